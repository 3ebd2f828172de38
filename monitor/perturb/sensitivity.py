"""How often a scorer (a reward model, or anything that scores (prompt, response) texts) ranks
the worse version of a perturbed pair lower: its sensitivity per perturbation kind."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from monitor.perturb.base import Perturbed
from sampling.estimator import bounded_interval

#: Scores a batch of (prompt, response) pairs; higher is better. Returns one score per pair.
ScoreFn = Callable[[Sequence[tuple[str, str]]], Sequence[float]]


@dataclass(frozen=True)
class Sensitivity:
    """Of ``n`` pairs of one kind, ``detected`` had the worse version scored strictly lower;
    ``rate`` = detected / n with a Wilson score interval at ``confidence``."""

    kind: str
    n: int
    detected: int
    rate: float
    ci_low: float
    ci_high: float
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _wilson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson's score interval for k of n: the project's bounded interval on 0/1 values with equal
    weights is exactly that (it stays valid at k = 0 and k = n, where a normal interval collapses)."""
    p = k / n
    return bounded_interval(p, p * (1.0 - p), 0.0, n, (0.0, 1.0), confidence)


def sensitivity(
    score_fn: ScoreFn,
    items: Iterable[Perturbed],
    confidence: float = 0.95,
    batch_size: int = 64,
) -> dict[str, Sensitivity]:
    """Per kind: the fraction of items whose worse version scores strictly lower than the better.

    A tie counts as *not detected*: a scorer that cannot tell the two apart has not noticed the
    perturbation. Each distinct (prompt, response) text is scored once (an original shared by
    several kinds costs one score), in batches of ``batch_size``. A score that is not a finite
    number, or a batch of the wrong length, is a broken scorer: ValueError, rather than a
    sensitivity number that would look real.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    pairs = [(it.kind, (it.prompt, it.worse), (it.prompt, it.better)) for it in items]
    texts = list(dict.fromkeys(t for _, w, b in pairs for t in (w, b)))
    scores = _score_all(score_fn, texts, batch_size)
    counts: dict[str, list[int]] = {}
    for kind, worse, better in pairs:
        c = counts.setdefault(kind, [0, 0])
        c[0] += 1
        c[1] += scores[worse] < scores[better]
    out: dict[str, Sensitivity] = {}
    for kind, (n, k) in sorted(counts.items()):
        lo, hi = _wilson(k, n, confidence)
        out[kind] = Sensitivity(kind, n, k, k / n, lo, hi, confidence)
    return out


def _score_all(score_fn: ScoreFn, texts: list[tuple[str, str]], batch_size: int) -> dict[tuple[str, str], float]:
    scores: dict[tuple[str, str], float] = {}
    for i in range(0, len(texts), batch_size):
        batch = texts[i : i + batch_size]
        got = list(score_fn(batch))
        if len(got) != len(batch):
            raise ValueError(f"score_fn returned {len(got)} scores for {len(batch)} texts")
        for t, raw in zip(batch, got, strict=True):
            s = float(raw)
            if not math.isfinite(s):
                raise ValueError(f"score_fn returned a non-finite score ({s!r})")
            scores[t] = s
    return scores
