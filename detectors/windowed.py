"""A drift detector whose false-alarm budget is in event time, for streams at production volume.

Why: an ERT counted in episodes (CUSUM & co.) means one false alarm every few minutes at 100
episodes/s, and at volume any shift, however small, becomes significant. This detector tests
**closed event-time windows** against a **seasonal reference**, with an **interval null**.

* **Windows.** Every value falls into one window of each length in ``windows_s`` (aligned on
  multiples of the length, e.g. 5 min, 1 h, 6 h). When the first value at or past a window's end
  arrives, the window closes and is tested once, at level ``alpha_j = dt_j / (ert * L)``
  (``dt_j`` the window's length, ``L`` the number of lengths). Summed over the windows of any
  period of length ``P``: ``sum alpha_j <= P / ert`` whatever the traffic rate, so the expected
  number of false alarms in ``P`` is at most ``P / ert`` (a union bound: no independence needed).
  ``ert`` is thus the mean event-time seconds between false alarms, a lower bound.
* **Small windows merge.** A window with fewer than ``min_count`` values (binary signals: fewer
  than ``min_events`` expected events or non-events under the reference) is not tested: its
  values stay and the window extends to the next boundary; the merged window is tested at the
  level of its whole length, so the budget still holds in time. The normal approximation of the
  window mean (what the level assumes) needs these counts.
* **Interval null.** With ``d`` the window's mean deviation from the reference and ``se`` its
  standard error, the window alarms only when ``(|d| - delta0) / se > z_{1 - alpha_j / 2}``:
  ``delta0 = min_shift_sd`` reference SDs for continuous signals, ``min_rate_change`` times the
  reference rate for binary ones. Shifts smaller than ``delta0`` alarm with probability at most
  ``alpha_j``; as volume rises ``se`` shrinks and a larger shift is found in a shorter window.
  Every test reports the shift in reference SDs with a 95% interval (:attr:`last_test`).
* **Seasonal reference.** With ``seasonal=True`` the reference is a profile of 48 buckets
  (hour of day x weekday/weekend, in ``timezone``: UTC by default; a rhythm that follows a local
  clock moves by an hour in UTC when daylight saving time starts or ends, and its buckets with it
  in UTC, which alarmed on the day of the change). Each hour's values are folded, when the hour ends,
  into their bucket: an exponentially forgetting mean of the hourly means (half-life
  ``half_life_folds`` days), their between-day variance ``tau^2`` and the mean within-hour
  variance ``sigma^2``. A value is compared with its bucket's mean and the window's variance is
  ``se^2 = mean(sigma^2) / n + (mean u)^2`` with ``u^2 = tau^2 (1 + w) + sigma^2 / n_ref``: the
  day-to-day variation of the bucket (taken as fully correlated across a window's hours, the
  conservative choice) plus the error of the reference mean itself (``w`` its forgetting weight).
  ``tau^2`` of a bucket seen on fewer than two days is the pooled ratio ``tau^2 / sigma^2`` of
  the others, shrunk towards ``tau_prior_sd^2`` (4 pseudo-days); a bucket's own estimate is used
  only when larger. Hours that raised an alarm are not folded, nor are hours of fewer than
  ``min_count`` values (one record stamped days early, a ``"timestamp": 0`` sentinel, made an
  hour of one value whose variance of 0 put its bucket's error at the floor: an alarm of -1,700
  standard deviations on stationary traffic). A bucket not yet seen on any day is not tested
  (the first weekend after the start is learned, not tested), and no window is tested before
  ``warmup_s`` after the start of the first hour folded. ``seasonal=False``: one bucket, folded every
  ``fold_s`` seconds. State: O(buckets + windows), never O(traffic).
* **What the guarantee assumes.** The reference is right for the hour (the daily and weekly
  rhythm repeats, up to ``tau``), window means are approximately normal (the merge rule), and
  values arrive roughly in event-time order: a late value (earlier than the latest seen) counts
  at the latest time seen.

Without ``t`` (``update(x)``) one update is one second, so ``ert`` counts updates.
:meth:`update_many` feeds sorted ``(t, x)`` arrays through the same state changes, grouped per
interval that no window or fold boundary cuts: same alarms as one update per value.
"""

from __future__ import annotations

import datetime
import functools
import math
import zoneinfo
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any, ClassVar

from detectors.base import Detector


@functools.cache
def _zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown time zone {name!r} (an IANA name, e.g. Asia/Kolkata)") from e


_N = NormalDist()
_Z95 = _N.inv_cdf(0.975)
_DAY = 86400.0
_PRIOR_DAYS = 4.0  # pseudo-days of the prior ratio tau^2 / sigma^2


class _Window:
    """One window length's open (possibly merged) window: sums over its tested values."""

    __slots__ = ("end", "length", "n", "s_dev", "s_mu", "s_sd", "s_structure", "s_u", "s_var", "start")

    def __init__(self, length: float) -> None:
        self.length = length
        self.start = math.nan
        self.end = math.nan
        self.clear()

    def clear(self) -> None:
        self.n = 0.0
        self.s_dev = self.s_var = self.s_u = self.s_sd = self.s_mu = self.s_structure = 0.0

    def __getstate__(self) -> tuple[float, ...]:
        return (
            self.length, self.start, self.end, self.n, self.s_dev, self.s_var, self.s_u, self.s_sd, self.s_mu,
            self.s_structure,
        )  # fmt: skip

    def __setstate__(self, st: tuple[float, ...]) -> None:
        self.length, self.start, self.end, self.n, self.s_dev, self.s_var, self.s_u, self.s_sd, self.s_mu = st[:9]
        self.s_structure = st[9] if len(st) > 9 else 0.0  # a window saved before the structure term


class WindowedShiftDetector(Detector):
    """Event-time windows against a seasonal reference, budgeted in time (see the module).

    result(): ``distance`` is the last tested window's shift in reference SDs, ``threshold`` the
    minimum shift of interest (SDs; binary: the relative rate change) and ``p_val`` the window's
    p-value against the interval null (alarm: ``p_val <= alpha_j``).
    """

    name: ClassVar[str] = "windowed"
    kind: ClassVar[Any] = "continuous"
    timed: ClassVar[bool] = True
    # Read at construction only (the variance floor): not written again with every snapshot.
    static_attrs: ClassVar[tuple[str, ...]] = ("x_ref",)
    # Per bucket, the variance of the shortest window's means within an hour around the hour's mean
    # (the rhythm inside the hour), and the current fold's sums per such cell. None in a detector
    # saved before they existed: created on first use (learned from then on).
    _structure: list[float] | None = None
    _cells: dict[int, list[float]] | None = None
    timezone: str | None = None  # a detector saved before time zones: UTC
    _ref_var = 1.0  # a detector saved before it: the normal scores' unit variance
    _tz_hour = math.nan  # the hour of event time whose offset is cached
    _tz_offset = 0.0

    def __init__(
        self,
        *,
        ert: float | None = 30 * _DAY,
        x_ref: Any = None,
        windows_s: Sequence[float] = (300.0, 3600.0, 21600.0),
        min_shift_sd: float = 0.2,
        min_rate_change: float = 0.25,
        binary: bool = False,
        seasonal: bool = True,
        fold_s: float = 3600.0,
        warmup_s: float = _DAY,
        half_life_folds: float = 7.0,
        min_count: int = 30,
        min_events: int = 10,
        tau_prior_sd: float = 0.1,
        timezone: str | None = None,
    ) -> None:
        super().__init__(ert if ert is not None else 30 * _DAY)
        self.x_ref = x_ref
        self.windows_s = tuple(float(w) for w in windows_s)
        self.min_shift_sd, self.min_rate_change = float(min_shift_sd), float(min_rate_change)
        self.binary, self.seasonal = bool(binary), bool(seasonal)
        self.fold_s, self.warmup_s, self.half_life_folds = float(fold_s), float(warmup_s), float(half_life_folds)
        self.min_count, self.min_events, self.tau_prior_sd = int(min_count), int(min_events), float(tau_prior_sd)
        self.timezone = None if timezone in (None, "UTC") else timezone
        if self.timezone is not None:
            _zone(self.timezone)  # an unknown zone fails here, not at the first value
        self._check()
        if seasonal and fold_s != 3600.0:
            raise ValueError("a seasonal reference folds hourly: fold_s must be 3600")
        self._lam = 1.0 - 2.0 ** (-1.0 / self.half_life_folds)
        self._var_floor = variance_floor(x_ref)
        self._ref_var = reference_variance(x_ref)
        self._nb = 48 if self.seasonal else 1
        self._reset_state()

    def _check(self) -> None:
        if not self.windows_s or any(not (math.isfinite(w) and w > 0) for w in self.windows_s):
            raise ValueError("windows_s must be positive lengths")
        for v in (self.min_shift_sd, self.min_rate_change, self.warmup_s, self.tau_prior_sd):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError("min_shift_sd, min_rate_change, warmup_s and tau_prior_sd must be >= 0")
        if not (self.fold_s > 0 and self.half_life_folds > 0 and self.min_count >= 2 and self.min_events >= 1):
            raise ValueError("fold_s and half_life_folds must be > 0, min_count >= 2, min_events >= 1")

    # -- state ---------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        nb = self._nb
        # Per bucket: folds seen, mean of fold means, their variance (tau^2), within-fold variance,
        # effective reference count.
        self._k = [0.0] * nb
        self._m = [0.0] * nb
        self._tau2 = [0.0] * nb
        self._s2 = [0.0] * nb
        self._nref = [0.0] * nb
        self._rho = self.tau_prior_sd**2  # pooled tau^2 / sigma^2
        self._clock = math.nan
        self._first = math.nan
        self._warm = False
        self._fold = math.nan  # index of the fold being accumulated
        self._fold_acc = [0.0, 0.0, 0.0]  # n, sum, sum of squares
        self._fold_alarm = False
        self._wins = [_Window(w) for w in self.windows_s]
        self.last_test: dict[str, float] | None = None
        self._structure = [0.0] * nb
        self._cells = {}
        self._tz_hour = math.nan

    def _params(self) -> dict[str, Any]:
        return {
            "windows_s": list(self.windows_s),
            "min_shift_sd": self.min_shift_sd,
            "min_rate_change": self.min_rate_change,
            "binary": self.binary,
            "seasonal": self.seasonal,
            "fold_s": self.fold_s,
            "warmup_s": self.warmup_s,
            "half_life_folds": self.half_life_folds,
            "min_count": self.min_count,
            "min_events": self.min_events,
            "tau_prior_sd": self.tau_prior_sd,
            "timezone": self.timezone,
            "x_ref": None if self.x_ref is None else {"n": len(self.x_ref)},
        }

    # -- updates -------------------------------------------------------------------------------
    def _value(self, x: Any) -> float:
        v = float(x)
        if not math.isfinite(v):
            raise ValueError(f"{type(self).__name__}.update: non-finite value {x!r}")
        if self.binary and v not in (0.0, 1.0):
            raise ValueError(f"{type(self).__name__}.update: a binary signal takes 0 or 1, got {x!r}")
        return v

    def _step(self, x: Any) -> tuple[bool, Any, Any, Any]:
        v = self._value(x)
        return self._add(float(self._n), 1.0, v, v * v)

    def _step_at(self, x: Any, t: float) -> tuple[bool, Any, Any, Any]:
        v = self._value(x)
        if not math.isfinite(t):
            raise ValueError(f"{type(self).__name__}.update: non-finite time {t!r}")
        return self._add(t, 1.0, v, v * v)

    def update_many(self, t: Any, x: Any) -> list[tuple[int, dict[str, float]]]:
        """Feed values ``x`` at sorted event times ``t`` (arrays); returns ``(index, last_test)`` of
        each alarm, ``index`` the value whose arrival closed the alarming window. Same state
        changes as one :meth:`update` per value, with the sums of each interval that no window
        or fold boundary cuts added at once (so ``n`` counts groups here, not values)."""
        import numpy as np

        ts, xs = np.asarray(t, dtype=float), np.asarray(x, dtype=float)
        if ts.shape != xs.shape or not np.isfinite(xs).all() or not np.isfinite(ts).all():
            raise ValueError("update_many: t and x must be finite arrays of one shape")
        grid = _grid([*self.windows_s, self.fold_s, 3600.0 if self.seasonal else self.fold_s])
        cell = np.floor(ts / grid)
        cuts = np.flatnonzero(np.diff(cell)) + 1
        starts = np.r_[0, cuts]
        n = np.diff(np.r_[starts, len(xs)]).astype(float)
        s1, s2 = np.add.reduceat(xs, starts), np.add.reduceat(xs * xs, starts)
        alarms: list[tuple[int, dict[str, float]]] = []
        for i, a in enumerate(starts.tolist()):
            if self.add_sums(float(ts[a]), float(n[i]), float(s1[i]), float(s2[i])) and self.last_test is not None:
                alarms.append((a, dict(self.last_test)))
        return alarms

    def add_sums(self, t: float, n: float, s: float, ss: float) -> bool:
        """Feed ``n`` values at event time ``t`` by their sum ``s`` and sum of squares ``ss`` (no
        window or fold boundary may fall between them); counts as one update. Whether it alarmed."""
        if not (n > 0 and math.isfinite(t) and math.isfinite(s) and math.isfinite(ss)):
            raise ValueError("add_sums: n must be > 0 and t, s, ss finite")
        drift, distance, p_val, threshold = self._add(float(t), float(n), float(s), float(ss))
        self._n += 1
        self._drift_detected = bool(drift)
        self._distance, self._p_val, self._threshold = distance, p_val, threshold
        return self._drift_detected

    def _add(self, t: float, n: float, s: float, ss: float) -> tuple[bool, Any, Any, Any]:
        t = t if math.isnan(self._clock) else max(t, self._clock)  # late values count now
        self._clock = t
        hit = self._close_windows(t)
        self._roll_fold(t)
        acc = self._fold_acc
        acc[0] += n
        acc[1] += s
        acc[2] += ss
        if self._cells is None:
            self._cells = {}
        cell = self._cells.setdefault(math.floor(t / self._cell_s), [0.0, 0.0])
        cell[0] += n
        cell[1] += s
        if self._warm:
            self._into_windows(t, n, s)
        lt = self.last_test
        if lt is None:
            return False, None, None, self.min_rate_change if self.binary else self.min_shift_sd
        return hit, lt["shift_sd"], lt["p_val"], lt["min_shift"]

    # -- reference -----------------------------------------------------------------------------
    def _bucket(self, t: float) -> int:
        if not self.seasonal:
            return 0
        t += self._offset(t)
        day = math.floor(t / _DAY)
        weekend = (day + 3) % 7 >= 5  # 1970-01-01 was a Thursday: day 0 -> weekday index 3
        return int((t - day * _DAY) // 3600) + (24 if weekend else 0)

    def _roll_fold(self, t: float) -> None:
        idx = math.floor(t / self.fold_s)
        if idx == self._fold:
            return
        # An hour of a few values before anything was learned, followed by a gap (one record stamped
        # days early, a "timestamp": 0 sentinel) is not learned: the warm-up counted from it and its
        # bucket's error started at the floor (-1,700 SD alarms on stationary traffic). A stream of a
        # few values an hour still learns from its hours (their variance floored in _fold_in).
        stray = self._fold_acc[0] < self.min_count and math.isnan(self._first) and idx > self._fold + 1
        if not math.isnan(self._fold) and self._fold_acc[0] > 0 and not self._fold_alarm and not stray:
            start = self._fold * self.fold_s
            if math.isnan(self._first):
                self._first = start  # the warm-up counts from the first hour learned
            self._fold_in(self._bucket(start), *self._fold_acc)
            self._fold_structure(self._bucket(start), *self._fold_acc)
        self._fold, self._fold_acc, self._fold_alarm = idx, [0.0, 0.0, 0.0], False
        self._cells = {}
        self._warm = t - self._first >= self.warmup_s  # False while nothing was folded (NaN)

    def _fold_in(self, b: int, n: float, s: float, ss: float) -> None:
        h = s / n
        v = max(0.0, ss / n - h * h)
        if n < self.min_count:
            # Too few values to measure a spread (one value: none): the reference's, not 0, which
            # put the bucket's error at the floor.
            v = max(v, self._ref_var)
        if self._k[b] == 0:
            self._m[b], self._tau2[b], self._s2[b], self._nref[b] = h, 0.0, v, n
        else:
            w = max(self._lam, 1.0 / (self._k[b] + 1.0))
            d = h - self._m[b]
            self._m[b] += w * d
            self._tau2[b] = (1.0 - w) * (self._tau2[b] + w * d * d)
            self._s2[b] = (1.0 - w) * self._s2[b] + w * v
            self._nref[b] = (1.0 - w) * self._nref[b] + n
        self._k[b] += 1.0
        self._pool()

    def _offset(self, t: float) -> float:
        """Seconds ``timezone`` is ahead of UTC at ``t``; looked up once per hour of event time."""
        if self.timezone is None:
            return 0.0
        hour = math.floor(t / 3600.0)
        if hour != self._tz_hour:
            moment = datetime.datetime.fromtimestamp(hour * 3600.0, datetime.UTC)
            delta = _zone(self.timezone).utcoffset(moment)
            self._tz_hour, self._tz_offset = hour, 0.0 if delta is None else delta.total_seconds()
        return self._tz_offset

    @property
    def _cell_s(self) -> float:
        """The shortest window, inside the fold: the rhythm within an hour is measured at it."""
        return min(*self.windows_s, self.fold_s)

    def _fold_structure(self, b: int, n: float, s: float, ss: float) -> None:
        """Learn how far the shortest window's means stray from their hour's mean, every day.

        A bucket's mean is the hour's; a rhythm that steps inside the hour (a deployment in a
        half-hour time zone whose night mix changes at :30 UTC, a batch job at :45) puts every
        5-minute window before the step half a step from it, every day, and that was tested as
        drift: 16 false alarms in 21 days at 80-1,000 episodes/s against a budget of 1 a month.
        The between-cell variance of the fold, less what the within-cell noise explains
        (``(K - 1) sigma_w^2``, K cells), is that structure's variance; a window of k cells of an
        hour of K is off the hour's mean by ``V (K - k) / (k (K - 1))`` in variance (a mean of k
        of K cells drawn without replacement), 0 for a whole hour."""
        cells = [c for c in (self._cells or {}).values() if c[0] > 0]
        if self._structure is None:
            self._structure = [0.0] * self._nb
        k = len(cells)
        if k < 2:
            return
        mean = s / n
        between = sum(c[0] * (c[1] / c[0] - mean) ** 2 for c in cells)
        within = max(0.0, (ss - n * mean * mean - between) / max(n - k, 1.0))
        v = max(0.0, (between - (k - 1) * within) / n)
        w = max(self._lam, 1.0 / self._k[b]) if self._k[b] > 0 else 1.0
        self._structure[b] += w * (v - self._structure[b])

    def _structure_sd(self, b: int) -> float:
        return 0.0 if self._structure is None else math.sqrt(self._structure[b])

    def _pool(self) -> None:
        """The pooled ratio tau^2 / sigma^2 over buckets seen on two days or more, with the prior."""
        num, den = _PRIOR_DAYS * self.tau_prior_sd**2, _PRIOR_DAYS
        for b in range(self._nb):
            if self._k[b] >= 2:
                num += (self._k[b] - 1) * self._tau2[b] / self._sigma2(b)
                den += self._k[b] - 1
        self._rho = num / den

    def _sigma2(self, b: int) -> float:
        if self.binary:
            p = min(max(self._m[b], 1.0 / (self._nref[b] + 2.0)), 1.0 - 1.0 / (self._nref[b] + 2.0))
            return p * (1.0 - p)
        return max(self._s2[b], self._var_floor, 1e-12)

    def _shared_sd(self, b: int) -> float:
        """The window-independent error of a value's reference: day-to-day variation and the
        reference mean's own error."""
        s2 = self._sigma2(b)
        tau2 = max(self._tau2[b] if self._k[b] >= 2 else 0.0, self._rho * s2)
        w = max(self._lam, 1.0 / (self._k[b] + 1.0))
        return math.sqrt(tau2 * (1.0 + w) + s2 / max(self._nref[b], 1.0))

    # -- windows -------------------------------------------------------------------------------
    def _fold_bucket(self, t: float) -> int:
        """The bucket of the fold (a UTC hour) that ``t`` falls in: the one its values are learned
        into. Not ``_bucket(t)``: in a half-hour time zone a UTC hour is local 09:30-10:30, and its
        values after 10:00 were tested against the next hour's reference (228 alarms in 21 days)."""
        return self._bucket(math.floor(t / self.fold_s) * self.fold_s)

    def _into_windows(self, t: float, n: float, s: float) -> None:
        b = self._fold_bucket(t)
        if self._k[b] == 0:
            return  # a bucket never seen on a day is learned, not tested
        s2, u, mu = self._sigma2(b), self._shared_sd(b), self._m[b]
        sd, structure = math.sqrt(s2), self._structure_sd(b)
        for w in self._wins:
            if math.isnan(w.start):
                w.start = math.floor(t / w.length) * w.length
                w.end = w.start + w.length
            w.n += n
            w.s_dev += s - n * mu
            w.s_var += n * s2
            w.s_u += n * u
            w.s_structure += n * structure
            w.s_sd += n * sd
            w.s_mu += n * mu

    def _close_windows(self, t: float) -> bool:
        hit = False
        best = -math.inf
        for w in self._wins:
            if math.isnan(w.end) or t < w.end:
                continue
            if w.n > 0 and not self._enough(w):
                w.end = (math.floor(t / w.length) + 1) * w.length  # merge into the next window
                continue
            res = self._test(w) if w.n > 0 else None
            w.start = w.end = math.nan
            w.clear()
            if res is None:
                continue
            excess = res["excess"] - res["z"]
            if res["alarm"] and excess > best:
                best, hit = excess, True
                self.last_test = res
            elif not hit:
                self.last_test = res
        if hit:
            self._fold_alarm = True
        return hit

    def _enough(self, w: _Window) -> bool:
        """Enough values for the test: ``min_count``, and for a binary signal ``min_events`` of each
        outcome, expected from the reference or seen. Seen counts too: a reference rate of 0 (or 1)
        expects no events however long the window, and the change from it would never be tested
        (the window merging on while the drifted traffic is folded into the reference)."""
        if w.n < self.min_count:
            return False
        if not self.binary:
            return True
        expected = w.s_mu
        seen = w.s_dev + w.s_mu
        return max(expected, seen) >= self.min_events and w.n - min(expected, seen) >= self.min_events

    def _test(self, w: _Window) -> dict[str, float]:
        assert self.ert is not None
        n = w.n
        span = w.end - w.start
        alpha = min(1.0, span / (self.ert * len(self._wins)))
        z = _N.inv_cdf(1.0 - alpha / 2.0) if alpha < 1.0 else 0.0
        d = w.s_dev / n
        sd = w.s_sd / n
        cells = self.fold_s / self._cell_s  # the shortest windows an hour holds
        k = min(max(span / self._cell_s, 1.0), cells)
        inside = (cells - k) / (k * (cells - 1.0)) if cells > 1.0 else 0.0
        se = math.sqrt(w.s_var / n / n + (w.s_u / n) ** 2 + inside * (w.s_structure / n) ** 2)
        margin = self.min_rate_change * (w.s_mu / n) if self.binary else self.min_shift_sd * sd
        excess = (abs(d) - margin) / se
        p_val = 1.0 if excess <= 0 else math.erfc(excess / math.sqrt(2.0))
        return {
            "window_s": span,
            "window_end": w.end,
            "n": n,
            "shift": d,
            "shift_sd": d / sd,
            "ci_low": (d - _Z95 * se) / sd,
            "ci_high": (d + _Z95 * se) / sd,
            "min_shift": margin / sd,
            "alpha": alpha,
            "z": z,
            "excess": excess,
            "p_val": p_val,
            "alarm": float(excess > z),
            # The reference buckets the window was compared with (seasonal: hour of day in UTC,
            # +24 on weekends; else 0), first and last: a person reads the size against them.
            "bucket_first": float(self._fold_bucket(w.start)),
            "bucket_last": float(self._fold_bucket(max(w.start, w.end - 1.0))),
        }


def reference_variance(x_ref: Any) -> float:
    """The reference's variance, or the normal scores' unit variance where it has none to give.

    >>> reference_variance([0.0, 2.0] * 50), reference_variance(None), reference_variance([3.0] * 10)
    (1.0101010101010102, 1.0, 1.0)
    """
    var = _sample_variance(x_ref)
    return var if var > 0 else 1.0


def _sample_variance(x_ref: Any) -> float:
    """0 for no reference (or one value)."""
    if x_ref is None or len(x_ref) < 2:
        return 0.0
    vals = [float(v) for v in x_ref]
    mean = sum(vals) / len(vals)
    return sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)


def variance_floor(x_ref: Any) -> float:
    """The least variance a bucket is given: a millionth of the reference's, against rounding.
    A reference without spread (a constant signal) has no scale to take a millionth of: its floor
    is the unit variance of the normal scores the monitor feeds, so one outlier after days of a
    constant value is not a shift of thousands of SDs (a level change of the whole window still is).

    >>> variance_floor([2.0] * 100), variance_floor([0.0, 2.0] * 50) < 1e-5
    (1.0, True)
    """
    if x_ref is None or len(x_ref) < 2:
        return 1e-6
    var = _sample_variance(x_ref)
    return 1e-6 * var if var > 0 else 1.0


def _grid(lengths: Sequence[float]) -> float:
    """The largest interval that divides every boundary period (whole seconds; else 1 s)."""
    ints = [int(v) for v in lengths if float(v).is_integer()]
    if len(ints) != len(lengths):
        return 1.0
    return float(math.gcd(*ints))
