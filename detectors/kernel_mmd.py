"""A built-in online kernel two-sample (MMD) detector for embeddings, in numpy only.

The default install needs a multivariate detector whose licence allows production use and
whose dependencies are light: this one imports numpy and nothing else (no torch, no
alibi-detect). It follows the same contract as the others (:mod:`detectors.base`) and takes the
ERT natively, like alibi-detect's ``MMDDriftOnline``, which stays available as ``mmd``.

Kernel
    Gaussian RBF, ``k(x, y) = exp(-||x - y||^2 / (2 sigma^2))``. Bandwidth: ``sigma`` if given,
    else the *median heuristic* on the reference, ``sigma^2 = median ||x_i - x_j||^2 / 2`` over
    the pairs of distinct reference rows (``i < j``, exact duplicates left out), so that the
    kernel of a median pair is ``exp(-1)``: the rule alibi-detect uses. A reference whose rows
    are all equal gets ``sigma = 1``.

Statistic
    The unbiased squared MMD between the reference ``R`` (``n`` rows) and the window ``Y`` of
    the last ``window_size`` (``W``) updates::

        MMD^2 = sum_{i != j} k(r_i, r_j) / (n (n-1)) + sum_{s != t} k(y_s, y_t) / (W (W-1))
                - 2 sum_{i, s} k(r_i, y_s) / (n W)

    The first term is a constant. An update computes the new point's kernel with the ``n``
    reference rows and the ``W - 1`` window rows, and keeps running sums of the other two terms
    (the window's kernel matrix is kept so the leaving point's row is at hand): O((n + W) d)
    per update, with state of fixed size (the reference and a ``W``-row window). The running
    sums are recomputed from the window every ``W`` updates (O(W^2) once per ``W`` updates), so
    rounding never accumulates. No test before the window is full: the first ``W - 1`` updates
    only fill it (they count towards the run length). After an alarm the detector keeps going
    (like alibi's): it usually keeps firing while the changed data fill the window, until
    :meth:`~detectors.base.Detector.reset`.

Calibration (the alarm threshold for the target ERT)
    The ERT is a mean run length, not a per-test level: consecutive windows share ``W - 1``
    points, so their statistics are strongly correlated, and the threshold is found by
    simulating whole null streams (:func:`calibrate`):

    1. *Null streams by permutation.* Each simulated update is a reference row; any ``W``
       consecutive ones are distinct (uniform draws, a clash with one of the previous
       ``W - 1`` redrawn until none is left: :func:`distinct_window_streams`), and the
       statistic of each window is computed against the reference *without the window's own
       rows* (``n - W`` rows). Each window statistic is then the two-sample permutation
       statistic of the reference split into ``n - W`` and ``W`` rows: the null distribution
       that holds when reference and stream are exchangeable. (Drawing with replacement would
       put the same row twice in a window, whose kernel of 1 inflates the window term; leaving
       the rows in the reference would deflate the cross term.) Because every simulated point
       is a reference row, all kernel values come from the ``n x n`` reference kernel matrix
       computed once: a simulated step costs ``W - 1`` table look-ups.
    2. *Paths once, thresholds after.* The statistic's path along a stream does not depend on
       the threshold, so the streams are simulated once (``calibration_runs x ERT`` updates
       in all, default 48 x ERT, spread over 8 streams) and every threshold is then a matter
       of counting. Only the high values of the paths are kept (a floor rises so that at
       most ~``100 x calibration_runs x W`` are held), with their times.
    3. *False alarms of a restarting detector.* For a threshold, the simulated detector
       alarms at the first value above it, then restarts as after a reset: it refills its
       window and can alarm again ``W`` updates later at the earliest (the first ``W - 1``
       updates of each stream, and of each restart, only fill the window). Every alarm
       ends one run from a (re)start; the runs cut by the end of a stream are censored. The
       ERT estimate is the censored exponential one of
       :func:`detectors.calibration.estimate_ert`: simulated updates / alarms. Unlike
       first passages in separate runs cut at a fixed length, no simulated update is
       wasted after a run's alarm: the estimate has the relative standard error of
       ``1 / sqrt(alarms)``, ~14% with about 48 alarms at the target.
    4. *Search.* The alarm count only changes at the kept values, and it falls as the
       threshold rises: a bisection over them finds the one whose estimate is closest to
       the target (the threshold is put midway to the next kept value, clear of the
       rounding differences between the float32 simulation and the float64 detector).

    Cost: about ``48 x ERT x (W - 1)`` table look-ups plus the streams' draws (~0.1-0.2 s
    for ERT 10^4 and ``W = 20``, ~1 s for ERT 10^5, one core; ``bench/kernel_mmd.py``
    prints it), plus the ``n x n`` kernel matrix (O(n^2 d) time and O(n^2) memory, both
    dropped after construction).

What the ERT guarantee assumes
    Stream and reference are exchangeable (drawn independently from one distribution) and the
    stream is stationary (independent, identically distributed updates). The calibration is
    the permutation null, i.e. the ERT averaged over the reference samples one could have
    drawn: for one given reference the realised ERT scatters around the target, more so when
    ``W`` is not small compared with ``n`` (hence ``n >= 4 W``). Serial dependence in the
    stream (bursts of near-duplicate traffic) shortens the run length; a reference unlike the
    stream is drift, by definition. The estimate itself has ~14% noise with the default runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from detectors import calibration as cal
from detectors.base import Detector, Kind

FloatArray = NDArray[np.float64]
IndexArray = NDArray[np.int64]

#: Default size of the null simulation, in target ERTs (about that many false alarms).
DEFAULT_RUNS = cal.DEFAULT_RUNS
# Independent null streams the simulated updates are spread over, and the steps simulated at a
# time: 8 x 8192 look-ups per array keep the working set in the CPU cache whatever the ERT.
_STREAMS = 8
_CHUNK_STEPS = 8192
# High values kept per expected alarm and window step: the exceedances around an alarm span a
# few windows at most, so the threshold lies far above the floor of what is kept.
_KEEP_PER_RUN = 50
# Threshold when every simulated statistic is the same (a reference whose rows are all equal):
# just above that value, so that any point unlike the reference alarms.
_DEGENERATE_MARGIN = 1e-9


# -- kernel ---------------------------------------------------------------------------------------
def squared_distances(a: FloatArray, a_sq: FloatArray, b: FloatArray, b_sq: FloatArray) -> FloatArray:
    """``||a_i - b_j||^2`` for the rows of ``a`` and ``b`` given their squared norms, clipped at 0
    (the expansion ``|a|^2 + |b|^2 - 2 a.b`` can round below 0 for near-equal rows)."""
    d2: FloatArray = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    np.maximum(d2, 0.0, out=d2)
    return d2


def median_bandwidth(sq: FloatArray) -> float:
    """The median heuristic: ``sqrt(median / 2)`` of the squared distances between the distinct
    pairs of rows (upper triangle of ``sq``, exact duplicates left out); 1 if all rows are equal."""
    d = sq[np.triu_indices(sq.shape[0], k=1)]
    if d.size:
        # Relative cut: duplicates give distances of rounding size, not exactly 0.
        d = d[d > 1e-9 * float(d.max())]
    if d.size == 0:
        return 1.0
    return math.sqrt(float(np.median(d)) / 2.0)


def rbf(sq: FloatArray, bandwidth: float) -> FloatArray:
    """The Gaussian RBF kernel of squared distances."""
    out: FloatArray = np.exp(sq * (-0.5 / (bandwidth * bandwidth)))
    return out


# -- null simulation ----------------------------------------------------------------------------
def distinct_window_streams(
    rng: np.random.Generator, n: int, rows: int, length: int, window: int, prefix: IndexArray | None = None
) -> IndexArray:
    """``rows`` streams of indices into ``range(n)`` in which any ``window`` consecutive entries
    are distinct: ``prefix`` (the end of the streams so far, kept as is) followed by ``length``
    new entries.

    New entries are uniform draws; an entry equal to one of the ``window - 1`` before it is
    drawn again, and so is any redrawn entry that clashes with a neighbour, until no clash is
    left. The procedure treats all labels alike, so every window is a uniformly random ordered
    set of ``window`` distinct indices (a permutation sample). Needs ``n >= 2 * window`` (each
    redraw then succeeds with probability above 1/2 once ``n >= 4 * window``).
    """
    if n < 2 * window:
        raise ValueError("distinct windows need n >= 2 * window")
    head = 0 if prefix is None else prefix.shape[1]
    total = head + length
    idx: IndexArray = np.empty((rows, total), dtype=np.int64)
    if prefix is not None:
        idx[:, :head] = prefix
    idx[:, head:] = rng.integers(0, n, size=(rows, length), dtype=np.int64)
    # Compare narrow copies (a quarter of the memory traffic) when the labels fit.
    small = idx.astype(np.int16) if n <= np.iinfo(np.int16).max else idx
    clash = np.zeros(idx.shape, dtype=bool)
    for lag in range(1, min(window, total)):
        clash[:, lag:] |= small[:, lag:] == small[:, :-lag]  # marks the later entry: never the prefix
    r, c = np.nonzero(clash)
    offsets = np.r_[np.arange(1 - window, 0), np.arange(1, window)]
    flat = idx.reshape(-1)  # a view: redraws land in idx
    while r.size:
        at = r * total + c
        flat[at] = rng.integers(0, n, size=r.size, dtype=np.int64)
        near = c[:, None] + offsets[None, :]
        inside = (near >= 0) & (near < total)
        same = flat.take(np.where(inside, at[:, None] + offsets[None, :], at[:, None])) == flat[at][:, None]
        again = (same & inside).any(axis=1)
        r, c = r[again], c[again]
    return idx


class NullModel:
    """The window statistic along simulated null streams (reference rows, see the module).

    ``kernel``: the ``(n, n)`` reference kernel matrix (float64, unit diagonal).
    """

    def __init__(self, kernel: FloatArray, window: int) -> None:
        n = kernel.shape[0]
        if window < 2 or n < 2 * window + 2:
            raise ValueError("the null model needs window >= 2 and n >= 2 * window + 2")
        self.n = n
        self.window = window
        # float32 halves the table (500 rows: 1 MB, mostly cache-resident); sums stay float64.
        self._table = np.ascontiguousarray(kernel, dtype=np.float32).reshape(-1)
        self._row_sums = kernel.sum(axis=0)
        #: sum of k(r_i, r_j) over i != j
        self.off_diagonal_sum = float(kernel.sum() - np.trace(kernel))

    def window_stats(self, seg: IndexArray) -> FloatArray:
        """Permutation MMD^2 of every full window of ``seg`` (rows x steps of indices): column
        ``j`` is the window ``seg[:, j : j + W]`` against the other ``n - W`` reference rows."""
        w, n = self.window, self.n
        rows, steps = seg.shape
        flat = seg * n
        # Pair sums, ordered pairs: P_u = P_{u-1} + 2 (new_u - old_u), where new_u is the
        # newcomer's kernel with the W - 1 before it and old_u the leaving point's kernel with
        # the W - 1 after it; both are sums over the lags of v_lag[j] = K[seg[j + lag], seg[j]].
        new = np.zeros((rows, steps), dtype=np.float32)
        old = np.zeros((rows, steps), dtype=np.float32)
        first = np.zeros(rows)  # unordered pair sum of the first full window
        for lag in range(1, w):
            v = self._table.take(flat[:, lag:] + seg[:, :-lag])
            new[:, lag:] += v
            old[:, w:] += v[:, : steps - w]
            first += v[:, : w - lag].sum(axis=1, dtype=np.float64)
        pair = np.empty((rows, steps - w + 1))
        pair[:, 0] = first
        np.cumsum((new[:, w:] - old[:, w:]).astype(np.float64), axis=1, out=pair[:, 1:])
        pair[:, 1:] += first[:, None]
        pair *= 2.0
        # Window sums of the reference row sums: sum over the window of sum_i k(r_i, y_s).
        cs = np.cumsum(self._row_sums[seg], axis=1)
        a = cs[:, w - 1 :].copy()
        a[:, 1:] -= cs[:, : steps - w]
        # The reference without the window: n - W rows (its kernel with the window subtracted).
        m = n - w
        cross = a - pair - w  # sum over i in R minus Y, s in Y
        within = self.off_diagonal_sum - 2.0 * a + pair + 2.0 * w  # sum over i != j in R minus Y
        out: FloatArray = within / (m * (m - 1)) + pair / (w * (w - 1)) - cross * (2.0 / (m * w))
        return out

    def streams(
        self, rng: np.random.Generator, rows: int, length: int, chunk: int = _CHUNK_STEPS
    ) -> Iterator[tuple[int, IndexArray]]:
        """Null streams of ``length`` updates, ``chunk`` updates at a time: yields ``(step0,
        seg)`` where ``seg`` holds the previous ``W - 1`` indices (none for the first chunk)
        and then those of the updates from 0-based step ``step0`` on."""
        prefix: IndexArray | None = None
        for t0 in range(0, length, chunk):
            seg = distinct_window_streams(rng, self.n, rows, min(chunk, length - t0), self.window, prefix)
            yield t0, seg
            prefix = seg[:, 1 - self.window :]

    def blocks(
        self, rng: np.random.Generator, rows: int, length: int, chunk: int = _CHUNK_STEPS
    ) -> Iterator[tuple[int, FloatArray]]:
        """The statistics along :meth:`streams`: yields ``(step0, stats)`` where ``stats[:, j]``
        is the statistic of the window that ends at 0-based step ``step0 + j``. Streams are
        drawn chunk by chunk: memory stays bounded for any length."""
        w = self.window
        for t0, seg in self.streams(rng, rows, length, chunk):
            if seg.shape[1] >= w:
                yield (t0 + w - 1 if t0 == 0 else t0), self.window_stats(seg)

    def paths(self, rng: np.random.Generator, rows: int, length: int, chunk: int = _CHUNK_STEPS) -> FloatArray:
        """Whole statistic paths (``-inf`` while the window fills); for tests and small sizes."""
        out = np.full((rows, length), -np.inf)
        for t0, stats in self.blocks(rng, rows, length, chunk):
            out[:, t0 : t0 + stats.shape[1]] = stats
        return out


class Exceedances:
    """The high values of simulated statistic paths, and the false alarms they give for any
    threshold when the detector restarts after each alarm.

    Only values above a floor are kept: the floor rises so that at most ``2 * keep`` are held
    (the ``keep`` highest survive a cut). Any threshold at or above :attr:`floor` sees exactly
    the values above it.
    """

    def __init__(self, rows: int, length: int, window: int, keep: int) -> None:
        self.rows, self.length, self.window, self.keep = rows, length, window, keep
        self.floor = -np.inf
        self._when: list[IndexArray] = []
        self._value: list[FloatArray] = []
        self._held = 0
        # Streams are laid end to end on one time axis with a gap of W steps, so an alarm near
        # the end of a stream never blocks the start of the next (a fresh detector).
        self._stride = length + window

    def add(self, step0: int, stats: FloatArray) -> None:
        r, c = np.nonzero(stats > self.floor)
        self._when.append(r * self._stride + step0 + c)
        self._value.append(stats[r, c])
        self._held += r.size
        if self._held > 2 * self.keep:
            self._cut()

    def _cut(self) -> None:
        when, value = np.concatenate(self._when), np.concatenate(self._value)
        self.floor = float(np.partition(value, value.size - self.keep)[value.size - self.keep])
        high = value > self.floor
        self._when, self._value, self._held = [when[high]], [value[high]], int(high.sum())

    def levels(self) -> tuple[IndexArray, FloatArray]:
        """``(time, value)`` of the values kept, in time order."""
        when = np.concatenate(self._when) if self._when else np.zeros(0, dtype=np.int64)
        value = np.concatenate(self._value) if self._value else np.zeros(0)
        order = np.argsort(when, kind="stable")
        return when[order], value[order]

    @staticmethod
    def alarms(when: IndexArray, window: int) -> int:
        """False alarms of a detector that alarms at the first of the exceedance times ``when``
        (sorted) and then restarts: it fills its window again and tests ``window`` steps after
        the alarm at the earliest."""
        # nxt[i]: the first exceedance the restarted detector can alarm at after one at i.
        nxt = np.searchsorted(when, when + window).tolist()
        count, i = 0, 0
        while i < len(nxt):
            count += 1
            i = nxt[i]
        return count


def calibrate(
    kernel: FloatArray, window: int, ert: float, runs: int = DEFAULT_RUNS, seed: int = 0
) -> cal.CalibrationResult:
    """The alarm threshold of the windowed MMD^2 whose mean run length from a (re)start to a
    false alarm is ``ert`` on null streams of ``runs x ert`` updates in all (``param`` of the
    result; see the module for the method)."""
    if not ert > window:
        raise ValueError("ert must be larger than window_size")
    model = NullModel(kernel, window)
    rows = _STREAMS
    length = max(2 * window, math.ceil(runs * ert / rows))
    high = Exceedances(rows, length, window, keep=_KEEP_PER_RUN * runs * window)
    for step0, stats in model.blocks(np.random.default_rng(seed), rows, length):
        high.add(step0, stats)
    return _threshold_search(high, ert)


def _threshold_search(high: Exceedances, ert: float) -> cal.CalibrationResult:
    """Bisection over the kept values (the alarm count only changes there): the threshold whose
    estimated ERT is closest to the target on log scale."""
    when, value = high.levels()
    levels = np.unique(value)
    exposure = high.rows * high.length

    def estimate(i: int) -> tuple[float, int]:
        # The censored exponential estimate (detectors.calibration.estimate_ert): every
        # simulated update is exposure, the runs cut by the end of a stream are censored.
        k = Exceedances.alarms(when[value > levels[i]], high.window)
        return (exposure / k if k else math.inf), k

    evals: dict[int, tuple[float, int]] = {}

    def err(i: int) -> float:
        if i not in evals:
            evals[i] = estimate(i)
        e = evals[i][0]
        return math.inf if math.isinf(e) else math.log(e / ert)

    # The estimate grows with the level; at the highest value nothing exceeds it (inf).
    lo, hi = 0, len(levels) - 1
    if err(lo) >= 0:
        # Even the lowest value kept alarms too rarely: the ERT is so short that the threshold
        # lies below (nearly) every null statistic (or all of them are equal). The lowest value
        # is as close as the simulation gets. (A floor never causes this: the values kept
        # above it outnumber the alarms' exceedances many times over.)
        hi = lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if err(mid) < 0:
            lo = mid
        else:
            hi = mid
    best = min({lo, hi}, key=lambda i: abs(err(i)))
    # Any threshold from this level up to the next kept value gives the same simulated alarms:
    # take the middle, away from the rounding differences between simulation and detector.
    upper = float(levels[best + 1]) if best + 1 < len(levels) else float(levels[best]) + _DEGENERATE_MARGIN
    threshold = (float(levels[best]) + upper) / 2.0
    ert_est, alarms = evals[best]
    return cal.CalibrationResult(
        param=threshold,
        ert_estimate=ert_est,
        target_ert=float(ert),
        n_runs=high.rows,
        n_alarms=alarms,
        max_len=high.length,
        evaluations=len(evals),
        converged=abs(err(best)) <= math.log1p(cal.DEFAULT_RTOL),
    )


# -- the detector ---------------------------------------------------------------------------------
def _whole(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int if it is a whole number ``>= minimum`` (an int, or a float like 20.0)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not (math.isfinite(value) and float(value).is_integer() and value >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class KernelMMDDetector(Detector):
    """Squared MMD (Gaussian RBF kernel) between a sliding window of ``window_size`` updates and
    the reference, with an alarm threshold calibrated to the ERT by permutation simulation
    (see :mod:`detectors.kernel_mmd`). numpy only.

    ``sigma``: the kernel bandwidth (``None``: the median heuristic on the reference).
    ``calibration_runs``: the null simulation's length in ERTs (about that many simulated
    false alarms); ``seed``: its random streams. Needs ``len(x_ref) >=
    4 * window_size`` and ``ert > window_size``. result(): ``distance`` is the squared MMD
    (``None`` until the window is full), ``threshold`` the alarm threshold; ``p_val`` is
    ``None``.

    >>> import numpy as np
    >>> from detectors.kernel_mmd import KernelMMDDetector
    >>> rng = np.random.default_rng(1)
    >>> det = KernelMMDDetector(ert=2000, x_ref=rng.standard_normal((300, 16)), window_size=20)
    >>> alarms = 0
    >>> for x in rng.standard_normal((500, 16)):  # like the reference
    ...     det.update(x)
    ...     alarms += det.drift_detected
    >>> alarms
    0
    >>> for i, x in enumerate(rng.normal(0.5, 1.0, (200, 16))):  # every coordinate moves
    ...     det.update(x)
    ...     if det.drift_detected:
    ...         break
    >>> print(f"drift after {i + 1} updates")
    drift after 12 updates
    >>> round(det.result()["data"]["distance"], 3), round(det.result()["data"]["threshold"], 3)
    (0.032, 0.028)
    """

    name: ClassVar[str] = "kmmd"
    kind: ClassVar[Kind] = "multivariate"
    static_attrs: ClassVar[tuple[str, ...]] = ("x_ref", "_r_sq")  # the window's arrays change per update

    ert: float
    x_ref: FloatArray
    # online state (see _reset_state)
    _win: FloatArray
    _win_sq: FloatArray
    _kw: FloatArray
    _m: FloatArray
    _pair: float
    _msum: float
    _count: int
    _pos: int

    def __init__(
        self,
        *,
        ert: float = 1000.0,
        x_ref: ArrayLike | None = None,
        window_size: int = 20,
        sigma: float | None = None,
        calibration_runs: int = DEFAULT_RUNS,
        seed: int = 0,
    ) -> None:
        if ert is None:
            raise ValueError("KernelMMDDetector needs an ert")
        super().__init__(ert)
        if x_ref is None:
            raise ValueError("KernelMMDDetector needs reference data (x_ref)")
        # Configuration files may spell integers as floats (20.0): take those, refuse 20.5.
        self.window_size = _whole("window_size", window_size, 2)
        self.sigma = sigma
        self.calibration_runs = _whole("calibration_runs", calibration_runs, 2)
        self.seed = _whole("seed", seed, 0)
        self.x_ref = self._reference(x_ref)
        self._check_settings()
        self._r_sq: FloatArray = np.einsum("ij,ij->i", self.x_ref, self.x_ref)
        sq = squared_distances(self.x_ref, self._r_sq, self.x_ref, self._r_sq)
        np.fill_diagonal(sq, 0.0)
        self._bandwidth = median_bandwidth(sq) if sigma is None else float(sigma)
        self._gamma = 0.5 / (self._bandwidth * self._bandwidth)
        kernel = rbf(sq, self._bandwidth)
        del sq
        n = len(self.x_ref)
        self._k_rr = float(kernel.sum() - np.trace(kernel)) / (n * (n - 1))
        self._calibration = calibrate(kernel, self.window_size, self.ert, self.calibration_runs, self.seed)
        self._alarm_level = self._calibration.param
        self._reset_state()

    # -- construction -----------------------------------------------------------------------
    def _reference(self, x_ref: ArrayLike) -> FloatArray:
        a = np.array(x_ref, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] < 1:
            raise ValueError("KernelMMDDetector: x_ref must be 2-D (n, d)")
        if not np.all(np.isfinite(a)):
            raise ValueError("the reference contains NaN or infinite values")
        return a

    def _check_settings(self) -> None:
        w = self.window_size
        if len(self.x_ref) < 4 * w:
            raise ValueError(
                f"KernelMMDDetector: x_ref needs at least 4 * window_size = {4 * w} rows, has {len(self.x_ref)}"
            )
        if not self.ert > w:
            raise ValueError("KernelMMDDetector: ert must be larger than window_size")
        if self.sigma is not None and not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError("sigma must be a finite number > 0 (or None: the median heuristic)")

    # -- public read-outs ---------------------------------------------------------------------
    @property
    def bandwidth(self) -> float:
        """The kernel bandwidth in use (``sigma``, or the median heuristic's)."""
        return self._bandwidth

    @property
    def threshold(self) -> float:
        """The alarm threshold on the squared MMD (calibrated to the ERT)."""
        return self._alarm_level

    @property
    def calibration(self) -> cal.CalibrationResult:
        """How the threshold was calibrated (its ``param`` is the threshold)."""
        return self._calibration

    # -- the contract ---------------------------------------------------------------------------
    def _input(self, x: Any) -> FloatArray:
        y = np.asarray(x, dtype=np.float64)
        if y.shape != (self.x_ref.shape[1],):
            raise ValueError(f"KernelMMDDetector.update takes a 1-D array of {self.x_ref.shape[1]} values")
        if not np.all(np.isfinite(y)):
            raise ValueError("KernelMMDDetector.update: non-finite values")
        return y

    def _kernel_with(self, rows: FloatArray, rows_sq: FloatArray, y: FloatArray, y_sq: float) -> FloatArray:
        d2 = rows_sq + y_sq - 2.0 * (rows @ y)
        np.maximum(d2, 0.0, out=d2)
        out: FloatArray = np.exp(d2 * -self._gamma)
        return out

    def _step(self, x: Any) -> tuple[bool, Any, Any, Any]:
        y = self._input(x)
        y_sq = float(y @ y)
        w = self.window_size
        slot = self._pos  # when the window is full, this slot holds the oldest point
        m = float(self._kernel_with(self.x_ref, self._r_sq, y, y_sq).sum())
        if self._count == w:
            self._pair -= 2.0 * (float(self._kw[slot].sum()) - 1.0)
            self._msum -= float(self._m[slot])
        kv = self._kernel_with(self._win, self._win_sq, y, y_sq)
        if self._count < w:
            kv[self._count :] = 0.0  # empty slots (slot == count here)
        kv[slot] = 1.0
        self._kw[slot, :] = kv
        self._kw[:, slot] = kv
        self._pair += 2.0 * (float(kv.sum()) - 1.0)
        self._win[slot] = y
        self._win_sq[slot] = y_sq
        self._m[slot] = m
        self._msum += m
        self._count = min(self._count + 1, w)
        self._pos = (slot + 1) % w
        if self._pos == 0 and self._count == w:
            # Once per pass over the window: the running sums from scratch, so rounding errors
            # of the subtractions above never accumulate over a long stream.
            self._pair = float(self._kw.sum()) - w
            self._msum = float(self._m.sum())
        if self._count < w:
            return False, None, None, self._alarm_level
        n = len(self.x_ref)
        stat = self._k_rr + self._pair / (w * (w - 1)) - self._msum * (2.0 / (n * w))
        return stat > self._alarm_level, stat, None, self._alarm_level

    def __getstate__(self) -> dict[str, Any]:
        # The window is the largest part of the state a checkpoint writes at every batch (20 x 384
        # float64 for the embedding detector by default). Its rows are the inputs, which are float32
        # embeddings in the monitor: then it is pickled as float32, exactly (checked, else kept).
        state = self.__dict__.copy()
        win = state.get("_win")
        if isinstance(win, np.ndarray) and win.dtype == np.float64:
            narrow = win.astype(np.float32)
            if np.array_equal(narrow, win):
                state["_win"] = narrow
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        win = state.get("_win")
        if isinstance(win, np.ndarray) and win.dtype == np.float32:
            state["_win"] = win.astype(np.float64)  # every update computes in float64
        self.__dict__.update(state)

    def _reset_state(self) -> None:
        w, d = self.window_size, self.x_ref.shape[1]
        self._win = np.zeros((w, d))
        self._win_sq = np.zeros(w)
        self._kw = np.zeros((w, w))
        self._m = np.zeros(w)
        self._pair = 0.0  # sum of k(y_s, y_t) over ordered pairs s != t of the window
        self._msum = 0.0  # sum over the window of sum_i k(r_i, y_s)
        self._count = 0
        self._pos = 0

    def _params(self) -> dict[str, Any]:
        return {
            "window_size": self.window_size,
            "sigma": self.sigma,
            "calibration_runs": self.calibration_runs,
            "seed": self.seed,
            "x_ref_shape": list(self.x_ref.shape),
            "bandwidth": self._bandwidth,
            "threshold": self._alarm_level,
            "calibration": self._calibration.as_dict(),
        }
