"""PyTorch bf16 encoders on the CPU (``monitor/inference/bf16.py``): when ``auto`` chooses them, and
that they keep accuracy on real texts, for the drift embedding through the settings the service
reads (the reward model's: ``tests/reward/test_bf16_scoring.py``).

bf16 runs on any CPU (emulated where there is no native support, only slower), so every test here
runs on every machine; which precision ``auto`` picks is tested on given flag sets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from inference.test_onnx_encoder import real_episodes
from monitor.inference import bf16
from monitor.inference.bf16 import cpu_flags, native_bf16, resolve_precision
from monitor.inference.traced import TracedEncoder

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse2 avx2 fma {extra}
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu
"""


@pytest.mark.parametrize(
    ("extra", "native"), [("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True), ("avx512f avx512_vnni", False)]
)
def test_native_bf16_is_read_from_the_first_processors_flags(tmp_path: Path, extra: str, native: bool) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(extra=extra))
    flags = cpu_flags(info)
    assert "avx2" in flags and "spectre_v1" not in flags
    assert native_bf16(flags) is native


def test_without_cpuinfo_there_are_no_flags(tmp_path: Path) -> None:
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu_flags(tmp_path) == frozenset()  # a folder: unreadable as a file


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    bf16.bf16_gain.cache_clear()
    yield
    bf16.bf16_gain.cache_clear()  # the next test, and the rest of the run, time this machine


def no_probe() -> tuple[float, float]:
    raise AssertionError("a CPU without native bf16 is not timed")


@pytest.mark.parametrize(
    ("native", "seconds", "chosen", "over_int8"),
    [
        (True, (7.5, 1.0), "bf16", True),  # AMX: its products outrun ONNX int8's too
        (True, (2.0, 1.0), "bf16", False),  # twice as fast (AVX512-BF16 alone): int8 stays ahead
        (True, (1.0, 1.6), "fp32", False),  # the flag, but slower: a Xeon listing avx512_bf16 measured this
        (True, (1.0, 0.9), "fp32", False),  # within the margin: not worth the bf16 copy
        (False, None, "fp32", False),
    ],
)
def test_auto_chooses_bf16_only_where_it_is_measured_faster(
    monkeypatch: pytest.MonkeyPatch,
    fresh_probe: None,
    native: bool,
    seconds: tuple[float, float] | None,
    chosen: str,
    over_int8: bool,
) -> None:
    monkeypatch.setattr(bf16, "_this_cpu", lambda: frozenset({"avx512_bf16"} if native else {"avx2"}))
    monkeypatch.setattr(bf16, "product_seconds", (lambda: seconds) if seconds else no_probe)
    assert resolve_precision("auto", "cpu") == chosen
    assert bf16.bf16_outruns_int8("auto") is over_int8
    assert bf16.bf16_outruns_int8("bf16") and not bf16.bf16_outruns_int8("fp32")  # asked for: no probe
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == resolve_precision("bf16", "cuda:0") == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")


def test_a_probe_that_cannot_run_gives_fp32(monkeypatch: pytest.MonkeyPatch, fresh_probe: None) -> None:
    def broken() -> tuple[float, float]:
        raise RuntimeError("no bf16 kernel in this build")

    monkeypatch.setattr(bf16, "_this_cpu", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(bf16, "product_seconds", broken)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # asked for: no probe


def test_the_probe_times_both_products_on_this_machine() -> None:
    fp32, bf16_s = bf16.product_seconds(shape=(64, 32, 48), rounds=2)
    assert 0 < fp32 < 10 and 0 < bf16_s < 10


def test_drift_embeddings_in_bf16_keep_the_fp32_direction() -> None:
    from monitor.signals.embeddings import Embedder

    prompts, responses = real_episodes()
    ref_enc = Embedder(backend="torch")
    ref = ref_enc.embed_episodes(prompts, responses)
    got_enc = Embedder(backend="torch", precision="bf16")
    got = got_enc.embed_episodes(prompts, responses)
    assert ref_enc.resolved_precision == "fp32" and isinstance(got_enc._runner, TracedEncoder)
    assert got_enc._runner.attention == "sdpa"  # fused: the faster one
    assert got_enc._runner.traced  # a TorchScript call: the interpreter lock is free while it runs
    assert got_enc.resolved_precision == "bf16" and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * ref).sum(1)
    # bf16 keeps fp32's exponent range: no outliers to manage, so far above the int8 gate (0.99).
    assert cos.min() >= 0.999, float(cos.min())
    # The pooled states are fp32 sums: short texts and the empty response come out as fp32 does.
    assert np.abs(got - ref).max() < 0.02


def test_the_settings_give_the_drift_encoder_its_precision() -> None:
    from monitor.config import load_settings
    from monitor.signals.embeddings import embedder_for

    settings = load_settings(None, ["dev=true", "drift.embedding.backend=torch", "drift.embedding.precision=bf16"])
    enc = embedder_for(settings.drift.embedding)
    enc.embed(["hello"])
    assert enc.resolved_precision == "bf16"
    plain = embedder_for(load_settings(None, ["dev=true", "drift.embedding.precision=fp32"]).drift.embedding)
    assert plain.precision == "fp32"


def test_the_bf16_encoders_run_fused_attention_and_the_export_eager() -> None:
    """PyTorch's SDPA for a module PyTorch runs (faster in bf16: the module docstring of
    ``set_attention``), eager attention for one ONNX traces (``pooled_module`` says why); the two
    compute the same function."""
    import torch

    from inference.test_onnx_encoder import tiny_bert, tiny_inputs
    from monitor.inference.onnx import pooled_module

    ids, mask, types = (torch.from_numpy(a) for a in tiny_inputs())
    fused = pooled_module(tiny_bert(), [0, -1], normalize=True, attention="sdpa")
    traced = pooled_module(tiny_bert(), [0, -1], normalize=True)
    assert fused.encoder.config._attn_implementation == "sdpa"
    assert traced.encoder.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(fused(ids, mask, types), traced(ids, mask, types), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="flash"):
        pooled_module(tiny_bert(), [-1], normalize=True, attention="flash")


def test_an_encoder_without_fused_attention_keeps_eager() -> None:
    from transformers import BertModel

    from inference.test_onnx_encoder import tiny_bert
    from monitor.inference.onnx import set_attention

    class NoSdpa(BertModel):  # type: ignore[no-untyped-call, unused-ignore]
        _supports_sdpa = False

    cfg = tiny_bert().config
    cfg._attn_implementation = "eager"  # as a class without SDPA is loaded
    model = NoSdpa(cfg).eval()  # type: ignore[no-untyped-call, unused-ignore]
    assert set_attention(model, "sdpa") == "eager"
    assert set_attention(tiny_bert(), "sdpa") == "sdpa"
    assert set_attention(object(), "sdpa") == "unchanged"
