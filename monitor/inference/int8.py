"""Dynamic int8 of chosen weight MatMuls in an ONNX file, without the ``onnx`` package.

``onnx`` (26 MB, with ``ml_dtypes``) was in the default install for one call: ONNX Runtime's
``quantize_dynamic``, which rewrites 18 of the encoder's MatMuls (q/k/v, see
``monitor/inference/onnx.py``). This module does that one rewrite itself, with the same recipe:

* weights int8 per output channel, symmetric: ``scale = max|W[:, j]| / 127``, zero point 0,
  ``q = clip(round(W / scale), -127, 127)``;
* activations quantised at run time: ``DynamicQuantizeLinear(X)`` (uint8, one per input tensor,
  shared by the MatMuls that read it), then ``MatMulInteger``, ``Cast`` to float, and the product
  of the two scales;

so a rewritten model computes what ``quantize_dynamic(per_channel=True, weight_type=QInt8)`` gives
(``tests/inference/test_int8.py`` compares the two; the dev install has ``onnx``).

The file is read with a hand-written subset of ``onnx.proto`` (the fields below, numbered as in
ONNX's schema): protobuf keeps every field it does not know as it was, so the rest of the model
goes through untouched.

>>> import numpy as np
>>> w = np.array([[0.5, -2.0], [0.25, 1.0]], dtype=np.float32)
>>> q, scale = quantize_weight(w)
>>> q.tolist(), scale.tolist()
([[127, -127], [64, 64]], [0.003937007859349251, 0.015748031437397003])
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

# TensorProto.DataType and AttributeProto.AttributeType values (onnx.proto).
FLOAT, INT8 = 1, 3
ATTR_INT = 2
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
#: Names of the standard operator domain; any other domain is a custom one.
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


# The fields the rewrite reads and writes, as onnx.proto numbers them: "name number type", a
# leading "*" for repeated. Everything else in a model is kept as unknown fields, written back as it was.
_SCHEMA = {
    "AttributeProto": "name 1 string, i 3 int64, g 6 GraphProto, graphs 11 *GraphProto, type 20 int32",
    "TensorProto": "dims 1 *int64, data_type 2 int32, float_data 4 *float, name 8 string, raw_data 9 bytes,"
    " data_location 14 int32",
    "NodeProto": "input 1 *string, output 2 *string, name 3 string, op_type 4 string,"
    " attribute 5 *AttributeProto, domain 7 string",
    "GraphProto": "node 1 *NodeProto, initializer 5 *TensorProto",
    "ModelProto": "graph 7 GraphProto",
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


def quantize_weight(w: Any) -> tuple[Any, Any]:
    """``(q, scale)`` of a 2-D float32 weight, per output channel (column), symmetric int8."""
    import numpy as np

    absmax = np.abs(w).max(axis=0).astype(np.float32)
    scale = absmax / np.float32(127)
    scale[scale == 0] = np.float32(1.0)  # an all-zero column: any scale gives zeros
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale


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


def _node(op: str, name: str, inputs: list[str], outputs: list[str], **ints: int) -> Any:
    n = _messages()["NodeProto"](op_type=op, name=name)
    n.input.extend(inputs)
    n.output.extend(outputs)
    for key, value in ints.items():
        n.attribute.add(name=key, i=value, type=ATTR_INT)
    return n


def quantize_matmuls(src: Path, dest: Path, chosen: Callable[[str], bool]) -> int:
    """Write ``src`` to ``dest`` with every MatMul whose node name ``chosen`` accepts (and whose
    second input is a 2-D float initializer) in dynamic int8; returns how many were rewritten."""
    model = _messages()["ModelProto"]()
    model.ParseFromString(src.read_bytes())
    rewritten = _rewrite(model.graph, chosen)
    dest.write_bytes(model.SerializeToString())
    return rewritten


def _rewrite(graph: Any, chosen: Callable[[str], bool]) -> int:
    """Replace the chosen MatMuls of ``graph`` in place (nodes stay in topological order: each
    replacement takes its MatMul's place); weights no node reads any more are dropped."""
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for n in graph.node for name in n.input)
    nodes: list[Any] = []
    activations: dict[str, tuple[str, str, str]] = {}  # input -> its uint8 copy, scale, zero point
    new_inits: list[Any] = []
    rewritten = 0
    for n in graph.node:
        weight = inits.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
        if weight is None or n.domain not in STANDARD_DOMAINS or not chosen(n.name):
            nodes.append(n)
            continue
        w = n.input[1]
        if f"{w}_quantized" not in inits:  # a weight read by two chosen MatMuls is quantised once
            quantised = _quantised_weight(weight)
            if quantised is None:
                nodes.append(n)
                continue
            new_inits += quantised
            inits.update((t.name, t) for t in quantised)
        x = n.input[0]
        if x not in activations:
            activations[x] = (f"{x}_quantized", f"{x}_scale", f"{x}_zero_point")
            nodes.append(_node("DynamicQuantizeLinear", f"{x}_QuantizeLinear", [x], list(activations[x])))
        nodes += _int8_matmul(n, activations[x])
        uses[w] -= 1
        rewritten += 1
    kept = [t for t in graph.initializer if uses[t.name] > 0 or f"{t.name}_quantized" not in inits]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    return rewritten


def _quantised_weight(t: Any) -> list[Any] | None:
    """The int8 weight, its zero points and scales as initializers (None: not a 2-D float one)."""
    import numpy as np

    array = _weight(t)
    if array is None:
        return None
    q, scale = quantize_weight(array)
    return [
        _tensor(f"{t.name}_quantized", q, INT8),
        _tensor(f"{t.name}_zero_point", np.zeros(q.shape[1], dtype=np.int8), INT8),
        _tensor(f"{t.name}_scale", scale, FLOAT),
    ]


def _int8_matmul(n: Any, activation: tuple[str, str, str]) -> list[Any]:
    """The nodes that compute MatMul ``n`` from the quantised input and weight, into its output."""
    xq, xs, xz = activation
    w, out = n.input[1], n.output[0]
    return [
        _node("MatMulInteger", f"{n.name}_quant", [xq, f"{w}_quantized", xz, f"{w}_zero_point"], [f"{out}_int32"]),
        _node("Cast", f"{n.name}_cast", [f"{out}_int32"], [f"{out}_int32_float"], to=FLOAT),
        _node("Mul", f"{n.name}_scales_mul", [xs, f"{w}_scale"], [f"{out}_scales"]),
        _node("Mul", f"{n.name}_output_scale_mul", [f"{out}_int32_float", f"{out}_scales"], [out]),
    ]
