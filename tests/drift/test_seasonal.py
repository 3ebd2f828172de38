"""Seasonal references: a daily and weekly rhythm is not drift; an abrupt change inside it is; shifts
below the minimum of interest never alarm at volume; larger ones are found sooner at higher volume."""

from __future__ import annotations

import math

import numpy as np
import pytest
from streams import DAY, MONDAY, run

from detectors.windowed import WindowedShiftDetector


def test_daily_and_weekly_rhythm_gives_no_alarm() -> None:
    """Mean and rate follow the hour of day (a 1.6 SD swing) and the weekend (0.5 SD): 15 days, none."""
    assert run(WindowedShiftDetector(), 100.0, 15, seed=1) == []


def test_an_abrupt_change_inside_the_rhythm_alarms_within_30_minutes() -> None:
    shift_at = 9 + 14 / 24 + 10 / 1440  # a weekday afternoon, 14:10: a 5-minute window starts
    alarms = run(WindowedShiftDetector(), 10.0, 10, seed=2, shift=0.5, shift_at=shift_at)
    assert alarms, "the change was missed"
    day, res = alarms[0]
    assert day >= shift_at, "a false alarm before the change"
    assert (day - shift_at) * 1440 <= 30
    assert res["ci_low"] <= 0.5 <= res["ci_high"]  # the reported size covers the true one


def test_a_shift_below_the_minimum_never_alarms_at_volume() -> None:
    assert run(WindowedShiftDetector(min_shift_sd=0.2), 1000.0, 10, seed=4, shift=0.12, shift_at=8.5) == []


def delay_minutes(rate: float, shift: float, seed: int) -> float:
    shift_at = 8 + 10 / 24
    alarms = run(WindowedShiftDetector(), rate, 9, seed=seed, shift=shift, shift_at=shift_at)
    after = [d for d, _ in alarms if d >= shift_at]
    assert len(after) == len(alarms), "a false alarm before the change"
    return (after[0] - shift_at) * 1440 if after else math.inf


@pytest.mark.parametrize("seed", [1, 2])
def test_detection_is_faster_at_higher_volume(seed: int) -> None:
    slow, fast = delay_minutes(2.0, 0.3, seed), delay_minutes(100.0, 0.3, seed)
    assert fast < slow, (fast, slow)
    assert fast <= 10


def test_binary_rate_change_needs_the_minimum_relative_change() -> None:
    """A binary signal at a 10% rate: +15% relative is below min_rate_change (25%), +60% is not."""

    def run_binary(rel: float) -> int:
        rng = np.random.default_rng(8)
        det = WindowedShiftDetector(binary=True)
        alarms = 0
        for m in range(4 * 1440):
            t = MONDAY + m * 60.0
            n = int(rng.poisson(60_000))
            p = 0.1 * (1 + rel if t >= MONDAY + 3 * DAY else 1.0)
            k = float(rng.binomial(n, p))
            alarms += det.add_sums(t, n, k, k)
        return alarms

    assert run_binary(0.15) == 0
    assert run_binary(0.6) >= 1
