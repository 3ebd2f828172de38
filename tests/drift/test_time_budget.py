"""The windowed detector's false-alarm budget holds in event time, whatever the traffic rate.

Stationary streams with a daily rate cycle (30% to 100% of the peak) and a daily rhythm of the
mean, 4 weeks each, at 0.1 to 1,000 episodes/s, fed as per-minute sums. A budget of one false
alarm per day (``ert`` = 1 day, so that a few weeks measure it) on the point null (no minimum
shift, no prior day-to-day variance): the count must stay within the budget's Poisson bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from streams import DAY, MONDAY, run

from detectors.windowed import WindowedShiftDetector

DAYS = 28


def poisson_upper(mean: float, p: float = 0.999) -> int:
    """The smallest k with P(Poisson(mean) <= k) >= p."""
    k, term = 0, math.exp(-mean)
    total = term
    while total < p:
        k += 1
        term *= mean / k
        total += term
    return k


@pytest.mark.parametrize("rate", [0.1, 1.0, 100.0, 1000.0])
def test_false_alarms_within_the_budget_in_time(rate: float) -> None:
    det = WindowedShiftDetector(ert=DAY, min_shift_sd=0.0, tau_prior_sd=0.0)
    alarms = run(det, rate, DAYS, seed=int(rate * 10))
    budget = DAYS - 1  # the first day is the warm-up
    assert len(alarms) <= poisson_upper(budget), (rate, len(alarms))


def test_the_point_null_budget_is_used_not_wasted() -> None:
    """The bound is not vacuous: at 1 episode/s the point-null test does alarm now and then."""
    det = WindowedShiftDetector(ert=DAY / 4, min_shift_sd=0.0, tau_prior_sd=0.0)
    assert len(run(det, 1.0, 14, seed=3)) >= 5


@pytest.mark.parametrize("rate", [1.0, 1000.0])
def test_default_settings_give_no_false_alarm(rate: float) -> None:
    assert run(WindowedShiftDetector(), rate, DAYS, seed=11) == []


def test_per_episode_updates_equal_per_minute_sums() -> None:
    """update(x, t) per value and update_many (sums per minute) reach the same alarms and state."""
    rng = np.random.default_rng(5)
    t = MONDAY + np.sort(rng.uniform(0, 3 * DAY, 40_000))
    x = rng.standard_normal(t.size) + (t > MONDAY + 2.5 * DAY) * 1.0
    kw = {"warmup_s": DAY, "windows_s": (300.0, 3600.0)}
    one = WindowedShiftDetector(**kw)
    per_value = []
    for i, (ti, xi) in enumerate(zip(t.tolist(), x.tolist(), strict=True)):
        one.update(xi, ti)
        if one.drift_detected:
            per_value.append(i)
    many = WindowedShiftDetector(**kw)
    grouped = [i for i, _ in many.update_many(t, x)]
    assert per_value and per_value == grouped
    assert one.last_test is not None and many.last_test is not None
    assert one.last_test["n"] == many.last_test["n"]
    assert one.last_test["shift_sd"] == pytest.approx(many.last_test["shift_sd"], rel=1e-9)


def test_restore_mid_window_continues_identically() -> None:
    """A snapshot taken inside an open window (and fold) loses and repeats nothing."""
    rng = np.random.default_rng(9)
    t = MONDAY + np.sort(rng.uniform(0, 2 * DAY, 20_000))
    x = rng.standard_normal(t.size) + (t > MONDAY + 1.5 * DAY) * 0.8
    whole = WindowedShiftDetector(windows_s=(300.0, 3600.0))
    expected = whole.update_many(t, x)
    cut = int(np.searchsorted(t, MONDAY + 1.5 * DAY + 150.0))  # mid 5-minute window, mid hour
    first = WindowedShiftDetector(windows_s=(300.0, 3600.0))
    got = first.update_many(t[:cut], x[:cut])
    import detectors

    second = detectors.restore(first.snapshot())
    assert isinstance(second, WindowedShiftDetector)
    got += [(i + cut, r) for i, r in second.update_many(t[cut:], x[cut:])]
    assert expected and got == expected
