"""PyTorch encoders on the CPU as frozen TorchScript traces (``monitor/inference/traced.py``): the
trace computes the eager module on batches of every shape, in fp32 and bf16, a module that cannot
be traced runs eagerly, and the traced forward leaves the interpreter lock to other threads."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from monitor.inference.traced import TracedEncoder

PRECISIONS = pytest.mark.parametrize("precision", ["fp32", "bf16"])


def shapes() -> list[tuple[Any, Any, Any]]:
    """Batches unlike the trace's example: one row without padding, rows padded to several lengths,
    a longer sequence."""
    rng = np.random.default_rng(0)
    out = []
    for rows, length, pads in ((1, 3, [0]), (3, 9, [0, 4, 7]), (5, 40, [0, 1, 20, 30, 38])):
        ids = rng.integers(3, 200, size=(rows, length))
        for r, pad in enumerate(pads):
            ids[r, length - pad :] = 0
        ids[:, 0] = 1
        out.append((ids, (ids != 0).astype(np.int64), np.zeros_like(ids)))
    return out


@PRECISIONS
def test_the_trace_computes_the_eager_module_on_batches_of_any_shape(precision: Any) -> None:
    import torch

    from inference.test_onnx_encoder import tiny_bert
    from monitor.inference.onnx import pooled_module

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    eager = pooled_module(tiny_bert(), [0, -1], normalize=False, attention="sdpa").to(dtype=dtype)
    tol = 2e-2 if precision == "bf16" else 1e-5
    enc = TracedEncoder(pooled_module(tiny_bert(), [0, -1], normalize=False, attention="sdpa"), precision)
    assert enc.traced and isinstance(enc.module, torch.jit.ScriptModule) and enc.attention == "sdpa"
    assert enc.precision == precision
    for ids, mask, types in shapes():
        with torch.no_grad():
            want = eager(*(torch.from_numpy(a) for a in (ids, mask, types))).float().numpy()
        got = enc.run(ids, mask, types)
        assert got.shape == want.shape == (len(ids), 64) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
        # The mask is in the trace: a padded row's padding changes nothing.
        if mask[-1].min() == 0:
            keep = int(mask[-1].sum())
            alone = enc.run(ids[-1:, :keep], mask[-1:, :keep], types[-1:, :keep])
            np.testing.assert_allclose(alone[0], got[-1], atol=tol, rtol=tol)


def test_a_module_that_cannot_be_traced_runs_eagerly(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    class Counting(torch.nn.Module):
        """Its output depends on Python state, which a trace bakes in: the trace disagrees with it."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, ids: Any, mask: Any, types: Any) -> Any:
            self.calls += 1
            return ids.float() + self.calls

    class Untraceable(torch.nn.Module):
        def forward(self, ids: Any, mask: Any, types: Any) -> Any:
            return {"not": "a tensor"}

    with caplog.at_level(logging.WARNING, logger="monitor.inference.traced"):
        broken = TracedEncoder(Untraceable(), "fp32")
    assert not broken.traced and "could not be traced" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="monitor.inference.traced"):
        counting = TracedEncoder(Counting(), "fp32")
    assert not counting.traced and "does not reproduce" in caplog.text
    ids, mask, types = shapes()[1]
    # Eager, it still encodes: the same function, only slower beside ingest.
    assert counting.run(ids, mask, types).shape[0] == len(ids)


@PRECISIONS
def test_the_traced_encoder_leaves_the_interpreter_lock_to_other_threads(precision: Any) -> None:
    """While a thread encodes, a Python thread that never blocks keeps running: the forward holds no
    interpreter lock (eager PyTorch would take it back between operators, every time waiting out
    the spinning thread's switch interval, here 50 ms: seconds for this model's operators)."""
    import sys
    import threading
    import time

    from inference.test_onnx_encoder import tiny_bert
    from monitor.inference.onnx import pooled_module

    enc = TracedEncoder(pooled_module(tiny_bert(), [-1], normalize=True, attention="sdpa"), precision)
    ids, mask, types = shapes()[2]
    enc.run(ids, mask, types)  # warm: the first runs of a trace profile it
    enc.run(ids, mask, types)
    took: list[float] = []

    def work() -> None:
        t0 = time.perf_counter()
        enc.run(ids, mask, types)
        took.append(time.perf_counter() - t0)

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.05)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        deadline = time.perf_counter() + 30
        while worker.is_alive() and time.perf_counter() < deadline:
            pass  # pure Python: gives the lock up only at the switch interval
        worker.join()
    finally:
        sys.setswitchinterval(before)
    # A handful of switch intervals (the call's own Python before and after the forward), not one
    # per operator: the eager module took 3.2 s here, on an AMX Xeon.
    assert took and took[0] < 1.5, took


def test_tracing_a_transformers_model_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    """The tracer reads every attribute, and a transformers model's ``loss_function`` property warns
    when read (``loss_type=None ... unrecognized``): on stderr of `oversight run` at every start."""
    import transformers.utils.logging as hf_logging

    from inference.test_onnx_encoder import tiny_bert
    from monitor.inference.onnx import pooled_module

    hf_logging.warning_once.cache_clear()  # a warning once a process: another test may have had it
    before = logging.getLogger("transformers").level
    capfd.readouterr()
    enc = TracedEncoder(pooled_module(tiny_bert(), [-1], normalize=True, attention="sdpa"), "fp32")
    assert enc.traced
    err = capfd.readouterr().err
    assert "loss_type" not in err and err == "", err
    assert logging.getLogger("transformers").level == before  # given back: transformers warns elsewhere


def test_batches_are_padded_to_few_shapes_and_keep_their_rows() -> None:
    """PyTorch keeps memory per input shape it has run: 3,000 batches of random shapes took the bf16
    encoder from 0.7 to 2.9 GB. Bucketed, every batch of 1-32 rows and 1-128 tokens is one of 48."""
    import torch

    from monitor.inference.traced import LENGTH_STEP, bucketed

    seen = set()
    rng = np.random.default_rng(1)
    for rows in range(1, 33):
        for length in range(1, 129):
            ids = torch.from_numpy(rng.integers(1, 200, size=(rows, length)))
            mask, types = torch.ones_like(ids), torch.zeros_like(ids)
            b_ids, b_mask, b_types = bucketed(ids, mask, types)
            seen.add(tuple(b_ids.shape))
            assert b_ids.shape == b_mask.shape == b_types.shape
            assert torch.equal(b_ids[:rows, :length], ids) and torch.equal(b_mask[:rows, :length], mask)
            assert int(b_mask[:rows, length:].sum()) == 0  # the added tokens are masked out
            assert torch.equal(b_ids[rows:], b_ids[:1].expand(len(b_ids) - rows, -1))  # copies of a real row
    assert len(seen) == 6 * (128 // LENGTH_STEP)
