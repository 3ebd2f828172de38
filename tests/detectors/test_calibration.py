"""The ERT calibration of the river detectors: the vectorised run-length models agree with
river, the search finds the parameter, results are cached and shared by look-alike references."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from detectors import calibration as cal
from detectors.river_detectors import KSWINDetector, PageHinkleyDetector


def test_page_hinkley_model_matches_river_exactly() -> None:
    streams = cal.null_streams(None, 6, 1500, seed=3)
    streams[3, 700:] += 1.0  # one stream with a change
    fixed: dict[str, Any] = {"min_instances": 30, "delta": 0.005, "alpha": 1 - 0.0001, "mode": "both"}
    fast = cal.page_hinkley_run_lengths(streams, **fixed)
    from river.drift import PageHinkley

    slow = cal.object_run_lengths(lambda thr: PageHinkley(threshold=thr, **fixed), streams)
    for threshold in (5.0, 20.0, 60.0):
        np.testing.assert_array_equal(fast(threshold), slow(threshold))
    assert (fast(20.0) > 0).any() and (fast(60.0) == 0).any()


@pytest.mark.parametrize("mode", ["both", "up", "down"])
def test_cusum_model_matches_the_detector_exactly(mode: str) -> None:
    from detectors.cusum import CUSUM

    streams = cal.null_streams(None, 6, 1500, seed=4)
    streams[2, 600:] += 1.0  # a rise
    streams[4, 900:] -= 1.0  # a fall
    fixed: dict[str, Any] = {"k": 0.5, "min_instances": 5, "mode": mode}
    fast = cal.cusum_run_lengths(streams, **fixed)
    slow = cal.object_run_lengths(lambda thr: CUSUM(thr, **fixed), streams)
    for threshold in (3.0, 8.0, 15.0):
        np.testing.assert_array_equal(fast(threshold), slow(threshold))
    runs = fast(8.0)
    assert runs[2 if mode != "down" else 4] > 0


def whole_stream_cusum_path(streams: Any, k: float, min_instances: int, mode: str) -> Any:
    """The CUSUM model's path over whole streams at once (how it was computed before chunking)."""
    up = np.cumsum(streams - k, axis=1)
    up = up - np.minimum(np.minimum.accumulate(up, axis=1), 0.0)
    down = np.cumsum(-streams - k, axis=1)
    down = down - np.minimum(np.minimum.accumulate(down, axis=1), 0.0)
    stat = up if mode == "up" else down if mode == "down" else np.maximum(up, down)
    stat[:, : max(min_instances - 1, 0)] = -np.inf
    return np.maximum.accumulate(stat, axis=1)


@pytest.mark.parametrize(("mode", "chunk", "min_instances"), [("both", 97, 5), ("up", 1, 300), ("down", 4096, 1)])
def test_the_chunked_cusum_path_is_the_whole_stream_path_bit_for_bit(mode: str, chunk: int, min_instances: int) -> None:
    """Chunks carry the walk, its low and the path's maximum: the same additions in the same
    order, so the calibrated thresholds cannot move. The warm-up can span chunks (300 > 97)."""
    streams = cal.null_streams(None, 7, 3001, seed=11)
    streams[1, 1500:] += 0.8
    streams[5, 2000:] -= 0.8
    got = cal.cusum_path_max(streams, k=0.3, min_instances=min_instances, mode=mode, chunk=chunk)
    want = whole_stream_cusum_path(streams, 0.3, min_instances, mode)
    assert np.array_equal(got, want)
    run = cal.cusum_run_lengths(streams, k=0.3, min_instances=min_instances, mode=mode, chunk=chunk)
    for level in (2.0, 9.0, 25.0, 1e9):
        level_hits = [int(np.argmax(row > level)) + 1 if (row > level).any() else 0 for row in want]
        assert run(level).tolist() == level_hits


def test_cusum_is_anchored_on_the_reference_not_the_running_mean() -> None:
    """A change soon after the start: the reference-anchored CUSUM finds it, PageHinkley (whose
    running mean follows the new level) much later."""
    from detectors.cusum import CUSUMDetector

    rng = np.random.default_rng(5)
    ref = rng.standard_normal(500)
    stream = np.r_[rng.standard_normal(20), rng.normal(-1.0, 1.0, 600)]
    delays = {}
    for det in (CUSUMDetector(ert=20000, x_ref=ref), PageHinkleyDetector(ert=20000, x_ref=ref, delta=0.5, alpha=1.0)):
        delays[det.name] = next((i - 20 for i, x in enumerate(stream, 1) if det.update(x) or det.drift_detected), None)
    assert delays["cusum"] is not None and delays["cusum"] < 60, delays
    assert delays["page_hinkley"] is None or delays["page_hinkley"] > 2 * delays["cusum"], delays


@pytest.mark.parametrize("seed", range(3))
def test_ks_statistic_matches_scipy_with_ties(seed: int) -> None:
    from scipy import stats

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 12, size=(50, 30))  # many ties, within and across samples
    b = rng.integers(0, 12, size=(50, 30)) + rng.integers(0, 3, size=(50, 1))
    k = cal.ks_k(a, b)
    expected = [round(stats.ks_2samp(x, y).statistic * 30) for x, y in zip(a, b, strict=True)]
    np.testing.assert_array_equal(k, expected)


def test_kswin_critical_value_follows_rivers_rule() -> None:
    p = cal.kswin_p_values(30)
    assert all(a >= b for a, b in itertools.pairwise(p))  # p falls as D grows
    for alpha in (0.5, 0.05, 0.005, 1e-4, 1e-9):
        k = cal.kswin_critical_k(alpha, 30)
        assert p[k] <= alpha and k / 30 > 0.1
        assert k == 4 or p[k - 1] > alpha
    assert cal.kswin_critical_k(1e-30, 30) == 31  # unreachable: never fires


def test_kswin_model_agrees_with_river_in_distribution() -> None:
    streams = cal.null_streams(None, 32, 600, seed=5)
    alpha = 0.02  # a short ERT keeps river's slow KSWIN cheap here
    fast = cal.kswin_run_lengths(streams, window_size=100, stat_size=30, seed=1)(alpha)
    from river.drift import KSWIN

    slow = cal.object_run_lengths(lambda a: KSWIN(alpha=a, seed=1), streams)(alpha)
    e_fast, e_slow = cal.estimate_ert(fast, 600), cal.estimate_ert(slow, 600)
    assert 1 / 1.5 < e_fast / e_slow < 1.5, (e_fast, e_slow)


def test_search_finds_the_parameter_on_log_scale() -> None:
    # A synthetic detector whose run lengths are exactly 1000 / param (decreasing in param).
    def model(param: float) -> cal.IntArray:
        return np.full(20, max(1, round(1000 / param)), dtype=np.int64)

    res = cal.search(model, target_ert=250, max_len=10**6, start=0.01, lo=1e-6, hi=1e6, increasing=False, rtol=0.02)
    assert res.converged and abs(res.ert_estimate / 250 - 1) <= 0.02
    assert res.param == pytest.approx(4.0, rel=0.03)
    assert res.evaluations <= 12
    # Out of reach: the closest bound, not converged.
    res = cal.search(model, target_ert=10**7, max_len=10**9, start=1, lo=0.5, hi=10, increasing=False)
    assert not res.converged and res.param == 0.5


def test_estimate_handles_censoring() -> None:
    assert cal.estimate_ert(np.array([0, 0]), 100) == math.inf
    assert cal.estimate_ert(np.array([10, 0, 30]), 100) == pytest.approx((10 + 30 + 100) / 2)


def test_calibration_is_cached_and_shared_by_standardised_lookalikes() -> None:
    ref = np.random.default_rng(0).standard_normal(400)
    a = PageHinkleyDetector(ert=500, x_ref=ref)
    b = PageHinkleyDetector(ert=500, x_ref=ref * 7.0 + 100.0)  # same shape after standardising
    assert a.calibration is b.calibration  # one cache entry
    assert a.calibration is not None and a.calibration.converged
    assert a.param_value == b.param_value
    cal.clear_cache()
    c = PageHinkleyDetector(ert=500, x_ref=ref)
    assert c.calibration == a.calibration  # recomputed: deterministic


def test_explicit_parameter_skips_calibration() -> None:
    det = KSWINDetector(ert=None, alpha=0.001)
    assert det.calibration is None and det.param_value == 0.001 and det.alpha == 0.001
    with pytest.raises(ValueError):
        KSWINDetector(ert=None)


def test_reference_checks() -> None:
    # A constant reference (a signal that never moved during the warm-up) is centred with unit
    # scale: a later move away from the constant is drift.
    det = PageHinkleyDetector(ert=500, x_ref=np.ones(50))
    fired_before = fired_after = False
    for i in range(400):
        det.update(1.0 if i < 100 else 6.0)
        if i < 100:
            fired_before = fired_before or det.drift_detected
        else:
            fired_after = fired_after or det.drift_detected
    assert fired_after and not fired_before
    with pytest.raises(ValueError, match="NaN"):
        PageHinkleyDetector(ert=500, x_ref=np.array([1.0, np.nan, 2.0]))


def test_adjustment_coefficient_is_2k_for_normal_increments() -> None:
    # E exp(theta (Z - k)) = 1 for Z ~ N(0, 1) at theta = 2k: checked on a large sample.
    z = np.random.default_rng(0).standard_normal(400_000)
    assert cal.adjustment_coefficient(z - 0.5) == pytest.approx(1.0, rel=0.05)
    assert cal.cusum_log_arl_slope(None, k=0.25, mode="both") == 0.5
    assert cal.adjustment_coefficient(np.full(10, -0.3)) == math.inf  # a walk that never rises
    with pytest.raises(ValueError, match="allowance"):
        cal.cusum_log_arl_slope(None, k=0.0, mode="both")


@pytest.mark.parametrize("shape", ["normal", "skewed", "binary"])
def test_cusum_beyond_simulation_is_extrapolated_to_the_same_threshold(shape: str) -> None:
    """Calibrated at a small cap and extrapolated, the threshold is the one a direct simulation
    finds, and its measured ERT on fresh null streams is at least about the target."""
    rng = np.random.default_rng(11)
    ref = {
        "normal": rng.standard_normal(600),
        "skewed": rng.exponential(1.0, 600),
        "binary": (rng.random(600) < 0.1).astype(float),
    }[shape]
    k, target = 0.5, 20_000.0
    slope = cal.cusum_log_arl_slope(ref, k=k, mode="both")

    def fast(s: cal.FloatArray) -> cal.RunLengths:
        return cal.cusum_run_lengths(s, k=k, min_instances=1, mode="both")

    kw: dict[str, Any] = {"start": 10.0, "lo": 0.01, "hi": 1e6, "increasing": True, "fast": fast, "n_runs": 96}
    direct = cal.calibrate(None, ref, target, **kw)
    extrapolated = cal.calibrate(None, ref, target, **kw, log_arl_slope=slope, max_simulated_ert=1500)
    assert extrapolated.max_len == math.ceil(3 * 1500)  # it simulated at the cap only
    assert extrapolated.param == pytest.approx(direct.param, abs=0.08 * direct.param)
    _, _, z = cal.standardise(ref)
    run = fast(cal.null_streams(z, 96, 100_000, seed=5))
    assert cal.estimate_ert(run(extrapolated.param), 100_000) > 0.6 * target


def test_an_ert_beyond_simulation_costs_no_more_and_is_refused_without_a_slope() -> None:
    from detectors.cusum import CUSUMDetector

    x = np.random.default_rng(2).standard_normal(500)
    # One false alarm per 30 days at 1 episode/s for each of 8 detectors: 20.7 M updates. The
    # simulation is that of MAX_SIMULATED_ERT (it once asked for 28 GB).
    det = CUSUMDetector(ert=2_592_000 * 8, x_ref=x, k=0.5)
    cap = CUSUMDetector(ert=cal.MAX_SIMULATED_ERT, x_ref=x, k=0.5)
    assert det.calibration is not None and det.calibration.max_len == math.ceil(3 * cal.MAX_SIMULATED_ERT)
    slope = cal.cusum_log_arl_slope(x, k=0.5, mode="both")
    assert det.param_value == pytest.approx(cap.param_value + math.log(2_592_000 * 8 / cal.MAX_SIMULATED_ERT) / slope)
    with pytest.raises(ValueError, match="above what this detector can calibrate"):
        PageHinkleyDetector(ert=cal.MAX_SIMULATED_ERT * 2, x_ref=x)
