"""The int8 rewrite without the ``onnx`` package (``monitor/inference/int8.py``).

It must compute what ONNX Runtime's ``quantize_dynamic`` computes with the same recipe (that
reference needs ``onnx``, which the dev install has and the default install does not), leave the
rest of the model as it was, and build the encoder's int8 cache where ``onnx`` cannot be imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.test_onnx_encoder import tiny_bert
from monitor.inference.int8 import (
    FULL_RANGE,
    PER_TENSOR,
    REDUCED_RANGE,
    STANDARD_DOMAINS,
    PerRow,
    Scheme,
    node_domains,
    quantize_matmuls,
    quantize_weight,
    weight_levels,
)
from monitor.inference.onnx import OnnxEncoder, export, pooled_module

QKV = ("/attention/self/query/", "/attention/self/key/", "/attention/self/value/")


def qkv(name: str) -> Scheme | None:
    return PER_TENSOR if any(k in name for k in QKV) else None


def inputs(seed: int) -> tuple[Any, Any, Any]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 200, size=(4, 11)).astype(np.int64)
    ids[:, 0] = 1
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # padding: the pooling must ignore it
    mask[3, 3:] = 0
    return ids, mask, np.zeros_like(ids)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "fp32.onnx"
    export(pooled_module(tiny_bert(), [0, -1], False), path)
    return path


@pytest.mark.parametrize("levels", [REDUCED_RANGE, FULL_RANGE])
def test_weight_recipe_is_symmetric_per_output_channel(levels: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column
    q, scale = quantize_weight(w, levels)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (8,)
    assert np.abs(q).max() == levels and q.min() >= -levels
    assert (q[:, 3] == 0).all() and scale[3] == 1.0
    # Each column's largest magnitude lands on +-levels, and dequantising is within half a step.
    assert (np.abs(q[:, [0, 1, 2, 4, 5, 6, 7]]).max(axis=0) == levels).all()
    assert np.abs(q * scale - w).max() <= scale.max() / 2 + 1e-7
    with pytest.raises(ValueError, match="levels"):
        quantize_weight(w, 128)  # would wrap round in int8


def integer_product(tmp_path: Path, levels: int, name: str) -> tuple[Any, Any]:
    """ONNX Runtime's ``MatMulInteger`` of the worst-case activations (uint8 255, the largest
    and 0) and random weights over ``[-levels, levels]`` (half of them at the bounds), with the
    exact int64 product."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(levels)
    w = rng.integers(-levels, levels + 1, size=(384, 384)).astype(np.float32)
    w[:, ::2] = levels * np.sign(w[:, ::2] + 0.5)  # every other column at +-levels
    w[0] = levels  # every column reaches its bound: its scale is 1, so it quantises to itself

    class Product(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.from_numpy(w))

        def forward(self, x: Any) -> Any:
            return x @ self.w

    src, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}-int8.onnx"
    x = np.where(rng.random((16, 384)) < 0.7, 255.0, 0.0).astype(np.float32)
    torch.onnx.export(Product().eval(), (torch.from_numpy(x),), str(src), dynamo=False, input_names=["x"])
    assert quantize_matmuls(src, out, lambda node: PER_TENSOR, levels=levels) == 1
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    # x quantises to itself (scale 1, zero point 0) and w to itself (scale 1 per column).
    return got, x.astype(np.int64) @ w.astype(np.int64)


def test_the_weight_range_this_machine_gets_is_computed_exactly(tmp_path: Path) -> None:
    """The probe's verdict, checked on a full product: the levels it chose sum without
    saturating here, and where it chose the reduced range, full-range weights really do
    saturate (the reason for the choice). Each machine exercises one branch: VNNI/AMX hosts the
    first, AVX2-only hosts both."""
    levels = weight_levels()
    assert levels in (REDUCED_RANGE, FULL_RANGE)
    got, want = integer_product(tmp_path, levels, "chosen")
    np.testing.assert_array_equal(got, want)
    if levels == REDUCED_RANGE:
        got, want = integer_product(tmp_path, FULL_RANGE, "full")
        assert not np.array_equal(got, want)


def test_rewrites_only_the_chosen_matmuls_and_keeps_the_rest(fp32: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8.onnx"
    assert quantize_matmuls(fp32, out, qkv) == 6  # 2 layers x q, k, v
    assert quantize_matmuls(fp32, tmp_path / "none.onnx", lambda name: None) == 0
    base = OnnxEncoder(fp32).session
    got = OnnxEncoder(out).session
    # The graph's inputs and outputs are untouched (unknown fields written back as they were).
    assert [i.name for i in got.get_inputs()] == [i.name for i in base.get_inputs()]
    assert [o.name for o in got.get_outputs()] == [o.name for o in base.get_outputs()]
    # Nothing chosen: the same model, byte for byte in what it computes.
    same = OnnxEncoder(tmp_path / "none.onnx")
    for seed in range(3):
        ids, mask, types = inputs(seed)
        a, b = OnnxEncoder(fp32).run(ids, mask, types), same.run(ids, mask, types)
        assert np.array_equal(a, b)


def test_a_shared_weight_is_quantised_once_and_other_shapes_stay_fp32(tmp_path: Path) -> None:
    import torch

    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(8, 8, generator=g))
            self.v = torch.nn.Parameter(torch.randn(3, 8, 8, generator=g))

        def forward(self, x: Any) -> Any:
            # Two MatMuls read w (different inputs); one reads a 3-D weight.
            return x @ self.w + (2 * x) @ self.w + (x @ self.v).sum(0)

    src, out = tmp_path / "shared.onnx", tmp_path / "shared-int8.onnx"
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    torch.onnx.export(Shared().eval(), (torch.from_numpy(x),), str(src), dynamo=False, input_names=["x"])
    assert quantize_matmuls(src, out, lambda name: PER_TENSOR) == 2
    import onnxruntime as ort

    want = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    assert got.shape == want.shape and not np.array_equal(got, want)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # int8 of an 8-wide product


def activation_then_matmul(tmp_path: Path, activation: str) -> tuple[Path, Any, Any]:
    """``act(x @ A) @ W`` exported (the second MatMul reads an activation's output, as an encoder's
    feed-forward output projection does), and inputs whose rows span two orders of magnitude."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.a = torch.nn.Parameter(torch.randn(16, 64, generator=g))
            self.w = torch.nn.Parameter(torch.randn(64, 8, generator=g) / 8)

        def forward(self, x: Any) -> Any:
            act = torch.nn.functional.gelu if activation == "gelu" else torch.relu
            return act(x @ self.a) @ self.w

    rng = np.random.default_rng(1)
    x = (rng.normal(size=(12, 16)) * np.logspace(-1, 1, 12)[:, None]).astype(np.float32)
    src, block = tmp_path / f"{activation}.onnx", Block().eval()
    torch.onnx.export(block, (torch.from_numpy(x),), str(src), dynamo=False, input_names=["x"], opset_version=17)
    return src, x, block


def second_matmul(scheme: Scheme) -> Any:
    return lambda name: scheme if name.endswith("MatMul_1") else None


def row_errors(src: Path, out: Path, x: Any) -> Any:
    import onnxruntime as ort

    want = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    return np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)


def test_per_row_activations_keep_every_rows_precision(tmp_path: Path) -> None:
    """One scale per tensor spends its 256 levels on the largest row; per row, a row 100 times
    smaller keeps its own. The rows' zero points must be taken back out exactly (GELU's outputs
    reach -0.17, so no row's zero point is 0)."""
    src, x, _ = activation_then_matmul(tmp_path, "gelu")
    per_row, per_tensor = tmp_path / "row.onnx", tmp_path / "tensor.onnx"
    assert quantize_matmuls(src, per_row, second_matmul(PerRow(-0.17))) == 1
    assert quantize_matmuls(src, per_tensor, second_matmul(PER_TENSOR)) == 1
    row, tensor = row_errors(src, per_row, x), row_errors(src, per_tensor, x)
    assert row.max() < 0.02  # every row within 2% of fp32 (int8 weights, 8-bit rows)
    small = slice(0, 4)  # the rows 100-25 times smaller than the largest
    assert tensor[small].mean() > 10 * row[small].mean()


def test_per_row_saturates_below_the_floor_instead_of_wrapping(tmp_path: Path) -> None:
    """A floor above the activation's minimum (0 for a GELU, whose outputs reach -0.17) clips
    the values below it: the result is the product of the clipped activations, not uint8 wrapping
    round to the top of the range. A floor below the minimum only costs levels."""
    import onnxruntime as ort
    import torch

    src, x, block = activation_then_matmul(tmp_path, "gelu")
    out = tmp_path / "floor0.onnx"
    quantize_matmuls(src, out, second_matmul(PerRow(0.0)))
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    with torch.no_grad():
        clipped = (torch.nn.functional.gelu(torch.from_numpy(x) @ block.a).clamp(min=0.0) @ block.w).numpy()
    assert (np.linalg.norm(got - clipped, axis=1) / np.linalg.norm(clipped, axis=1)).max() < 0.02
    quantize_matmuls(src, out, second_matmul(PerRow(-1.0)))
    assert row_errors(src, out, x).max() < 0.05


def test_per_row_gives_exact_zeros_for_a_row_at_the_floor(tmp_path: Path) -> None:
    """A row whose values all sit at the floor (ReLU of zeros) has no range: its scale must not be
    0 (0/0 is NaN); the product is then exactly 0."""
    import onnxruntime as ort

    src, x, _ = activation_then_matmul(tmp_path, "relu")
    x[5] = 0.0  # ReLU(0 @ A) = 0 everywhere
    out = tmp_path / "row.onnx"
    quantize_matmuls(src, out, second_matmul(PerRow(0.0)))
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    assert np.isfinite(got).all() and np.array_equal(got[5], np.zeros(8, dtype=np.float32))
    assert row_errors(src, out, x)[np.arange(12) != 5].max() < 0.02


def test_per_row_over_each_rows_own_range_keeps_a_two_sided_input_precise(tmp_path: Path) -> None:
    """``PerRow()`` (no floor): each row's range is its own ``[min(0, row min), max(0, row max)]``,
    so a two-sided input with a few rows far larger than the rest (a LayerNorm's output with its
    ``[SEP]`` tokens) keeps every row's precision, with the rows' zero points taken back out."""
    import onnxruntime as ort
    import torch

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(2)
            self.w = torch.nn.Parameter(torch.randn(16, 8, generator=g) / 4)

        def forward(self, x: Any) -> Any:
            return x @ self.w

    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 16)).astype(np.float32) + 0.5  # two-sided, not centred
    x[[3, 9]] *= 60.0  # two outlier tokens
    x[6] = -np.abs(x[6])  # a row with no positive value
    src = tmp_path / "linear.onnx"
    torch.onnx.export(
        Block().eval(), (torch.from_numpy(x),), str(src), dynamo=False, input_names=["x"], opset_version=17
    )
    per_row, per_tensor = tmp_path / "row.onnx", tmp_path / "tensor.onnx"
    assert quantize_matmuls(src, per_row, lambda name: PerRow()) == 1  # the graph's one MatMul
    assert quantize_matmuls(src, per_tensor, lambda name: PER_TENSOR) == 1
    row, tensor = row_errors(src, per_row, x), row_errors(src, per_tensor, x)
    assert row.max() < 0.02
    small = np.array([i for i in range(12) if i not in (3, 9)])
    assert tensor[small].mean() > 5 * row[small].mean()
    x[4] = 0.0  # a row with no range: exactly zero, not NaN
    got = ort.InferenceSession(str(per_row)).run(None, {"x": x})[0]
    assert np.isfinite(got).all() and np.array_equal(got[4], np.zeros(8, dtype=np.float32))


def test_node_domains_reach_into_subgraphs(fp32: Path) -> None:
    """The export hook refuses custom-domain operators; one inside an If branch counts too."""
    import onnx
    from onnx import TensorProto, helper

    assert node_domains(fp32.read_bytes()) <= STANDARD_DOMAINS  # the encoder: standard only
    branch = helper.make_graph(
        [helper.make_node("MyOp", ["x"], ["y"], domain="com.example")],
        "branch",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    plain = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "plain",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    cond = helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=plain)
    graph = helper.make_graph(
        [cond],
        "g",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    assert node_domains(model.SerializeToString()) == {"", "com.example"}
    assert node_domains(onnx.ModelProto(graph=plain).SerializeToString()) == {""}


def test_same_outputs_as_onnxruntime_quantize_dynamic(fp32: Path, tmp_path: Path) -> None:
    # The reference needs `onnx`: the dev install has it (pyproject's dev extra), so this never skips.
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32)).graph
    keep = [n.name for n in graph.node if n.op_type == "MatMul" and qkv(n.name) is None]
    ref_path = tmp_path / "ort.onnx"
    quantize_dynamic(
        str(fp32),
        str(ref_path),
        op_types_to_quantize=["MatMul"],
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        nodes_to_exclude=keep,
    )
    ours_path = tmp_path / "ours.onnx"
    quantize_matmuls(fp32, ours_path, qkv)
    ref, ours, base = OnnxEncoder(ref_path), OnnxEncoder(ours_path), OnnxEncoder(fp32)
    # The same int8 weights, scales and zero points as the reference writes.
    r = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(ref_path)).graph.initializer}
    o = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(ours_path)).graph.initializer}
    quantised = sorted(k for k in r if k.endswith(("_quantized", "_scale", "_zero_point")) and "MatMul" in k)
    assert len(quantised) == 18
    for k in quantised:
        assert o[k].dtype == r[k].dtype and np.array_equal(o[k], r[k]), k
    for seed in range(5):
        x = inputs(seed)
        want, got, full = ref.run(*x), ours.run(*x), base.run(*x)
        assert np.allclose(got, want, rtol=0, atol=1e-6)
        assert not np.array_equal(got, full)  # it is quantised


def test_int8_cache_builds_where_onnx_cannot_be_imported(tmp_path: Path) -> None:
    """The default install has no ``onnx``: building the int8 encoder must not need it."""
    script = """
import sys
sys.modules["onnx"] = None  # import onnx raises ImportError
sys.path.insert(0, "tests")
import numpy as np, torch
from monitor.inference.onnx import load_encoder
from inference.test_onnx_encoder import tiny_bert, tiny_inputs
batch = [tuple(torch.from_numpy(a) for a in tiny_inputs())]  # smoothed: the default recipe
enc = load_encoder("tiny", tiny_bert, [0, -1], normalize=False, quantisation="int8", calibration=lambda: batch)
out = enc.run(*tiny_inputs())
assert out.shape == (2, 64) and np.isfinite(out).all(), out.shape
print("ok", enc.path.parent.name)
"""
    env = {"ENCODER_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok int8-") and "-qkv" not in done.stdout
