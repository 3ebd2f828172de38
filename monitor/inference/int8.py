"""Dynamic int8 of chosen weight MatMuls in an ONNX file, without the ``onnx`` package.

``onnx`` (26 MB, with ``ml_dtypes``) was in the default install for one call: ONNX Runtime's
``quantize_dynamic``, which rewrites 18 of the encoder's MatMuls (q/k/v, see
``monitor/inference/onnx.py``). This module does that one rewrite itself, with the same recipe:

* weights int8 per output channel, symmetric: ``scale = max|W[:, j]| / L``, zero point 0,
  ``q = clip(round(W / scale), -L, L)``, with ``L`` 127 where this machine's ONNX Runtime computes
  full-range products exactly and 64 (a reduced range) elsewhere (:func:`weight_levels` says why);
* activations quantised at run time: ``DynamicQuantizeLinear(X)`` (uint8, one per input tensor,
  shared by the MatMuls that read it), then ``MatMulInteger``, ``Cast`` to float, and the product
  of the two scales;

so a rewritten model with ``L = 64`` computes what ``quantize_dynamic(per_channel=True,
weight_type=QInt8, reduce_range=True)`` gives
(``tests/inference/test_int8.py`` compares the two; the dev install has ``onnx``). That is
:data:`PER_TENSOR`. A MatMul may instead get :class:`PerRow`: one activation scale per row (per
token), for an input whose values one scale per tensor resolves poorly (see the class), computed by
ONNX Runtime's own ``MatMulIntegerToFloat`` (domain ``com.microsoft``, which the rewritten model
then imports).

The file is read with a hand-written subset of ``onnx.proto`` (the fields below, numbered as in
ONNX's schema): protobuf keeps every field it does not know as it was, so the rest of the model
goes through untouched.

>>> import numpy as np
>>> w = np.array([[0.5, -2.0], [0.25, 1.0]], dtype=np.float32)
>>> q, scale = quantize_weight(w)
>>> q.tolist(), scale.tolist()
([[64, -64], [32, 32]], [0.0078125, 0.03125])
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# TensorProto.DataType and AttributeProto.AttributeType values (onnx.proto).
FLOAT, UINT8, INT8, INT32, INT64 = 1, 2, 3, 6, 7
ATTR_INT, ATTR_INTS = 2, 7
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
#: Names of the standard operator domain; any other domain is a custom one.
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


@dataclass(frozen=True)
class PerTensor:
    """One activation scale and zero point per input tensor, computed at run time
    (``DynamicQuantizeLinear``, uint8): ``quantize_dynamic``'s recipe, which ONNX Runtime fuses with
    the MatMul into one ``DynamicQuantizeMatMul``."""


@dataclass(frozen=True)
class PerRow:
    """One activation scale per row of the input (per token), the product in ONNX Runtime's
    ``MatMulIntegerToFloat`` (the integer product, its cast and the weights' scales in one kernel),
    then each row's scale.

    ``floor`` (<= 0): the activation function's minimum. The input is shifted by it,
    ``x - floor >= 0``, and each row quantised over ``[0, max(0, row max) - floor]`` (uint8, zero
    point 0; a value below the floor saturates to it rather than wrapping round, so a loose floor
    costs precision, not correctness); the shift's share of the product, ``floor * colsum(W)``, is
    a constant added back. For an input with a long one-sided tail whose extent differs from token
    to token (a GELU's output: mostly near zero, a few tokens several times larger than the rest),
    one scale per tensor spends its levels on the largest token of the batch; per row, each token
    gets all 256 levels over its own range.

    ``floor=None``: symmetric rows, ``[-a, a]`` with ``a`` the row's largest magnitude (255 levels,
    stored around the zero point 128), for a two-sided input (a LayerNorm's output, read by q/k/v)
    in which a few tokens are far larger than the rest: the ``[SEP]`` between a prompt and its
    response, for one (``tests/inference/test_int8.py``).

    Why no per-row zero point (as recipe 8 had, over ``[min(0, row min), max(0, row max)]``): ONNX
    Runtime's integer kernels take one zero point per tensor, so each row's had to be taken out of
    the product afterwards (``z_row * colsum(W)``, an outer product as large as the output), in
    five elementwise passes over the output where now there is one. On the drift encoder (2-core
    Xeon, AVX-512 VNNI, 256 AlpacaEval episodes) that took the int8 model from 125 to 141 texts/s
    (the session alone, the best of 6 runs of each batch) at a minimum cosine to fp32 of 0.9976
    (0.9982 before). Symmetric rows for the feed-forward output as well were slower (126) and less
    accurate (0.9970)."""

    floor: float | None = None


#: The largest weight level where the int8 products may be summed in int16: ONNX Runtime's uint8 x
#: int8 kernel on x86 CPUs without VNNI (AVX2 only, as many AMD EPYC and older Xeon hosts are, and
#: AVX-512 without VNNI) adds adjacent products in int16 (``vpmaddubsw``), which saturates:
#: 255 x 127 x 2 = 64,770 > 32,767. On such a CPU full-range int8 weights gave 19% relative error on
#: a random 64 x 64 MatMul and 10-15% at 384 x 384 (against 1% computed exactly), whatever the
#: onnxruntime version (1.20 to 1.32); 255 x 64 x 2 = 32,640 fits. This is ``quantize_dynamic``'s
#: ``reduce_range``.
REDUCED_RANGE = 64
#: The largest weight level where the kernel sums in int32 (VNNI's ``vpdpbusd``, AMX): one more bit
#: per weight. On the drift encoder (MiniLM, smoothed) on an AVX-512 VNNI Xeon it raised the minimum
#: cosine to PyTorch on the gate's 195 episodes from 0.9899 (under the 0.99 gate: a short refusal
#: after an empty prompt) to 0.9958, and on its 197 texts from 0.9918 to 0.9959; the means from
#: 0.9975 and 0.9977 to 0.9992 and 0.9991.
FULL_RANGE = 127

#: The default scheme, as ``quantize_dynamic`` does it.
PER_TENSOR = PerTensor()
Scheme = PerTensor | PerRow
_ROW_LEVELS = 255.0
# A symmetric row: round(x / scale) in [-127, 127], stored as uint8 around the zero point 128.
_SYMMETRIC_LEVELS = 127.0
_SYMMETRIC_ZERO = 128
#: ONNX Runtime's operator domain (``MatMulIntegerToFloat``).
MS_DOMAIN = "com.microsoft"
_TINY_SCALE = 1e-12  # a row that is all its low end: any positive scale gives zeros, not 0/0


# The fields the rewrite reads and writes, as onnx.proto numbers them: "name number type", a
# leading "*" for repeated. Everything else in a model is kept as unknown fields, written back as it was.
_SCHEMA = {
    "AttributeProto": "name 1 string, i 3 int64, g 6 GraphProto, ints 8 *int64, graphs 11 *GraphProto, type 20 int32",
    "TensorProto": "dims 1 *int64, data_type 2 int32, float_data 4 *float, name 8 string, raw_data 9 bytes,"
    " data_location 14 int32",
    "NodeProto": "input 1 *string, output 2 *string, name 3 string, op_type 4 string,"
    " attribute 5 *AttributeProto, domain 7 string",
    "GraphProto": "node 1 *NodeProto, name 2 string, initializer 5 *TensorProto, input 11 *ValueInfoProto,"
    " output 12 *ValueInfoProto",
    "ModelProto": "ir_version 1 int64, graph 7 GraphProto, opset_import 8 *OperatorSetIdProto",
    # The rest only for :func:`weight_levels`'s probe model, which is built rather than rewritten.
    "OperatorSetIdProto": "domain 1 string, version 2 int64",
    "ValueInfoProto": "name 1 string, type 2 TypeProto",
    "TypeProto": "tensor_type 1 TensorTypeProto",
    "TensorTypeProto": "elem_type 1 int32, shape 2 TensorShapeProto",  # TypeProto.Tensor
    "TensorShapeProto": "dim 1 *DimensionProto",
    "DimensionProto": "dim_value 1 int64, dim_param 2 string",  # TensorShapeProto.Dimension
}


@cache
def _messages() -> dict[str, Any]:
    """The ONNX message classes of :data:`_SCHEMA` (proto2, as onnx.proto is)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    scalars = {"string": field.TYPE_STRING, "int64": field.TYPE_INT64, "int32": field.TYPE_INT32}
    scalars |= {"float": field.TYPE_FLOAT, "bytes": field.TYPE_BYTES}
    fd = descriptor_pb2.FileDescriptorProto(name="oversight/onnx_subset.proto", package="oversight_onnx")
    fd.syntax = "proto2"
    for name, spec in _SCHEMA.items():
        m = fd.message_type.add(name=name)
        for part in spec.split(","):
            fname, number, kind = part.split()
            repeated = kind.startswith("*")
            kind = kind.lstrip("*")
            f = m.field.add(name=fname, number=int(number))
            f.label = field.LABEL_REPEATED if repeated else field.LABEL_OPTIONAL
            if kind in scalars:
                f.type = scalars[kind]
            else:
                f.type, f.type_name = field.TYPE_MESSAGE, f".oversight_onnx.{kind}"
            if repeated and kind == "float":
                f.options.packed = True  # float_data, as onnx.proto declares it
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"oversight_onnx.{name}")) for name in _SCHEMA
    }


def node_domains(model_bytes: bytes) -> set[str]:
    """The operator domains of a serialised model's nodes, those of subgraphs (If, Loop, Scan
    bodies) included (``""``: the standard one)."""
    model = _messages()["ModelProto"]()
    model.ParseFromString(model_bytes)
    domains: set[str] = set()
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for n in graph.node:
            domains.add(n.domain)
            for a in n.attribute:
                if a.HasField("g"):
                    graphs.append(a.g)
                graphs.extend(a.graphs)
    return domains


def quantize_weight(w: Any, levels: int = REDUCED_RANGE) -> tuple[Any, Any]:
    """``(q, scale)`` of a 2-D float32 weight, per output channel (column), symmetric int8 in
    ``[-levels, levels]``."""
    import numpy as np

    if not 1 <= levels <= FULL_RANGE:
        raise ValueError(f"int8 weight levels must be in [1, {FULL_RANGE}], not {levels}")
    absmax = np.abs(w).max(axis=0).astype(np.float32)
    scale = absmax / np.float32(levels)
    scale[scale == 0] = np.float32(1.0)  # an all-zero column: any scale gives zeros
    q = np.clip(np.round(w / scale), -levels, levels).astype(np.int8)
    return q, scale


@cache
def weight_levels() -> int:
    """:data:`FULL_RANGE` where this process's ONNX Runtime sums uint8 x int8 products exactly,
    else :data:`REDUCED_RANGE`.

    Decided by running the kernel, not by reading CPU flags: which of its kernels ONNX Runtime
    picks (AVX2, AVX-VNNI, AVX-512 with or without VNNI, AMX, ARM's dot products) is its own
    choice and may change between versions. The probe multiplies 255s by 127s, the products that
    saturate an int16 sum, and compares with the exact result; a probe that cannot run at all
    gives the reduced range, which is correct everywhere. The answer is part of the encoders' cache
    key, so a cache shared by machines of both kinds holds one model for each."""
    try:
        exact = _full_range_is_exact()
    except Exception as e:  # onnxruntime raises its own types; the reduced range is always safe
        log.warning("int8 kernel probe failed (%s): weights over the reduced range", e)
        exact = False
    return FULL_RANGE if exact else REDUCED_RANGE


def _full_range_is_exact() -> bool:
    import numpy as np
    import onnxruntime as ort

    rows, inner, cols = 8, 256, 32  # a matrix product, not a vector one: the kernels ingest uses
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(_probe_model(inner, cols), opts, providers=["CPUExecutionProvider"])
    x = np.full((rows, inner), 255, dtype=np.uint8)
    got = session.run(None, {"x": x})[0]
    return bool((got == 255 * FULL_RANGE * inner).all())


def _probe_model(inner: int, cols: int) -> bytes:
    """A serialised model computing ``MatMulInteger(x, W)``, ``x`` uint8 ``[rows, inner]`` (an
    input, so the product runs when called rather than folded at load), ``W`` all :data:`FULL_RANGE`."""
    import numpy as np

    m = _messages()
    model = m["ModelProto"](ir_version=8)
    model.opset_import.add(domain="", version=13)
    graph = model.graph
    graph.name = "int8_kernel_probe"
    graph.initializer.append(_tensor("w", np.full((inner, cols), FULL_RANGE, dtype=np.int8), INT8))
    graph.node.append(_node("MatMulInteger", "probe", ["x", "w"], ["y"]))
    for value, name, elem, width in ((graph.input.add(), "x", UINT8, inner), (graph.output.add(), "y", INT32, cols)):
        value.name = name
        tensor = value.type.tensor_type
        tensor.elem_type = elem
        tensor.shape.dim.add(dim_param="rows")
        tensor.shape.dim.add(dim_value=width)
    serialised: bytes = model.SerializeToString()
    return serialised


def _weight(t: Any) -> Any:
    """A 2-D float32 initializer's array, or None for anything else (that MatMul stays fp32)."""
    import numpy as np

    if t.data_location == _EXTERNAL or t.data_type != FLOAT or len(t.dims) != 2:
        return None
    data = np.frombuffer(t.raw_data, dtype="<f4") if t.raw_data else np.asarray(t.float_data, dtype=np.float32)
    return data.reshape(tuple(t.dims)).astype(np.float32)


def _tensor(name: str, array: Any, data_type: int) -> Any:
    t = _messages()["TensorProto"](name=name, data_type=data_type, raw_data=array.tobytes())
    t.dims.extend(array.shape)
    return t


def _node(
    op: str, name: str, inputs: list[str], outputs: list[str], domain: str = "", **attributes: int | list[int]
) -> Any:
    n = _messages()["NodeProto"](op_type=op, name=name, domain=domain)
    n.input.extend(inputs)
    n.output.extend(outputs)
    for key, value in attributes.items():
        if isinstance(value, list):
            n.attribute.add(name=key, ints=value, type=ATTR_INTS)
        else:
            n.attribute.add(name=key, i=value, type=ATTR_INT)
    return n


def _scalar(name: str, value: float) -> Any:
    import numpy as np

    return _tensor(name, np.array(value, dtype=np.float32), FLOAT)


def quantize_matmuls(
    src: Path, dest: Path, scheme: Callable[[str], Scheme | None], *, levels: int = REDUCED_RANGE
) -> int:
    """Write ``src`` to ``dest`` with every MatMul (whose second input is a 2-D float initializer)
    in dynamic int8 by the scheme ``scheme`` gives its node name (None: it stays fp32), weights
    over ``[-levels, levels]``; returns how many were rewritten."""
    model = _messages()["ModelProto"]()
    model.ParseFromString(src.read_bytes())
    rewritten = _rewrite(model.graph, scheme, levels)
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and all(o.domain != MS_DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=MS_DOMAIN, version=1)
    dest.write_bytes(model.SerializeToString())
    return rewritten


def _rewrite(graph: Any, scheme: Callable[[str], Scheme | None], levels: int) -> int:
    """Replace the chosen MatMuls of ``graph`` in place (nodes stay in topological order: each
    replacement takes its MatMul's place); weights no node reads any more are dropped."""
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for n in graph.node for name in n.input)
    nodes: list[Any] = []
    # An input quantised once per scheme, shared by the MatMuls that read it: (input, scheme) ->
    # the names of its quantised copy and scale (and zero point, per tensor).
    activations: dict[tuple[str, Scheme], tuple[str, ...]] = {}
    new_inits: list[Any] = []
    rewritten = 0
    for n in graph.node:
        weight = inits.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
        chosen = scheme(n.name) if weight is not None and n.domain in STANDARD_DOMAINS else None
        if weight is None or chosen is None:
            nodes.append(n)
            continue
        w = n.input[1]
        if f"{w}_quantized" not in inits:  # a weight read by two chosen MatMuls is quantised once
            quantised = _quantised_weight(weight, levels)
            if quantised is None:
                nodes.append(n)
                continue
            new_inits += quantised
            inits.update((t.name, t) for t in quantised)
        key = (n.input[0], chosen)
        if key not in activations:
            activations[key], quantise, constants = _quantised_input(*key, width=int(weight.dims[0]))
            nodes += quantise
            new_inits += constants
        if isinstance(chosen, PerRow):
            unit = f"{activations[key][0]}_unit_scale"
            if unit not in inits:  # the rows' own scales are applied after the kernel
                inits[unit] = _scalar(unit, 1.0)
                new_inits.append(inits[unit])
            share = None
            if chosen.floor is not None:
                share = _floor_share(
                    inits[f"{w}_quantized"], inits[f"{w}_scale"], chosen.floor, f"{n.name}_floor_share"
                )
                new_inits.append(share)
            nodes += _row_int8_matmul(n, activations[key], None if share is None else share.name)
        else:
            nodes += _int8_matmul(n, activations[key])
        uses[w] -= 1
        rewritten += 1
    kept = [t for t in graph.initializer if uses[t.name] > 0 or f"{t.name}_quantized" not in inits]
    read = {name for n in nodes for name in n.input}
    new_inits = [t for t in new_inits if t.name in read]  # a weight's zero point, when only rows read it
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return rewritten


def _quantised_input(x: str, scheme: Scheme, width: int) -> tuple[tuple[str, ...], list[Any], list[Any]]:
    """The names of ``x``'s quantised copy, scale(s) and zero point, the nodes that compute them
    and the constants those nodes read (``width``: ``x``'s last dimension)."""
    if isinstance(scheme, PerTensor):
        names = (f"{x}_quantized", f"{x}_scale", f"{x}_zero_point")
        return names, [_node("DynamicQuantizeLinear", f"{x}_QuantizeLinear", [x], list(names))], []
    import numpy as np

    c = {k: f"{x}_row_{k}" for k in ("floor", "zero", "inverse_levels", "tiny", "flat", "rows", "centre")}
    v = {k: f"{x}_row_{k}" for k in ("max", "min", "neg_min", "top", "range", "raw_scale", "scale", "shifted")}
    v |= {k: f"{x}_row_{k}" for k in ("scale_flat", "as_rows", "rows_quantized", "flat_shape", "zero_flat")}
    v |= {"shape": f"{x}_shape", "quantized": f"{x}_row_quantized"}
    constants = [
        _scalar(c["tiny"], _TINY_SCALE),
        _tensor(c["flat"], np.array([-1], dtype=np.int64), INT64),
        _tensor(c["rows"], np.array([-1, width], dtype=np.int64), INT64),
    ]
    if scheme.floor is None:
        # Symmetric: each row over [-a, a], a its largest magnitude, stored with the one zero point
        # 128 that MatMulIntegerToFloat takes (a per-row zero point would have to be taken out of
        # the product afterwards, an outer product as large as the output).
        source = x
        nodes = [
            _node("ReduceMax", f"{x}_row_max", [x], [v["max"]], axes=[-1], keepdims=1),
            _node("ReduceMin", f"{x}_row_min", [x], [v["min"]], axes=[-1], keepdims=1),
            _node("Neg", f"{x}_row_neg_min", [v["min"]], [v["neg_min"]]),
            _node("Max", f"{x}_row_range", [v["max"], v["neg_min"]], [v["range"]]),
        ]
        levels = _SYMMETRIC_LEVELS
        constants += [_tensor(c["centre"], np.array(_SYMMETRIC_ZERO, dtype=np.uint8), UINT8)]
    else:
        # Shifted: x - floor is >= 0 (what lies below the floor saturates to 0), over [0, top] per
        # row with zero point 0; the shift's share of the product is a constant the output gets back.
        source = v["shifted"]
        nodes = [
            _node("Sub", f"{x}_row_shift", [x, c["floor"]], [v["shifted"]]),
            _node("ReduceMax", f"{x}_row_max", [x], [v["max"]], axes=[-1], keepdims=1),
            _node("Max", f"{x}_row_top", [v["max"], c["zero"]], [v["top"]]),  # 0 in range: exact zeros
            _node("Sub", f"{x}_row_range", [v["top"], c["floor"]], [v["range"]]),
        ]
        levels = _ROW_LEVELS
        constants += [_scalar(c["floor"], scheme.floor), _scalar(c["zero"], 0.0)]
    constants.append(_scalar(c["inverse_levels"], 1.0 / levels))
    nodes += [
        # Each row's scale, shaped [..., 1] to broadcast over the product.
        _node("Mul", f"{x}_row_raw_scale", [v["range"], c["inverse_levels"]], [v["raw_scale"]]),
        _node("Max", f"{x}_row_scale", [v["raw_scale"], c["tiny"]], [v["scale"]]),
        # QuantizeLinear's per-axis parameters are 1-D along one axis: the rows of a 2-D view.
        _node("Reshape", f"{x}_row_scale_flat", [v["scale"], c["flat"]], [v["scale_flat"]]),
        _node("Reshape", f"{x}_row_as_rows", [source, c["rows"]], [v["as_rows"]]),
    ]
    quantize_inputs = [v["as_rows"], v["scale_flat"]]
    if scheme.floor is None:  # the zero point, per axis as the scale is: 128 for every row
        nodes += [
            _node("Shape", f"{x}_row_flat_shape", [v["scale_flat"]], [v["flat_shape"]]),
            _node("Expand", f"{x}_row_zero_flat", [c["centre"], v["flat_shape"]], [v["zero_flat"]]),
        ]
        quantize_inputs.append(v["zero_flat"])
    nodes += [
        _node("QuantizeLinear", f"{x}_row_quantize", quantize_inputs, [v["rows_quantized"]], axis=0),
        _node("Shape", f"{x}_shape", [x], [v["shape"]]),
        _node("Reshape", f"{x}_row_reshape", [v["rows_quantized"], v["shape"]], [v["quantized"]]),
    ]
    zero_point = c["centre"] if scheme.floor is None else ""
    return (v["quantized"], v["scale"], zero_point), nodes, constants


def _floor_share(q: Any, scale: Any, floor: float, name: str) -> Any:
    """``floor @ W``: what the constant ``floor`` taken off every input value contributes to each
    output column, from the int8 weight as the kernel multiplies it (its column sums, scaled)."""
    import numpy as np

    w = np.frombuffer(q.raw_data, dtype=np.int8).reshape(tuple(q.dims)).astype(np.float64)
    s = np.frombuffer(scale.raw_data, dtype="<f4").astype(np.float64)
    return _tensor(name, (floor * w.sum(axis=0) * s).astype(np.float32), FLOAT)


def _quantised_weight(t: Any, levels: int) -> list[Any] | None:
    """The int8 weight, its zero points and scales as initializers (None: not a 2-D float one)."""
    import numpy as np

    array = _weight(t)
    if array is None:
        return None
    q, scale = quantize_weight(array, levels)
    return [
        _tensor(f"{t.name}_quantized", q, INT8),
        _tensor(f"{t.name}_zero_point", np.zeros(q.shape[1], dtype=np.int8), INT8),
        _tensor(f"{t.name}_scale", scale, FLOAT),
    ]


def _int8_matmul(n: Any, activation: tuple[str, ...]) -> list[Any]:
    """The nodes that compute MatMul ``n`` from the quantised input and weight, into its output."""
    xq, xs, xz = activation
    w, out = n.input[1], n.output[0]
    return [
        _node("MatMulInteger", f"{n.name}_quant", [xq, f"{w}_quantized", xz, f"{w}_zero_point"], [f"{out}_int32"]),
        _node("Cast", f"{n.name}_cast", [f"{out}_int32"], [f"{out}_int32_float"], to=FLOAT),
        _node("Mul", f"{n.name}_scales_mul", [xs, f"{w}_scale"], [f"{out}_scales"]),
        _node("Mul", f"{n.name}_output_scale_mul", [f"{out}_int32_float", f"{out}_scales"], [out]),
    ]


def _row_int8_matmul(n: Any, activation: tuple[str, ...], floor_share: str | None) -> list[Any]:
    """:func:`_int8_matmul` for a :class:`PerRow` input: ONNX Runtime's ``MatMulIntegerToFloat``
    (the integer product, its cast and the weight's scales in one kernel, with the one zero point
    of the symmetric rows), then the rows' scales, then ``floor_share`` (the name of the constant
    the shifted rows' floor contributes to every output row) where there is one."""
    xq, xs, xz = activation
    w, out = n.input[1], n.output[0]
    scaled = f"{out}_weight_scaled"
    inputs = [xq, f"{w}_quantized", f"{xq}_unit_scale", f"{w}_scale", *([xz] if xz else [])]
    nodes = [
        _node("MatMulIntegerToFloat", f"{n.name}_quant", inputs, [scaled], domain=MS_DOMAIN),
        _node("Mul", f"{n.name}_row_scale_mul", [scaled, xs], [out if floor_share is None else f"{out}_rows"]),
    ]
    if floor_share is not None:
        nodes.append(_node("Add", f"{n.name}_floor_share_add", [f"{out}_rows", floor_share], [out]))
    return nodes
