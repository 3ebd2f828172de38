"""Isotonic calibration of a remote scorer on fresh human labels (the update of a kind we cannot train).

A judge's raw score (an expected 1-10, a logit from a JSON endpoint) is mapped onto the reviewers'
rating scale by the non-decreasing function closest to the labels in least squares: isotonic
regression, fitted here with the pool-adjacent-violators algorithm (PAVA) in numpy (no
scikit-learn in the install). Ties in the raw score are pooled first (one block per distinct raw
value, weighted by its count), so the fit does not depend on the order of tied items.

The map is stored as knots: each final block's weighted mean raw score and its fitted value,
joined by straight lines and flat outside the first and last knot. Between knots it is strictly
increasing, so it keeps the raw order there; beyond the ends (and inside a pooled block's span)
items tie. A monotone map cannot order two responses better than the raw score did: what it
buys is scores on the reviewers' scale (comparable across versions, streams and the drift
feed). The gate still decides on agreement, with ties counted half.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from monitor.reward.kinds.base import Item, Score, ScoringBackend
from monitor.reward.kinds.config import CalibrationMap


def pava(y: Sequence[float] | np.ndarray, w: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in weighted least squares (``y`` in the order
    of the raw score). One pass with a stack of blocks: O(n)."""
    ys = np.asarray(y, dtype=float)
    ws = np.ones_like(ys) if w is None else np.asarray(w, dtype=float)
    if ys.shape != ws.shape or ys.ndim != 1:
        raise ValueError("y and w must be one-dimensional and of the same length")
    if np.any(ws <= 0) or not np.all(np.isfinite(ys)):
        raise ValueError("weights must be positive and values finite")
    means: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for v, wt in zip(ys.tolist(), ws.tolist(), strict=True):
        means.append(v)
        weights.append(wt)
        sizes.append(1)
        # Merge while the last block is below the one before it (a violation of monotonicity).
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, s2 = means.pop(), weights.pop(), sizes.pop()
            m1, w1 = means[-1], weights[-1]
            means[-1] = (m1 * w1 + m2 * w2) / (w1 + w2)
            weights[-1] = w1 + w2
            sizes[-1] += s2
    return np.repeat(np.asarray(means), np.asarray(sizes, dtype=np.int64))


def fit_isotonic(raw: Sequence[float], target: Sequence[float]) -> CalibrationMap:
    """The calibration map of raw scores onto targets (ratings). Raises ValueError on fewer than
    two distinct raw scores (nothing to order) or non-finite input."""
    x = np.asarray(raw, dtype=float)
    y = np.asarray(target, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError("raw scores and targets must be two lists of the same, non-zero length")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("raw scores and targets must be finite")
    ux, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    if len(ux) < 2:
        raise ValueError("all raw scores are equal: no order to calibrate")
    means = np.bincount(inverse, weights=y) / counts
    fitted = pava(means, counts)
    # One knot per final block: its weighted mean raw score and its (constant) fitted value.
    knots_x: list[float] = []
    knots_y: list[float] = []
    start = 0
    for end in range(1, len(ux) + 1):
        if end == len(ux) or fitted[end] != fitted[start]:
            wt = counts[start:end]
            knots_x.append(float(np.average(ux[start:end], weights=wt)))
            knots_y.append(float(fitted[start]))
            start = end
    return CalibrationMap(x=knots_x, y=knots_y, labels=len(x))


def apply(cal: CalibrationMap, raw: Sequence[float]) -> np.ndarray:
    """Calibrated values: linear between knots, flat outside them."""
    return np.asarray(np.interp(np.asarray(raw, dtype=float), np.asarray(cal.x), np.asarray(cal.y)), dtype=float)


class Calibrated:
    """A remote backend whose scores pass through a calibration map (a version's ``calibration``).
    Failed items stay failed; everything else (kind, remoteness, version, metrics) is the inner
    backend's."""

    def __init__(self, inner: ScoringBackend, cal: CalibrationMap):
        self.inner = inner
        self.calibration = cal
        self.kind = inner.kind
        self.remote = inner.remote

    @property
    def version(self) -> str | None:
        return self.inner.version

    def score(self, items: Sequence[Item]) -> list[Score]:
        scores = self.inner.score(items)
        ok = [i for i, s in enumerate(scores) if s.ok]
        mapped = apply(self.calibration, [float(scores[i].value or 0.0) for i in ok]).tolist() if ok else []
        out = list(scores)
        for i, v in zip(ok, mapped, strict=True):
            s = scores[i]
            out[i] = Score(float(v), truncated=s.truncated, tokens=s.tokens)
        return out

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # The inner backend's own handles (its HTTP client, its configuration) for tests and benches.
        return getattr(self.inner, name)
