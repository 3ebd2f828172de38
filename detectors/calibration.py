"""Calibrating a detector's sensitivity parameter to a target expected run time (ERT).

The ERT is the mean number of updates between false alarms on stationary data. alibi-detect's
online detectors take it natively (they set their thresholds by simulation). river's detectors
take a sensitivity parameter instead (ADWIN ``delta``, KSWIN ``alpha``, PageHinkley
``threshold``); this module finds the value of that parameter whose false-alarm rate matches
the ERT.

Method
------
1. *Null streams.* The reference sample is standardised (``z = (x - mean) / std``; the
   detector then sees standardised inputs too) and resampled with replacement into
   ``n_runs`` (default 48) streams of length ``max_len = ceil(max_len_factor * ert)``
   (default 3 x ERT): stationary data
   with the reference's distribution (the bootstrap null). Without a reference, a standard
   normal sample of 5,000 stands in for it. The streams are drawn once, from ``seed``, and
   reused for every candidate value (common random numbers), so the estimated ERT is a
   monotone function of the parameter and the search is deterministic.
2. *Run lengths.* For a candidate value, a fresh detector runs over each stream until its
   first alarm; a run without alarm is censored at ``max_len``.
3. *ERT estimate.* With censoring, the mean of the observed run lengths is biased low; the
   estimate is the exponential (geometric) maximum-likelihood estimate
   ``(sum of observed run lengths + max_len * censored runs) / number of alarms``.
   Its relative standard error is about ``1 / sqrt(alarms)`` (~15% for 48 runs).
4. *Search.* Bisection on the log of the parameter: the bracket ``[lo, hi]`` is found by
   stepping outward (x10) from a starting value, then split at its log-midpoint (or, when
   both ends have finite estimates, at the log-log interpolation of the target, kept within
   the middle 80% of the bracket: this halves the number of evaluations for power-law
   relations). It stops when the estimate is within ``rtol`` (relative) of the target or
   the bracket is exhausted, and returns the evaluated value whose estimate is closest to
   the target on log scale (``converged`` tells whether it met ``rtol``). KSWIN's alarm
   rule is discrete (``p <= alpha`` with a KS statistic in steps of ``1/stat_size``), so
   only some ERTs are reachable: the closest reachable one is returned.

Speed. Run lengths are computed by *vectorised* equivalents of the detectors where the
statistic's path does not depend on the parameter (PageHinkley: the two-sided CUSUM paths via
``scipy.signal.lfilter``, then a first-passage search for any threshold; KSWIN: the KS
statistic at every step for every stream, then a first-passage search for the critical value
of any ``alpha``). ADWIN runs the real river detector (its Cython core does ~2.5 us an update;
a calibration at ERT 1000-3000 takes 1-3 s). The CUSUM path is built a chunk of time steps at a
time (:func:`cusum_path_max`), in cache, and a first passage is a binary search per run: at the
default ERT (48 runs of 540,000 steps) the path takes 0.65 s where whole-stream passes took
1-2.8 s. See ``detectors/README.md`` for the values found.
Bounded cost. The simulation holds ``n_runs x max_len_factor x ERT`` values, so it is capped at
``MAX_SIMULATED_ERT`` (250,000: about 36 M values, ~0.6 GB at the peak of the CUSUM model: the
streams and the path, which is built in chunks). Above it
a detector that knows how its ERT grows with its parameter (``log_arl_slope``) is calibrated at
the cap and extrapolated: for a CUSUM on increments ``y = z - k`` the false-alarm run length
grows as ``C exp(theta h)`` in the threshold ``h`` (Siegmund; Cramer-Lundberg for the random
walk), where ``theta > 0`` solves ``E exp(theta y) = 1`` on the standardised reference itself
(``2k`` for a normal reference). ``h = h_cap + log(ERT / cap) / theta`` with the smaller
``theta`` of the two sides is conservative for a two-sided CUSUM: each side's run length grows by
at least ``ERT / cap``. A detector without a slope refuses an ERT above the cap with a clear
error instead of allocating tens of GB (an ERT of 2.6 M episodes, one false alarm per 30 days at
1 episode/s, asked for 28 GB). Memory and time therefore no longer grow with the ERT.
Results are cached in-process per (detector, fixed parameters, ERT, reference summary, search
settings), where the reference summary is the standardised reference's quantiles rounded to
0.1 sd and its share of distinct values rounded to 0.1: streams whose standardised references
look alike share one calibration.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

#: param -> first-alarm index (1-based) per run; 0 means no alarm within the stream (censored).
RunLengths = Callable[[float], IntArray]

DEFAULT_RUNS = 48
DEFAULT_MAX_LEN_FACTOR = 3.0
DEFAULT_RTOL = 0.1
#: The largest ERT simulated; above it a detector's ``log_arl_slope`` extrapolates (see the module).
MAX_SIMULATED_ERT = 250_000.0
#: Time steps of the CUSUM model computed at once (48 runs x 2,048 float64: 0.8 MB, in cache).
CUSUM_CHUNK = 2048
_GAUSSIAN_REF_SIZE = 5000
_SUMMARY_PROBS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


class _Updatable(Protocol):
    def update(self, x: Any) -> Any: ...

    @property
    def drift_detected(self) -> bool: ...


@dataclass(frozen=True)
class CalibrationResult:
    """Outcome of :func:`calibrate`."""

    param: float  # the chosen parameter value
    ert_estimate: float  # estimated mean run length at ``param`` (inf: no alarm at all)
    target_ert: float
    n_runs: int
    n_alarms: int  # runs with an alarm before max_len, at ``param``
    max_len: int
    evaluations: int
    converged: bool  # estimate within rtol of the target

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- reference handling ----------------------------------------------------------------------
def standardise(x_ref: ArrayLike | None) -> tuple[float, float, FloatArray | None]:
    """``(mean, std, standardised reference)``; ``(0, 1, None)`` without a reference."""
    if x_ref is None:
        return 0.0, 1.0, None
    x = np.asarray(x_ref, dtype=np.float64).reshape(-1)
    if x.size < 2:
        raise ValueError("the reference needs at least 2 values")
    if not np.all(np.isfinite(x)):
        raise ValueError("the reference contains NaN or infinite values")
    mu, sd = float(x.mean()), float(x.std())
    if not sd > 0:
        # A signal that was constant during the warm-up (e.g. no non-text characters at all):
        # centre on that constant, keep unit scale, and calibrate on the Gaussian null.
        return mu, 1.0, None
    return mu, sd, (x - mu) / sd


def reference_summary(z_ref: FloatArray | None) -> Hashable:
    """A coarse description of a standardised reference (the calibration cache key)."""
    if z_ref is None:
        return ("gaussian",)
    q = np.round(np.quantile(z_ref, _SUMMARY_PROBS), 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    distinct = round(len(np.unique(z_ref)) / len(z_ref), 1)
    return (*(float(v) for v in q), distinct)


def null_streams(z_ref: FloatArray | None, n_runs: int, length: int, seed: int) -> FloatArray:
    """``n_runs`` stationary streams: the standardised reference resampled with replacement."""
    rng = np.random.default_rng(seed)
    if z_ref is None:
        z_ref = rng.standard_normal(_GAUSSIAN_REF_SIZE)
    idx = rng.integers(0, len(z_ref), size=(n_runs, length))
    out: FloatArray = z_ref[idx]
    return out


def estimate_ert(run_lengths: IntArray, max_len: int) -> float:
    """Censored exponential MLE of the mean run length (``inf`` without any alarm)."""
    alarms = run_lengths > 0
    k = int(alarms.sum())
    if k == 0:
        return math.inf
    exposure = float(run_lengths[alarms].sum()) + float(max_len) * float((~alarms).sum())
    return exposure / k


# -- run-length models ---------------------------------------------------------------------
def object_run_lengths(factory: Callable[[float], _Updatable], streams: FloatArray) -> RunLengths:
    """Run lengths by running ``factory(param)`` detectors (anything with update / drift_detected)."""
    rows = [row.tolist() for row in streams]

    def run(param: float) -> IntArray:
        out = np.zeros(len(rows), dtype=np.int64)
        for r, row in enumerate(rows):
            det = factory(param)
            update = det.update
            for i, x in enumerate(row):
                update(x)
                if det.drift_detected:
                    out[r] = i + 1
                    break
        return out

    return run


def _first_passage(path_max: FloatArray, level: float, strict: bool) -> IntArray:
    """Per row, 1-based index of the first value ``> level`` (``>=`` if not strict) of a
    non-decreasing path; 0 if none. A binary search per row: the calibration's search asks a
    path for several levels, and a full comparison pass over ``n_runs x max_len`` per level
    cost more than building the path."""
    side: Literal["left", "right"] = "right" if strict else "left"
    idx = np.fromiter((np.searchsorted(row, level, side=side) for row in path_max), np.int64, len(path_max))
    return np.where(idx < path_max.shape[1], idx + 1, 0)


def page_hinkley_run_lengths(
    streams: FloatArray, *, min_instances: int, delta: float, alpha: float, mode: str
) -> RunLengths:
    """Vectorised river ``PageHinkley`` (param: ``threshold``): the statistic's path does not
    depend on the threshold, so it is computed once and each threshold is a first passage."""
    from scipy.signal import lfilter

    n = np.arange(1, streams.shape[1] + 1, dtype=np.float64)
    dev = streams - np.cumsum(streams, axis=1) / n
    s_inc = lfilter([1.0], [1.0, -alpha], dev - delta, axis=1)
    s_dec = lfilter([1.0], [1.0, -alpha], dev + delta, axis=1)
    test_inc = s_inc - np.minimum.accumulate(s_inc, axis=1)
    test_dec = np.maximum(np.maximum.accumulate(s_dec, axis=1), -1.0) - s_dec
    if mode == "up":
        stat = test_inc
    elif mode == "down":
        stat = test_dec
    else:
        stat = np.maximum(test_inc, test_dec)
    stat[:, : max(min_instances - 1, 0)] = -np.inf
    path = np.maximum.accumulate(stat, axis=1)

    def run(threshold: float) -> IntArray:
        return _first_passage(path, threshold, strict=True)

    return run


def cusum_run_lengths(
    streams: FloatArray, *, k: float, min_instances: int, mode: str, chunk: int = CUSUM_CHUNK
) -> RunLengths:
    """Vectorised :class:`detectors.cusum.CUSUM` (param: ``threshold``). A CUSUM
    ``S_t = max(0, S_{t-1} + y_t)`` equals ``X_t - min(0, min_{j<=t} X_j)`` for the random walk
    ``X = cumsum(y)``, so the path is two cumulative sums and each threshold a first passage."""
    path = cusum_path_max(streams, k=k, min_instances=min_instances, mode=mode, chunk=chunk)

    def run(threshold: float) -> IntArray:
        return _first_passage(path, threshold, strict=True)

    return run


def cusum_path_max(
    streams: FloatArray, *, k: float, min_instances: int, mode: str, chunk: int = CUSUM_CHUNK
) -> FloatArray:
    """The running maximum of the CUSUM statistic of every stream, ``chunk`` steps at a time.

    Over whole streams (48 x 540,000 values at the default ERT) each of the dozen array passes
    goes through main memory; a chunk's passes stay in cache, and the random walk, its running
    minimum and the path's running maximum carry from one chunk to the next. Every value is the
    one the whole-stream computation gives, bit for bit: a chunk's first increment is added to
    the carried sum before its cumulative sum, which is the whole stream's order of additions."""
    n_runs, length = streams.shape
    path: FloatArray = np.empty((n_runs, length), dtype=np.float64)
    signs = [1.0] if mode == "up" else [-1.0] if mode == "down" else [1.0, -1.0]
    # Per side, the walk X at the end of the previous chunk and min(0, min X) so far.
    carry = {sign: (np.zeros(n_runs), np.zeros(n_runs)) for sign in signs}
    top = np.full(n_runs, -np.inf)  # the path's running maximum so far
    warm = max(min_instances - 1, 0)  # the first steps can never alarm
    for c0 in range(0, length, chunk):
        c1 = min(length, c0 + chunk)
        sides = []
        for sign in signs:
            side, carry[sign] = _cusum_side(sign * streams[:, c0:c1] - k, *carry[sign])
            sides.append(side)
        stat = sides[0] if len(sides) == 1 else np.maximum(sides[0], sides[1], out=sides[0])
        if c0 < warm:
            stat[:, : warm - c0] = -np.inf
        np.maximum.accumulate(stat, axis=1, out=stat)
        np.maximum(stat, top[:, None], out=stat)
        top = stat[:, -1].copy()
        path[:, c0:c1] = stat
    return path


def _cusum_side(
    increments: FloatArray, walk: FloatArray, low: FloatArray
) -> tuple[FloatArray, tuple[FloatArray, FloatArray]]:
    """One side's CUSUM ``X_t - min(0, min X)`` over a chunk of ``increments`` (a new array,
    overwritten), from the walk and low carried in; returns it and the carries out."""
    increments[:, 0] += walk
    x = np.cumsum(increments, axis=1, out=increments)
    floor = np.minimum.accumulate(x, axis=1)
    np.minimum(floor, low[:, None], out=floor)
    carried = (x[:, -1].copy(), floor[:, -1].copy())
    np.subtract(x, floor, out=x)
    return x, carried


@lru_cache(maxsize=64)
def kswin_p_values(stat_size: int) -> tuple[float, ...]:
    """p-value of scipy's ``ks_2samp`` (as river's KSWIN calls it) for D = k / stat_size, k = 0..stat_size."""
    from scipy import stats

    base = np.arange(stat_size, dtype=np.float64)
    with warnings.catch_warnings():  # "exact calculation unsuccessful": river gets the same fallback
        warnings.simplefilter("ignore", RuntimeWarning)
        return tuple(float(stats.ks_2samp(base, base + k, method="auto").pvalue) for k in range(stat_size + 1))


def kswin_critical_k(alpha: float, stat_size: int) -> int:
    """Smallest k with KSWIN's alarm rule ``p <= alpha and D > 0.1`` at D = k / stat_size."""
    p = kswin_p_values(stat_size)
    for k in range(stat_size + 1):
        if p[k] <= alpha and k / stat_size > 0.1:
            return k
    return stat_size + 1


def _kswin_k_path(streams: FloatArray, window_size: int, stat_size: int, seed: int) -> NDArray[np.int32]:
    """k = stat_size * D of every KSWIN test on every stream (-1 before the window is full)."""
    rng = np.random.default_rng(seed)
    n_runs, length = streams.shape
    # Dense integer ranks make the tie handling exact and the sorts cheap.
    _, ranks_flat = np.unique(streams, return_inverse=True)
    ranks = ranks_flat.reshape(streams.shape).astype(np.int32)
    old = window_size - stat_size
    out = np.full((n_runs, length), -1, dtype=np.int32)
    first = window_size - 1  # index of the first full window
    chunk = max(1, 2_000_000 // max(n_runs * window_size, 1))
    for t0 in range(first, length, chunk):
        t1 = min(length, t0 + chunk)
        ts = np.arange(t0, t1)
        # window of the test at index t: ranks[:, t - window_size + 1 : t + 1]
        win_idx = ts[:, None] - window_size + 1 + np.arange(window_size)[None, :]  # (C, W)
        win = ranks[:, win_idx]  # (R, C, W)
        pick = np.argpartition(rng.random((n_runs, len(ts), old)), stat_size - 1, axis=-1)[..., :stat_size]
        sample = np.take_along_axis(win[..., :old], pick, axis=-1)
        out[:, t0:t1] = ks_k(sample, win[..., old:])
    return out


def ks_k(a: NDArray[Any], b: NDArray[Any]) -> NDArray[np.int32]:
    """Two-sample KS statistic times the sample size, batched over the leading axes, for equal
    sizes (last axis): ``n * max |F_a - F_b|`` with ties handled as scipy's ``ks_2samp`` does."""
    n = a.shape[-1]
    if b.shape[-1] != n:
        raise ValueError("ks_k needs samples of equal size")
    both = np.concatenate([a, b], axis=-1)
    labels = np.concatenate([np.ones(n, np.int32), -np.ones(n, np.int32)])
    order = np.argsort(both, axis=-1, kind="stable")
    vals = np.take_along_axis(both, order, axis=-1)
    cs = np.cumsum(labels[order], axis=-1)
    ends = np.ones(vals.shape, dtype=bool)  # last element of each group of tied values
    ends[..., :-1] = vals[..., 1:] != vals[..., :-1]
    out: NDArray[np.int32] = np.where(ends, np.abs(cs), 0).max(axis=-1).astype(np.int32)
    return out


def kswin_run_lengths(streams: FloatArray, *, window_size: int, stat_size: int, seed: int) -> RunLengths:
    """Vectorised river ``KSWIN`` up to its first alarm (param: ``alpha``). The random old-window
    sample is drawn with numpy (statistically, not bitwise, equal to river's ``random.Random``)."""
    path = np.maximum.accumulate(_kswin_k_path(streams, window_size, stat_size, seed), axis=1).astype(np.float64)

    def run(alpha: float) -> IntArray:
        return _first_passage(path, float(kswin_critical_k(alpha, stat_size)), strict=False)

    return run


# -- the search -----------------------------------------------------------------------------
_CACHE: dict[Hashable, CalibrationResult] = {}


def clear_cache() -> None:
    _CACHE.clear()


def search(
    run_lengths: RunLengths,
    *,
    target_ert: float,
    max_len: int,
    start: float,
    lo: float,
    hi: float,
    increasing: bool,
    rtol: float = DEFAULT_RTOL,
    max_evals: int = 30,
) -> CalibrationResult:
    """Bisection on log(param) for the value whose estimated ERT matches ``target_ert``.

    ``increasing``: whether the ERT grows with the parameter (PageHinkley threshold) or
    shrinks (ADWIN delta, KSWIN alpha). ``lo``/``hi`` bound the search.
    """
    if not 0 < lo <= start <= hi:
        raise ValueError("need 0 < lo <= start <= hi")
    tol = math.log1p(rtol)
    evals: dict[float, tuple[float, int]] = {}

    def err(p: float) -> float:
        if p not in evals:
            rl = run_lengths(p)
            evals[p] = (estimate_ert(rl, max_len), int((rl > 0).sum()))
        e = evals[p][0]
        return math.inf if math.isinf(e) else math.log(e / target_ert)

    def too_long(e: float) -> bool:  # ERT above target: move towards more alarms
        return e > 0

    # Bracket: step out from `start` by factors of 10 until the sign of the error changes.
    a = b = start
    ea = eb = err(start)
    step = 10.0
    while abs(ea) > tol and len(evals) < max_evals:
        go_up = too_long(ea) != increasing  # larger param needed?
        nxt = min(hi, a * step) if go_up else max(lo, a / step)
        if nxt == a:
            break
        en = err(nxt)
        b, eb = a, ea
        a, ea = nxt, en
        if (en > 0) != (eb > 0) or abs(en) <= tol:
            break
    # Now [a, b] brackets the target (or a bound was hit / a value was good enough).
    lo_p, hi_p = sorted((a, b))
    e_lo, e_hi = (ea, eb) if lo_p == a else (eb, ea)
    while (
        (e_lo > 0) != (e_hi > 0)
        and min(abs(e_lo), abs(e_hi)) > tol
        and len(evals) < max_evals
        and math.log(hi_p / lo_p) > 1e-6
    ):
        llo, lhi = math.log(lo_p), math.log(hi_p)
        frac = 0.5
        if math.isfinite(e_lo) and math.isfinite(e_hi) and e_lo != e_hi:
            frac = min(0.9, max(0.1, e_lo / (e_lo - e_hi)))
        mid = math.exp(llo + frac * (lhi - llo))
        if mid in evals:  # floating point exhausted
            break
        em = err(mid)
        if (em > 0) == (e_lo > 0):
            lo_p, e_lo = mid, em
        else:
            hi_p, e_hi = mid, em
    best = min(evals, key=lambda p: (abs(err(p)), -evals[p][0]))
    ert_best, alarms = evals[best]
    return CalibrationResult(
        param=float(best),
        ert_estimate=float(ert_best),
        target_ert=float(target_ert),
        n_runs=-1,
        n_alarms=alarms,
        max_len=max_len,
        evaluations=len(evals),
        converged=abs(err(best)) <= tol,
    )


def calibrate(
    factory: Callable[[float], _Updatable] | None,
    x_ref: ArrayLike | None,
    ert: float,
    *,
    start: float,
    lo: float,
    hi: float,
    increasing: bool,
    fast: Callable[[FloatArray], RunLengths] | None = None,
    n_runs: int = DEFAULT_RUNS,
    max_len_factor: float = DEFAULT_MAX_LEN_FACTOR,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
    cache_key: Hashable | None = None,
    log_arl_slope: float | None = None,
    max_simulated_ert: float = MAX_SIMULATED_ERT,
) -> CalibrationResult:
    """Find the parameter of ``factory(param)`` whose mean run length to the first false alarm
    on null streams (``x_ref`` standardised and resampled with replacement) is ``ert``.

    ``factory`` builds a detector that takes *standardised* values. ``fast`` (optional)
    replaces it by a vectorised model: streams -> (param -> run lengths). ``cache_key``
    (optional) names the detector and its fixed parameters; with it, results are cached
    in-process per (cache_key, ert, reference summary, search settings). Above
    ``max_simulated_ert`` the parameter is extrapolated with ``log_arl_slope`` (d log ERT / d
    param; the result's ``max_len`` is then that of the simulation), or refused without one.
    """
    if not ert > 1:
        raise ValueError("ert must be > 1")
    if factory is None and fast is None:
        raise ValueError("need a factory or a fast model")
    if ert > max_simulated_ert:
        if log_arl_slope is None:
            raise ValueError(
                f"an ERT of {ert:.0f} is above what this detector can calibrate by simulation"
                f" ({max_simulated_ert:.0f}); use a CUSUM or the time-budgeted windowed detector"
            )
        base = calibrate(
            factory,
            x_ref,
            max_simulated_ert,
            start=start,
            lo=lo,
            hi=hi,
            increasing=increasing,
            fast=fast,
            n_runs=n_runs,
            max_len_factor=max_len_factor,
            rtol=rtol,
            seed=seed,
            cache_key=cache_key,
        )
        step = 0.0 if math.isinf(log_arl_slope) else math.log(ert / max_simulated_ert) / log_arl_slope
        return CalibrationResult(
            **{
                **base.as_dict(),
                "param": base.param + step,
                "ert_estimate": base.ert_estimate * ert / max_simulated_ert,
            }
        )
    _, _, z_ref = standardise(x_ref)
    key = None
    if cache_key is not None:
        key = (cache_key, float(ert), reference_summary(z_ref), n_runs, max_len_factor, rtol, seed, start, lo, hi)
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
    max_len = max(2, math.ceil(max_len_factor * ert))
    streams = null_streams(z_ref, n_runs, max_len, seed)
    if fast is not None:
        model = fast(streams)
    else:
        assert factory is not None
        model = object_run_lengths(factory, streams)
    res = search(model, target_ert=ert, max_len=max_len, start=start, lo=lo, hi=hi, increasing=increasing, rtol=rtol)
    res = CalibrationResult(**{**res.as_dict(), "n_runs": n_runs})
    if key is not None:
        _CACHE[key] = res
    return res


def adjustment_coefficient(increments: FloatArray) -> float:
    """``theta > 0`` with ``mean(exp(theta * y)) = 1`` for increments of negative mean: the
    exponent of a random walk's (and so a CUSUM's) tail, ``P(max > h) ~ C exp(-theta h)``.
    ``inf`` when no increment is positive (the walk never rises)."""
    y = np.asarray(increments, dtype=np.float64)
    if not y.mean() < 0:
        raise ValueError("the increments need a negative mean (an allowance k > 0)")
    top = float(y.max())
    if top <= 0:
        return math.inf

    def log_mgf(theta: float) -> float:  # log mean exp(theta y), computed without overflow
        a = theta * y
        m = float(a.max())
        return m + math.log(float(np.exp(a - m).mean()))

    lo, hi = 0.0, 1.0
    while log_mgf(hi) < 0:  # convex, 0 at 0, falling first: step out to the root's far side
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if log_mgf(mid) < 0:
            lo = mid
        else:
            hi = mid
    return hi


def cusum_log_arl_slope(x_ref: ArrayLike | None, *, k: float, mode: str) -> float:
    """d log(ERT) / d threshold of a CUSUM with allowance ``k`` on ``x_ref`` standardised (a
    standard normal without one): the smaller adjustment coefficient of its sides."""
    if not k > 0:
        raise ValueError("a CUSUM without allowance (k = 0) has no exponential run length to extrapolate")
    _, _, z = standardise(x_ref)
    if z is None:
        return 2.0 * k  # normal increments z - k: theta = 2k exactly
    sides = {"up": [z - k], "down": [-z - k], "both": [z - k, -z - k]}[mode]
    return min(adjustment_coefficient(y) for y in sides)


# -- off the caller's process ---------------------------------------------------------------
class CalibrationProcess:
    """Runs :func:`calibrate` (through :func:`detectors.make`) in a child process of its own.

    A calibration at a large ERT simulates tens of millions of values, partly in numpy calls that
    hold the interpreter lock for up to a second: in a thread it would stall the caller's other
    threads (a service's ingest) and delay its exit. In a child process it uses its own core, and
    the child is ended at once when the caller exits (and ends itself if the caller dies). The
    child imports only this package and numpy/scipy ("spawn": nothing of the caller's state,
    threads or locks is copied). One request at a time; a child that died is started again once.
    The child is started here, on the constructing thread, so that it exists before anything
    can begin the caller's exit.
    """

    def __init__(self) -> None:
        import atexit

        self._lock = threading.Lock()
        self._conn: Any = None
        self._proc: Any = None
        self._closed = False
        self._start()
        # Before multiprocessing's own exit handler (atexit runs last-registered first): a
        # calibration in progress is abandoned, never waited for.
        atexit.register(self.close)

    def _start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, os.getpid()), name="detector-calibration", daemon=True)
        proc.start()
        child.close()
        self._conn, self._proc = parent, proc

    def param(self, name: str, *, ert: float, x_ref: ArrayLike | None, params: Mapping[str, Any]) -> float:
        """The calibrated sensitivity parameter of detector ``name`` (``param_value``)."""
        ref = None if x_ref is None else np.asarray(x_ref, dtype=np.float64)
        with self._lock:
            for _ in range(2):
                if self._closed:
                    raise RuntimeError("the calibration process is closed")
                if self._proc is None or not self._proc.is_alive():
                    self._start()
                try:
                    self._conn.send((name, float(ert), ref, dict(params)))
                    ok, value = self._conn.recv()
                except (EOFError, OSError):  # the child died (killed, out of memory): once more
                    self._proc = None
                    continue
                if not ok:
                    raise ValueError(value)
                return float(value)
        raise RuntimeError("the calibration process died twice in a row")

    def close(self) -> None:
        """End the child now (not under the lock: a request may be waiting for it)."""
        self._closed = True
        proc, conn = self._proc, self._conn
        if proc is not None and proc.is_alive():
            proc.kill()
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()


def _serve(conn: Any, parent: int) -> None:
    """The child's loop: (name, ert, reference, params) in, (ok, parameter or error) out."""
    # A Ctrl-C at a terminal reaches the whole process group: the parent drains and stops this
    # child itself, which would otherwise print a KeyboardInterrupt traceback at the user.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def orphaned() -> None:  # the parent died without ending us: end now, mid-simulation or not
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    import detectors

    while True:
        try:
            name, ert, x_ref, params = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        try:
            det: Any = detectors.make(name, ert=ert, x_ref=x_ref, **params)
            conn.send((True, float(det.param_value)))
        except Exception as e:
            conn.send((False, f"{type(e).__name__}: {e}"))
