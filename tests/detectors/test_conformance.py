"""One contract, every detector: clone, snapshot/restore, reset, result shape, public
constructor arguments, lazy imports. Small references and few bootstraps keep it fast."""

from __future__ import annotations

import inspect
import json
import pickle
import subprocess
import sys
from functools import cache
from typing import Any

import numpy as np
import pytest
from extra_marks import by_extra

import detectors
from detectors.base import SNAPSHOT_MAGIC, SNAPSHOT_VERSION, Detector, SnapshotError

_rng = np.random.default_rng(20240601)
REF_1D = _rng.standard_normal(200)
REF_BIN = (_rng.random(200) < 0.2).astype(int)
REF_MV = _rng.standard_normal((120, 4))

# Small, fast configurations (correctness of the contract, not detection quality).
SPECS: dict[str, dict[str, Any]] = {
    "adwin": {"ert": 300, "x_ref": REF_1D, "calibration_runs": 16, "clock": 8},
    "kswin": {"ert": 300, "x_ref": REF_1D, "calibration_runs": 16, "window_size": 40, "stat_size": 15},
    "page_hinkley": {"ert": 300, "x_ref": REF_1D, "calibration_runs": 16},
    "cusum": {"ert": 300, "x_ref": REF_1D, "calibration_runs": 16},
    "cvm": {"ert": 100, "x_ref": REF_1D, "window_sizes": (10, 20), "n_bootstraps": 200},
    "fet": {"ert": 100, "x_ref": REF_BIN, "window_sizes": (10, 30), "n_bootstraps": 300},
    "mmd": {"ert": 100, "x_ref": REF_MV, "window_size": 8, "n_bootstraps": 200},
    "lsdd": {"ert": 100, "x_ref": REF_MV, "window_size": 8, "n_bootstraps": 200},
    "kmmd": {"ert": 100, "x_ref": REF_MV, "window_size": 8},
    # Without event times one update is one second: windows of 10 and 20 updates, one bucket folded every 20.
    "windowed": {
        "ert": 300,
        "x_ref": REF_1D,
        "windows_s": (10.0, 20.0),
        "seasonal": False,
        "fold_s": 20.0,
        "warmup_s": 40.0,
        "min_count": 5,
    },
}
KINDS = {"continuous", "binary", "multivariate"}
DATA_KEYS = {"is_drift", "distance", "p_val", "threshold"}
META_KEYS = {"name", "detector", "ert", "n", "params"}


def test_every_name_has_a_spec() -> None:
    assert set(SPECS) == set(detectors.NAMES)


@cache
def _proto(name: str) -> Detector:
    return detectors.make(name, **SPECS[name])


def fresh(name: str) -> Detector:
    return _proto(name).clone()


@cache
def stream(kind: str, n: int = 240, change: int = 120) -> list[Any]:
    """A seeded stream with a strong change at ``change``, so that alarms happen."""
    rng = np.random.default_rng(7)
    if kind == "continuous":
        return [float(v) for v in np.r_[rng.standard_normal(change), rng.normal(2.5, 1.0, n - change)]]
    if kind == "binary":
        return [int(v) for v in np.r_[rng.random(change) < 0.2, rng.random(n - change) < 0.8]]
    return list(np.r_[rng.standard_normal((change, 4)), rng.normal(2.0, 1.0, (n - change, 4))].astype(np.float32))


def trace(det: Detector, xs: list[Any]) -> tuple[list[bool], list[Any]]:
    flags, results = [], []
    for x in xs:
        det.update(x)
        flags.append(det.drift_detected)
        results.append(det.result())
    return flags, results


names = pytest.mark.parametrize("name", by_extra(detectors.NAMES))


@names
def test_class_attributes(name: str) -> None:
    cls = detectors.detector_class(name)
    assert cls.name == name
    assert cls.kind in KINDS
    assert issubclass(cls, Detector)
    assert getattr(detectors, cls.__name__) is cls


@names
def test_constructor_args_are_public_attributes(name: str) -> None:
    det = _proto(name)
    spec = SPECS[name]
    for p in list(inspect.signature(type(det).__init__).parameters.values())[1:]:
        assert hasattr(det, p.name), p.name
        value = getattr(det, p.name)
        expected = spec.get(p.name, p.default)
        if p.name == "x_ref":
            np.testing.assert_array_equal(np.asarray(value, dtype=float), np.asarray(expected, dtype=float))
        elif isinstance(expected, tuple | list):
            assert tuple(value) == tuple(expected), p.name
        else:
            assert value == expected, p.name


@names
def test_result_has_the_fixed_shape(name: str) -> None:
    det = fresh(name)

    def check(res: Any, n: int) -> None:
        assert set(res) == {"data", "meta"}
        assert set(res["data"]) == DATA_KEYS
        assert set(res["meta"]) == META_KEYS
        assert type(res["data"]["is_drift"]) is bool
        for k in ("distance", "p_val", "threshold"):
            assert res["data"][k] is None or type(res["data"][k]) is float, (k, res["data"][k])
        assert res["meta"]["name"] == name
        assert res["meta"]["detector"] == type(det).__name__
        assert res["meta"]["n"] == n
        assert res["meta"]["ert"] == float(SPECS[name]["ert"])
        assert isinstance(res["meta"]["params"], dict)
        json.dumps(res)

    res = det.result()
    check(res, 0)
    assert res["data"] == {"is_drift": False, "distance": None, "p_val": None, "threshold": None}
    _, results = trace(det, stream(det.kind))
    for i, r in enumerate(results):
        check(r, i + 1)
    assert any(r["data"]["is_drift"] for r in results), "the change in the stream should be detected"
    if name != "adwin":  # river's ADWIN exposes no statistic
        assert any(r["data"]["distance"] is not None or r["data"]["p_val"] is not None for r in results)


@names
def test_clone_is_a_fresh_detector_with_equal_parameters(name: str) -> None:
    det = fresh(name)
    xs = stream(det.kind)
    trace(det, xs[:150])
    c = det.clone()
    assert type(c) is type(det)
    assert c.n == 0 and not c.drift_detected
    assert c.result()["meta"]["params"] == det.result()["meta"]["params"]
    for p in list(inspect.signature(type(det).__init__).parameters)[1:]:
        a, b = getattr(c, p), getattr(det, p)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b, p
    # fresh: behaves as a never-used detector; independent of the original
    assert trace(c, xs) == trace(fresh(name), xs)
    assert det.n == 150


@names
def test_same_parameters_and_seed_build_the_same_detector(name: str) -> None:
    xs = stream(detectors.detector_class(name).kind)
    assert trace(detectors.make(name, **SPECS[name]), xs) == trace(fresh(name), xs)


@names
@pytest.mark.parametrize("cut", [60, 150])
def test_snapshot_restore_continues_identically(name: str, cut: int) -> None:
    xs = stream(detectors.detector_class(name).kind)
    flags, results = trace(fresh(name), xs)
    det = fresh(name)
    trace(det, xs[:cut])
    data = det.snapshot()
    assert data.startswith(SNAPSHOT_MAGIC + bytes([SNAPSHOT_VERSION]))
    restored = type(det).restore(data)
    assert type(restored) is type(det) and restored.n == cut
    assert restored.result() == results[cut - 1]
    via_module = detectors.restore(data)
    twice = pickle.loads(pickle.dumps(restored))
    for d in (det, restored, via_module, twice):
        assert trace(d, xs[cut:]) == (flags[cut:], results[cut:])


@names
def test_snapshot_parts_hold_the_static_attributes_apart_and_join_identically(name: str) -> None:
    xs = stream(detectors.detector_class(name).kind)
    flags, results = trace(fresh(name), xs)
    det = fresh(name)
    before = {a: pickle.dumps(getattr(det, a)) for a in det.static_attrs}
    trace(det, xs[:100])
    # Static means static: the updates leave them as they were (a checkpoint writes them once).
    assert {a: pickle.dumps(getattr(det, a)) for a in det.static_attrs} == before
    data, static = det.snapshot_parts()
    assert set(static) == {a for a in det.static_attrs if getattr(det, a) is not None}
    assert len(data) <= len(det.snapshot())
    for restored in (type(det).restore_parts(data, static), detectors.restore_parts(data, static)):
        assert type(restored) is type(det) and restored.result() == results[99]
        assert restored.result()["meta"]["params"] == det.result()["meta"]["params"]
        assert trace(restored, xs[100:]) == (flags[100:], results[100:])
    with pytest.raises(SnapshotError):
        detectors.restore_parts(data, {"no_such_attribute": 1})
    if static:  # a static attribute that the bytes already hold is not overwritten
        with pytest.raises(SnapshotError):
            detectors.restore_parts(det.snapshot(), static)


@names
def test_updates_ignore_the_global_random_generators(name: str) -> None:
    import torch

    xs = stream(detectors.detector_class(name).kind)
    expected = trace(fresh(name), xs)
    det = fresh(name)
    flags, results = [], []
    for i, x in enumerate(xs):
        np.random.seed(i)
        torch.manual_seed(i)
        det.update(x)
        flags.append(det.drift_detected)
        results.append(det.result())
    assert (flags, results) == expected


@names
def test_reset_returns_to_the_fresh_state(name: str) -> None:
    det = fresh(name)
    xs = stream(det.kind)
    trace(det, xs[:200])
    det.reset()
    assert det.n == 0 and not det.drift_detected
    assert det.result()["data"] == {"is_drift": False, "distance": None, "p_val": None, "threshold": None}
    assert trace(det, xs) == trace(fresh(name), xs)


@names
def test_bad_inputs_raise_and_leave_the_state_alone(name: str) -> None:
    det = fresh(name)
    xs = stream(det.kind)
    trace(det, xs[:5])
    bad_by_kind: dict[str, list[Any]] = {
        "continuous": [float("nan"), float("inf")],
        "binary": [0.5, 2],
        "multivariate": [np.zeros(3), np.full(4, np.nan)],
    }
    bad = bad_by_kind[det.kind]
    for x in bad:
        with pytest.raises(ValueError):
            det.update(x)
    assert det.n == 5


def test_restore_refuses_what_it_cannot_read() -> None:
    with pytest.raises(SnapshotError):
        detectors.restore(b"not a snapshot")
    data = _proto("page_hinkley").snapshot()
    with pytest.raises(SnapshotError):
        detectors.restore(SNAPSHOT_MAGIC + bytes([SNAPSHOT_VERSION + 1]) + data[len(SNAPSHOT_MAGIC) + 1 :])
    with pytest.raises(SnapshotError):
        detectors.detector_class("adwin").restore(data)
    with pytest.raises(SnapshotError):
        detectors.restore(SNAPSHOT_MAGIC + bytes([SNAPSHOT_VERSION]) + pickle.dumps({"not": "a detector"}))


def test_make_rejects_unknown_names_and_missing_references() -> None:
    with pytest.raises(ValueError, match="unknown detector"):
        detectors.make("nope", ert=100)
    with pytest.raises(ValueError, match="x_ref"):
        detectors.make("kmmd", ert=100)


@pytest.mark.alibi
def test_alibi_detectors_reject_missing_references() -> None:
    for name in ("cvm", "fet", "mmd", "lsdd"):
        with pytest.raises(ValueError, match="x_ref"):
            detectors.make(name, ert=100)


def test_import_is_lazy() -> None:
    code = (
        "import sys, detectors\n"
        "assert detectors.NAMES and callable(detectors.make) and callable(detectors.restore)\n"
        "print(sorted(m for m in ('river', 'alibi_detect', 'torch', 'numpy', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout


def _same_result(got: Any, want: Any) -> bool:
    """Results equal, a statistic up to the last bits (a vectorised override sums in another order)."""
    if got["meta"] != want["meta"]:
        return False
    for key in DATA_KEYS:
        a, b = got["data"][key], want["data"][key]
        if isinstance(b, float) and isinstance(a, float):
            if a != pytest.approx(b, rel=1e-9, abs=1e-9):
                return False
        elif a != b:
            return False
    return True


@names
@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
def test_update_until_drift_is_update_one_value_at_a_time(name: str, chunk: int) -> None:
    """The batch contract (the ingest path feeds a batch's values of a signal in one call): in
    chunks, each call stopping at its first alarm, the alarms fall on the same values and every
    result is the one that many single updates leave."""
    xs = stream(detectors.detector_class(name).kind)
    flags, results = trace(fresh(name), xs)
    det = fresh(name)
    alarms, i = [], 0
    while i < len(xs):
        size = min(chunk, len(xs) - i)
        taken = det.update_until_drift(xs[i : i + size])
        assert 1 <= taken <= size
        assert taken == size or det.drift_detected, "stopped early without an alarm"
        i += taken
        if det.drift_detected:
            alarms.append(i - 1)
        assert det.n == results[i - 1]["meta"]["n"] and det.drift_detected == flags[i - 1]
        assert _same_result(det.result(), results[i - 1]), (i, det.result(), results[i - 1])
    assert alarms == [j for j, f in enumerate(flags) if f]
    assert alarms, "the stream's change raised no alarm: the test would prove nothing"


@pytest.mark.parametrize("mode", ["both", "up", "down"])
@pytest.mark.parametrize("min_instances", [1, 30])
def test_the_cusum_closed_form_alarms_where_its_steps_do(mode: str, min_instances: int) -> None:
    """CUSUM's one-pass form (cumulative sums and running minima) on long streams with shifts
    both ways, in chunks that cut anywhere: the same alarms as one step at a time, the same sums up
    to rounding; a non-finite value raises once the values before it are in, as ``update`` does."""
    from detectors.cusum import MANY_MIN

    rng = np.random.default_rng(11)
    xs = np.r_[rng.normal(0, 1, 3000), rng.normal(0.7, 1, 2000), rng.normal(-0.6, 1, 2000)].tolist()
    one = detectors.make("cusum", ert=500, x_ref=REF_1D, k=0.25, mode=mode, min_instances=min_instances)
    many = one.clone()
    want = []
    for j, x in enumerate(xs):
        one.update(x)
        if one.drift_detected:
            want.append(j)
    got, i = [], 0
    while i < len(xs):
        i += many.update_until_drift(xs[i : i + int(rng.integers(MANY_MIN, 400))])
        if many.drift_detected:
            got.append(i - 1)
    assert got == want and len(want) > 5
    assert many.result()["data"]["distance"] == pytest.approx(one.result()["data"]["distance"], abs=1e-9)
    before = many.n
    with pytest.raises(ValueError):
        many.update_until_drift([0.1] * 20 + [float("nan")] + [0.2] * 20)
    assert many.n == before + 20
