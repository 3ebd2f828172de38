"""Online drift detectors: the detector contract and its implementations.

``import detectors`` loads only the standard library: the implementations (numpy, river,
alibi-detect, torch) are imported when a detector is made, so the CLI starts fast.

:func:`make` builds one by name (an example there); :class:`Detector` is the contract every one
keeps. See ``detectors/README.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from detectors.base import Detector, Result, SnapshotError, load_snapshot, load_snapshot_parts
from detectors.extras import MissingExtraError, missing_for_module, module_extra, require_module

if TYPE_CHECKING:
    from detectors.alibi_detectors import CVMDetector, FETDetector, LSDDDetector, MMDDetector
    from detectors.cusum import CUSUMDetector
    from detectors.kernel_mmd import KernelMMDDetector
    from detectors.river_detectors import ADWINDetector, KSWINDetector, PageHinkleyDetector
    from detectors.windowed import WindowedShiftDetector

__all__ = [
    "NAMES",
    "ADWINDetector",
    "CUSUMDetector",
    "CVMDetector",
    "Detector",
    "FETDetector",
    "KSWINDetector",
    "KernelMMDDetector",
    "LSDDDetector",
    "MMDDetector",
    "MissingExtraError",
    "PageHinkleyDetector",
    "Result",
    "SnapshotError",
    "WindowedShiftDetector",
    "detector_class",
    "extra_of",
    "make",
    "missing_extra",
    "restore",
    "restore_parts",
]

# name -> (module, class)
_REGISTRY: dict[str, tuple[str, str]] = {
    "adwin": ("detectors.river_detectors", "ADWINDetector"),
    "kswin": ("detectors.river_detectors", "KSWINDetector"),
    "page_hinkley": ("detectors.river_detectors", "PageHinkleyDetector"),
    "cusum": ("detectors.cusum", "CUSUMDetector"),
    "cvm": ("detectors.alibi_detectors", "CVMDetector"),
    "fet": ("detectors.alibi_detectors", "FETDetector"),
    "mmd": ("detectors.alibi_detectors", "MMDDetector"),
    "lsdd": ("detectors.alibi_detectors", "LSDDDetector"),
    "kmmd": ("detectors.kernel_mmd", "KernelMMDDetector"),
    "windowed": ("detectors.windowed", "WindowedShiftDetector"),
}

#: Every detector name :func:`make` knows.
NAMES: tuple[str, ...] = tuple(_REGISTRY)

_CLASSES = {cls: mod for mod, cls in _REGISTRY.values()}


def detector_class(name: str) -> type[Detector]:
    """The class registered under ``name`` (imports its module)."""
    try:
        module, cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(NAMES)}") from None
    # alibi-detect's detectors need the `alibi` extra: one sentence naming it, not an import traceback.
    require_module(module, f"detector {name!r}")
    out: type[Detector] = getattr(importlib.import_module(module), cls)
    return out


def extra_of(name: str) -> str | None:
    """The optional extra of oversight-monitor the detector ``name`` needs (``"alibi"``), or None."""
    entry = _REGISTRY.get(name)
    return None if entry is None else module_extra(entry[0])


def missing_extra(name: str) -> str | None:
    """Why the detector ``name`` cannot be built in this install (the extra to add), or None.

    None too for an unknown name (:func:`detector_class` reports those). Nothing is imported.
    """
    entry = _REGISTRY.get(name)
    return None if entry is None else missing_for_module(entry[0], f"detector {name!r}")


def make(name: str, *, ert: float, x_ref: Any = None, **params: Any) -> Detector:
    """Build the detector ``name`` for a target ERT (mean updates between false alarms).

    ``x_ref``: reference data (a 1-D array for the univariate detectors, 0/1 for ``fet``, an
    ``(n, d)`` array for ``mmd``/``lsdd``/``kmmd``); required except for the river detectors, which then
    assume standardised inputs. ``params``: the detector's other constructor arguments.

    A CUSUM for a continuous signal, with about one false alarm per 500 updates while the signal
    looks like its reference:

    >>> import numpy as np
    >>> import detectors
    >>> reference = np.random.default_rng(0).normal(10.0, 2.0, 500)
    >>> det = detectors.make("cusum", ert=500, x_ref=reference)
    >>> round(det.result()["meta"]["params"]["threshold"], 1)  # calibrated to the ERT by simulation
    5.3
    >>> for x in [10.0] * 50 + [14.0] * 20:  # the mean moves up by two standard deviations
    ...     det.update(x)
    ...     if det.drift_detected:
    ...         break
    >>> det.drift_detected, det.n  # the fourth value after the change
    (True, 54)

    A snapshot holds the whole state: the restored detector continues where this one stopped.

    >>> same = detectors.restore(det.snapshot())
    >>> type(same).__name__, same.n, same.result() == det.result()
    ('CUSUMDetector', 54, True)
    """
    cls: Any = detector_class(name)  # the concrete classes take ert and x_ref
    det: Detector = cls(ert=ert, x_ref=x_ref, **params)
    return det


def restore(data: bytes) -> Detector:
    """A detector from :meth:`Detector.snapshot` bytes. Authenticate the bytes first: it unpickles."""
    return load_snapshot(data)


def restore_parts(data: bytes, static: Mapping[str, Any]) -> Detector:
    """A detector from :meth:`Detector.snapshot_parts`: the bytes (authenticate them first) and the
    static attributes handed out apart."""
    return load_snapshot_parts(data, static)


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'detectors' has no attribute {name!r}")
