""" "Better" variants: a stronger known answer to the same prompt, or a perturbation undone.

A canary that is only ever worse teaches reviewers that a changed answer is a bad one. Better
variants balance it: the reviewer sees an answer that is known to be better than the one it
stands next to (or in place of).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from monitor.data import bundled_records
from monitor.perturb.base import Direction, Perturbed

#: The kind of a better variant made from a stronger known answer.
STRONGER = "stronger_answer"
DEMO_TRAFFIC = "demo-traffic.jsonl.gz"
HH_PAIRS = "hh-harmless-400.jsonl.gz"


@dataclass(frozen=True)
class KnownAnswer:
    """Another answer to the same prompt with a quality on a scale shared by its group (e.g. the
    AlpacaEval judge's preference probability, or 1 for HH-RLHF's chosen and 0 for its rejected)."""

    response: str
    quality: float
    source: str = ""


def better_variant(
    prompt: str,
    response: str,
    alternatives: Iterable[KnownAnswer],
    *,
    quality: float | None = None,
    min_margin: float = 0.0,
) -> Perturbed | None:
    """The best of ``alternatives`` as a "better" item next to ``response``, or None.

    With ``quality`` (the response's own, on the alternatives' scale) only an alternative better
    by more than ``min_margin`` qualifies; without it the caller vouches that every alternative is
    better. Alternatives that are empty, equal to the response or of non-finite quality are
    skipped; ties go to the first.
    """
    best: KnownAnswer | None = None
    for alt in alternatives:
        if not alt.response.strip() or alt.response.strip() == response.strip() or not math.isfinite(alt.quality):
            continue
        if quality is not None and (not math.isfinite(quality) or not alt.quality > quality + min_margin):
            continue
        if best is None or alt.quality > best.quality:
            best = alt
    if best is None:
        return None
    return Perturbed(
        kind=STRONGER,
        prompt=prompt,
        original=response,
        perturbed=best.response,
        direction="better",
        detail={"source": best.source, "quality_original": quality, "quality_better": best.quality},
    )


def undo(item: Perturbed) -> Perturbed:
    """The same pair the other way round: the real response as a "better" version of the
    perturbed one. Kind and detail are kept (``detail["undo"]`` is True), so per-kind statistics
    count it under its kind; do not pass an item and its undo to one sensitivity measurement,
    which would count the pair twice."""
    direction: Direction = "better" if item.direction == "worse" else "worse"
    detail = dict(item.detail)
    # Undoing an undo gives the item back exactly.
    if detail.pop("undo", False) is not True:
        detail["undo"] = True
    return Perturbed(
        kind=item.kind,
        prompt=item.prompt,
        original=item.perturbed,
        perturbed=item.original,
        direction=direction,
        detail=detail,
        seed_key=item.seed_key,
    )


def known_answers_from_episodes(
    records: Iterable[dict[str, Any]], key: str = "judge_pref"
) -> dict[str, list[KnownAnswer]]:
    """Answers grouped by prompt, from episode records whose ``metadata[key]`` is a number; the
    source is the episode's ``model``."""
    out: dict[str, list[KnownAnswer]] = {}
    for r in records:
        meta = r.get("metadata")
        prompt, response = r.get("prompt"), r.get("response")
        if not (isinstance(meta, dict) and isinstance(prompt, str) and isinstance(response, str)):
            continue
        q = meta.get(key)
        if isinstance(q, int | float) and not isinstance(q, bool) and math.isfinite(q):
            out.setdefault(prompt, []).append(KnownAnswer(response, float(q), str(r.get("model", ""))))
    return out


def known_answers_from_pairs(records: Iterable[dict[str, Any]]) -> dict[str, list[KnownAnswer]]:
    """``{"prompt", "chosen", "rejected"}`` pairs as answers of quality 1 (chosen) and 0 (rejected)."""
    out: dict[str, list[KnownAnswer]] = {}
    for r in records:
        prompt, chosen, rejected = r.get("prompt"), r.get("chosen"), r.get("rejected")
        if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
            src = str(r.get("source", "pair"))
            out.setdefault(prompt, []).extend(
                (KnownAnswer(chosen, 1.0, f"{src}:chosen"), KnownAnswer(rejected, 0.0, f"{src}:rejected"))
            )
    return out


def bundled_known_answers() -> dict[str, list[KnownAnswer]]:
    """Known answers in the bundled data (``monitor/data``): the three AlpacaEval answers to each
    demo-traffic instruction, with the judge's preference as quality, and the HH-RLHF pairs."""
    out = known_answers_from_episodes(bundled_records(DEMO_TRAFFIC))
    for prompt, answers in known_answers_from_pairs(bundled_records(HH_PAIRS)).items():
        out.setdefault(prompt, []).extend(answers)
    return out
