"""Training pairs that keep what the gate protects: reviewed answers over copies made worse.

An update trains on a few hundred fresh ratings of the drifted stream. Those teach it the new
traffic, and nothing stops them from teaching it to forget what the active version could see: a
candidate trained on them alone preferred answers with an inserted off-topic sentence or an
unsupported claim (they are longer), and the gate's sensitivity rule refused it however much better
it ranked the new traffic (README, "In the closed loop"). So the update also trains on pairs in
which a reviewed answer is *chosen* over a copy of itself made worse in one named way
(``monitor.perturb``), a few per kind.

What keeps the gate honest about it:

* **Other sentences.** The kinds that insert a bundled sentence draw from the training bank
  (``phrases.TRAINING_BANK``), which shares no sentence with the probe bank the gate measures with.
  The gate then measures whether a sensitivity carries over to sentences the candidate never saw.
* **Other prompts.** The caller passes the prompts of the gate's probe set and of its held-out
  labels (``exclude_prompts``); no answer to one of them is perturbed for training.
* **Answers worth keeping.** Only answers rated at least the median of the records are perturbed: a
  copy of the worst-rated answer with a sentence cut off is not clearly worse than it.

They must not drown the ratings: with few labels, 40 pairs of each of eight kinds outnumbered the
ratings' pairs, and in ``tests/loop`` (a random-head start, 60 head epochs without early stopping)
the candidate's gain on the new held-out pairs fell from enough to promote to +0.045. So the caller
caps them at a share of the ratings' training pairs (``reward.update.perturbation_share``).

Deterministic: answers are visited in the order of a hash of (seed, prompt, answer), and each
perturbation's draws are keyed on the answer and the seed.

>>> answer = "The primary colours are:\\n\\n1. Red\\n2. Yellow\\n3. Blue\\n\\nThey mix into all others."
>>> records = [{"prompt": "Name three primary colours.", "response": answer, "rating": 5}]
>>> pairs = perturbation_pairs(records, per_kind=1, kinds=["drop_item", "off_topic"])
>>> [p["source"] for p in pairs]
['perturbation:drop_item', 'perturbation:off_topic']
>>> all(p["chosen"] == records[0]["response"] != p["rejected"] for p in pairs)
True
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from monitor.perturb import NAMES, make, make_seed_key
from monitor.perturb.phrases import TRAINING_BANK
from monitor.reward.data import Pair

SOURCE_PREFIX = "perturbation:"


def _order_key(seed: int, prompt: str, response: str) -> str:
    return hashlib.sha256(f"{seed}\x00{prompt}\x00{response}".encode()).hexdigest()


def answers_to_perturb(
    records: Iterable[Mapping[str, Any]], exclude_prompts: Collection[str], seed: int
) -> list[tuple[str, str]]:
    """Distinct (prompt, answer) rated at least the median rating, not answering an excluded
    prompt, in seeded hash order."""
    ratings: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.get("skipped") or r.get("rating") is None:
            continue
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str):
            continue
        ratings.setdefault((r["prompt"], r["response"]), []).append(float(r["rating"]))
    if not ratings:
        return []
    means = {k: statistics.fmean(v) for k, v in ratings.items()}
    median = statistics.median(means.values())
    kept = [k for k, m in means.items() if m >= median and k[0] not in exclude_prompts]
    return sorted(kept, key=lambda k: _order_key(seed, *k))


def perturbation_pairs(
    records: Iterable[Mapping[str, Any]],
    *,
    per_kind: int,
    seed: int = 0,
    exclude_prompts: Collection[str] = frozenset(),
    kinds: Sequence[str] = NAMES,
    max_total: int | None = None,
) -> list[Pair]:
    """Up to ``per_kind`` pairs of each kind: a rated answer (``prompt``, ``response``, ``rating``
    records, as ``pairs_from_ratings`` reads them) chosen over its copy made worse with the
    training bank. ``source`` names the kind (``perturbation:<kind>``). ``max_total`` caps them
    all, taken a kind at a time in turn so that every kind keeps its share."""
    if per_kind <= 0 or (max_total is not None and max_total <= 0):
        return []
    answers = answers_to_perturb(records, exclude_prompts, seed)
    per: list[list[Pair]] = [kind_pairs(kind, answers, per_kind, seed) for kind in kinds]
    out: list[Pair] = []
    for rank in range(per_kind):
        for pairs in per:
            if rank < len(pairs) and (max_total is None or len(out) < max_total):
                out.append(pairs[rank])
    # Back in the kinds' order (each kind's pairs in their own order), as without a cap.
    order = {kind: i for i, kind in enumerate(kinds)}
    return sorted(out, key=lambda p: order[str(p["source"])[len(SOURCE_PREFIX) :]])


def kind_pairs(kind: str, answers: Sequence[tuple[str, str]], per_kind: int, seed: int) -> list[Pair]:
    """Up to ``per_kind`` pairs of one kind, from ``answers`` in their order."""
    perturbation = make(kind, TRAINING_BANK)
    out: list[Pair] = []
    for prompt, response in answers:
        if len(out) >= per_kind:
            break
        item = perturbation.apply(prompt, response, make_seed_key(_order_key(seed, prompt, response), seed))
        if item is None or item.worse == item.better:
            continue
        out.append(
            {
                "prompt": prompt,
                "chosen": item.better,
                "rejected": item.worse,
                "group": prompt,
                "source": SOURCE_PREFIX + kind,
            }
        )
    return out


def kinds_of(pairs: Iterable[Pair]) -> dict[str, int]:
    """Perturbation pairs per kind (for the record of what an update trained on)."""
    out: dict[str, int] = {}
    for p in pairs:
        source = str(p.get("source", ""))
        if source.startswith(SOURCE_PREFIX):
            kind = source[len(SOURCE_PREFIX) :]
            out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))
