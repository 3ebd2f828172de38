"""Seeded assignment of assistance conditions.

The condition of a (reviewer, item) pair is a pure function of the experiment's seed, the
reviewer and the item: the same reviewer reopening the same item sees the same help, a restart
changes nothing, and the assignment cannot depend on anything the reviewer or the item's content
does (so conditions are comparable). Items are keyed by ``episode_id`` and ``slot``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from monitor.config import AssistExperimentConfig


def uniform(seed: int, *parts: object) -> float:
    """A deterministic number in [0, 1) from the seed and the parts (BLAKE2b, 53 bits)."""
    h = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return (int.from_bytes(h, "big") >> 11) / float(1 << 53)


def assign(seed: int, user_id: int, episode_id: str, slot: int, weights: Mapping[str, float]) -> str:
    """The condition for this reviewer and item, drawn with the given weights (sorted by name so
    the draw does not depend on the order the configuration lists them).

    >>> a = assign(7, 3, "ep-1", 0, {"none": 1.0, "rm_score": 1.0})
    >>> a in ("none", "rm_score"), a == assign(7, 3, "ep-1", 0, {"rm_score": 1.0, "none": 1.0})
    (True, True)
    >>> assign(7, 3, "ep-1", 0, {"none": 0.0, "rm_score": 1.0})
    'rm_score'
    """
    names = sorted(c for c, w in weights.items() if w > 0)
    if not names:
        raise ValueError("no condition has a positive weight")
    total = sum(weights[c] for c in names)
    u = uniform(seed, "assist", user_id, episode_id, slot) * total
    for c in names:
        u -= weights[c]
        if u < 0:
            return c
    return names[-1]


def condition_of(cfg: AssistExperimentConfig, user_id: int, episode_id: str, slot: int) -> str | None:
    """The condition shown to this reviewer for this item, or None when no experiment runs."""
    if not cfg.enabled:
        return None
    weights = {c: cfg.weights.get(c, 1.0) if cfg.weights else 1.0 for c in cfg.conditions}
    return assign(cfg.seed, user_id, episode_id, slot, weights)


def assistants_of(cfg: AssistExperimentConfig, condition: str | None) -> list[str]:
    """The assistants whose hints are shown under a condition (none without an experiment)."""
    if condition is None:
        return []
    return list(cfg.conditions.get(condition, []))
