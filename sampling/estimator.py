"""Horvitz-Thompson estimation over all traffic from sampled items.

Each sampled item carries its inclusion probability ``pi``. Sampling is
Poisson (each episode is included independently), so the HT total
``sum(y / pi)`` is unbiased and ``sum((1 - pi) * y**2 / pi**2)`` is an
unbiased estimate of its variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a normal-approximation confidence interval."""

    mean: float
    total: float
    se: float
    ci_low: float
    ci_high: float
    confidence: float
    n_sampled: int
    population: float
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def horvitz_thompson(
    values: Sequence[float],
    probabilities: Sequence[float],
    population: float | None = None,
    confidence: float = 0.95,
) -> Estimate:
    """Estimate the mean (and total) of ``y`` over every episode in a population.

    ``values[i]`` is the quantity on sampled item ``i`` and ``probabilities[i]``
    the inclusion probability it was sampled with. When ``population`` (the
    number of episodes in the stream and window, all traffic) is known the
    mean is the HT mean ``total / N``; otherwise the Hajek ratio estimator
    ``total / sum(1/pi)`` with its linearised variance is used.
    """
    if len(values) != len(probabilities):
        raise ValueError("values and probabilities must have the same length")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    for p in probabilities:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"inclusion probability {p!r} is not in (0, 1]")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    n = len(values)
    total = math.fsum(y / p for y, p in zip(values, probabilities, strict=True))
    var_total = math.fsum((1.0 - p) * y * y / (p * p) for y, p in zip(values, probabilities, strict=True))
    if n == 0:
        # With nothing sampled the HT total is 0 with variance 0, a confident
        # wrong answer; say "unknown" instead.
        nan = float("nan")
        return Estimate(nan, nan, nan, nan, nan, confidence, 0, float(population or 0.0), "none")
    if population is not None:
        if population <= 0:
            raise ValueError("population must be positive")
        mean = total / population
        se = math.sqrt(var_total) / population
        method = "horvitz-thompson"
        pop = float(population)
    else:
        pop = math.fsum(1.0 / p for p in probabilities)
        mean = total / pop
        resid = [(y - mean) for y in values]
        var_mean = math.fsum((1.0 - p) * r * r / (p * p) for r, p in zip(resid, probabilities, strict=True)) / (
            pop * pop
        )
        se = math.sqrt(var_mean)
        method = "hajek"
    return Estimate(
        mean=mean,
        total=total,
        se=se,
        ci_low=mean - z * se,
        ci_high=mean + z * se,
        confidence=confidence,
        n_sampled=n,
        population=pop,
        method=method,
    )
