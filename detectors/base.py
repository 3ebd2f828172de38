"""The detector contract shared by every drift detector of the monitor.

Style follows river's ``drift`` detectors (constructor arguments are kept as public
attributes, state lives in underscore attributes, ``update(x) -> None`` and a read-only
``drift_detected`` property) and alibi-detect's result shape (``{"data": ..., "meta": ...}``).

This module imports only the standard library: ``import detectors`` must stay cheap.
"""

from __future__ import annotations

import abc
import copy
import math
import pickle
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, Self, TypedDict

#: Header of every snapshot: magic bytes, then one version byte, then a pickle.
SNAPSHOT_MAGIC = b"OMDET"
SNAPSHOT_VERSION = 1

Kind = Literal["continuous", "binary", "multivariate"]


class SnapshotError(ValueError):
    """The bytes are not a detector snapshot this code can read."""


class ResultData(TypedDict):
    is_drift: bool
    distance: float | None
    p_val: float | None
    threshold: float | None


class ResultMeta(TypedDict):
    name: str
    detector: str
    ert: float | None
    n: int
    params: dict[str, Any]


class Result(TypedDict):
    data: ResultData
    meta: ResultMeta


def finite_or_none(v: Any) -> float | None:
    """``float(v)`` when it is a finite number, else ``None`` (NaN, inf, None, arrays of size != 1)."""
    if type(v) is float:  # the common case, on every update: x - x is 0 only for a finite x
        return v if v - v == 0.0 else None
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class Detector(abc.ABC):
    """A streaming drift detector.

    Subclasses implement :meth:`_step` (one update, returning the decision and the
    statistics of that update), :meth:`_reset_state` and :meth:`_params`.

    The contract:

    * ``update(x) -> None``: ``x`` is a float (``kind == "continuous"``), 0/1 (``"binary"``)
      or a 1-D numpy array (``"multivariate"``).
    * ``drift_detected``: whether the *last* update detected drift.
    * ``reset()``: back to the state right after construction (a reference-based detector
      keeps its reference and its calibrated thresholds).
    * ``snapshot() -> bytes`` / ``restore(data)``: a restored detector continues exactly
      where the original stopped (same alarms at the same indices for the same inputs).
      The bytes are a pickle: only restore bytes you have authenticated.
    * ``clone()``: a fresh copy with the same parameters (and the same reference).
    * ``n``: updates since construction or the last ``reset()``.
    * ``result()``: one fixed shape for every detector (see :class:`Result`).

    A detector that alarms when a value exceeds a fixed level, to show what a subclass writes
    and what it gets (``detectors.make`` builds the real ones):

    >>> class Above(Detector):
    ...     name, kind = "above", "continuous"
    ...     def __init__(self, level):
    ...         super().__init__(ert=None)
    ...         self.level = level
    ...     def _step(self, x):
    ...         return x > self.level, x, None, self.level  # drift, distance, p_val, threshold
    ...     def _reset_state(self):
    ...         pass  # no online state besides what the base class keeps
    ...     def _params(self):
    ...         return {"level": self.level}
    >>> det = Above(2.0)
    >>> for x in (0.5, 1.0, 3.0):
    ...     det.update(x)
    >>> det.drift_detected, det.n
    (True, 3)
    >>> det.result()["data"]
    {'is_drift': True, 'distance': 3.0, 'p_val': None, 'threshold': 2.0}
    >>> det.update(float("inf"))
    >>> det.result()["data"]["distance"] is None  # a non-finite statistic becomes None
    True
    >>> det.reset(); det.n, det.drift_detected
    (0, False)
    >>> det
    Above(ert=None, level=2.0)
    """

    #: Registry name (``detectors.NAMES``).
    name: ClassVar[str]
    #: What ``update`` takes.
    kind: ClassVar[Kind]

    ert: float | None

    def __init__(self, ert: float | None) -> None:
        if ert is not None and not (math.isfinite(ert) and ert > 1):
            raise ValueError(f"ert must be a finite number > 1, got {ert!r}")
        self.ert = None if ert is None else float(ert)
        self._n = 0
        self._drift_detected = False
        self._distance: float | None = None
        self._p_val: float | None = None
        self._threshold: float | None = None

    # -- the contract ---------------------------------------------------------------
    @property
    def drift_detected(self) -> bool:
        """Whether the last update detected drift."""
        return self._drift_detected

    @property
    def n(self) -> int:
        """Updates since construction or the last :meth:`reset`."""
        return self._n

    def update(self, x: Any, t: float | None = None) -> None:
        """Update the detector with one observation (see :attr:`kind`).

        ``t``: the observation's event time in seconds. Detectors that count updates ignore it;
        detectors whose false-alarm budget is in time (``timed = True``) use it, and without it
        count one second per update."""
        if t is not None and self.timed:
            drift, distance, p_val, threshold = self._step_at(x, float(t))
        else:  # detectors that count updates go straight to _step: one call less per value
            drift, distance, p_val, threshold = self._step(x)
        self._n += 1
        self._drift_detected = bool(drift)
        self._distance = finite_or_none(distance)
        self._p_val = finite_or_none(p_val)
        self._threshold = finite_or_none(threshold)

    def update_until_drift(self, xs: Sequence[Any], ts: Sequence[float] | None = None) -> int:
        """Update with ``xs`` in order (``ts``: their event times), stopping after the first value
        on which drift is detected; returns how many values were taken (``len(xs)`` if none).

        The detector is then as after that many :meth:`update` calls: the same alarm at the same
        value, the same :meth:`result` (a vectorised override may differ in the last bits of its
        statistic, never in an alarm away from the threshold). A value that :meth:`update` refuses
        raises its error once the values before it are taken. This one loops; detectors whose
        recursion has a closed form override it (:class:`detectors.CUSUMDetector`), which is what
        lets the ingest path put a batch's values of a signal through in one call.

        >>> import detectors
        >>> det = detectors.make("cusum", ert=None, threshold=3.0, k=0.5)
        >>> det.update_until_drift([0.0, 1.5, 2.0, 2.0, 0.0])  # sums 0, 1, 2.5, 4 > 3: stops at the 4th
        4
        >>> det.drift_detected, det.n
        (True, 4)
        """
        for i, x in enumerate(xs):
            self.update(x, None if ts is None else ts[i])
            if self._drift_detected:
                return i + 1
        return len(xs)

    def reset(self) -> None:
        """Back to the state right after construction (reference and calibration kept)."""
        self._reset_state()
        self._n = 0
        self._drift_detected = False
        self._distance = self._p_val = self._threshold = None

    def clone(self) -> Self:
        """A fresh copy with the same parameters (and, if any, the same reference)."""
        new = copy.deepcopy(self)
        new.reset()
        return new

    def snapshot(self) -> bytes:
        """The full state as bytes: a version header, then a pickle. Sign them before storing."""
        return SNAPSHOT_MAGIC + bytes([SNAPSHOT_VERSION]) + pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def restore(cls, data: bytes) -> Self:
        """The detector a :meth:`snapshot` was taken of. Only pass bytes you have authenticated."""
        obj = load_snapshot(data)
        if not isinstance(obj, cls):
            raise SnapshotError(f"snapshot holds a {type(obj).__name__}, not a {cls.__name__}")
        return obj

    #: Attributes that hold the reference (arrays, typically) and never change after construction:
    #: :meth:`snapshot_parts` hands them out apart from the rest of the state.
    static_attrs: ClassVar[tuple[str, ...]] = ()

    def snapshot_parts(self) -> tuple[bytes, dict[str, Any]]:
        """:meth:`snapshot` without the :attr:`static_attrs` (set to ``None`` in it), and their values.

        A checkpoint at every batch then writes the online state (bytes) and, once per build, the
        reference, which is most of the size (a 500-value reference against a few sums).
        :meth:`restore_parts` joins them again."""
        static = {a: v for a in self.static_attrs if (v := getattr(self, a, None)) is not None}
        if not static:
            return self.snapshot(), {}
        light = copy.copy(self)  # shallow: the snapshot reads it, nothing writes it
        for a in static:
            setattr(light, a, None)
        return light.snapshot(), static

    @classmethod
    def restore_parts(cls, data: bytes, static: Mapping[str, Any]) -> Self:
        """The detector that :meth:`snapshot_parts` split into ``data`` and ``static``."""
        return _join(cls.restore(data), static)  # type: ignore[return-value]

    def result(self) -> Result:
        """The last update's decision and statistics, and the detector's metadata."""
        return {
            "data": {
                "is_drift": self._drift_detected,
                "distance": self._distance,
                "p_val": self._p_val,
                "threshold": self._threshold,
            },
            "meta": {
                "name": self.name,
                "detector": type(self).__name__,
                "ert": self.ert,
                "n": self._n,
                "params": self._params(),
            },
        }

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}(ert={self.ert!r}, {params})"

    # -- for subclasses ---------------------------------------------------------------
    #: Whether :meth:`update` uses event time (see :meth:`_step_at`).
    timed: ClassVar[bool] = False

    def _step_at(self, x: Any, t: float) -> tuple[bool, Any, Any, Any]:
        """One update at event time ``t`` (seconds): called only when :attr:`timed` is true (the
        others get :meth:`_step`)."""
        return self._step(x)

    @abc.abstractmethod
    def _step(self, x: Any) -> tuple[bool, Any, Any, Any]:
        """One update: ``(drift, distance, p_val, threshold)`` (non-finite values become ``None``)."""

    @abc.abstractmethod
    def _reset_state(self) -> None:
        """Reset the online state (not the reference nor the calibration)."""

    @abc.abstractmethod
    def _params(self) -> dict[str, Any]:
        """JSON-friendly parameters: the constructor arguments (arrays summarised) and calibrated values."""


def load_snapshot_parts(data: bytes, static: Mapping[str, Any]) -> Detector:
    """Restore any detector from :meth:`Detector.snapshot_parts` (authenticate ``data`` first)."""
    return _join(load_snapshot(data), static)


def _join(det: Detector, static: Mapping[str, Any]) -> Detector:
    unknown = sorted(set(static) - set(det.static_attrs))
    if unknown:
        raise SnapshotError(f"{type(det).__name__} has no static attributes {unknown}")
    for a, v in static.items():
        if getattr(det, a, None) is not None:
            raise SnapshotError(f"{type(det).__name__}.{a} is in the snapshot already")
        setattr(det, a, v)
    return det


def load_snapshot(data: bytes) -> Detector:
    """Restore any detector from :meth:`Detector.snapshot` bytes (authenticate them first)."""
    head = len(SNAPSHOT_MAGIC)
    if not isinstance(data, bytes | bytearray) or data[:head] != SNAPSHOT_MAGIC or len(data) <= head:
        raise SnapshotError("not a detector snapshot")
    version = data[head]
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(
            f"detector snapshot version {version} is not supported (this code reads {SNAPSHOT_VERSION})"
        )
    obj = pickle.loads(data[head + 1 :])  # noqa: S301 - the caller authenticates the bytes (HMAC)
    if not isinstance(obj, Detector):
        raise SnapshotError(f"snapshot holds a {type(obj).__name__}, not a Detector")
    return obj
