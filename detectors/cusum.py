"""A two-sided CUSUM anchored on the reference: the detector for a known in-control level.

river's PageHinkley measures deviations from the *running* mean of everything it has seen; once
a change has lasted a while that mean has moved towards the new level and the statistic stops
growing, so a change that comes soon after the detector starts is found late or never. When a
reference exists, the in-control mean is known: after standardising by the reference
(``z = (x - mean_ref) / sd_ref``) the CUSUM

    S+_t = max(0, S+_{t-1} + z_t - k),   S-_t = max(0, S-_{t-1} - z_t - k)

alarms when ``max(S+, S-) > threshold``. ``k`` is the allowance (half the shift, in reference
standard deviations, that it is tuned for: 0.5 is the classic choice for one standard
deviation); ``threshold`` is calibrated to the target ERT on stationary streams resampled from
the reference (:func:`detectors.calibration.cusum_run_lengths`), and above
``MAX_SIMULATED_ERT`` extrapolated from there in ``log ERT`` (:func:`detectors.calibration.
cusum_log_arl_slope`), so memory does not grow with the ERT. After an alarm both sums start
again from 0 on the next update (as river's detectors do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from detectors import calibration as cal
from detectors.base import finite_or_none
from detectors.river_detectors import CalibratedDetector

FloatArray = NDArray[np.float64]
#: Fewer values than this go one update at a time: numpy's calls cost more than the steps they save.
MANY_MIN = 16


class CUSUM:
    """The bare two-sided CUSUM on standardised values (``update`` / ``drift_detected``)."""

    def __init__(self, threshold: float, k: float = 0.5, min_instances: int = 1, mode: str = "both"):
        self.threshold = threshold
        self.k = k
        self.min_instances = min_instances
        self.mode = mode
        self.s_up = 0.0
        self.s_down = 0.0
        self.n = 0
        self.drift_detected = False

    def update(self, z: float) -> None:
        if self.drift_detected:
            self.s_up = self.s_down = 0.0
            self.n = 0
            self.drift_detected = False
        self.n += 1
        # max(0.0, s) without the builtin's call, on every value of every text signal; the same
        # result for NaN (0.0) and -0.0 (0.0).
        up = self.s_up + z - self.k
        down = self.s_down - z - self.k
        self.s_up = up if up > 0.0 else 0.0
        self.s_down = down if down > 0.0 else 0.0
        self.drift_detected = self.n >= self.min_instances and self.statistic > self.threshold

    def update_until_drift(self, z: FloatArray) -> int:
        """:meth:`update` with each value of ``z`` in order, stopping after the first alarm; returns
        how many values were taken. One pass of numpy instead of a Python step per value.

        Each sum is a Lindley recursion ``S_t = max(0, S_(t-1) + a_t)``, whose closed form is
        ``S_t = C_t - min(-S_0, min_(j <= t) C_j)`` with ``C`` the cumulative sum of ``a``: a
        cumulative sum and a running minimum. Sums are rounded in another order than one step at
        a time, so the statistic may differ in its last bits (a few ulps of the partial sums).

        >>> c = CUSUM(threshold=3.0, k=0.5)
        >>> c.update_until_drift(np.array([0.0, 1.5, 2.0, 2.0, 0.0])), c.s_up, c.n, c.drift_detected
        (4, 4.0, 4, True)
        """
        m = len(z)
        if m == 0:
            return 0
        if self.drift_detected:
            self.s_up = self.s_down = 0.0
            self.n = 0
            self.drift_detected = False
        up = _lindley(self.s_up, z - self.k)
        down = _lindley(self.s_down, -z - self.k)
        stat = up if self.mode == "up" else down if self.mode == "down" else np.maximum(up, down)
        alarm = stat > self.threshold
        first = self.min_instances - self.n - 1  # values before it have n < min_instances
        if first > 0:
            alarm[:first] = False
        hit = int(np.argmax(alarm)) if alarm.any() else -1
        last = hit if hit >= 0 else m - 1
        self.s_up, self.s_down = float(up[last]), float(down[last])
        self.n += last + 1
        self.drift_detected = hit >= 0
        return last + 1

    @property
    def statistic(self) -> float:
        up, down, mode = self.s_up, self.s_down, self.mode
        return up if mode == "up" else down if mode == "down" else up if up >= down else down


def _lindley(s0: float, a: FloatArray) -> FloatArray:
    """``S_t = max(0, S_(t-1) + a_t)`` from ``S_0 = s0`` for every ``t``, in closed form (see
    :meth:`CUSUM.update_until_drift`)."""
    c = np.cumsum(a)
    low = np.minimum.accumulate(c)
    np.minimum(low, -s0, out=low)
    out: FloatArray = c - low
    return out


class CUSUMDetector(CalibratedDetector):
    """Two-sided CUSUM of standardised values around the reference mean (see the module).

    result(): ``distance`` is the CUSUM statistic (the larger side for ``mode="both"``) and
    ``threshold`` the alarm level; ``p_val`` is ``None``.
    """

    name: ClassVar[str] = "cusum"
    param_name: ClassVar[str] = "threshold"
    _search: ClassVar[tuple[float, float, float, bool]] = (10.0, 0.01, 1e6, True)

    def __init__(
        self,
        *,
        ert: float | None = 1000.0,
        x_ref: ArrayLike | None = None,
        threshold: float | None = None,
        k: float = 0.5,
        min_instances: int = 1,
        mode: str = "both",
        seed: int = 0,
        calibration_runs: int = cal.DEFAULT_RUNS,
    ) -> None:
        super().__init__(ert, x_ref, seed, calibration_runs)
        if mode not in ("up", "down", "both"):
            raise ValueError("mode must be 'up', 'down' or 'both'")
        if not (k >= 0 and math.isfinite(k)):
            raise ValueError("k must be a finite number >= 0")
        if min_instances < 1:
            raise ValueError("min_instances must be >= 1")
        self.threshold = threshold
        self.k = k
        self.min_instances = min_instances
        self.mode = mode
        self._configure(threshold)

    def _fixed(self) -> dict[str, Any]:
        return {"k": self.k, "min_instances": self.min_instances, "mode": self.mode}

    def _factory(self) -> Callable[[float], Any]:
        fixed = self._fixed()
        return lambda threshold: CUSUM(threshold, **fixed)

    def _fast_model(self) -> Callable[[cal.FloatArray], cal.RunLengths] | None:
        fixed = self._fixed()
        return lambda streams: cal.cusum_run_lengths(streams, **fixed)

    def _log_arl_slope(self) -> float | None:
        return cal.cusum_log_arl_slope(self.x_ref, k=self.k, mode=self.mode)

    def _stats(self) -> tuple[Any, Any, Any]:
        d = self._detector
        if d.n < self.min_instances:
            return None, None, self._value
        return float(d.statistic), None, self._value

    def update_until_drift(self, xs: Sequence[Any], ts: Sequence[float] | None = None) -> int:
        """:meth:`detectors.base.Detector.update_until_drift` in one numpy pass (:meth:`CUSUM.update_until_drift`)
        when there are enough values to pay for numpy's calls; else, and for values that are not
        plain numbers, one :meth:`update` at a time."""
        d = self._detector
        if len(xs) < MANY_MIN or type(d) is not CUSUM:
            return super().update_until_drift(xs, ts)
        try:
            v = np.asarray(xs, dtype=np.float64)
        except (TypeError, ValueError):
            return super().update_until_drift(xs, ts)
        if v.ndim != 1:
            return super().update_until_drift(xs, ts)
        finite = np.isfinite(v)
        m = len(v) if finite.all() else int(np.argmin(finite))
        taken = d.update_until_drift((v[:m] - self._mu) / self._sd) if m else 0
        if taken:
            self._n += taken
            self._drift_detected = bool(d.drift_detected)
            distance, p_val, threshold = self._stats()
            self._distance = finite_or_none(distance)
            self._p_val = finite_or_none(p_val)
            self._threshold = finite_or_none(threshold)
        if taken == m < len(v) and not self._drift_detected:
            self.update(xs[m])  # the value update refuses: its error, the state left as it is
        return taken
