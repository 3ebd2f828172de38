"""Simulated event-time streams for the windowed detector, fed as per-minute sums (fast at any rate)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from detectors.windowed import WindowedShiftDetector

DAY = 86400.0
MONDAY = 4 * DAY  # 1970-01-05 00:00 UTC


def rate_at(t: float, rate: float) -> float:
    """Episodes/s: a daily cycle from 30% to 100% of ``rate``."""
    hour = (t % DAY) / 3600
    return rate * (0.3 + 0.35 * (1 + math.sin(2 * math.pi * (hour - 6) / 24)))


def rhythm_mean(t: float) -> float:
    """The signal's mean: constant within an hour, following the hour of day, higher on weekends."""
    hour = math.floor((t % DAY) / 3600)
    weekend = (math.floor(t / DAY) + 3) % 7 >= 5
    return 0.8 * math.sin(2 * math.pi * hour / 24) + (0.5 if weekend else 0.0)


def run(
    det: WindowedShiftDetector,
    rate: float,
    days: float,
    *,
    seed: int,
    mean: Callable[[float], float] = rhythm_mean,
    shift: float = 0.0,
    shift_at: float | None = None,
) -> list[tuple[float, dict[str, float]]]:
    """Feed ``days`` of a unit-variance normal signal; the (day, last_test) of every alarm."""
    rng = np.random.default_rng(seed)
    alarms = []
    for m in range(int(days * 1440)):
        t = MONDAY + m * 60.0
        n = int(rng.poisson(rate_at(t, rate) * 60))
        if n == 0:
            continue
        mu = mean(t) + (shift if shift_at is not None and t >= MONDAY + shift_at * DAY else 0.0)
        s = float(rng.normal(n * mu, math.sqrt(n)))
        ss = (float(rng.chisquare(n - 1)) if n > 1 else 0.0) + s * s / n  # sum of squares of n N(mu, 1)
        if det.add_sums(t, n, s, ss):
            assert det.last_test is not None
            alarms.append(((t - MONDAY) / DAY, dict(det.last_test)))
    return alarms
