"""river's univariate drift detectors (ADWIN, KSWIN, PageHinkley) behind the detector contract.

Inputs are standardised by the reference mean and standard deviation (when a reference is
given), and the sensitivity parameter (ADWIN ``delta``, KSWIN ``alpha``, PageHinkley
``threshold``) is calibrated to the target ERT by :mod:`detectors.calibration` unless it is
given explicitly. The ERT counts updates from the first one after construction or reset.

After an alarm, river resets the detector on the *next* update: ADWIN starts an empty window,
KSWIN an empty window (it tests again after ``window_size`` new values), PageHinkley fresh
statistics (it tests again after ``min_instances`` values). This wrapper does not add a
cool-down: the monitor does.

river is imported inside the constructors, never when ``detectors`` is imported.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike

from detectors import calibration as cal
from detectors.base import Detector, Kind


class CalibratedDetector(Detector):
    """A univariate detector with one sensitivity parameter (``param_name``), calibrated to the ERT
    unless it is given: the base of the river detectors here and of :class:`detectors.cusum.CUSUMDetector`.
    """

    kind: ClassVar[Kind] = "continuous"
    static_attrs: ClassVar[tuple[str, ...]] = ("x_ref",)  # read by the calibration only
    #: name of the calibrated constructor argument
    param_name: ClassVar[str]
    # search settings for the calibrated parameter: start, lo, hi, ERT increasing with it
    _search: ClassVar[tuple[float, float, float, bool]]

    def __init__(self, ert: float | None, x_ref: ArrayLike | None, seed: int, calibration_runs: int) -> None:
        super().__init__(ert)
        self.x_ref = None if x_ref is None else np.array(x_ref, dtype=np.float64).reshape(-1)
        self.seed = seed
        self.calibration_runs = calibration_runs
        mu, sd, _ = cal.standardise(self.x_ref)
        self._mu, self._sd = mu, sd
        self._calibration: cal.CalibrationResult | None = None
        self._value = math.nan
        self._detector: Any = None

    def _configure(self, explicit: float | None) -> None:
        if explicit is None:
            if self.ert is None:
                raise ValueError(f"{type(self).__name__}: give ert or {self.param_name}")
            start, lo, hi, increasing = self._search
            self._calibration = cal.calibrate(
                None if self._fast_model() is not None else self._factory(),
                self.x_ref,
                self.ert,
                start=start,
                lo=lo,
                hi=hi,
                increasing=increasing,
                fast=self._fast_model(),
                n_runs=self.calibration_runs,
                seed=self.seed,
                cache_key=(type(self).__name__, tuple(sorted(self._fixed().items()))),
                log_arl_slope=self._log_arl_slope() if self.ert > cal.MAX_SIMULATED_ERT else None,
            )
            self._value = self._calibration.param
        else:
            self._value = float(explicit)
        self._detector = self._factory()(self._value)

    # -- per detector ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _fixed(self) -> dict[str, Any]:
        """The constructor arguments other than ert, x_ref, the calibrated one and the seeds."""

    @abc.abstractmethod
    def _factory(self) -> Callable[[float], Any]:
        """A function from the sensitivity parameter to a fresh river detector."""

    def _fast_model(self) -> Callable[[cal.FloatArray], cal.RunLengths] | None:
        return None

    def _log_arl_slope(self) -> float | None:
        """d log ERT / d parameter, for ERTs beyond simulation (None: such ERTs are refused)."""
        return None

    def _stats(self) -> tuple[Any, Any, Any]:
        return None, None, None

    # -- the contract ---------------------------------------------------------------------------
    @property
    def param_value(self) -> float:
        """The effective value of the sensitivity parameter (given or calibrated)."""
        return self._value

    @property
    def calibration(self) -> cal.CalibrationResult | None:
        """How the parameter was calibrated (``None`` if it was given)."""
        return self._calibration

    def _step(self, x: Any) -> tuple[bool, Any, Any, Any]:
        v = float(x)
        if not math.isfinite(v):
            raise ValueError(f"{type(self).__name__}.update: non-finite value {x!r}")
        self._detector.update((v - self._mu) / self._sd)
        return bool(self._detector.drift_detected), *self._stats()

    def _reset_state(self) -> None:
        self._detector = self._factory()(self._value)

    def _params(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self._fixed(),
            self.param_name: self._value,
            "seed": self.seed,
            "calibration_runs": self.calibration_runs,
            "x_ref_size": None if self.x_ref is None else len(self.x_ref),
            "x_ref_mean": self._mu,
            "x_ref_std": self._sd,
            "calibration": None if self._calibration is None else self._calibration.as_dict(),
        }
        return out


class ADWINDetector(CalibratedDetector):
    """river ``ADWIN`` (adaptive windowing; detects changes of the mean).

    ``delta`` (None: calibrated to ``ert``) is ADWIN's significance; ``clock`` how often it
    checks for cuts (alarms come at multiples of ``clock`` updates). result(): no statistic
    (river exposes none): ``distance``, ``p_val`` and ``threshold`` are ``None``.
    """

    name: ClassVar[str] = "adwin"
    param_name: ClassVar[str] = "delta"
    _search: ClassVar[tuple[float, float, float, bool]] = (0.002, 1e-12, 0.99, False)

    def __init__(
        self,
        *,
        ert: float | None = 1000.0,
        x_ref: ArrayLike | None = None,
        delta: float | None = None,
        clock: int = 32,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
        seed: int = 0,
        calibration_runs: int = cal.DEFAULT_RUNS,
    ) -> None:
        super().__init__(ert, x_ref, seed, calibration_runs)
        self.delta = delta
        self.clock = clock
        self.max_buckets = max_buckets
        self.min_window_length = min_window_length
        self.grace_period = grace_period
        self._configure(delta)

    def _fixed(self) -> dict[str, Any]:
        return {
            "clock": self.clock,
            "max_buckets": self.max_buckets,
            "min_window_length": self.min_window_length,
            "grace_period": self.grace_period,
        }

    def _factory(self) -> Callable[[float], Any]:
        from river.drift import ADWIN

        fixed = self._fixed()
        return lambda delta: ADWIN(delta=delta, **fixed)  # type: ignore[no-untyped-call]


class KSWINDetector(CalibratedDetector):
    """river ``KSWIN`` (Kolmogorov-Smirnov test of the last ``stat_size`` values against a
    random sample of the older part of a ``window_size`` sliding window).

    ``alpha`` (None: calibrated to ``ert``) is the p-value level; river also requires
    ``D > 0.1``. With ``stat_size`` 30 the statistic moves in steps of 1/30, so only some ERTs
    are reachable: calibration picks the closest. result(): ``p_val`` is the last test's
    p-value and ``threshold`` is ``alpha`` (an alarm is ``p_val <= threshold``); ``distance``
    is ``None`` (river keeps no statistic).
    """

    name: ClassVar[str] = "kswin"
    param_name: ClassVar[str] = "alpha"
    _search: ClassVar[tuple[float, float, float, bool]] = (0.005, 1e-15, 0.5, False)

    def __init__(
        self,
        *,
        ert: float | None = 1000.0,
        x_ref: ArrayLike | None = None,
        alpha: float | None = None,
        window_size: int = 100,
        stat_size: int = 30,
        seed: int = 0,
        calibration_runs: int = cal.DEFAULT_RUNS,
    ) -> None:
        super().__init__(ert, x_ref, seed, calibration_runs)
        if not 0 < stat_size < window_size:
            raise ValueError("need 0 < stat_size < window_size")
        if window_size - stat_size < stat_size:
            raise ValueError("need window_size - stat_size >= stat_size (KSWIN samples stat_size older values)")
        self.alpha = alpha
        self.window_size = window_size
        self.stat_size = stat_size
        self._configure(alpha)

    def _fixed(self) -> dict[str, Any]:
        return {"window_size": self.window_size, "stat_size": self.stat_size}

    def _factory(self) -> Callable[[float], Any]:
        from river.drift import KSWIN

        ws, ss, seed = self.window_size, self.stat_size, self.seed
        return lambda alpha: KSWIN(alpha=alpha, window_size=ws, stat_size=ss, seed=seed)

    def _fast_model(self) -> Callable[[cal.FloatArray], cal.RunLengths] | None:
        ws, ss, seed = self.window_size, self.stat_size, self.seed
        return lambda streams: cal.kswin_run_lengths(streams, window_size=ws, stat_size=ss, seed=seed)

    def _stats(self) -> tuple[Any, Any, Any]:
        d = self._detector
        tested = d.drift_detected or len(d.window) >= self.window_size
        return None, (float(d.p_value) if tested else None), self._value


class PageHinkleyDetector(CalibratedDetector):
    """river ``PageHinkley`` (two-sided CUSUM of deviations from the running mean).

    ``threshold`` (None: calibrated to ``ert``) is the alarm level on the standardised scale.
    result(): ``distance`` is the CUSUM statistic (the larger side for ``mode="both"``) and
    ``threshold`` the level; ``p_val`` is ``None``.
    """

    name: ClassVar[str] = "page_hinkley"
    param_name: ClassVar[str] = "threshold"
    _search: ClassVar[tuple[float, float, float, bool]] = (50.0, 0.01, 1e6, True)

    def __init__(
        self,
        *,
        ert: float | None = 1000.0,
        x_ref: ArrayLike | None = None,
        threshold: float | None = None,
        min_instances: int = 30,
        delta: float = 0.005,
        alpha: float = 1 - 0.0001,
        mode: str = "both",
        seed: int = 0,
        calibration_runs: int = cal.DEFAULT_RUNS,
    ) -> None:
        super().__init__(ert, x_ref, seed, calibration_runs)
        if mode not in ("up", "down", "both"):
            raise ValueError("mode must be 'up', 'down' or 'both'")
        self.threshold = threshold
        self.min_instances = min_instances
        self.delta = delta
        self.alpha = alpha
        self.mode = mode
        self._configure(threshold)

    def _fixed(self) -> dict[str, Any]:
        return {"min_instances": self.min_instances, "delta": self.delta, "alpha": self.alpha, "mode": self.mode}

    def _factory(self) -> Callable[[float], Any]:
        from river.drift import PageHinkley

        fixed = self._fixed()
        return lambda threshold: PageHinkley(threshold=threshold, **fixed)

    def _fast_model(self) -> Callable[[cal.FloatArray], cal.RunLengths] | None:
        fixed = self._fixed()
        return lambda streams: cal.page_hinkley_run_lengths(streams, **fixed)

    def _stats(self) -> tuple[Any, Any, Any]:
        d = self._detector
        if d._x_mean.n < self.min_instances:
            return None, None, self._value
        up = d._sum_increase - d._min_increase
        down = d._max_decrease - d._sum_decrease
        stat = up if self.mode == "up" else down if self.mode == "down" else max(up, down)
        return float(stat), None, self._value
