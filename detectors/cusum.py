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
from collections.abc import Callable
from typing import Any, ClassVar

from numpy.typing import ArrayLike

from detectors import calibration as cal
from detectors.river_detectors import CalibratedDetector


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

    @property
    def statistic(self) -> float:
        up, down, mode = self.s_up, self.s_down, self.mode
        return up if mode == "up" else down if mode == "down" else up if up >= down else down


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
