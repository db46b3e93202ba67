"""TFLite head surgery: a segment's exit head (its one dense layer) read out of the .tflite as
float weights, a probe for the pooled feature it sees, and new weights quantized back in place."""
from __future__ import annotations

import numpy as np

from tierlite.errors import BundleError


def _fc(model):
    """(subgraph, the one FULLY_CONNECTED op) of a flatbuffer model: the exit head's dense layer."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools.flatbuffer_utils import get_builtin_code_from_operator_code

    sub = model.subgraphs[0]
    fcs = [op for op in sub.operators
           if get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex]) == fb.BuiltinOperator.FULLY_CONNECTED]
    if len(fcs) != 1:
        raise BundleError(f"segment has {len(fcs)} dense layers; retraining needs an exit head ending in exactly one")
    return sub, fcs[0]


def _quant(tensor) -> tuple[np.ndarray, np.ndarray]:
    q = tensor.quantization
    return np.asarray(q.scale, dtype=np.float64).reshape(-1), np.asarray(q.zeroPoint, dtype=np.int64).reshape(-1)


class Head:
    """A segment's .tflite with its exit head exposed: the dense layer's float weights, and a probe
    model whose extra output is that layer's input (the pooled feature the head sees)."""

    def __init__(self, model_bytes: bytes, tier: str):
        from ai_edge_litert.interpreter import Interpreter
        from ai_edge_litert.tools import flatbuffer_utils as fbu

        self.tier, self.model_bytes = tier, model_bytes
        model = fbu.read_model_from_bytearray(bytearray(model_bytes))
        sub, op = _fc(model)
        x_t, w_t, b_t = (sub.tensors[i] for i in op.inputs[:3])
        self.in_scale, in_zp = _quant(x_t)
        self.in_zp = int(in_zp[0])
        w_scale, _ = _quant(w_t)
        wq = np.frombuffer(bytes(model.buffers[w_t.buffer].data), dtype=np.int8).reshape(tuple(w_t.shape))
        bq = np.frombuffer(bytes(model.buffers[b_t.buffer].data), dtype=np.int32)
        per_channel = w_scale.size == wq.shape[0]
        self.W = (wq.astype(np.float64) * (w_scale[:, None] if per_channel else w_scale[0])).T  # (D, C)
        self.b = bq.astype(np.float64) * self.in_scale[0] * (w_scale if per_channel else w_scale[0])
        sub.outputs = list(sub.outputs) + [op.inputs[0]]  # probe: also output the head's input
        self._interp = Interpreter(model_content=bytes(fbu.convert_object_to_bytearray(model)))
        self._interp.allocate_tensors()
        self._in = self._interp.get_input_details()[0]
        self._outs = self._interp.get_output_details()

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(pooled head inputs (N, D) float, the segment's own outputs (N, ...) raw) for N inputs."""
        pooled, outs = [], [[] for _ in self._outs[:-1]]
        for x in inputs:
            self._interp.set_tensor(self._in["index"], x.reshape(self._in["shape"]).astype(self._in["dtype"]))
            self._interp.invoke()
            for k, d in enumerate(self._outs[:-1]):
                outs[k].append(self._interp.get_tensor(d["index"])[0])
            pooled.append(self._interp.get_tensor(self._outs[-1]["index"]).reshape(-1))
        q = np.stack(pooled).astype(np.float64)
        return (q - self.in_zp) * self.in_scale[0], [np.stack(o) for o in outs]

    def patched(self, W: np.ndarray, b: np.ndarray) -> bytes:
        """The same model with new dense weights (D, C) and bias (C,), quantized in its own scheme
        (int8 symmetric weights, per channel if it was; int32 bias at input x weight scale) and
        written over the old values in place: every other byte of the file is unchanged, so an
        update can ship the file as a tiny XOR delta. The logits' output quantization is kept,
        so every tier decodes carried logits as before."""
        from ai_edge_litert import schema_py_generated as fb
        from ai_edge_litert.tools.flatbuffer_utils import get_builtin_code_from_operator_code

        data = bytearray(self.model_bytes)
        model = fb.Model.GetRootAs(data, 0)
        sub = model.Subgraphs(0)
        ops = [sub.Operators(i) for i in range(sub.OperatorsLength())]
        op = next(o for o in ops if get_builtin_code_from_operator_code(model.OperatorCodes(o.OpcodeIndex()))
                  == fb.BuiltinOperator.FULLY_CONNECTED)
        w_t, b_t = sub.Tensors(op.Inputs(1)), sub.Tensors(op.Inputs(2))

        def view(tensor, dtype):  # a writable numpy view of a constant tensor's bytes in `data`
            buf = model.Buffers(tensor.Buffer())
            if buf.Offset():  # large models keep buffers after the flatbuffer
                return np.frombuffer(data, dtype=dtype, count=buf.Size() // np.dtype(dtype).itemsize, offset=buf.Offset())
            return buf.DataAsNumpy().view(dtype)

        w_scale_view, b_scale_view = w_t.Quantization().ScaleAsNumpy(), b_t.Quantization().ScaleAsNumpy()
        wt = np.asarray(W, dtype=np.float64).T  # (C, D) as TFLite stores it
        if w_scale_view.size == wt.shape[0]:
            scale = np.maximum(np.abs(wt).max(axis=1), 1e-12) / 127.0
            wq = np.clip(np.round(wt / scale[:, None]), -127, 127).astype(np.int8)
        else:
            scale = np.array([max(np.abs(wt).max(), 1e-12) / 127.0])
            wq = np.clip(np.round(wt / scale[0]), -127, 127).astype(np.int8)
        scale = scale.astype(np.float32)
        bias_scale = (np.float32(self.in_scale[0]) * scale).astype(np.float32)
        if b_scale_view.size != wt.shape[0]:
            raise BundleError(f"{self.tier} head: bias quantization has {b_scale_view.size} scales, expected {wt.shape[0]}")
        bias_scale_full = np.broadcast_to(bias_scale, (wt.shape[0],)) if bias_scale.size == 1 else bias_scale
        bq = np.clip(np.round(np.asarray(b, dtype=np.float64) / bias_scale_full), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        view(w_t, np.int8)[:] = wq.reshape(-1)
        view(b_t, np.int32)[:] = bq
        w_scale_view[:] = scale
        b_scale_view[:] = bias_scale_full
        return bytes(data)
