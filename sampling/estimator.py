"""Horvitz-Thompson estimation over all traffic from sampled items.

Each sampled item carries its inclusion probability ``pi``. Sampling is
Poisson (each episode is included independently), so the HT total
``sum(y / pi)`` is unbiased and ``sum((1 - pi) * y**2 / pi**2)`` is an
unbiased estimate of its variance.

Intervals. An unbounded quantity (a length) gets the normal interval
``mean +- z * se``. A quantity on a known range (a rate: 0/1; a rating on a
fixed scale) gets :func:`bounded_interval`, a score interval that stays inside
the range and does not collapse to a point when every observed value is the
same: with 0 events in 30 labels the rate is not known to be 0, only to be
below about 11%.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its confidence interval.

    ``interval`` names how the interval was made: ``"normal"`` (``mean +- z * se``) or ``"score"``
    (:func:`bounded_interval`, for a quantity with known bounds). ``n_effective`` is Kish's
    effective sample size ``(sum w)**2 / sum w**2`` with ``w = 1 / pi``: the number of equally
    weighted items that would carry as much information as the unequally weighted sample.
    """

    mean: float
    total: float
    se: float
    ci_low: float
    ci_high: float
    confidence: float
    n_sampled: int
    population: float
    method: str
    interval: str = "normal"
    n_effective: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _lower_score_bound(p: float, s2: float, n: float, excess: float, z: float) -> float:
    """Smallest ``theta <= p`` with ``(p - theta)**2 <= z**2 * (V(theta) / n + excess)`` on [0, 1].

    ``V(theta) = (theta / p) * s2 + theta * (p - theta)`` is the variance of the sample's
    distribution after the least favourable change that moves its mean down to ``theta``: a share
    ``1 - theta / p`` of it moved to 0, the bound it has not been seen near. For 0/1 data
    (``s2 = p * (1 - p)``) it is the binomial ``theta * (1 - theta)`` and the bound is Wilson's.
    """
    if p <= 0.0:
        return 0.0
    z2 = z * z
    a = n + z2
    b = 2.0 * n * p + z2 * s2 / p + z2 * p
    c = n * p * p - z2 * n * excess
    if c <= 0.0:
        return 0.0
    disc = max(b * b - 4.0 * a * c, 0.0)
    # The smaller root in the form that does not cancel.
    return max(0.0, 2.0 * c / (b + math.sqrt(disc)))


def bounded_interval(
    mean: float,
    variance: float,
    design_variance: float,
    n_effective: float,
    bounds: tuple[float, float],
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Confidence interval for the mean of a quantity known to lie in ``bounds = (lo, hi)``.

    ``mean`` is the weighted (Hajek) mean, ``variance`` the weighted variance of the values
    around it, ``design_variance`` the design-based variance of the mean (Poisson sampling,
    linearised) and ``n_effective`` Kish's effective sample size.

    Method: a score interval, the set of means ``theta`` that the estimate is within ``z``
    standard errors of when the standard error is computed *at theta*, not at the estimate.
    Values are rescaled to [0, 1]. Below the estimate ``p`` the variance at ``theta`` is that of
    the sample's distribution with a share ``1 - theta / p`` of it moved to the lower bound
    (the least favourable way for the mean to be ``theta``: mass where nothing was seen),
    ``V(theta) = (theta / p) * s2 + theta * (p - theta)``; above it, the mirror image. For 0/1
    values this is the binomial variance, and with equal weights the interval is exactly
    Wilson's score interval (Wilson 1927), with ``n`` replaced by Kish's effective sample size for
    unequal inclusion probabilities. Where the design-based variance of the mean is larger than
    ``s2 / n_effective`` (values correlated with the weights), the difference is added to the
    variance at every ``theta``. The interval always contains the estimate, never leaves
    ``bounds``, and does not collapse to a point when every value is the same (the normal
    interval gives ``[0, 0]`` for 0 events in 30, which claims a certainty nobody has).

    Measured coverage of the 95% interval (``tests/test_estimator.py``, Poisson sampling with
    probabilities varying 10x, 30 to 300 items): at least nominal within Monte-Carlo error at
    true rates from 0.001 to 0.99 and for ratings piled up at either end of a 1-7 scale, where
    the normal interval covered as little as 2%.

    >>> lo, hi = bounded_interval(0.0, 0.0, 0.0, 30, (0.0, 1.0))  # 0 events in 30 labels
    >>> (round(lo, 4), round(hi, 4))
    (0.0, 0.1135)
    >>> lo, hi = bounded_interval(7.0, 0.0, 0.0, 30, (1.0, 7.0))  # 30 ratings, all 7 of 7
    >>> (round(lo, 2), hi)
    (6.32, 7.0)
    """
    lo_b, hi_b = bounds
    if not (math.isfinite(lo_b) and math.isfinite(hi_b) and lo_b < hi_b):
        raise ValueError(f"bounds {bounds!r} are not a finite range lo < hi")
    if not n_effective > 0.0:
        raise ValueError("n_effective must be positive")
    z = _z(confidence)
    span = hi_b - lo_b
    p = min(1.0, max(0.0, (mean - lo_b) / span))
    # No distribution on [0, 1] with mean p has a variance above p * (1 - p); rounding may say so.
    s2 = min(max(variance, 0.0) / span**2, p * (1.0 - p))
    excess = max(0.0, max(design_variance, 0.0) / span**2 - s2 / n_effective)
    low = _lower_score_bound(p, s2, n_effective, excess, z)
    high = 1.0 - _lower_score_bound(1.0 - p, s2, n_effective, excess, z)
    return lo_b + span * low, lo_b + span * high


def _check(values: Sequence[float], probabilities: Sequence[float], bounds: tuple[float, float] | None) -> None:
    if len(values) != len(probabilities):
        raise ValueError("values and probabilities must have the same length")
    for p in probabilities:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"inclusion probability {p!r} is not in (0, 1]")
    if bounds is not None:
        lo, hi = bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds {bounds!r} are not a finite range lo < hi")
        for y in values:
            if not lo <= y <= hi:
                raise ValueError(f"value {y!r} is outside the declared bounds [{lo}, {hi}]")


def _scale(values: Sequence[float], weights: Sequence[float]) -> float:
    """1, or a power of two near the largest ``|y|`` when ``(y / pi)**2`` could overflow."""
    top = max((abs(y) for y in values), default=0.0)
    if top == 0.0 or top * max(weights) < 1e150:
        return 1.0
    return math.ldexp(1.0, math.frexp(top)[1] - 1)  # 2**1024 itself is beyond the double range


def _rescaled(est: Estimate, scale: float) -> Estimate:
    """An estimate of scaled values, in the values' own units (a total beyond the double range is inf)."""
    return replace(
        est,
        mean=est.mean * scale,
        total=est.total * scale,
        se=est.se * scale,
        ci_low=est.ci_low * scale,
        ci_high=est.ci_high * scale,
    )


def _ht_total_variance(values: Sequence[float], probabilities: Sequence[float], weights: list[float]) -> float:
    """Unbiased variance estimate of the HT total under Poisson sampling: ``sum((1 - pi) y**2 / pi**2)``."""
    return math.fsum((1.0 - p) * y * y * w * w for y, p, w in zip(values, probabilities, weights, strict=True))


def _hajek(values: Sequence[float], probabilities: Sequence[float], weights: list[float]) -> tuple[float, float, float]:
    """The ratio mean ``sum(w y) / sum(w)``, its linearised design variance under Poisson
    sampling, and the weighted variance of the values around it."""
    sum_w = math.fsum(weights)
    mean = math.fsum(y * w for y, w in zip(values, weights, strict=True)) / sum_w
    resid = [y - mean for y in values]
    design = math.fsum((1.0 - p) * r * r * w * w for r, p, w in zip(resid, probabilities, weights, strict=True))
    spread = math.fsum(w * r * r for r, w in zip(resid, weights, strict=True)) / sum_w
    return mean, design / (sum_w * sum_w), spread


def horvitz_thompson(
    values: Sequence[float],
    probabilities: Sequence[float],
    population: float | None = None,
    confidence: float = 0.95,
    bounds: tuple[float, float] | None = None,
) -> Estimate:
    """Estimate the mean (and total) of ``y`` over every episode in a population.

    ``values[i]`` is the quantity on sampled item ``i`` and ``probabilities[i]``
    the inclusion probability it was sampled with. When ``population`` (the
    number of episodes in the stream and window, all traffic) is known the
    mean is the HT mean ``total / N``; otherwise the Hajek ratio estimator
    ``total / sum(1/pi)`` with its linearised variance is used.

    ``bounds=(lo, hi)`` declares that every value lies in that range (a rate: ``(0, 1)``; a
    rating on a 1-7 scale: ``(1, 7)``). Then the interval is :func:`bounded_interval` and the
    mean is the Hajek ratio even when the population is known: the HT mean of a rate carries
    the whole sampling noise of ``sum(1/pi)``, which does not shrink at the bounds (simulated at
    a true rate of 97%, 30 to 300 items, probabilities varying 10x: intervals 2.6 to 3.6 times as
    wide as the ratio's, and estimates above 100%). The total is then ``mean * N``.

    Response lengths of three sampled episodes, sampled with probabilities 0.5, 0.1 and 0.1, in a
    stream of 40 episodes: each stands for ``1 / pi`` episodes.

    >>> est = horvitz_thompson([120.0, 300.0, 80.0], [0.5, 0.1, 0.1], population=40)
    >>> est.method, est.total, est.mean
    ('horvitz-thompson', 4040.0, 101.0)

    One item gives an estimate but no interval (its variance cannot be estimated from it):

    >>> one = horvitz_thompson([42.0], [0.01])
    >>> one.mean, math.isnan(one.ci_low) and math.isnan(one.ci_high)
    (42.0, True)

    A rate (flags, 0/1) has known bounds, and its interval stays inside them:

    >>> rate = horvitz_thompson([0.0, 1.0, 0.0, 0.0], [0.5, 0.1, 0.1, 0.2], bounds=(0.0, 1.0))
    >>> rate.method, rate.interval, round(rate.mean, 3), (round(rate.ci_low, 3), round(rate.ci_high, 3))
    ('hajek', 'score', 0.37, (0.077, 0.805))
    """
    _check(values, probabilities, bounds)
    z = _z(confidence)
    n = len(values)
    if n == 0:
        # With nothing sampled the HT total is 0 with variance 0, a confident
        # wrong answer; say "unknown" instead.
        nan = float("nan")
        return Estimate(nan, nan, nan, nan, nan, confidence, 0, float(population or 0.0), "none")
    if population is not None and population <= 0:
        raise ValueError("population must be positive")
    weights = [1.0 / p for p in probabilities]
    scale = _scale(values, weights)
    if scale != 1.0:
        # Values near the double range (a producer's 1e308 in metadata) overflow y / pi and y**2:
        # "-inf + inf in fsum" stopped the whole estimate. Scaled by a power of two, which is exact.
        small = [y / scale for y in values]
        box = None if bounds is None else (bounds[0] / scale, bounds[1] / scale)
        return _rescaled(horvitz_thompson(small, probabilities, population, confidence, box), scale)
    n_eff = math.fsum(weights) ** 2 / math.fsum(w * w for w in weights)
    total = math.fsum(y * w for y, w in zip(values, weights, strict=True))
    # One item estimates no variance: its normal interval was a point ([42, 42] from one sampled 42),
    # certainty where there is none. Unknown instead (a bounded quantity's score interval stays), unless
    # it was certain to be sampled (a census is exact).
    nan = float("nan")
    varies = n > 1 or all(p >= 1.0 for p in probabilities)
    if bounds is None and population is not None:
        mean = total / population
        se = math.sqrt(_ht_total_variance(values, probabilities, weights)) / population if varies else nan
        lo, hi = mean - z * se, mean + z * se
        return Estimate(mean, total, se, lo, hi, confidence, n, float(population), "horvitz-thompson", "normal", n_eff)
    mean, var_mean, variance = _hajek(values, probabilities, weights)
    se = math.sqrt(var_mean)
    sum_w = math.fsum(weights)
    pop = sum_w if population is None else float(population)
    if bounds is None:
        se = se if varies else nan
        return Estimate(mean, total, se, mean - z * se, mean + z * se, confidence, n, pop, "hajek", "normal", n_eff)
    est = bounded_hajek(WeightedSums(n, sum_w, n_eff, total, var_mean, variance), bounds, confidence)
    return est if population is None else replace(est, total=est.mean * population, population=float(population))


@dataclass(frozen=True)
class WeightedSums:
    """What a bounded Hajek estimate needs of its ``n`` items, ``w = 1 / pi``: ``sum_w``, Kish's
    ``n_effective``, the weighted ``total = sum(w y)``, the linearised design variance of the mean
    ``design = sum((1 - pi) w**2 (y - mean)**2) / sum_w**2`` and the weighted variance
    ``spread = sum(w (y - mean)**2) / sum_w``. A database can add these up itself
    (``monitor.quality.aggregate``), so an estimate over millions of items never holds them."""

    n: int
    sum_w: float
    n_effective: float
    total: float
    design: float
    spread: float


def bounded_hajek(sums: WeightedSums, bounds: tuple[float, float], confidence: float = 0.95) -> Estimate:
    """The Hajek mean of a quantity in ``bounds`` and its score interval, from its sums: what
    :func:`horvitz_thompson` with ``bounds`` and no population returns for the same items.

    >>> est = bounded_hajek(WeightedSums(4, 19.0, 3.0, 10.0, 0.04, 0.2), (0.0, 1.0))
    >>> round(est.mean, 3), (round(est.ci_low, 3), round(est.ci_high, 3)), est.interval
    (0.526, (0.148, 0.876), 'score')
    """
    if sums.n == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, nan, nan, confidence, 0, 0.0, "none")
    mean = sums.total / sums.sum_w
    mean = min(bounds[1], max(bounds[0], mean))  # a weighted mean of values in range is in range; rounding aside
    var_mean = max(sums.design, 0.0)
    ci_low, ci_high = bounded_interval(mean, sums.spread, var_mean, sums.n_effective, bounds, confidence)
    se = math.sqrt(var_mean)
    return Estimate(
        mean, sums.total, se, ci_low, ci_high, confidence, sums.n, sums.sum_w, "hajek", "score", sums.n_effective
    )
