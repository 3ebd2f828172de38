"""SmoothQuant before the int8 export (``monitor/inference/smooth.py``).

Smoothing must not change what the fp32 encoder computes (it only moves a per-channel factor from
the activations into the weights), it must make int8 more accurate on an encoder with an outlier
channel, and the int8 build must quantise what :func:`int8_scheme` says, falling back to q/k/v for
an encoder it cannot smooth. The accuracy gates on the real MiniLM are in ``test_onnx_encoder.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.test_int8 import inputs
from inference.test_onnx_encoder import onnx_ops, tiny_bert
from monitor.data import calibration_pairs
from monitor.inference.int8 import FULL_RANGE, REDUCED_RANGE, quantize_matmuls, weight_levels
from monitor.inference.onnx import (
    CACHE_ENV,
    OnnxEncoder,
    export,
    int8_scheme,
    load_encoder,
    pooled_module,
    quantize_int8,
)
from monitor.inference.smooth import input_absmax, layers, smooth


def batches(seeds: range) -> list[tuple[Any, Any, Any]]:
    import torch

    return [tuple(torch.from_numpy(a) for a in inputs(s)) for s in seeds]  # type: ignore[misc]


def outlier_bert() -> Any:
    """tiny_bert with the outlier channels real encoders have: two hidden channels that every
    LayerNorm puts out 40 times larger, so each layer's q/k/v and feed-forward inputs carry them.
    Biases are not zero (as BERT's initialisation leaves them), so that folding into them counts."""
    import torch

    model = tiny_bert()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight[[3, 17]] *= 40.0
                mod.bias[[3, 17]] += 5.0
            if isinstance(mod, torch.nn.Linear):
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))
    return model


def pooled(model: Any, batch: tuple[Any, Any, Any]) -> Any:
    import torch

    with torch.no_grad():
        return pooled_module(model, [0, -1], False)(*batch).numpy()


def test_smoothing_leaves_the_fp32_function_unchanged() -> None:
    model, ref = outlier_bert(), outlier_bert()
    assert smooth(model, input_absmax(model, batches(range(3)))) == 2
    for batch in batches(range(10, 14)):
        np.testing.assert_allclose(pooled(model, batch), pooled(ref, batch), rtol=1e-4, atol=1e-4)
    # The weights did change: q/k/v's input columns were scaled, the value rows divided.
    layer, before = model.encoder.layer[0], ref.encoder.layer[0]
    assert not np.allclose(
        layer.attention.self.query.weight.detach().numpy(), before.attention.self.query.weight.detach().numpy()
    )
    assert not np.allclose(
        layer.attention.self.value.bias.detach().numpy(), before.attention.self.value.bias.detach().numpy()
    )


def spread(absmax: Any) -> float:
    """How far the largest channel stands above the typical one."""
    return float(absmax.max() / absmax.median())


def test_smoothing_flattens_the_quantised_inputs() -> None:
    model = outlier_bert()
    before = input_absmax(model, batches(range(3)))
    smooth(model, before)
    after = input_absmax(model, batches(range(3)))  # the hooks divide: this is what int8 sees
    for b, a in zip(before, after, strict=True):
        for name in b:
            if name == "output.dense":  # recorded, not smoothed: it is int8 per token instead
                continue
            assert spread(a[name]) < spread(b[name]) / 2, name


def test_smoothed_int8_is_closer_to_fp32_than_int8_alone(tmp_path: Path) -> None:
    def int8(model: Any, name: str) -> OnnxEncoder:
        fp32, out = tmp_path / f"{name}-fp32.onnx", tmp_path / f"{name}.onnx"
        export(pooled_module(model, [0, -1], False), fp32)
        assert quantize_matmuls(fp32, out, lambda node: int8_scheme(node, True)) == 2 * 5
        return OnnxEncoder(out)

    ref = outlier_bert()
    smoothed = outlier_bert()
    smooth(smoothed, input_absmax(smoothed, batches(range(4))))
    plain, better = int8(outlier_bert(), "plain"), int8(smoothed, "smoothed")
    err_plain, err_smoothed = [], []
    for seed in range(20, 30):  # inputs the calibration never saw
        x = inputs(seed)
        want = pooled(ref, batches(range(seed, seed + 1))[0])
        err_plain.append(np.abs(plain.run(*x) - want).max())
        err_smoothed.append(np.abs(better.run(*x) - want).max())
    assert np.mean(err_smoothed) < np.mean(err_plain) / 2, (np.mean(err_smoothed), np.mean(err_plain))


def test_an_encoder_of_another_shape_is_not_smoothed() -> None:
    import torch

    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert layers(other) == [] and smooth(other, []) == 0
    model = tiny_bert()
    assert smooth(model, []) == 0  # no calibration statistics: nothing is touched


def test_the_int8_build_smooths_when_given_calibration_and_falls_back_to_qkv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    smoothed = load_encoder(
        "tiny", tiny_bert, [0, -1], normalize=False, quantisation="int8", calibration=lambda: batches(range(2))
    )
    qkv_only = load_encoder("tiny", tiny_bert, [0, -1], normalize=False, quantisation="int8")
    assert smoothed.path != qkv_only.path  # two recipes, two cache entries
    # 2 layers: q, k, v, attention output, feed-forward input int8 (5 each), of which q, k, v per row
    # (MatMulIntegerToFloat); the feed-forward output per row too where this machine's kernel sums
    # full-range weights exactly, else fp32 (the next test builds both); q/k/v alone: 3 each, per tensor.
    ops = onnx_ops(smoothed.path)
    ffn_rows = 2 if weight_levels() == FULL_RANGE else 0
    assert (ops.count("MatMulInteger"), ops.count("MatMulIntegerToFloat")) == (4, 6 + ffn_rows)
    assert onnx_ops(qkv_only.path).count("MatMulInteger") == 6
    ref = tiny_bert()
    for seed in range(3):
        x = inputs(seed)
        want = pooled(ref, batches(range(seed, seed + 1))[0])
        assert np.allclose(smoothed.run(*x), want, atol=0.05)


@pytest.mark.parametrize(("levels", "ffn_rows"), [(FULL_RANGE, 2), (REDUCED_RANGE, 0)])
def test_the_feed_forward_output_is_int8_only_with_full_range_weights(
    levels: int, ffn_rows: int, tmp_path: Path
) -> None:
    """Where the kernel sums in int16 (reduced-range weights) the feed-forward output projection
    stays fp32, the rest as in full range; the model built with this machine's range computes the
    encoder's function."""
    import torch

    model = tiny_bert()
    smooth(model, input_absmax(model, batches(range(2))))
    module = pooled_module(model, [0, -1], False, smoothed=True)
    export(module, tmp_path / "fp32.onnx")
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    quantize_int8(fp32, int8, smoothed=True, ffn_floor=module.ffn_floor, levels=levels)
    ops = onnx_ops(int8)
    assert (ops.count("MatMulInteger"), ops.count("MatMulIntegerToFloat")) == (4, 6 + ffn_rows)
    if levels == weight_levels():  # products this machine computes exactly
        x = inputs(0)
        with torch.no_grad():
            want = module(*batches(range(1))[0]).numpy()
        assert np.allclose(OnnxEncoder(int8).run(*x), want, atol=0.05)


def test_calibration_pairs_come_from_the_bundled_dialogues() -> None:
    pairs = calibration_pairs(4)
    assert len(pairs) == 12 and all(isinstance(p, str) and isinstance(r, str) for p, r in pairs)
    assert pairs[0][0].rstrip().endswith("Assistant:") and pairs[0][1]
    assert max(len(r) for _, r in pairs[2::3]) <= 60  # the short answers


def tiny_encoder(family: str, act: str) -> Any:
    """A tiny randomly initialised encoder of ``family`` (``bert``, ``roberta``, ``distilbert``)
    with feed-forward activation ``act``, seeded like ``tiny_bert``."""
    import torch
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    if family == "distilbert":  # its own names for the same sizes
        shape = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "activation": act}
    else:
        shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
        shape["hidden_act"] = act
    config = AutoConfig.for_model(family, vocab_size=200, **shape)
    return AutoModel.from_config(config).eval()  # type: ignore[no-untyped-call, unused-ignore]


@pytest.mark.parametrize(
    ("family", "act", "int8_matmuls"),
    [
        # BERT-shaped: smoothed, the feed-forward output per row (where the weights have the full range)
        ("roberta", "gelu_new", 12),
        ("bert", "silu", 12),  # another floor (-0.279)
        ("bert", "tanh", 10),  # no known minimum: the feed-forward output projection stays fp32
        ("distilbert", "gelu", 0),  # not BERT-shaped, no token types: exported, left fp32, and it runs
    ],
)
def test_the_int8_recipe_on_other_encoders_matches_pytorch(
    family: str, act: str, int8_matmuls: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``drift.embedding.model_dir`` takes any local encoder: the export's attention switch, the
    smoothing and the per-row scheme must hold beyond MiniLM, and fail closed where they cannot."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    enc = load_encoder(
        f"{family}-{act}",
        lambda: tiny_encoder(family, act),
        [0, -1],
        normalize=False,
        quantisation="int8",
        calibration=lambda: batches(range(2)),
    )
    ops = onnx_ops(enc.path)
    if int8_matmuls == 12 and weight_levels() == REDUCED_RANGE:
        int8_matmuls = 10  # the feed-forward output projections stay fp32 (quantize_int8)
    assert ops.count("MatMulInteger") + ops.count("MatMulIntegerToFloat") == int8_matmuls
    assert "IsNaN" not in onnx_ops(enc.path)
    ref = tiny_encoder(family, act)
    for seed in range(3):
        want = pooled(ref, batches(range(seed, seed + 1))[0])
        got = enc.run(*inputs(seed))
        assert np.isfinite(got).all() and np.allclose(got, want, atol=0.05), np.abs(got - want).max()
