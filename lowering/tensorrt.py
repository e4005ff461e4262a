"""The TensorRT flavour of the ONNX export, checked against a pinned copy of TensorRT's ONNX parser support table.

``export_onnx(qm, path, flavor="tensorrt")`` writes the same step as the ``onnxruntime`` flavour with uint8 only at
the network's inputs and outputs: packed bytes are written through int32 (:func:`onnx_kernels.bytes_as_int32`) and
:func:`bytes_only_at_io` removes every uint8 tensor inside the graph (a cast to uint8 whose consumers cast it again
reads the value before the cast: the codes are integers below 256, so that is exact). :func:`parser_problems`
then names every node the table (``tensorrt_onnx_support.txt``) does not accept; the export stops on any.

What was verified where: the graph and the table check run here, in ONNX Runtime on CPU, equal to the torch model.
Building and running a TensorRT engine needs a GPU machine with TensorRT (``trtexec --onnx=model.onnx``); nothing of
TensorRT installs on these machines, so that has not been run. torch-tensorrt converters or plugins for the kvpass
ops are not written.
"""

from __future__ import annotations

import functools
from pathlib import Path

import onnx

TABLE = Path(__file__).with_name("tensorrt_onnx_support.txt")
# ONNX element type -> the table's name; INT64 is cast down to INT32 by the parser, so it is checked as INT32
TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT32", onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.DOUBLE: "DOUBLE",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.FLOAT8E5M2: "FP8",
}
# the node's data type is its output's for these (their first input is a shape or any type)
TYPED_BY_OUTPUT = ("Cast", "ConstantOfShape", "Shape", "Size")


@functools.cache
def support_table() -> dict[str, frozenset[str]]:
    """Op type -> the element types the parser accepts for it (ops absent are unsupported)."""
    table = {}
    for line in TABLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            op, _, types = line.partition(":")
            table[op.strip()] = frozenset(types.split())
    return table


def _types(model: onnx.ModelProto) -> dict[str, int]:
    graph = onnx.shape_inference.infer_shapes(model).graph
    out = {t.name: t.data_type for t in graph.initializer}
    for value in (*graph.input, *graph.output, *graph.value_info):
        out[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:  # constants carry their type in the attribute
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = attr.t.data_type
    return out


def parser_problems(model: onnx.ModelProto) -> list[str]:
    """Every node of ``model`` that TensorRT's ONNX parser (the pinned table) would refuse, with why."""
    table, types = support_table(), _types(model)
    graph = model.graph
    io = {v.name for v in graph.input} | {v.name for v in graph.output}
    problems = []
    for node in graph.node:
        where = f"{node.op_type} {node.name or node.output[0]}"
        if node.op_type not in table:
            problems.append(f"{where}: the parser has no {node.op_type}")
            continue
        for name in (*node.input, *node.output):
            if name and TYPE_NAMES.get(types.get(name)) == "UINT8" and (node.op_type != "Cast" or name not in io):
                problems.append(f"{where}: uint8 tensor {name} inside the network (uint8 only at inputs and outputs)")
        checked = node.output[:1] if node.op_type in TYPED_BY_OUTPUT else node.input[:1]
        for name in checked:
            kind = TYPE_NAMES.get(types.get(name), "UNKNOWN")
            if kind != "UINT8" and kind not in table[node.op_type]:
                problems.append(f"{where}: {kind} {name}; the parser takes {', '.join(sorted(table[node.op_type]))}")
    return problems


def bytes_only_at_io(model: onnx.ModelProto) -> onnx.ModelProto:
    """Bypass every ``Cast(to=UINT8)`` whose consumers are Casts: they read the value before it (exact for the
    integer codes below 256 that are the only uint8 values here). The cast stays where it feeds a graph output."""
    graph = model.graph
    outputs = {v.name for v in graph.output}
    to_uint8 = {n.output[0]: n for n in graph.node
                if n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.UINT8 for a in n.attribute)}
    for node in graph.node:
        if node.op_type == "Cast" and node.input and node.input[0] in to_uint8:
            node.input[0] = to_uint8[node.input[0]].input[0]
    used = {name for n in graph.node for name in n.input} | outputs
    keep = [n for n in graph.node if not (n.output and n.output[0] in to_uint8 and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep)
    return model
