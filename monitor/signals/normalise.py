"""Put every scalar signal on one null distribution before a detector sees it.

Text statistics are skewed, bounded, or mostly zero (``non_text_ratio``), so a detector
calibrated on a Gaussian null would raise false alarms at rates far from its ERT. Two
transforms fix that without per-stream calibration runs:

* **Continuous signals: normal scores.** ``z = Phi^-1(F_ref(x))`` with the reference's
  empirical CDF (mid-ranks for ties, ``(r + 1/2) / (n + 1)`` so no value maps to infinity).
  Under no drift ``z`` is close to standard normal whatever the signal's shape, so a
  detector calibrated once per process on the Gaussian null keeps its ERT on every stream
  and signal. Values outside the reference's range continue linearly in units of the
  reference's standard deviation, clipped at ``+-clip``: a run of far-out values (a
  degenerate model) still moves the statistic quickly, but one outlier cannot fire alone.
* **Continuous signals with a point mass** (``non_text_ratio`` is mostly zero): normal scores
  are discrete, so detectors are calibrated on the bootstrap of the transformed reference, with
  the values a bootstrap never draws added back: new values beyond the reference's range, at a
  conservative bound of their chance and at the clipped score (:func:`tail_augmented_reference`).
  Without them, a reference that happened to see a short tail made every later out-of-range
  value look like evidence (a false alarm on stationary gpt-3.5 traffic in ``bench/drift.py``).
* **Binary signals: a conservative reference.** The rate of a rare event (refusals, empty
  responses) estimated from a few hundred episodes is noisy; a detector calibrated on that
  estimate fires whenever the true rate is a little higher. The detector is calibrated on
  a synthetic 0/1 reference at the upper 97.5% Beta bound of the rate instead.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import NDArray

_N = NormalDist()
FloatArray = NDArray[np.float64]


@dataclass
class NormalScores:
    """Normal-score transform against a reference sample (picklable; part of detector state)."""

    sorted_ref: list[float]
    scale: float
    clip: float
    # Phi^-1 of every mid-rank (2n + 1 of them), built at the first call: one list index per value
    # instead of inv_cdf on the ingest path. Not pickled (rebuilt), absent from older pickles.
    _scores: list[float] | None = field(default=None, init=False, repr=False, compare=False)
    # The reference and that table as arrays, for :meth:`many` (a batch's values at once). Not pickled.
    _table: tuple[FloatArray, FloatArray] | None = field(default=None, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_scores", "_table")}

    @classmethod
    def fit(cls, ref: list[float], clip: float = 5.0) -> NormalScores:
        s = sorted(float(x) for x in ref)
        n = len(s)
        mean = sum(s) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in s) / max(1, n - 1))
        return cls(s, sd if sd > 0 else 1.0, clip)

    def to_dict(self) -> dict[str, Any]:
        return {"sorted_ref": self.sorted_ref, "scale": self.scale, "clip": self.clip}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormalScores:
        return cls([float(x) for x in d["sorted_ref"]], float(d["scale"]), float(d["clip"]))

    def __call__(self, x: float) -> float:
        s, n = self.sorted_ref, len(self.sorted_ref)
        lo, hi = s[0], s[-1]
        if x < lo:
            return max(_N.inv_cdf(0.5 / (n + 1)) - (lo - x) / self.scale, -self.clip)
        if x > hi:
            return min(_N.inv_cdf(1 - 0.5 / (n + 1)) + (x - hi) / self.scale, self.clip)
        scores = self._scores
        if scores is None:
            # (twice the mid-rank) / 2 + 0.5: the same float operations as on the rank itself.
            scores = self._scores = [_N.inv_cdf((i / 2 + 0.5) / (n + 1)) for i in range(2 * n + 1)]
        return scores[bisect.bisect_left(s, x) + bisect.bisect_right(s, x)]

    def many(self, xs: Sequence[float]) -> FloatArray:
        """:meth:`__call__` of every value, in one numpy pass: the same table and the same float
        operations, so the same scores to the bit.

        >>> t = NormalScores.fit([1.0, 2.0, 3.0, 4.0])
        >>> xs = [0.0, 1.0, 2.5, 2.5, 4.0, 9.0]
        >>> t.many(xs).tolist() == [t(x) for x in xs]
        True
        """
        s, n = self.sorted_ref, len(self.sorted_ref)
        if self._scores is None:
            self(s[0])  # builds the table
        table = self._table
        if table is None or len(table[0]) != n:
            table = self._table = (np.asarray(s, dtype=np.float64), np.asarray(self._scores, dtype=np.float64))
        ref, scores = table
        v = np.asarray(xs, dtype=np.float64)
        out: FloatArray = scores[np.searchsorted(ref, v, "left") + np.searchsorted(ref, v, "right")]
        lo, hi = s[0], s[-1]
        below, above = v < lo, v > hi
        if below.any():
            out[below] = np.maximum(_N.inv_cdf(0.5 / (n + 1)) - (lo - v[below]) / self.scale, -self.clip)
        if above.any():
            out[above] = np.minimum(_N.inv_cdf(1 - 0.5 / (n + 1)) + (v[above] - hi) / self.scale, self.clip)
        return out


def has_point_mass(ref: list[float], share: float = 0.1) -> bool:
    """Whether one value holds more than ``share`` of the reference (e.g. a mostly-zero ratio).

    Such a signal's normal scores are discrete, not Gaussian. Duplicates of a few values (the
    same answer served twice) are not a point mass: their normal scores stay close to Gaussian."""
    return bool(ref) and Counter(ref).most_common(1)[0][1] > share * len(ref)


def tail_augmented_reference(z_ref: list[float], raw: list[float], clip: float, quantile: float = 0.975) -> list[float]:
    """The transformed reference plus the values it cannot show: new values beyond its range.

    A bootstrap of the reference never leaves its range, but new traffic does: the chance that a
    new value exceeds the largest of ``n`` exchangeable reference values is Beta(1, n)-distributed
    given the reference (mean ``1/(n+1)``). Each side whose extreme is a single value (not a point
    mass such as the zeros of a ratio) gets draws at the clipped score (the transform's worst case)
    at the upper ``quantile`` bound of that chance (about 3.7/n at 97.5%), so a detector calibrated
    on the result keeps its ERT when an unlucky reference has a short tail."""
    n = len(raw)
    if n == 0:
        return list(z_ref)
    p = 1.0 - math.pow(1.0 - quantile, 1.0 / n)
    # Enough copies of the reference that the tail share is represented in whole draws.
    reps = max(1, math.ceil(1.0 / (p * n)))
    extra = round(p * n * reps)
    lo, hi = min(raw), max(raw)
    out = list(z_ref) * reps
    if raw.count(hi) == 1:
        out += [clip] * extra
    if raw.count(lo) == 1:
        out += [-clip] * extra
    return out


def conservative_binary_reference(ref: list[float], size: int = 4000, quantile: float = 0.975) -> list[float]:
    """A 0/1 sample whose rate is the upper ``quantile`` Beta bound of the reference's rate."""
    from scipy.stats import beta

    n = len(ref)
    k = sum(1 for x in ref if x >= 0.5)
    p = float(beta.ppf(quantile, k + 1, n - k + 1))
    ones = max(1, min(size - 1, round(p * size)))
    return [1.0] * ones + [0.0] * (size - ones)


def describe(t: Any) -> dict[str, Any]:
    if isinstance(t, NormalScores):
        return {"transform": "normal_scores", "reference_size": len(t.sorted_ref), "clip": t.clip}
    return {"transform": "none"}
