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
) -> list[Pair]:
    """Up to ``per_kind`` pairs of each kind: a rated answer (``prompt``, ``response``, ``rating``
    records, as ``pairs_from_ratings`` reads them) chosen over its copy made worse with the
    training bank. ``source`` names the kind (``perturbation:<kind>``)."""
    if per_kind <= 0:
        return []
    answers = answers_to_perturb(records, exclude_prompts, seed)
    out: list[Pair] = []
    for kind in kinds:
        perturbation = make(kind, TRAINING_BANK)
        got = 0
        for prompt, response in answers:
            if got >= per_kind:
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
            got += 1
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
