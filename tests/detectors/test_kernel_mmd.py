"""The built-in kernel MMD detector (``kmmd``): its statistic is the squared MMD it claims (live
and in the null simulation), the simulated streams and alarm counting are what the calibration
assumes, the realised false-alarm rate on fresh null data matches the ERT, and it needs neither
torch nor alibi-detect."""

from __future__ import annotations

import math
import subprocess
import sys
from functools import cache

import numpy as np
import pytest
from numpy.typing import NDArray

from detectors import kernel_mmd as km


def brute_mmd2(ref: NDArray[np.float64], win: NDArray[np.float64], bandwidth: float) -> float:
    """Unbiased squared MMD with a Gaussian RBF kernel, from the definition."""

    def k(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        gram: NDArray[np.float64] = np.exp(-d2 / (2 * bandwidth**2))
        return gram

    n, w = len(ref), len(win)
    krr, kyy = k(ref, ref), k(win, win)
    return float(
        (krr.sum() - np.trace(krr)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (w * (w - 1))
        - 2 * k(ref, win).mean()
    )


@cache
def reference_kernel(n: int = 90, d: int = 5) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    x = np.random.default_rng(3).standard_normal((n, d))
    sq_norm = (x**2).sum(1)
    sq = km.squared_distances(x, sq_norm, x, sq_norm)
    np.fill_diagonal(sq, 0.0)
    bw = km.median_bandwidth(sq)
    return x, km.rbf(sq, bw), bw


def test_null_model_statistic_is_the_permutation_mmd() -> None:
    """Each simulated window statistic is the squared MMD of the window's reference rows against
    the other reference rows: across chunk boundaries too (a small chunk forces several)."""
    x, kernel, bw = reference_kernel()
    w = 6
    model = km.NullModel(kernel, w)
    paths = model.paths(np.random.default_rng(0), 3, 170, chunk=50)
    segs = [seg[:, 0 if t0 == 0 else w - 1 :] for t0, seg in model.streams(np.random.default_rng(0), 3, 170, chunk=50)]
    ids = np.concatenate(segs, axis=1)
    assert ids.shape == (3, 170)
    assert np.all(np.isneginf(paths[:, : w - 1]))
    for r in range(3):
        for t in (w - 1, w, 49, 50, 51, 100, 169):
            win = ids[r, t - w + 1 : t + 1]
            rest = np.setdiff1d(np.arange(len(x)), win)
            assert paths[r, t] == pytest.approx(brute_mmd2(x[rest], x[win], bw), abs=1e-6), (r, t)


def test_live_statistic_is_the_mmd_of_the_last_window() -> None:
    x, _, bw = reference_kernel()
    w = 7
    det = km.KernelMMDDetector(ert=300, x_ref=x, window_size=w)
    assert det.bandwidth == bw
    stream = np.random.default_rng(1).normal(0.3, 1.2, (200, x.shape[1]))
    for i, y in enumerate(stream, 1):
        det.update(y)
        dist = det.result()["data"]["distance"]
        if i < w:
            assert dist is None and not det.drift_detected
        elif i in (w, w + 1, 2 * w, 3 * w + 2, 199, 200):  # before and after wrapping the window
            assert dist is not None and dist == pytest.approx(brute_mmd2(x, stream[i - w : i], bw), abs=1e-9), i
            assert det.drift_detected == (dist > det.threshold)


@pytest.mark.parametrize(("n", "w"), [(40, 10), (500, 20)])
def test_streams_have_distinct_windows_and_uniform_entries(n: int, w: int) -> None:
    rng = np.random.default_rng(4)
    first = km.distinct_window_streams(rng, n, 4, 3000, w)
    more = km.distinct_window_streams(rng, n, 4, 500, w, first[:, 1 - w :])
    np.testing.assert_array_equal(more[:, : w - 1], first[:, 1 - w :])  # the prefix is kept
    for s in (first, more):
        windows = np.lib.stride_tricks.sliding_window_view(s, w, axis=1)
        ordered = np.sort(windows, axis=-1)
        assert not (ordered[..., 1:] == ordered[..., :-1]).any()
    counts = np.bincount(first.reshape(-1), minlength=n)
    expected = first.size / n
    assert np.abs(counts - expected).max() < 5 * math.sqrt(expected)  # no label favoured


def brute_alarms(path: NDArray[np.float64], threshold: float, w: int) -> int:
    """A detector that restarts after each alarm (no test for the next W - 1 updates)."""
    alarms, blocked_until = 0, -1
    for t, v in enumerate(path):
        if t > blocked_until and v > threshold:
            alarms += 1
            blocked_until = t + w - 1
    return alarms


def test_alarm_counting_matches_a_restarting_detector() -> None:
    _, kernel, _ = reference_kernel()
    w = 6
    model = km.NullModel(kernel, w)
    rows, length = 4, 3000
    paths = model.paths(np.random.default_rng(5), rows, length)
    # keep=300: the floor rises during the run, as in a long calibration.
    high = km.Exceedances(rows, length, w, keep=300)
    for t0, stats in model.blocks(np.random.default_rng(5), rows, length):
        high.add(t0, stats)
    when, value = high.levels()
    assert high.floor > -np.inf and len(value) <= 600
    for q in (0.99, 0.995, 0.999):
        level = float(np.quantile(paths[:, w - 1 :], q))
        assert level > high.floor
        expected = sum(brute_alarms(p, level, w) for p in paths)
        assert km.Exceedances.alarms(when[value > level], w) == expected > 0


def test_realised_false_alarms_match_the_ert() -> None:
    """Fresh data from the reference's distribution (not reference rows), a new reference per
    detector, reset after each alarm (as the monitor does): the pooled run length is the ERT
    (calibration noise ~14% per detector, sampling noise ~8% over ~150 alarms)."""
    ert, w, d = 150, 10, 6
    alarms = updates = 0
    for r in range(6):
        rng = np.random.default_rng(r)
        det = km.KernelMMDDetector(ert=ert, x_ref=rng.standard_normal((160, d)), window_size=w, seed=r)
        for y in rng.standard_normal((4000, d)):
            det.update(y)
            if det.drift_detected:
                alarms += 1
                det.reset()
        updates += 4000
    realised = updates / alarms
    print(f"realised ERT {realised:.0f} for a target of {ert} ({alarms} alarms)")
    assert ert / 1.4 < realised < ert * 1.4


def test_calibration_follows_the_ert_and_the_seed() -> None:
    _, kernel, _ = reference_kernel()
    a = km.calibrate(kernel, 6, 200, seed=3)
    assert a == km.calibrate(kernel, 6, 200, seed=3)  # deterministic
    b = km.calibrate(kernel, 6, 2000, seed=3)
    assert a.converged and b.converged
    assert b.param > a.param
    assert a.ert_estimate == pytest.approx(200, rel=0.1) and b.ert_estimate == pytest.approx(2000, rel=0.1)
    assert a.n_alarms == pytest.approx(km.DEFAULT_RUNS, rel=0.15)


def test_median_bandwidth_rule() -> None:
    x = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    sq_norm = (x**2).sum(1)
    sq = km.squared_distances(x, sq_norm, x, sq_norm)
    # distinct pairs: 25, 100, 25, 25, 100 (the duplicate pair at distance 0 left out): median 25
    assert km.median_bandwidth(sq) == pytest.approx(math.sqrt(25 / 2))
    same = np.ones((5, 3))
    assert km.median_bandwidth(km.squared_distances(same, (same**2).sum(1), same, (same**2).sum(1))) == 1.0


def test_constant_reference_alarms_only_on_other_points() -> None:
    det = km.KernelMMDDetector(ert=100, x_ref=np.ones((40, 3)), window_size=5)
    for _ in range(50):
        det.update(np.ones(3))
        assert not det.drift_detected
    fired = False
    for _ in range(5):
        det.update(np.array([1.0, 1.0, 1.5]))
        fired = fired or det.drift_detected
    assert fired


def test_state_and_snapshot_do_not_grow() -> None:
    x, _, _ = reference_kernel()
    det = km.KernelMMDDetector(ert=300, x_ref=x, window_size=7)
    rng = np.random.default_rng(2)
    for y in rng.standard_normal((50, x.shape[1])):
        det.update(y)
    size = len(det.snapshot())
    for y in rng.standard_normal((2000, x.shape[1])):
        det.update(y)
    assert len(det.snapshot()) <= size + 8  # the update counter takes a byte more


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x_ref": np.zeros((30, 2)), "window_size": 8}, "4 \\* window_size"),
        ({"x_ref": np.zeros(40)}, "2-D"),
        ({"x_ref": np.zeros((100, 2)), "ert": 20}, "larger than window_size"),
        ({"x_ref": np.zeros((100, 2)), "sigma": 0.0}, "sigma"),
        ({"x_ref": np.zeros((100, 2)), "window_size": 1}, "window_size"),
        ({"x_ref": np.zeros((100, 2)), "window_size": 10.5}, "window_size"),
        ({"x_ref": np.zeros((100, 2)), "calibration_runs": 1}, "calibration_runs"),
        ({"x_ref": np.full((100, 2), np.nan)}, "NaN"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        km.KernelMMDDetector(**{"ert": 500, **kwargs})  # type: ignore[arg-type]


def test_whole_floats_from_configuration_files_are_taken() -> None:
    x, _, _ = reference_kernel()
    a = km.KernelMMDDetector(ert=300, x_ref=x, window_size=7.0, calibration_runs=16.0, seed=2.0)  # type: ignore[arg-type]
    b = km.KernelMMDDetector(ert=300, x_ref=x, window_size=7, calibration_runs=16, seed=2)
    assert a.window_size == 7 and type(a.window_size) is int
    assert a.threshold == b.threshold


def test_needs_neither_torch_nor_alibi() -> None:
    code = (
        "import sys, numpy as np, detectors\n"
        "det = detectors.make('kmmd', ert=200, x_ref=np.random.default_rng(0).standard_normal((100, 4)))\n"
        "det.update(np.zeros(4))\n"
        "print(sorted(m for m in ('torch', 'alibi_detect', 'river', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_window_of_float32_inputs_is_pickled_as_float32_and_continues_exactly() -> None:
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((120, 16)).astype(np.float32)
    xs = list(rng.standard_normal((90, 16)).astype(np.float32))
    det = km.KernelMMDDetector(ert=500, x_ref=ref, window_size=10)
    for x in xs[:40]:
        det.update(x)
    narrow, static = det.snapshot_parts()
    wide_det = det.clone()
    for x in xs[:40]:
        wide_det.update(x.astype(np.float64) + 1e-9)  # not representable in float32: kept float64
    wide, _ = wide_det.snapshot_parts()
    assert len(narrow) < len(wide) - 10 * 16 * 3  # about half the window's bytes saved
    for data, source in ((narrow, det), (wide, wide_det)):
        restored = km.KernelMMDDetector.restore_parts(data, static)
        for x in xs[40:]:  # the same statistic at every update: the window came back exactly
            restored.update(x)
            source.update(x)
            assert restored.result() == source.result()
