"""alibi-detect's online drift detectors behind the detector contract.

* :class:`CVMDetector`: ``CVMDriftOnline`` (Cramer-von Mises; any change of a continuous
  univariate distribution).
* :class:`FETDetector`: ``FETDriftOnline`` (Fisher exact test; a change of the rate of a 0/1
  stream, one-sided: ``alternative="greater"`` watches for an increase).
* :class:`MMDDetector`, :class:`LSDDDetector`: ``MMDDriftOnline`` / ``LSDDDriftOnline`` with
  the pytorch backend on the CPU (multivariate).

They take the ERT natively: at construction they simulate ``n_bootstraps`` null streams from
the reference and set per-time thresholds so that the run length to a false alarm has the
ERT as its mean. alibi recommends ``n_bootstraps`` >= 10 x ERT; the defaults here (3,000 to
5,000) keep construction at a few seconds on a CPU core, at the price of a noisier
threshold (the realised ERT is only roughly the target). The univariate detectors count the
ERT from the update that fills the smallest window, the multivariate ones from the first.

Determinism: construction seeds numpy's and torch's global generators with ``seed`` and
restores them afterwards; FET's tie-breaking at prediction time draws from numpy's global
generator, so the wrapper swaps in its own (pickled) generator state around each update.
A restored snapshot therefore continues exactly like the original.

After an alarm the detector keeps going (alibi's online detectors only start again on
``reset_state``, which :meth:`Detector.reset` calls): its statistic usually stays above the
threshold while the changed data are in its window, so consecutive updates keep firing.
The monitor's cool-down and reset handle that.

The wrappers also trim alibi's ever-growing history (``xs``, ``test_stats``,
``drift_preds`` are concatenated at every update: O(t) memory and time) to what the next
update reads, so memory, update time and snapshots stay bounded.

alibi-detect and torch are imported inside the constructors, never when ``detectors`` is. alibi-detect
is the optional ``alibi`` extra (BSL 1.1): without it a constructor raises
:class:`detectors.extras.MissingExtraError`, which names the extra.
"""

from __future__ import annotations

import abc
import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from detectors.base import Detector, Kind
from detectors.extras import require_module


@contextlib.contextmanager
def _seeded(seed: int | None, use_torch: bool) -> Iterator[None]:
    """Seed numpy's (and torch's) global generator for a block; restore them afterwards."""
    if seed is None:
        yield
        return
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        if use_torch:
            import torch

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                yield
        else:
            yield
    finally:
        np.random.set_state(state)


def _alibi_cd() -> Any:
    """``alibi_detect.cd`` (imports torch too), without its import-time deprecation warnings."""
    # Without the `alibi` extra (the default install): one sentence naming it, not a traceback.
    require_module(__name__, "alibi-detect's detectors (cvm, fet, mmd, lsdd)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import alibi_detect.cd

    return alibi_detect.cd


def _max_or_none(v: Any) -> float | None:
    """Largest finite value of a scalar or array (``None`` if there is none)."""
    if v is None:
        return None
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu().numpy()
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else None


class _Standardise:
    """Picklable replacement for LSDDDriftOnlineTorch's ``_normalize`` lambda."""

    def __init__(self, means: Any, stds: Any, eps: float) -> None:
        self.means, self.stds, self.eps = means, stds, eps

    def __call__(self, x: Any) -> Any:
        return (x - self.means) / (self.stds + self.eps)


class _Unstandardise(_Standardise):
    """Picklable replacement for LSDDDriftOnlineTorch's ``_unnormalize`` lambda."""

    def __call__(self, x: Any) -> Any:
        import torch

        return (torch.as_tensor(x) * (self.stds + self.eps) + self.means).cpu().numpy()


class _AlibiDetector(Detector):
    _uses_torch: ClassVar[bool] = False
    _uses_global_rng_online: ClassVar[bool] = False  # predict() draws from np.random
    _univariate: ClassVar[bool] = True

    ert: float

    def __init__(self, ert: float, x_ref: ArrayLike | None, n_bootstraps: int, seed: int | None) -> None:
        if ert is None:
            raise ValueError(f"{type(self).__name__} needs an ert")
        super().__init__(ert)
        if x_ref is None:
            raise ValueError(f"{type(self).__name__} needs reference data (x_ref)")
        if n_bootstraps < 1:
            raise ValueError("n_bootstraps must be >= 1")
        self.n_bootstraps = n_bootstraps
        self.seed = seed
        self._detector: Any = None
        self._rng = np.random.RandomState(None if seed is None else (seed + 1) % 2**32)
        self._rng_state0: Any = self._rng.get_state()

    def _build(self, factory: Any, **kwargs: Any) -> None:
        with _seeded(self.seed, self._uses_torch), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # alibi refuses to estimate the (1 - 1/ERT) quantile from fewer than ~ERT null
            # streams; twice the ERT is the floor whatever n_bootstraps says.
            n = max(self.n_bootstraps, int(2 * self.ert) + 1)
            self._detector = factory(ert=self.ert, n_bootstraps=n, verbose=False, **kwargs)

    @abc.abstractmethod
    def _input(self, x: Any) -> NDArray[Any]:
        """Validate one update's input and shape it for alibi-detect."""

    def _predict(self, x_t: NDArray[Any]) -> dict[str, Any]:
        if not self._uses_global_rng_online:
            out: dict[str, Any] = self._detector.predict(x_t)
            return out
        saved = np.random.get_state()
        np.random.set_state(self._rng.get_state())
        try:
            out = self._detector.predict(x_t)
        finally:
            self._rng.set_state(np.random.get_state())
            np.random.set_state(saved)
        return out

    def _step(self, x: Any) -> tuple[bool, Any, Any, Any]:
        x_t = self._input(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = self._predict(x_t)
        self._trim()
        data = res["data"]
        return bool(data["is_drift"]), _max_or_none(data.get("test_stat")), None, _max_or_none(data.get("threshold"))

    def _trim(self) -> None:
        """Keep only the history alibi reads on the next update."""
        d = self._detector if self._univariate else self._detector._detector
        d.test_stats = d.test_stats[-1:]
        d.drift_preds = d.drift_preds[-1:]
        if self._univariate and d.t > 0:
            d.xs = d.xs[-int(d.max_ws) :]

    def _reset_state(self) -> None:
        self._detector.reset_state()
        self._rng.set_state(self._rng_state0)

    def _base_params(self) -> dict[str, Any]:
        return {"n_bootstraps": self.n_bootstraps, "seed": self.seed}


class _UnivariateAlibi(_AlibiDetector):
    x_ref: NDArray[Any]
    window_sizes: tuple[int, ...]

    def _ref_1d(self, x_ref: ArrayLike | None, dtype: Any) -> NDArray[Any]:
        a = np.array(x_ref, dtype=dtype)
        if a.ndim == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 1 or len(a) < 2:
            raise ValueError(f"{type(self).__name__}: x_ref must be a 1-D sequence of at least 2 values")
        return a

    def _windows(self, window_sizes: Sequence[int]) -> tuple[int, ...]:
        ws = tuple(int(w) for w in window_sizes)
        if not ws or min(ws) < 1:
            raise ValueError("window_sizes must be positive")
        return ws


class CVMDetector(_UnivariateAlibi):
    """alibi ``CVMDriftOnline``: Cramer-von Mises test of sliding windows against the reference.

    Rank based: no standardisation is needed. The thresholds are simulated for continuous data;
    many ties in the stream or the reference make the realised ERT differ from the target.
    result(): ``distance`` is the largest (normalised) CVM statistic over the windows and
    ``threshold`` the current threshold; ``p_val`` is ``None``.
    """

    name: ClassVar[str] = "cvm"
    kind: ClassVar[Kind] = "continuous"

    def __init__(
        self,
        *,
        ert: float = 1000.0,
        x_ref: ArrayLike | None = None,
        window_sizes: Sequence[int] = (20, 50),
        n_bootstraps: int = 3000,
        batch_size: int | None = None,
        seed: int | None = 0,
    ) -> None:
        super().__init__(ert, x_ref, n_bootstraps, seed)
        self.x_ref = self._ref_1d(x_ref, np.float64)
        if not np.all(np.isfinite(self.x_ref)):
            raise ValueError("the reference contains NaN or infinite values")
        self.window_sizes = self._windows(window_sizes)
        self.batch_size = batch_size
        # alibi holds a (batch, n + t_max, n + t_max) boolean array per batch: keep it ~32 MB.
        n_all = len(self.x_ref) + 2 * max(self.window_sizes) - 1
        batch = batch_size if batch_size is not None else max(1, min(64, 32_000_000 // (n_all * n_all)))
        self._build(
            _alibi_cd().CVMDriftOnline,
            x_ref=self.x_ref[:, None],
            window_sizes=list(self.window_sizes),
            batch_size=batch,
        )

    def _input(self, x: Any) -> NDArray[Any]:
        v = float(x)
        if not math.isfinite(v):
            raise ValueError(f"CVMDetector.update: non-finite value {x!r}")
        return np.array([v])

    def _params(self) -> dict[str, Any]:
        return {
            "window_sizes": list(self.window_sizes),
            "batch_size": self.batch_size,
            **self._base_params(),
            "x_ref_size": len(self.x_ref),
        }


class FETDetector(_UnivariateAlibi):
    """alibi ``FETDriftOnline``: Fisher exact test of the 0/1 rate of sliding windows against
    the reference's, one-sided (``alternative="greater"``: an increase; ``"less"``: a decrease),
    smoothed by an exponential moving average (``lam``).

    A reference of only 0s (or only 1s) gets one pseudo-observation of the other value
    appended (alibi cannot set thresholds otherwise): the base rate is then taken as
    1 / (n + 1). ``params["pseudo_observation"]`` says whether that happened.
    result(): ``distance`` is the largest smoothed ``1 - p`` over the windows and ``threshold``
    the current threshold; ``p_val`` is ``None``.
    """

    name: ClassVar[str] = "fet"
    kind: ClassVar[Kind] = "binary"
    _uses_global_rng_online: ClassVar[bool] = True

    def __init__(
        self,
        *,
        ert: float = 1000.0,
        x_ref: ArrayLike | None = None,
        window_sizes: Sequence[int] = (30, 100),
        n_bootstraps: int = 3000,
        alternative: str = "greater",
        lam: float = 0.99,
        seed: int | None = 0,
    ) -> None:
        super().__init__(ert, x_ref, n_bootstraps, seed)
        ref = self._ref_1d(x_ref, np.float64)
        if not np.all((ref == 0) | (ref == 1)):
            raise ValueError("FETDetector: x_ref must contain only 0/1 (or False/True)")
        self.x_ref = ref.astype(np.int64)
        self.window_sizes = self._windows(window_sizes)
        if alternative not in ("greater", "less"):
            raise ValueError("alternative must be 'greater' or 'less'")
        self.alternative = alternative
        self.lam = lam
        ref_used = self.x_ref
        self._pseudo = bool(ref_used.min() == ref_used.max())
        if self._pseudo:
            ref_used = np.append(ref_used, 1 - ref_used[0])
        self._build(
            _alibi_cd().FETDriftOnline,
            x_ref=ref_used[:, None],
            window_sizes=list(self.window_sizes),
            alternative=alternative,
            lam=lam,
        )

    def _input(self, x: Any) -> NDArray[Any]:
        if isinstance(x, bool | np.bool_):
            return np.array([int(x)])
        v = float(x)
        if v not in (0.0, 1.0):
            raise ValueError(f"FETDetector.update takes 0/1, got {x!r}")
        return np.array([int(v)])

    def _params(self) -> dict[str, Any]:
        return {
            "window_sizes": list(self.window_sizes),
            "alternative": self.alternative,
            "lam": self.lam,
            **self._base_params(),
            "x_ref_size": len(self.x_ref),
            "x_ref_rate": float(self.x_ref.mean()),
            "pseudo_observation": self._pseudo,
        }


class _MultivariateAlibi(_AlibiDetector):
    _uses_torch: ClassVar[bool] = True
    _univariate: ClassVar[bool] = False
    kind: ClassVar[Kind] = "multivariate"

    x_ref: NDArray[np.float64]
    window_size: int

    def _ref_2d(self, x_ref: ArrayLike | None, window_size: int) -> NDArray[np.float64]:
        a = np.array(x_ref, dtype=np.float64)
        if a.ndim != 2:
            raise ValueError(f"{type(self).__name__}: x_ref must be 2-D (n, d)")
        if not np.all(np.isfinite(a)):
            raise ValueError("the reference contains NaN or infinite values")
        if window_size < 2:
            raise ValueError("window_size must be >= 2")
        return a

    def _input(self, x: Any) -> NDArray[Any]:
        a = np.asarray(x, dtype=np.float32)
        if a.shape != (self.x_ref.shape[1],):
            raise ValueError(f"{type(self).__name__}.update takes a 1-D array of {self.x_ref.shape[1]} values")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{type(self).__name__}.update: non-finite values")
        return a


class MMDDetector(_MultivariateAlibi):
    """alibi ``MMDDriftOnline`` (pytorch backend, CPU): squared MMD with a Gaussian RBF kernel
    (bandwidth ``sigma``, or the median heuristic on the reference) between a sliding window of
    ``window_size`` updates and the reference. Needs ``len(x_ref)`` well above
    ``2 * window_size``. result(): ``distance`` is the squared MMD, ``threshold`` the current
    threshold; ``p_val`` is ``None``.
    """

    name: ClassVar[str] = "mmd"

    def __init__(
        self,
        *,
        ert: float = 1000.0,
        x_ref: ArrayLike | None = None,
        window_size: int = 20,
        n_bootstraps: int = 3000,
        sigma: float | None = None,
        seed: int | None = 0,
    ) -> None:
        super().__init__(ert, x_ref, n_bootstraps, seed)
        self.window_size = window_size
        self.x_ref = self._ref_2d(x_ref, window_size)
        self.sigma = sigma
        if len(self.x_ref) < 2 * window_size + 2:
            raise ValueError("MMDDetector: x_ref needs more than 2 * window_size + 1 rows")
        self._build(
            _alibi_cd().MMDDriftOnline,
            x_ref=self.x_ref.astype(np.float32),  # alibi computes in float32
            window_size=window_size,
            backend="pytorch",
            device="cpu",
            sigma=None if sigma is None else np.array([sigma], dtype=np.float32),
        )
        # The (n, n) reference kernel matrices are only read while configuring: dropping them
        # keeps snapshots small (~1 MB less for 500 reference rows).
        inner = self._detector._detector
        inner.k_xx = inner.k_xx_sub = None

    def _params(self) -> dict[str, Any]:
        return {
            "window_size": self.window_size,
            "sigma": self.sigma,
            **self._base_params(),
            "x_ref_shape": list(self.x_ref.shape),
        }


class LSDDDetector(_MultivariateAlibi):
    """alibi ``LSDDDriftOnline`` (pytorch backend, CPU): least-squares density difference between
    a sliding window of ``window_size`` updates and the reference (standardised by the
    reference), with ``n_kernel_centers`` reference points as kernel centres (default
    ``2 * window_size``). result(): ``distance`` is the LSDD, ``threshold`` the current
    threshold; ``p_val`` is ``None``.
    """

    name: ClassVar[str] = "lsdd"

    def __init__(
        self,
        *,
        ert: float = 1000.0,
        x_ref: ArrayLike | None = None,
        window_size: int = 20,
        n_bootstraps: int = 3000,
        sigma: float | None = None,
        n_kernel_centers: int | None = None,
        lambda_rd_max: float = 0.2,
        seed: int | None = 0,
    ) -> None:
        super().__init__(ert, x_ref, n_bootstraps, seed)
        self.window_size = window_size
        self.x_ref = self._ref_2d(x_ref, window_size)
        self.sigma = sigma
        self.n_kernel_centers = n_kernel_centers
        self.lambda_rd_max = lambda_rd_max
        centers = 2 * window_size if n_kernel_centers is None else n_kernel_centers
        if len(self.x_ref) < centers + 2 * window_size + 1:
            raise ValueError("LSDDDetector: x_ref needs more than n_kernel_centers + 2 * window_size rows")
        self._build(
            _alibi_cd().LSDDDriftOnline,
            x_ref=self.x_ref.astype(np.float32),  # alibi computes in float32
            window_size=window_size,
            backend="pytorch",
            device="cpu",
            sigma=None if sigma is None else np.array([sigma], dtype=np.float32),
            n_kernel_centers=n_kernel_centers,
            lambda_rd_max=lambda_rd_max,
        )
        self._make_picklable()

    def _make_picklable(self) -> None:
        # alibi stores two lambdas (closures over the reference's mean and std): pickle cannot
        # hold them. Recompute the same tensors the same way and use picklable callables.
        import torch

        inner = self._detector._detector
        ref = torch.from_numpy(self.x_ref.astype(np.float32)).to(inner.device)
        means, stds = ref.mean(0), ref.std(0)
        inner._normalize = _Standardise(means, stds, 1e-12)
        inner._unnormalize = _Unstandardise(means, stds, 1e-12)

    def _params(self) -> dict[str, Any]:
        return {
            "window_size": self.window_size,
            "sigma": self.sigma,
            "n_kernel_centers": self.n_kernel_centers,
            "lambda_rd_max": self.lambda_rd_max,
            **self._base_params(),
            "x_ref_shape": list(self.x_ref.shape),
        }
