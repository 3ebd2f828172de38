"""PyTorch bf16 for the encoders, on CPUs that multiply bf16 in hardware.

A CPU with AVX512-BF16 (``vdpbf16ps``: Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on) or
AMX-BF16 runs a bf16 matrix product at about twice the fp32 rate, and the encoder is mostly matrix
products. On such a CPU (an Intel Xeon, 2 cores, ``python bench/encoder.py``: max_length 128, batch
32) the bundled MiniLM's drift embeddings ran 88.3 texts/s in bf16 against 43.7 in fp32 and 59.8 in
ONNX int8, at a minimum cosine of 0.9999 to fp32 (int8: 0.9942); reward scoring 56.4 against 35.6,
at the same held-out accuracy. bf16 keeps fp32's exponent range, so unlike int8 there is no
activation outlier to manage. On a CPU without it PyTorch emulates bf16, slower
than fp32, so ``auto`` keeps fp32 there.

The flag is not enough: on another Intel Xeon that lists ``avx512_bf16`` (and AVX512-FP16, but no
AMX, 2 cores) an encoder-sized bf16 product took 1.6x fp32's time, and the same bench gave drift
embeddings in bf16 0.55x fp32 and reward scoring 0.64x. So ``auto`` also times the product it is
about (:func:`bf16_is_faster`: once a process, about 0.1 s) and takes bf16 only where it runs at
least :data:`MIN_GAIN` times as fast as fp32.

On a Xeon with AMX-BF16 (2 cores, the same bench), where the matrix products take a tenth of
fp32's time, the rest of the encoder sets the pace; with PyTorch's fused attention (SDPA) instead
of eager attention, drift embeddings ran 201.4 texts/s against 65.0 in fp32 (3.10x) and reward
scoring 224.9 against 72.0 (3.12x), at a minimum cosine of 0.9999 and the same held-out accuracy.

What runs is :func:`monitor.inference.onnx.pooled_module` (the function the ONNX export traces, with
SDPA attention here) in bf16 weights, with the pooling itself in fp32, as a TorchScript trace
(:class:`~monitor.inference.traced.TracedEncoder`). The caller keeps its fp32 encoder for training.

>>> resolve_precision("fp32", "cpu"), resolve_precision("bf16", "cpu")
('fp32', 'bf16')
>>> resolve_precision("bf16", "cuda")  # the GPU path is the model as loaded
'fp32'
>>> native_bf16(frozenset({"avx2", "avx512_bf16"})), native_bf16(frozenset({"avx2", "fma"}))
(True, False)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
#: /proc/cpuinfo flags of a native bf16 dot product (Linux's names).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")
#: How many times as fast as fp32 a bf16 product must run for ``auto`` to choose bf16: a margin
#: over the timing's noise on a shared host, and over what the encoder does besides its products.
MIN_GAIN = 1.2
#: How many times as fast as fp32 a bf16 product must run for a backend ``auto`` to choose PyTorch
#: bf16 over ONNX Runtime int8 (:func:`bf16_outruns_int8`). ONNX Runtime's int8 products ran 2.6x
#: PyTorch fp32's on a Xeon without AMX and 4.5x on one with AMX (``bench/encoder.py``'s ceiling),
#: so bf16 must beat about 3x: on the AMX Xeon its products ran 7.5x fp32's and the bf16 encoder
#: 1.9x the int8 one; on an AMD EPYC with AVX512-BF16 but no AMX (another session) the bf16
#: encoder ran 0.9x the int8 one, its products 0.64x int8's.
INT8_GAIN = 3.0
#: The timed product: a batch of 8 sequences of 128 tokens through a MiniLM feed-forward input
#: projection (384 -> 1536), as ``torch.nn.functional.linear`` runs the encoder's.
PROBE_SHAPE = (1024, 384, 1536)
_PROBE_ROUNDS = 5


def cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The first processor's flags in ``/proc/cpuinfo`` (empty where there is none: not Linux)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether the CPU (``flags``: its flags; default this machine's) multiplies bf16 in hardware."""
    return bool(BF16_FLAGS & frozenset(_this_cpu() if flags is None else flags))


@cache
def _this_cpu() -> frozenset[str]:
    return cpu_flags()


def resolve_precision(precision: str, device: str) -> Literal["fp32", "bf16"]:
    """The encoder's weights on ``device``: ``bf16`` on the CPU when asked, ``auto`` bf16 on a CPU
    where it is faster (:func:`bf16_is_faster`); fp32 otherwise, and always on a GPU (the encoders'
    GPU path is the PyTorch model as it was loaded)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown encoder precision {precision!r} (auto, fp32, bf16)")
    if device != "cpu" or precision == "fp32":
        return "fp32"
    return "bf16" if precision == "bf16" or bf16_is_faster() else "fp32"


def bf16_is_faster() -> bool:
    """Whether this process's PyTorch runs an encoder-sized bf16 product at least :data:`MIN_GAIN`
    times as fast as fp32 on the CPU (:func:`bf16_gain`)."""
    return bf16_gain() >= MIN_GAIN


def bf16_outruns_int8(precision: str) -> bool:
    """Whether an encoder on the CPU should run in PyTorch bf16 rather than ONNX Runtime int8:
    ``precision`` ``bf16`` (asked for), or ``auto`` where a bf16 product runs at least
    :data:`INT8_GAIN` times as fast as fp32 (AMX: the products then cost less than int8's)."""
    if precision == "bf16":
        return True
    return precision == "auto" and bf16_gain() >= INT8_GAIN


@cache
def bf16_gain() -> float:
    """How many times as fast as fp32 this process's PyTorch runs an encoder-sized bf16 product on
    the CPU, timed once a process; 0 where the CPU has no native bf16 (there it is emulated, up to
    90x slower, and not worth timing) or the probe cannot run. Decided by running it, as
    ``int8.weight_levels`` decides the int8 range, not by the flags alone (see the module)."""
    if not native_bf16():
        return 0.0
    try:
        fp32, bf16 = product_seconds()
    except Exception as e:  # a torch build without CPU bf16 kernels raises its own types
        log.warning("bf16 probe failed (%s): the encoders run fp32", e)
        return 0.0
    gain = fp32 / bf16 if bf16 > 0 else 0.0
    log.info(
        "precision auto: a bf16 product runs %.2fx fp32 on this CPU: encoders in %s",
        gain,
        "bf16" if gain >= MIN_GAIN else "fp32",
    )
    return gain


def product_seconds(shape: tuple[int, int, int] = PROBE_SHAPE, rounds: int = _PROBE_ROUNDS) -> tuple[float, float]:
    """The fastest of ``rounds`` interleaved timings of ``x @ W.T`` (``shape``: rows, inputs,
    outputs) in fp32 and in bf16, seconds each, after a warm-up of each."""
    import torch

    rows, inputs, outputs = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inputs, generator=generator)
    w = torch.randn(outputs, inputs, generator=generator)
    operands = {torch.float32: (x, w), torch.bfloat16: (x.bfloat16(), w.bfloat16())}
    best = dict.fromkeys(operands, float("inf"))
    with torch.inference_mode():
        for a, b in operands.values():
            torch.nn.functional.linear(a, b)
        for _ in range(rounds):
            for dtype, (a, b) in operands.items():
                t0 = time.perf_counter()
                torch.nn.functional.linear(a, b)
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.float32], best[torch.bfloat16]
