"""PyTorch encoders on the CPU as frozen TorchScript traces, so that they leave the interpreter lock
to the ingest loop.

The service encodes on worker threads beside the ingest loop, a Python thread that holds the
interpreter lock for its per-record work. Eager PyTorch takes the lock back between operators, and
each time waits out the ingest thread's switch interval (5 ms by default); an encoder runs hundreds
of operators a batch, so beside a busy loop it spent most of its time waiting. A TorchScript call
releases the lock for the whole forward, as ONNX Runtime does. On an Intel Xeon with AMX (2 cores,
``bench/encoder.py``'s drift workload beside a busy Python thread) the eager bf16 encoder ran 34-36
texts/s, the trace 109-123, alone both about 270-300.

What is traced is :func:`~monitor.inference.onnx.pooled_module` (the function the ONNX export
traces, with PyTorch's fused attention here), in the precision asked for: numpy int64 arrays in,
float32 pooled states out, the ``run`` of an ONNX Runtime encoder. A model whose forward cannot be
traced, or whose trace does not reproduce it, runs eagerly (the same function, slower beside
ingest), with a warning.

>>> import numpy as np, torch
>>> class Mean(torch.nn.Module):  # any module of (input_ids, attention_mask, token_type_ids)
...     def forward(self, ids, mask, types):
...         return (ids * mask).float().sum(1, keepdim=True) / mask.sum(1, keepdim=True)
>>> enc = TracedEncoder(Mean(), "fp32")
>>> enc.traced, enc.run(np.array([[2, 4, 0]]), np.array([[1, 1, 0]]), np.zeros((1, 3))).tolist()
(True, [[3.0]])
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

log = logging.getLogger(__name__)

#: Token counts are padded to a multiple of this (:func:`bucketed`): 8 lengths up to 128 tokens.
LENGTH_STEP = 16


class TracedEncoder:
    """A pooled encoder (:func:`~monitor.inference.onnx.pooled_module`) on the CPU in ``precision``,
    called as :class:`~monitor.inference.onnx.OnnxEncoder` is, as a trace (:func:`traced`) where it
    can be (``traced`` says). ``module`` must be the caller's own copy: it is converted in place."""

    def __init__(self, module: Any, precision: Literal["fp32", "bf16"]):
        import torch

        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        module = module.to(device="cpu", dtype=dtype).eval()
        self.precision = precision
        config = getattr(getattr(module, "encoder", None), "config", None)
        self.attention = str(getattr(config, "_attn_implementation", ""))  # what the trace runs
        script = traced(module)
        self.traced = script is not None
        self.module = module if script is None else script
        self._lock = threading.Lock()  # one module: callers on several threads take turns

    def run(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        import torch

        rows = len(input_ids)
        batch = bucketed(*(torch.as_tensor(a, dtype=torch.long) for a in (input_ids, attention_mask, token_type_ids)))
        with self._lock, torch.inference_mode():
            out = self.module(*batch)
        return out[:rows].float().numpy()


def bucketed(ids: Any, mask: Any, types: Any) -> tuple[Any, Any, Any]:
    """A batch padded to one of few shapes: rows to a power of two (copies of the first row, whose
    outputs the caller drops), tokens to a multiple of :data:`LENGTH_STEP` (masked out).

    Why: PyTorch on the CPU keeps memory per input shape it has run (oneDNN's primitive cache and
    the allocator's pools), and the workers' batches come in every size (what waits, up to 32) and
    length: on an AMX Xeon, 3,000 batches of random shapes (1-32 rows, 3-128 tokens) took the bf16
    MiniLM encoder from 0.7 to 2.9 GB, still growing, eager or traced alike; the same batches
    bucketed stayed flat after their warm-up (see the CHANGELOG). The outputs of the real rows do
    not change: a masked token is no key of any other."""
    import torch

    rows, length = ids.shape
    to_rows = 1 << max(0, rows - 1).bit_length()
    to_length = -(-length // LENGTH_STEP) * LENGTH_STEP
    if (to_rows, to_length) == (rows, length):
        return ids, mask, types
    pad = to_length - length
    ids, mask, types = (torch.nn.functional.pad(a, (0, pad)) for a in (ids, mask, types))
    if to_rows > rows:
        extra = to_rows - rows
        ids, mask, types = (torch.cat([a, a[:1].expand(extra, -1)]) for a in (ids, mask, types))
    return ids, mask, types


def example_inputs() -> tuple[Any, Any, Any]:
    """A batch to trace with: token ids valid in any vocabulary, and one padded row, so that the
    trace keeps the attention mask (a mask of ones alone could let a model skip it)."""
    import torch

    ids = torch.tensor([[1, 5, 6, 2], [1, 5, 2, 0]])
    return ids, (ids != 0).long(), torch.zeros_like(ids)


def traced(module: Any) -> Any | None:
    """``module`` traced with :func:`example_inputs` and frozen, or None where it cannot be (a
    model whose forward the tracer cannot follow, or whose trace does not give the module's own
    output on the example): the caller runs it eagerly then, slower beside ingest but the same
    function. Dynamic batch and sequence sizes hold as for the ONNX export, which traces the same
    module the same way (``tests/inference/test_traced.py`` checks other shapes)."""
    import torch

    example = example_inputs()
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet("transformers"):
            # The tracer warns at every Python-level branch on a tensor; transformers' own checks
            # (padding, causal flags) do not depend on the batch for an encoder with a mask.
            warnings.simplefilter("ignore")
            script = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False).eval())  # type: ignore[no-untyped-call]
            same = torch.allclose(script(*example).float(), module(*example).float(), atol=1e-2, rtol=1e-2)
    except Exception as e:  # the tracer raises many types (RuntimeError, TypeError, its own)
        log.warning("encoder runs eagerly: it could not be traced (%s)", e)
        return None
    if not same:
        log.warning("encoder runs eagerly: its trace does not reproduce it")
        return None
    return script


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """``logger`` at ERROR for the block: the tracer reads every attribute of the module, and a
    transformers model's ``loss_function`` property logs a warning when read (``loss_type=None``
    ... unrecognized), which a user would take for a fault of theirs."""
    log_ = logging.getLogger(logger)
    level = log_.level
    log_.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log_.setLevel(level)
