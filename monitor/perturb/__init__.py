"""Targeted perturbations: make a real response worse (or better) in one named, checkable way, to
measure how often reviewers and the reward model notice.

A perturbation has a small contract (:class:`Perturbation`): ``kind``, a cheap ``applies(prompt,
response)`` and ``apply(prompt, response, seed_key) -> Perturbed | None``, deterministic in its
arguments and never raising. The eight rule-based kinds (:data:`NAMES`, see
``monitor/perturb/kinds.py`` for each one's checkable property) need no model.

>>> from monitor.perturb import NAMES, choose, make, make_seed_key
>>> prompt = "List three primary colours."
>>> response = "The primary colours are:\\n\\n1. Red\\n2. Yellow\\n3. Blue\\n\\nThey mix into all others."
>>> item = make("drop_item").apply(prompt, response, make_seed_key("episode-1", seed=0))
>>> item.kind, item.direction, item.detail["items"]
('drop_item', 'worse', 3)
>>> item.perturbed.count("\\n2. "), "3. " in item.perturbed   # one item gone, renumbered
(1, False)
>>> make("break_code").applies(prompt, response)   # no code block
False
>>> choose(prompt, response, make_seed_key("episode-1")) == choose(prompt, response, make_seed_key("episode-1"))
True

Better variants (:func:`better_variant`, :func:`undo`) and the sensitivity of a scorer per kind
(:func:`sensitivity`):

>>> pair = undo(item)
>>> pair.direction, pair.perturbed == response
('better', True)
>>> def by_length(texts):   # a stand-in scorer: longer is better
...     return [len(r) for _, r in texts]
>>> sensitivity(by_length, [item])["drop_item"].detected
1
"""

from monitor.perturb.base import (
    DIRECTIONS,
    MAX_CHARS,
    MAX_PROMPT_CHARS,
    Direction,
    Perturbation,
    Perturbed,
    chars_changed,
    make_seed_key,
)
from monitor.perturb.better import (
    STRONGER,
    KnownAnswer,
    better_variant,
    bundled_known_answers,
    known_answers_from_episodes,
    known_answers_from_pairs,
    undo,
)
from monitor.perturb.kinds import is_refusal, looks_harmful
from monitor.perturb.registry import NAMES, all_perturbations, applicable, choose, make
from monitor.perturb.sensitivity import ScoreFn, Sensitivity, sensitivity

__all__ = [
    "DIRECTIONS",
    "MAX_CHARS",
    "MAX_PROMPT_CHARS",
    "NAMES",
    "STRONGER",
    "Direction",
    "KnownAnswer",
    "Perturbation",
    "Perturbed",
    "ScoreFn",
    "Sensitivity",
    "all_perturbations",
    "applicable",
    "better_variant",
    "bundled_known_answers",
    "chars_changed",
    "choose",
    "is_refusal",
    "known_answers_from_episodes",
    "known_answers_from_pairs",
    "looks_harmful",
    "make",
    "make_seed_key",
    "sensitivity",
    "undo",
]
