"""The windowed detector's false-alarm budget holds in event time, whatever the traffic rate.

Stationary streams with a daily rate cycle (30% to 100% of the peak) and a daily rhythm of the
mean, 4 weeks each, at 0.1 to 1,000 episodes/s, fed as per-minute sums. A budget of one false
alarm per day (``ert`` = 1 day, so that a few weeks measure it) on the point null (no minimum
shift, no prior day-to-day variance): the count must stay within the budget's Poisson bound."""

from __future__ import annotations

import math
from typing import Any

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


def _binary_stream(p_before: float, p_after: float, change_day: float, days: float, seed: int) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    t = MONDAY + np.arange(int(days * DAY), dtype=float)  # 1 episode/s
    p = np.where(t >= MONDAY + change_day * DAY, p_after, p_before)
    return t, (rng.random(t.size) < p).astype(float)


def test_a_change_from_a_rate_of_zero_is_tested() -> None:
    """A binary signal never seen during learning (rate 0: an empty response, a tool error) that
    jumps to 50%: its windows expected no events however long they grew, so the change went
    untested for a day while the reference absorbed it. Seen events count toward a test now."""
    t, x = _binary_stream(0.0, 0.5, 3.0, 4.0, seed=2)
    det = WindowedShiftDetector(binary=True, x_ref=np.zeros(500))
    hits = det.update_many(t, x)
    assert hits, "the change from 0% to 50% was never tested"
    assert t[hits[0][0]] - (MONDAY + 3 * DAY) < 3600.0, (t[hits[0][0]] - MONDAY) / DAY


def test_rare_events_on_a_rate_of_zero_are_no_alarm() -> None:
    """The other side: a stationary rare event (a few a day, none while learning, perhaps) is not
    a change; the windows it falls in are tested against the reference's floored rate."""
    t, x = _binary_stream(3e-5, 3e-5, 0.0, 14.0, seed=4)
    assert WindowedShiftDetector(binary=True, x_ref=np.zeros(500)).update_many(t, x) == []


def test_one_outlier_after_a_constant_reference_is_no_alarm_a_new_level_is() -> None:
    """A signal constant while learned (``turns`` 2 on single-turn traffic, fed as normal scores: all
    equal) has no spread to measure shifts in: one episode off it, among 86,400 a day, was a shift
    of thousands of SDs. A new level of the whole stream still alarms at once."""
    from monitor.signals.normalise import NormalScores

    transform = NormalScores.fit([2.0] * 500, 5.0)
    ref = np.array([transform(2.0)] * 500)
    t = MONDAY + np.arange(int(3 * DAY), dtype=float)
    one = np.full(t.size, transform(2.0))
    one[int(2.5 * DAY)] = transform(4.0)
    assert WindowedShiftDetector(x_ref=ref).update_many(t, one) == []
    level = np.where(t >= MONDAY + 2.5 * DAY, transform(3.0), transform(2.0))
    hits = WindowedShiftDetector(x_ref=ref).update_many(t, level)
    assert hits and t[hits[0][0]] - (MONDAY + 2.5 * DAY) <= 600.0


@pytest.mark.parametrize("stale_by", [2 * DAY + 1800.0, None])
def test_one_stale_first_value_is_no_alarm(stale_by: float | None) -> None:
    """The first value the detector sees stamped days before the rest (a buffered record flushed
    late), or at 0 (a producer's "unknown" sentinel): its hour of one value was folded with a
    variance of 0, and the warm-up counted from it. Stationary traffic then alarmed at shifts of
    about -1,700 SD. An hour of fewer than min_count values is not learned from."""
    rng = np.random.default_rng(7)
    start = MONDAY + 2 * DAY + 10 * 3600.0
    t = start + np.arange(int(3 * DAY), dtype=float)
    x = rng.standard_normal(t.size)
    t[0] = 0.0 if stale_by is None else start - stale_by
    det = WindowedShiftDetector()
    assert det.update_many(t, x) == []
    # Learning starts with the first full hour: the warm-up still ends and the windows are tested.
    assert det.last_test is not None


def _minute_sums(
    days: float,
    shift_from: float = math.inf,
    seed: int = 5,
    start: float = MONDAY,
    zone: str | None = None,
    night: tuple[int, int] = (30, 390),
) -> list[tuple[float, float, float, float]]:
    """Per minute, 2,000 unit-variance values whose mean steps by 0.7 for the ``night`` minutes of the day
    (default 00:30 to 06:30 UTC: a night mix in a half-hour time zone; ``zone``: of its local day), plus a
    shift of 0.5 of the whole stream from ``shift_from``: (time, n, sum, sum of squares)."""
    import datetime
    import zoneinfo

    tz = None if zone is None else zoneinfo.ZoneInfo(zone)
    rng = np.random.default_rng(seed)
    out = []
    n = 2000.0
    for m in range(int(days * 1440)):
        t = start + m * 60.0
        local = t if tz is None else t + tz.utcoffset(datetime.datetime.fromtimestamp(t, datetime.UTC)).total_seconds()  # type: ignore[union-attr]
        of_day = int(local % DAY) // 60
        mean = (0.7 if night[0] <= of_day < night[1] else 0.0) + (0.5 if t >= shift_from else 0.0)
        s = n * mean + math.sqrt(n) * float(rng.standard_normal())
        ss = s * s / n + float(rng.chisquare(n - 1.0))
        out.append((t, n, s, ss))
    return out


def test_a_rhythm_that_steps_inside_the_hour_is_no_alarm_a_shift_still_is() -> None:
    """The reference is one mean per hour: a step at :30 put every 5-minute window before it half a step off
    its hour's mean, every day, and that was tested as drift (16 false alarms in 21 days for a deployment in
    a half-hour time zone). The windows' spread inside the hour is learned and allowed for; a shift of the
    whole stream is still found in the first hour."""
    det = WindowedShiftDetector()
    hits = [t for t, n, s, ss in _minute_sums(9.0) if det.add_sums(t, n, s, ss)]
    assert hits == [], [(t - MONDAY) / DAY for t in hits]
    change = MONDAY + 9 * DAY + 14 * 3600.0
    shifted = WindowedShiftDetector()
    found = [t for t, n, s, ss in _minute_sums(10.0, change) if shifted.add_sums(t, n, s, ss)]
    assert found and found[0] - change <= 3600.0, [(t - MONDAY) / DAY for t in found[:3]]


@pytest.mark.parametrize("zone", [None, "America/New_York"])
def test_the_reference_follows_a_local_clock_across_daylight_saving_time(zone: str | None) -> None:
    """A rhythm on New York's clock (a night mix from 22:00 to 06:00 local) moves by an hour in UTC on
    2026-03-08: hourly UTC buckets alarmed that morning (4 signals at once in a hunt's run). Buckets on the
    local clock (``drift.seasonal_timezone``) see the same day as every other."""
    start = 1_771_804_800.0  # 2026-02-23 00:00 UTC, a Monday
    det = WindowedShiftDetector(timezone=zone)
    sums = _minute_sums(21.0, start=start, zone="America/New_York", night=(0, 360), seed=9)
    hits = [t for t, n, s, ss in sums if det.add_sums(t, n, s, ss)]
    if zone is None:
        assert hits, "the UTC reference should have alarmed at the change (the test's premise)"
    else:
        assert hits == [], [(t - start) / DAY for t in hits]


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        WindowedShiftDetector(timezone="Mars/Olympus")


def test_a_half_hour_time_zone_tests_a_value_against_the_hour_it_is_learned_into() -> None:
    """Folds are UTC hours: in Asia/Kolkata (+5:30) one is local 09:30-10:30, learned into bucket 9. Its
    values after 10:00 were tested against bucket 10, learned from 10:30-11:30: half of every hour
    against the next hour's reference (228 alarms in 21 days of a stationary office-hours rhythm)."""
    start = 1_771_804_800.0  # 2026-02-23 00:00 UTC, a Monday
    det = WindowedShiftDetector(timezone="Asia/Kolkata")
    sums = _minute_sums(14.0, start=start, zone="Asia/Kolkata", night=(9 * 60 + 30, 18 * 60 + 30), seed=4)
    assert [t for t, n, s, ss in sums if det.add_sums(t, n, s, ss)] == []


def test_a_stream_of_a_few_values_an_hour_still_learns_and_alarms() -> None:
    """Hours of fewer than min_count values are learned (their variance floored at the reference's):
    not learning them left a stream of ten values an hour untested for good."""
    rng = np.random.default_rng(2)
    t = np.sort(MONDAY + rng.uniform(0, 16 * DAY, size=16 * 24 * 10))
    x = rng.standard_normal(t.size) + np.where(t >= MONDAY + 14 * DAY, 2.0, 0.0)
    hits = WindowedShiftDetector().update_many(t, x)
    assert hits and t[hits[0][0]] >= MONDAY + 14 * DAY and t[hits[0][0]] - (MONDAY + 14 * DAY) < DAY


def test_reset_forgets_the_structure_inside_the_hour() -> None:
    det = WindowedShiftDetector()
    for t, n, s, ss in _minute_sums(3.0):
        det.add_sums(t, n, s, ss)
    assert max(det._structure or [0.0]) > 0.0
    det.reset()
    assert max(det._structure or [0.0]) == 0.0 and det.clone()._structure == det._structure
