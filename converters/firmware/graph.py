"""The graph reader: what a TFLite flatbuffer holds (ops, tensors, inputs, outputs), read with
tflite-micro's schema and no interpreter."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from tierlite.errors import BundleError


@dataclass
class ModelGraph:
    """What the flatbuffer says, read without allocating an interpreter."""

    ops: list[str]  # builtin ops the operators use, in order of first use
    op_counts: dict[str, int]
    custom_ops: list[str]
    subgraphs: int
    tensors: list[dict[str, Any]]  # {name, type, shape, dynamic, constant} for every tensor of subgraph 0
    inputs: list[int]
    outputs: list[int]


def read_graph(data: bytes, where: str = "model") -> ModelGraph:
    from tflite_micro.python.tflite_micro import runtime as tflm
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    try:
        model = tflm.convert_bytearray_to_object(bytearray(data))
    except Exception as e:  # flatbuffers raises assorted errors on garbage
        raise BundleError(f"{where}: not a TFLite flatbuffer ({type(e).__name__}: {e})") from None
    if not model.subgraphs:
        raise BundleError(f"{where}: TFLite model has no subgraph")
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    counts: Counter[str] = Counter()
    custom: list[str] = []
    for sg in model.subgraphs:
        for op in sg.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            builtin = tflm.get_builtin_code_from_operator_code(code)
            if builtin == schema.BuiltinOperator.CUSTOM:
                name = (code.customCode or b"?").decode()
                if name not in custom:
                    custom.append(name)
            else:
                counts[op_names.get(builtin, f"BUILTIN_{builtin}")] += 1
    sg = model.subgraphs[0]
    tensors = []
    for t in sg.tensors or []:
        buf = model.buffers[t.buffer] if model.buffers is not None and t.buffer < len(model.buffers) else None
        sig = list(t.shapeSignature) if t.shapeSignature is not None else []
        tensors.append({
            "name": (t.name or b"").decode(errors="replace"),
            "type": type_names.get(t.type, str(t.type)),
            "shape": [int(x) for x in (t.shape if t.shape is not None else [])],
            "dynamic": any(int(x) < 0 for x in sig),
            "constant": buf is not None and buf.data is not None and len(buf.data) > 0,
        })
    return ModelGraph(ops=list(counts), op_counts=dict(counts), custom_ops=custom,
                      subgraphs=len(model.subgraphs), tensors=tensors,
                      inputs=[int(i) for i in sg.inputs], outputs=[int(i) for i in sg.outputs])
