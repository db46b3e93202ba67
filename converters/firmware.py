"""`tierlite firmware SRC --board NAME --out DIR`: make a bundle's end segment (or any int8 .tflite)
deployable on a board profile from firmware_configs/.

Microcontroller boards (TFLite Micro): checks the model fits (model bytes vs the flash budget; the
tensor arena, measured on the TFLite Micro interpreter, vs the RAM budget), checks TFLM's outputs
against LiteRT's on sample frames, then writes the model as a C++ array, an op resolver with exactly
the model's ops, a config header (quantization, exit threshold, feature encoding, MQTT topics, node
id, arena size), a dependency-free exit-decision header, a README for the board's toolchain and a
JSON report. Linux boards: checks the budget and that the board's runtime plugin loads the model;
Coral boards also get the Edge TPU readiness check and, with edgetpu_compiler on PATH, the compiled
model added to the bundle (converters/edgetpu.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.boards import Board, format_bytes, load_board
from tierlite.errors import BundleError, ConfigError, TierliteError

ARENA_STEP = 16  # arena sizes are searched in 16-byte steps (TFLM aligns buffers to 16)
PARITY_TOLERANCE = 1  # quantization steps TFLM may differ from LiteRT's reference kernels
ARENA_HEADROOM_WARN = 0.10  # warn when the budget leaves less than this share above the arena

# MicroMutableOpResolver method per builtin op, checked against TFLM's micro_mutable_op_resolver.h.
TFLM_RESOLVER_METHODS = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable", "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd", "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo", "CALL_ONCE": "AddCallOnce", "CAST": "AddCast", "CEIL": "AddCeil",
    "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D", "COS": "AddCos", "CUMSUM": "AddCumSum",
    "DEPTH_TO_SPACE": "AddDepthToSpace", "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D",
    "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv", "ELU": "AddElu", "EQUAL": "AddEqual", "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill", "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod", "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd", "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish", "IF": "AddIf", "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D", "LEAKY_RELU": "AddLeakyRelu", "LESS": "AddLess",
    "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog", "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax", "MAXIMUM": "AddMaximum", "MAX_POOL_2D": "AddMaxPool2D",
    "MEAN": "AddMean", "MINIMUM": "AddMinimum", "MIRROR_PAD": "AddMirrorPad", "MUL": "AddMul",
    "NEG": "AddNeg", "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2",
    "PRELU": "AddPrelu", "QUANTIZE": "AddQuantize", "READ_VARIABLE": "AddReadVariable",
    "REDUCE_MAX": "AddReduceMax", "RELU": "AddRelu", "RELU6": "AddRelu6", "RESHAPE": "AddReshape",
    "RESIZE_BILINEAR": "AddResizeBilinear", "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor",
    "ROUND": "AddRound", "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape",
    "SIN": "AddSin", "SLICE": "AddSlice", "SOFTMAX": "AddSoftmax", "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd",
    "SPACE_TO_DEPTH": "AddSpaceToDepth", "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQRT": "AddSqrt",
    "SQUARE": "AddSquare", "SQUARED_DIFFERENCE": "AddSquaredDifference", "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf",
    "TANH": "AddTanh", "TRANSPOSE": "AddTranspose", "TRANSPOSE_CONV": "AddTransposeConv",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM", "UNPACK": "AddUnpack",
    "VAR_HANDLE": "AddVarHandle", "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}
TOOLCHAIN_NAMES = {"esp-idf": "ESP-IDF", "stm32cube": "STM32Cube", "zephyr": "Zephyr / nRF Connect SDK"}


class BoardCheckFailed(TierliteError):
    """A model cannot go on a board as it is; .report holds the numbers behind the message."""

    def __init__(self, message: str, report: dict[str, Any] | None = None):
        super().__init__(message)
        self.report = report or {}


class DoesNotFit(BoardCheckFailed):
    """The model is larger than a board's flash or RAM budget."""


class NotEdgeTPUReady(BoardCheckFailed):
    """The model cannot be mapped to the Edge TPU as a whole."""


class ParityMismatch(TierliteError):
    """TFLite Micro's outputs differ from LiteRT's reference kernels by more than the tolerance."""


# -- reading models -----------------------------------------------------------------------------
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


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int


@dataclass
class EndModel:
    """The model to deploy plus what the bundle says about it (roles, threshold, encoding)."""

    path: Path
    data: bytes
    name: str
    version: int  # bundle version; 0 for a bare .tflite
    labels: list[str]
    inputs: list[Tensor]
    outputs: list[Tensor]
    logits_index: int
    feature_index: int | None
    threshold: float
    encoding: dict[str, Any]
    bundle_root: Path | None = None  # set when SRC is a bundle directory (so files can be added)

    @property
    def input(self) -> Tensor:
        return self.inputs[0]

    @property
    def logits(self) -> Tensor:
        return self.outputs[self.logits_index]

    @property
    def feature(self) -> Tensor | None:
        return None if self.feature_index is None else self.outputs[self.feature_index]


def _litert_reference(path: Path, preserve: bool = False):
    """LiteRT with its reference kernels: the semantics TFLite Micro's kernels implement."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from tierlite.runtimes.litert import InterpreterRuntime

    try:
        interp = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_REF,
                             experimental_preserve_all_tensors=preserve)
        return InterpreterRuntime(path, interp)
    except (ValueError, RuntimeError) as e:
        raise BundleError(f"LiteRT cannot load {path}: {e}") from None


def load_end_model(src: str | Path, threshold: float | None = None) -> EndModel:
    """A bundle (directory or .tar.gz: its end segment) or a bare .tflite file."""
    from tierlite.bundle import Bundle

    src = Path(src)
    if not src.exists():
        raise ConfigError(f"not found: {src}")
    if src.is_file() and src.suffix == ".tflite":
        path, bundle = src, None
    elif src.is_dir() or src.name.endswith((".tar.gz", ".tgz")):
        bundle = Bundle.load(src)
        path = bundle.segment_path("end")
    else:
        raise ConfigError(f"{src}: expected a bundle directory, a bundle .tar.gz or a .tflite file")
    rt = _litert_reference(path)
    inputs = [Tensor(d.name, tuple(d.shape), d.dtype.name, d.scale, d.zero_point) for d in rt.inputs]
    outputs = [Tensor(d.name, tuple(d.shape), d.dtype.name, d.scale, d.zero_point) for d in rt.outputs]
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[-1] not in (1, 3):
        raise ConfigError(f"{path}: expected one image input [1,H,W,C], got {[t.shape for t in inputs]}")
    if bundle is not None:
        seg = bundle.segment("end")
        logits_index = seg.output("logits").index if seg.output("logits") else 0
        feature = seg.output("feature")
        feature_index = feature.index if feature else None
        thr = bundle.thresholds.get("end", 1.0) if threshold is None else threshold
        return EndModel(path, path.read_bytes(), bundle.name, bundle.version, bundle.labels, inputs, outputs,
                        logits_index, feature_index, float(thr), bundle.feature_encoding,
                        bundle.root if src.is_dir() else None)
    # A bare model: logits are the first output of rank <= 2; another output is the boundary feature.
    ranked = [i for i, t in enumerate(outputs) if len(t.shape) <= 2]
    logits_index = ranked[0] if ranked else 0
    others = [i for i in range(len(outputs)) if i != logits_index]
    classes = int(np.prod(outputs[logits_index].shape))
    return EndModel(path, path.read_bytes(), path.stem, 0, [str(i) for i in range(classes)], inputs, outputs,
                    logits_index, others[0] if others else None, 1.0 if threshold is None else float(threshold),
                    {"kind": "int8"})


def require_integer_io(model: EndModel) -> None:
    for kind, tensors in (("input", model.inputs), ("output", model.outputs)):
        for t in tensors:
            if t.dtype not in ("int8", "uint8"):
                raise ConfigError(f"{model.path.name}: {kind} {t.name!r} is {t.dtype}; firmware needs a "
                                  "full-integer (int8/uint8) model, convert it with full int8 quantization")


# -- TFLite Micro on the host -------------------------------------------------------------------
@contextlib.contextmanager
def captured_stderr():
    """TFLM's C++ side prints to fd 2; keep it off the console and hand the text back."""
    sink = tempfile.TemporaryFile(mode="w+b")
    saved = os.dup(2)
    result = {"text": ""}
    try:
        os.dup2(sink.fileno(), 2)
        yield result
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sink.seek(0)
        result["text"] = sink.read().decode(errors="replace")
        sink.close()


def _tflm(data: bytes, arena: int):
    from tflite_micro.python.tflite_micro import runtime as tflm

    return tflm.Interpreter.from_bytes(data, arena_size=arena)


def _allocates(data: bytes, arena: int) -> bool:
    try:
        _tflm(data, arena)
        return True
    except RuntimeError:
        return False


def measure_arena(model: EndModel, limit: int = 64 << 20) -> int:
    """Smallest tensor arena (bytes, 16-byte steps) with which TFLite Micro allocates and invokes."""
    data = model.data
    with captured_stderr() as err:
        hi = max(64 << 10, 2 * len(data))
        while not _allocates(data, hi):
            if hi >= limit:
                break
            hi = min(hi * 2, limit)
        else:
            lo = 0  # invariant: lo fails (or is 0), hi works
            while hi - lo > ARENA_STEP:
                mid = (lo + hi) // 2 // ARENA_STEP * ARENA_STEP
                lo, hi = (lo, mid) if _allocates(data, mid) else (mid, hi)
            interp = _tflm(data, hi)
            interp.set_input(np.zeros(model.input.shape, model.input.dtype), 0)
            interp.invoke()
            return hi
    detail = err["text"].strip().splitlines()
    raise ConfigError(f"{model.path.name}: TFLite Micro cannot allocate this model even with a "
                      f"{format_bytes(limit)} arena ({detail[-1] if detail else 'no message'})")


def tflm_latency_ms(model: EndModel, arena: int, frames: np.ndarray, repeats: int = 20) -> float:
    """Median invoke time of TFLite Micro's reference kernels on this host (not the board's speed)."""
    with captured_stderr():
        interp = _tflm(model.data, arena)
        x = frame_to_input(frames[0], model.input)
        interp.set_input(x, 0)
        interp.invoke()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            interp.invoke()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


# -- frames and parity --------------------------------------------------------------------------
def frame_to_input(frame: np.ndarray, spec: Tensor) -> np.ndarray:
    """An RGB uint8 frame as the model's input tensor: resized, then uint8 as is, or int8
    quantized from pixel values 0..255 with the input's scale and zero point."""
    import cv2

    _, h, w, c = spec.shape
    if frame.shape[:2] != (h, w):
        frame = cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)
    if c == 1 and frame.ndim == 3:
        frame = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    frame = frame.reshape(spec.shape)
    if spec.dtype == "uint8":
        return np.ascontiguousarray(frame, dtype=np.uint8)
    scale = spec.scale or 1.0
    q = np.round(frame.astype(np.float32) / scale + spec.zero_point)
    return np.clip(q, -128, 127).astype(np.int8)


def load_frames(model: EndModel, frames_dir: str | Path | None, count: int, seed: int = 0) -> np.ndarray:
    """Sample frames: images from a folder (recursively, sorted), or seeded synthetic scenes."""
    from tierlite.data import IMAGE_SUFFIXES, decode_image

    _, h, w, _ = model.input.shape
    if frames_dir is not None:
        root = Path(frames_dir)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []
        if not files:
            raise ConfigError(f"--frames {root}: no images found")
        step = max(1, len(files) // count)
        return np.stack([decode_image(p, (w, h)) for p in files[::step][:count]])
    # Smooth random scenes (upsampled noise plus edges) exercise the whole input range like photos do.
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        noise = rng.integers(-20, 21, size=img.shape)
        out.append(np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8))
    return np.stack(out)


@dataclass
class ParityReport:
    frames: int
    frames_exact: int  # frames where every output equals LiteRT's reference kernels bit for bit
    kernel_steps: int  # largest difference at the first op that diverges (identical inputs there)
    diverging_ops: list[str]  # ops where TFLM first departs from the reference kernels
    max_steps_vs_reference: list[int]  # per output, after propagation through later layers
    top1_agreement_vs_reference: float
    max_steps_vs_default: list[int]  # per output: TFLM vs LiteRT's default (optimized) kernels
    top1_agreement_vs_default: float
    exit_agreement_vs_default: float

    @property
    def ok(self) -> bool:
        return self.kernel_steps <= PARITY_TOLERANCE


def _tensor_bytes(graph: ModelGraph) -> int:
    sizes = {"INT8": 1, "UINT8": 1, "INT16": 2, "INT32": 4, "FLOAT32": 4, "INT64": 8, "BOOL": 1}
    return sum(int(np.prod(t["shape"] or [1])) * sizes.get(t["type"], 8) for t in graph.tensors if not t["constant"])


def check_parity(model: EndModel, frames: np.ndarray, graph: ModelGraph, arena: int) -> ParityReport:
    """Run every frame through TFLite Micro, LiteRT's reference kernels and LiteRT's default
    (optimized) kernels. With every intermediate tensor kept, find the first op where TFLM departs
    from the reference: its inputs are identical there, so its difference is the kernels' own
    (a 1-step rounding difference in one layer can grow through later layers, e.g. a softmax)."""
    from tflite_micro.python.tflite_micro import runtime as tflm

    from tierlite.policy import decide
    from tierlite.runtimes import open_runtime
    from tierlite.segment import dequantize

    reference = _litert_reference(model.path, preserve=True)
    ops = reference._interp._get_ops_details()  # execution order, tensor ids as in the flatbuffer
    default = open_runtime(model.path, "litert")
    n_out = len(model.outputs)
    vs_ref, vs_def = [0] * n_out, [0] * n_out
    top1 = top1_ref = exits = exact = kernel_steps = 0
    diverging: list[str] = []
    lo = model.logits
    with captured_stderr():
        micro = tflm.Interpreter.from_bytes(model.data, arena_size=arena + _tensor_bytes(graph) + (64 << 10),
                                            intrepreter_config=tflm.InterpreterConfig.kPreserveAllTensors)
        for frame in frames:
            x = frame_to_input(frame, model.input)
            micro.set_input(x, 0)
            micro.invoke()
            got = [np.array(micro.get_output(i)) for i in range(n_out)]
            ref, dflt = reference.run([x]), default.run([x])
            steps = [int(np.abs(got[i].astype(np.int32) - ref[i].astype(np.int32)).max()) for i in range(n_out)]
            vs_ref = [max(a, b) for a, b in zip(vs_ref, steps)]
            exact += max(steps) == 0
            if max(steps) > 0:
                for op in ops:
                    t = int(op["outputs"][0])
                    want = reference._interp.get_tensor(t).astype(np.int32)
                    have = np.asarray(micro.GetTensor(t, 0)["tensor_data"]).astype(np.int32).reshape(want.shape)
                    d = int(np.abs(want - have).max())
                    if d:
                        kernel_steps = max(kernel_steps, d)
                        if op["op_name"] not in diverging:
                            diverging.append(op["op_name"])
                        break
            for i in range(n_out):
                vs_def[i] = max(vs_def[i], int(np.abs(got[i].astype(np.int32) - dflt[i].astype(np.int32)).max()))
            a = decide(dequantize(got[model.logits_index], lo.scale, lo.zero_point), model.threshold)
            b = decide(dequantize(dflt[model.logits_index], lo.scale, lo.zero_point), model.threshold)
            top1_ref += a[1] == int(np.argmax(ref[model.logits_index]))
            top1 += a[1] == b[1]
            exits += a[0] == b[0]
    n = len(frames)
    return ParityReport(n, exact, kernel_steps, diverging, vs_ref, top1_ref / n, vs_def, top1 / n, exits / n)


# -- fit ------------------------------------------------------------------------------------------
@dataclass
class FitReport:
    board: str
    model: str
    model_bytes: int
    model_budget: int
    arena_bytes: int | None  # measured on TFLite Micro (MCU boards)
    arena_budget: int
    fits: bool
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_fit(board: Board, model_bytes: int, arena_bytes: int | None, model_name: str = "model") -> FitReport:
    b = board.budget
    problems, warnings = [], []
    if model_bytes > b.model:
        problems.append(f"model {model_bytes} B > flash budget {b.model} B ({format_bytes(model_bytes)} "
                        f"vs {format_bytes(b.model)})")
    if arena_bytes is not None:
        if arena_bytes > b.arena:
            problems.append(f"tensor arena {arena_bytes} B > {b.arena_in} budget {b.arena} B "
                            f"({format_bytes(arena_bytes)} vs {format_bytes(b.arena)})")
        elif b.arena - arena_bytes < ARENA_HEADROOM_WARN * b.arena:
            warnings.append(f"tensor arena {format_bytes(arena_bytes)} leaves under 10% of the "
                            f"{format_bytes(b.arena)} budget; optimized kernels may need more scratch")
    return FitReport(board.name, model_name, model_bytes, b.model, arena_bytes, b.arena, not problems,
                     problems, warnings)


# -- generated sources --------------------------------------------------------------------------
def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _c_float(x: float) -> str:
    return f"{float(x):.9g}f" if "e" in f"{float(x):.9g}" or "." in f"{float(x):.9g}" else f"{float(x):.1f}f"


def _c_type(dtype: str) -> str:
    return {"int8": "int8_t", "uint8": "uint8_t"}[dtype]


def topics(prefix: str, node_id: str) -> dict[str, str]:
    """MQTT topics of one node (tierlite.wire: <prefix>/<node>/<suffix>)."""
    from tierlite import wire

    if not wire.valid_node_id(node_id):
        raise ConfigError(f"--node-id {node_id!r}: use 1-64 letters, digits, '_', '.', '-' (not 'update')")
    return {k: wire.topic(prefix, node_id, k) for k in ("feature", "answer", "result", "status")}


def model_data_sources(data: bytes) -> dict[str, str]:
    lines = []
    for i in range(0, len(data), 12):
        lines.append("    " + " ".join(f"0x{b:02x}," for b in data[i:i + 12]))
    header = (
        "// Generated by `tierlite firmware`: the TFLite model as a C++ array.\n"
        "#ifndef TIERLITE_MODEL_DATA_H_\n#define TIERLITE_MODEL_DATA_H_\n\n"
        "extern const unsigned char g_tierlite_model_data[];\n"
        "extern const unsigned int g_tierlite_model_data_len;\n\n#endif  // TIERLITE_MODEL_DATA_H_\n"
    )
    source = (
        "// Generated by `tierlite firmware`. const: the array stays in flash (.rodata); TFLite Micro\n"
        "// reads weights in place and needs the flatbuffer 16-byte aligned.\n"
        '#include "tierlite_model_data.h"\n\n'
        "alignas(16) const unsigned char g_tierlite_model_data[] = {\n" + "\n".join(lines) + "\n};\n"
        f"const unsigned int g_tierlite_model_data_len = {len(data)};\n"
    )
    return {"tierlite_model_data.h": header, "tierlite_model_data.cc": source}


def op_resolver_source(graph: ModelGraph, where: str) -> str:
    if graph.custom_ops:
        raise ConfigError(f"{where}: custom ops {', '.join(graph.custom_ops)} have no TFLite Micro kernel here")
    missing = [op for op in graph.ops if op not in TFLM_RESOLVER_METHODS]
    if missing:
        raise ConfigError(f"{where}: TFLite Micro has no kernel for {', '.join(missing)}")
    adds = "\n".join(f"  if (resolver.{TFLM_RESOLVER_METHODS[op]}() != kTfLiteOk) return kTfLiteError;"
                     f"  // {op} x{graph.op_counts[op]}" for op in graph.ops)
    return (
        "// Generated by `tierlite firmware`: registers exactly the ops this model uses, so the linker\n"
        "// drops every other kernel.\n"
        "#ifndef TIERLITE_OP_RESOLVER_H_\n#define TIERLITE_OP_RESOLVER_H_\n\n"
        '#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"\n\n'
        f"#define TIERLITE_NUM_OPS {len(graph.ops)}\n\n"
        "using TierliteOpResolver = tflite::MicroMutableOpResolver<TIERLITE_NUM_OPS>;\n\n"
        "inline TfLiteStatus TierliteRegisterOps(TierliteOpResolver& resolver) {\n"
        f"{adds}\n  return kTfLiteOk;\n}}\n\n#endif  // TIERLITE_OP_RESOLVER_H_\n"
    )


def config_header(model: EndModel, board: Board, arena: int, node_id: str, prefix: str) -> str:
    inp, lo, feat = model.input, model.logits, model.feature
    enc = model.encoding
    binary = enc.get("kind") == "binary"
    n_classes = int(np.prod(lo.shape))
    t = topics(prefix, node_id)
    arena_planned = -(-arena // 1024) * 1024  # measured, rounded up to 1 KiB
    labels = ", ".join(_c_string(s) for s in model.labels[:n_classes])
    lines = [
        "// Generated by `tierlite firmware`: everything the node firmware needs to know about the model.",
        "// Plain C/C++ (no TFLite Micro headers).",
        "#ifndef TIERLITE_CONFIG_H_", "#define TIERLITE_CONFIG_H_", "", "#include <stdint.h>", "",
        f"#define TIERLITE_BOARD {_c_string(board.name)}",
        f"#define TIERLITE_MODEL_NAME {_c_string(model.name)}",
        f"#define TIERLITE_MODEL_VERSION {model.version}  /* bundle version; 0 = bare .tflite */",
        f"#define TIERLITE_MODEL_BYTES {len(model.data)}",
        f"#define TIERLITE_NODE_ID {_c_string(node_id)}",
        "",
        f"/* Tensor arena: {arena} B measured on TFLite Micro's reference kernels (64-bit host), rounded",
        "   up to 1 KiB. Optimized kernels (CMSIS-NN, ESP-NN) may request a little more scratch: if",
        "   AllocateTensors() fails, the interpreter prints the missing bytes. */",
        f"#define TIERLITE_ARENA_BYTES {arena_planned}",
        "",
        "/* Input: one RGB frame, NHWC. uint8 models take raw pixels; int8 models take",
        "   q = round(pixel / SCALE + ZERO_POINT) clamped to [-128, 127]. */",
        f"#define TIERLITE_INPUT_HEIGHT {inp.shape[1]}",
        f"#define TIERLITE_INPUT_WIDTH {inp.shape[2]}",
        f"#define TIERLITE_INPUT_CHANNELS {inp.shape[3]}",
        f"#define TIERLITE_INPUT_BYTES {int(np.prod(inp.shape))}",
        f"#define TIERLITE_INPUT_IS_INT8 {1 if inp.dtype == 'int8' else 0}",
        f"typedef {_c_type(inp.dtype)} tierlite_input_t;",
        f"#define TIERLITE_INPUT_SCALE {_c_float(inp.scale)}",
        f"#define TIERLITE_INPUT_ZERO_POINT {inp.zero_point}",
        "",
        "/* Exit head: quantized scores; the exit decides locally when the normalized entropy of",
        "   softmax(dequantized scores) is <= the threshold (tierlite_exit.h). */",
        f"#define TIERLITE_LOGITS_OUTPUT_INDEX {model.logits_index}",
        f"#define TIERLITE_NUM_CLASSES {n_classes}",
        f"typedef {_c_type(lo.dtype)} tierlite_logits_t;",
        f"#define TIERLITE_LOGITS_SCALE {_c_float(lo.scale)}",
        f"#define TIERLITE_LOGITS_ZERO_POINT {lo.zero_point}",
        f"#define TIERLITE_EXIT_THRESHOLD {_c_float(model.threshold)}",
        "",
        "/* Boundary feature: what an unsure frame sends up to the edge segment. */",
        f"#define TIERLITE_HAS_FEATURE {0 if feat is None else 1}",
    ]
    if feat is not None:
        n = int(np.prod(feat.shape))
        lines += [
            f"#define TIERLITE_FEATURE_OUTPUT_INDEX {model.feature_index}",
            f"#define TIERLITE_FEATURE_ELEMENTS {n}",
            f"typedef {_c_type(feat.dtype)} tierlite_feature_t;",
            f"#define TIERLITE_FEATURE_SCALE {_c_float(feat.scale)}",
            f"#define TIERLITE_FEATURE_ZERO_POINT {feat.zero_point}",
            "/* Encoding: 0 = int8 raw bytes; 1 = binary, 1 bit per element (1 = HIGH), MSB first. */",
            f"#define TIERLITE_FEATURE_BINARY {1 if binary else 0}",
            f"#define TIERLITE_FEATURE_LOW {int(enc.get('low', 0)) if binary else 0}",
            f"#define TIERLITE_FEATURE_HIGH {int(enc.get('high', 0)) if binary else 0}",
            f"#define TIERLITE_FEATURE_WIRE_BYTES {(n + 7) // 8 if binary else n}",
        ]
    lines += [
        "",
        f"/* MQTT: this board {'publishes itself' if board.mqtt == 'self' else 'relays through a host gateway'} "
        f"over {board.link}. */",
        f"#define TIERLITE_MQTT_SELF {1 if board.mqtt == 'self' else 0}",
        f"#define TIERLITE_MQTT_PREFIX {_c_string(prefix)}",
        f"#define TIERLITE_TOPIC_FEATURE {_c_string(t['feature'])}  /* publish: FEATURE messages (tierlite_wire.h) */",
        f"#define TIERLITE_TOPIC_ANSWER {_c_string(t['answer'])}  /* subscribe: ANSWER / REJECT from edge or cloud */",
        f"#define TIERLITE_TOPIC_RESULT {_c_string(t['result'])}  /* publish: one JSON result per frame */",
        f"#define TIERLITE_TOPIC_STATUS {_c_string(t['status'])}",
        "",
        f"static const char* const kTierliteLabels[TIERLITE_NUM_CLASSES] = {{{labels}}};",
        "",
        "#endif  /* TIERLITE_CONFIG_H_ */",
    ]
    return "\n".join(lines) + "\n"


EXIT_HEADER = r"""// Generated by `tierlite firmware`: the exit decision and feature encoding in plain C99 / C++,
// the same rule as tierlite.policy.decide and tierlite.segment.encode_feature.
#ifndef TIERLITE_EXIT_H_
#define TIERLITE_EXIT_H_

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tierlite_config.h"

typedef struct {
  int label;         /* argmax class */
  float confidence;  /* its softmax probability */
  float entropy;     /* normalized entropy in [0, 1] */
  int confident;     /* 1: decide on the node; 0: send the feature up */
} tierlite_decision_t;

static inline tierlite_decision_t tierlite_decide(const tierlite_logits_t* q) {
  float z[TIERLITE_NUM_CLASSES];
  float zmax = -INFINITY, sum = 0.0f, h = 0.0f;
  int i, best = 0;
  tierlite_decision_t d;
  for (i = 0; i < TIERLITE_NUM_CLASSES; ++i) {
    z[i] = ((float)q[i] - (float)TIERLITE_LOGITS_ZERO_POINT) * TIERLITE_LOGITS_SCALE;
    if (z[i] > zmax) { zmax = z[i]; best = i; }
  }
  for (i = 0; i < TIERLITE_NUM_CLASSES; ++i) { z[i] = expf(z[i] - zmax); sum += z[i]; }
  for (i = 0; i < TIERLITE_NUM_CLASSES; ++i) {
    float p = z[i] / sum;
    if (p < 1e-12f) p = 1e-12f;  /* same clip as tierlite.policy.normalized_entropy */
    h -= p * logf(p);
  }
  d.label = best;
  d.confidence = z[best] / sum;
  d.entropy = h / logf((float)TIERLITE_NUM_CLASSES);
  d.confident = d.entropy <= TIERLITE_EXIT_THRESHOLD;
  return d;
}

#if TIERLITE_HAS_FEATURE
/* Writes TIERLITE_FEATURE_WIRE_BYTES bytes to out: raw int8, or 1 bit per element, MSB first. */
static inline size_t tierlite_encode_feature(const tierlite_feature_t* q, uint8_t* out) {
#if TIERLITE_FEATURE_BINARY
  size_t i;
  memset(out, 0, TIERLITE_FEATURE_WIRE_BYTES);
  for (i = 0; i < TIERLITE_FEATURE_ELEMENTS; ++i)
    if (q[i] == TIERLITE_FEATURE_HIGH) out[i >> 3] |= (uint8_t)(0x80u >> (i & 7u));
#else
  memcpy(out, q, TIERLITE_FEATURE_WIRE_BYTES);
#endif
  return TIERLITE_FEATURE_WIRE_BYTES;
}
#endif

#endif  /* TIERLITE_EXIT_H_ */
"""


def wire_header(model: EndModel) -> str:
    """FEATURE messages and ANSWER/REJECT parsing in C, byte for byte as tierlite.wire (docs/protocol.md).
    The constants come from tierlite.wire itself, so the two cannot drift apart silently."""
    from tierlite import wire

    feat = model.feature
    assert feat is not None
    ndim = len(feat.shape)
    head, answer = wire.TENSOR_HEADER.size, wire.ANSWER_STRUCT.size
    dims = "\n".join(f"  p = tierlite_put_u16(p, {d});" for d in feat.shape)
    return f"""// Generated by `tierlite firmware`: the tierlite wire format (tierlite/wire.py, version {wire.WIRE_VERSION})
// for a node: build FEATURE messages, parse ANSWER / REJECT. Little-endian, any host byte order.
#ifndef TIERLITE_WIRE_H_
#define TIERLITE_WIRE_H_

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tierlite_config.h"

#define TIERLITE_WIRE_VERSION {wire.WIRE_VERSION}
#define TIERLITE_BUNDLE_ID 0x{wire.bundle_id(model.name):08x}u  /* crc32 of {_c_string(model.name)} */
#define TIERLITE_KIND_FEATURE {int(wire.Kind.FEATURE)}
#define TIERLITE_KIND_ANSWER {int(wire.Kind.ANSWER)}
#define TIERLITE_KIND_REJECT {int(wire.Kind.REJECT)}
#define TIERLITE_FEATURE_HEADER_BYTES {head + 2 * ndim}
#define TIERLITE_FEATURE_MESSAGE_BYTES (TIERLITE_FEATURE_HEADER_BYTES + TIERLITE_NUM_CLASSES + TIERLITE_FEATURE_WIRE_BYTES)
#define TIERLITE_ANSWER_BYTES {answer}

static inline uint8_t* tierlite_put_u16(uint8_t* p, uint16_t v) {{
  p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); return p + 2;
}}
static inline uint8_t* tierlite_put_u32(uint8_t* p, uint32_t v) {{
  p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24); return p + 4;
}}
static inline uint32_t tierlite_get_u32(const uint8_t* p) {{
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}}
static inline float tierlite_get_f32(const uint8_t* p) {{
  uint32_t u = tierlite_get_u32(p); float f; memcpy(&f, &u, 4); return f;
}}

/* One FEATURE message for an unsure frame: header, feature shape, the end exit's raw quantized
   scores, the encoded feature. Writes TIERLITE_FEATURE_MESSAGE_BYTES bytes; publish them to
   TIERLITE_TOPIC_FEATURE. sent_us: wall-clock microseconds (SNTP), 0 if the node has no clock. */
static inline size_t tierlite_encode_feature_message(uint8_t* out, uint32_t frame_id, uint64_t sent_us,
                                                     const tierlite_logits_t* logits,
                                                     const tierlite_feature_t* feature) {{
  uint8_t* p = out;
  float scale = TIERLITE_FEATURE_SCALE;
  uint32_t scale_bits;
  memcpy(&scale_bits, &scale, 4);
  *p++ = 'T'; *p++ = 'L';
  *p++ = TIERLITE_WIRE_VERSION;
  *p++ = TIERLITE_KIND_FEATURE;
  *p++ = TIERLITE_FEATURE_BINARY;  /* encoding: 0 int8, 1 binary */
  *p++ = 0;                        /* flags */
  *p++ = 1;                        /* exits carried: the end exit */
  *p++ = {ndim};                        /* feature rank */
  p = tierlite_put_u32(p, TIERLITE_BUNDLE_ID);
  p = tierlite_put_u32(p, TIERLITE_MODEL_VERSION);
  p = tierlite_put_u32(p, frame_id);
  p = tierlite_put_u32(p, (uint32_t)sent_us);
  p = tierlite_put_u32(p, (uint32_t)(sent_us >> 32));
  p = tierlite_put_u32(p, scale_bits);
  p = tierlite_put_u16(p, (uint16_t)(int16_t)TIERLITE_FEATURE_ZERO_POINT);
  p = tierlite_put_u16(p, TIERLITE_NUM_CLASSES);
{dims}
  memcpy(p, logits, TIERLITE_NUM_CLASSES);
  p += TIERLITE_NUM_CLASSES;
  p += tierlite_encode_feature(feature, p);
  return (size_t)(p - out);
}}

typedef struct {{
  int kind;       /* TIERLITE_KIND_ANSWER or TIERLITE_KIND_REJECT */
  int tier;       /* 0 end, 1 edge, 2 cloud */
  int reason;     /* REJECT: 1 bundle, 2 quantization, 3 shape, 4 encoding, 5 size, 0 other */
  int label;
  uint32_t bundle_id;
  uint32_t bundle_version;
  uint32_t frame_id;
  float confidence;
  float entropy;
}} tierlite_answer_t;

/* Parse a payload from TIERLITE_TOPIC_ANSWER. Returns 0, or -1 for anything malformed or meant
   for another bundle (drop it and keep going). */
static inline int tierlite_decode_answer(const uint8_t* p, size_t n, tierlite_answer_t* a) {{
  if (n != TIERLITE_ANSWER_BYTES || p[0] != 'T' || p[1] != 'L' || p[2] != TIERLITE_WIRE_VERSION) return -1;
  if (p[3] != TIERLITE_KIND_ANSWER && p[3] != TIERLITE_KIND_REJECT) return -1;
  if (p[4] > 2) return -1;
  a->kind = p[3];
  a->tier = p[4];
  a->reason = p[5];
  a->label = (int)((uint16_t)p[6] | ((uint16_t)p[7] << 8));
  a->bundle_id = tierlite_get_u32(p + 8);
  a->bundle_version = tierlite_get_u32(p + 12);
  a->frame_id = tierlite_get_u32(p + 16);
  a->confidence = tierlite_get_f32(p + 20);
  a->entropy = tierlite_get_f32(p + 24);
  if (a->bundle_id != TIERLITE_BUNDLE_ID || a->bundle_version != TIERLITE_MODEL_VERSION) return -1;
  if (a->kind == TIERLITE_KIND_ANSWER && a->label >= TIERLITE_NUM_CLASSES) return -1;
  return 0;
}}

#endif  /* TIERLITE_WIRE_H_ */
"""


def readme(model: EndModel, board: Board, fit: FitReport, graph: ModelGraph, arena: int) -> str:
    tc = board.toolchain
    common = f"""# TFLite Micro sources for {board.title}

Generated by `tierlite firmware` from `{model.path.name}` ({model.name} v{model.version}).
Model {len(model.data)} B (flash budget {board.budget.model} B); tensor arena {arena} B measured on the
TFLite Micro interpreter (budget {board.budget.arena} B in {board.budget.arena_in}). Ops: {', '.join(graph.ops)}.

| file | what |
|---|---|
| tierlite_model_data.cc/.h | the model, `alignas(16) const` so it stays in flash |
| tierlite_op_resolver.h | `TierliteOpResolver` + `TierliteRegisterOps()` with exactly these ops |
| tierlite_config.h | input quantization, exit threshold, feature encoding, MQTT topics, node id, arena size |
| tierlite_exit.h | the exit decision and feature encoding in plain C (no TFLM) |
| tierlite_wire.h | FEATURE messages out, ANSWER/REJECT in: tierlite's wire format (docs/protocol.md) in C |
| firmware.json | the checks behind these files (fit, parity, latency on the build host) |

## The inference loop (any toolchain)

```cpp
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tierlite_model_data.h"
#include "tierlite_op_resolver.h"
#include "tierlite_exit.h"
#include "tierlite_wire.h"  // bundles with a boundary feature

alignas(16) static uint8_t tensor_arena[TIERLITE_ARENA_BYTES];

void run_node() {{
  const tflite::Model* model = tflite::GetModel(g_tierlite_model_data);
  static TierliteOpResolver resolver;
  TierliteRegisterOps(resolver);
  static tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, TIERLITE_ARENA_BYTES);
  if (interpreter.AllocateTensors() != kTfLiteOk) return;  // arena too small: it prints by how much
  uint32_t frame_id = 0;
  for (;;) {{
    tierlite_input_t* in = interpreter.input(0)->data.{'int8' if model.input.dtype == 'int8' else 'uint8'};
    capture_frame(in);  // camera -> TIERLITE_INPUT_HEIGHT x WIDTH x CHANNELS (see the config header)
    interpreter.Invoke();
    const tierlite_decision_t d = tierlite_decide(
        interpreter.output(TIERLITE_LOGITS_OUTPUT_INDEX)->data.{'int8' if model.logits.dtype == 'int8' else 'uint8'});
    if (d.confident) {{
      publish_result(kTierliteLabels[d.label], d.confidence);   // TIERLITE_TOPIC_RESULT
    }}"""
    if model.feature is not None:
        feat_t = "int8" if model.feature.dtype == "int8" else "uint8"
        logit_t = "int8" if model.logits.dtype == "int8" else "uint8"
        common += f""" else {{
      static uint8_t msg[TIERLITE_FEATURE_MESSAGE_BYTES];   // tierlite_wire.h
      size_t n = tierlite_encode_feature_message(msg, frame_id++, now_us(),
          interpreter.output(TIERLITE_LOGITS_OUTPUT_INDEX)->data.{logit_t},
          interpreter.output(TIERLITE_FEATURE_OUTPUT_INDEX)->data.{feat_t});
      mqtt_publish(TIERLITE_TOPIC_FEATURE, msg, n);   // the answer comes back on TIERLITE_TOPIC_ANSWER:
      // tierlite_decode_answer(); if none arrives by your deadline, use d.label (marked as a fallback)
    }}"""
    common += "\n  }\n}\n```\n"
    mqtt = ("The board publishes MQTT itself." if board.mqtt == "self" else
            f"The board has no IP link ({board.link}): a host gateway relays its results and features to "
            "the MQTT topics in `tierlite_config.h`.")
    if tc == "esp-idf":
        arena_note = ("Allocate the arena in PSRAM instead of the static array: `heap_caps_malloc(TIERLITE_ARENA_BYTES, "
                      "MALLOC_CAP_SPIRAM)` and enable CONFIG_SPIRAM (octal) in menuconfig."
                      if board.budget.arena_in == "psram" else
                      "The static arena lands in internal SRAM (fast); keep camera frame buffers in PSRAM "
                      "(`fb_location = CAMERA_FB_IN_PSRAM`).")
        steps = f"""## Build with ESP-IDF

Board: {board.title}; {board.module}.

```sh
idf.py create-project tierlite_node && cd tierlite_node
idf.py add-dependency "espressif/esp-tflite-micro"    # TFLM with ESP-NN optimized kernels
idf.py add-dependency "espressif/esp32-camera"
cp /path/to/these/files/*.h /path/to/these/files/*.cc main/   # + tierlite_node.cc with the loop above
# main/CMakeLists.txt: idf_component_register(SRCS "tierlite_node.cc" "tierlite_model_data.cc" INCLUDE_DIRS ".")
idf.py set-target esp32s3
idf.py build flash monitor
```

{arena_note} MQTT: ESP-MQTT (`esp_mqtt_client_publish`) to the topics in the config header.
"""
    elif tc == "stm32cube":
        steps = f"""## Build with STM32Cube

Board: {board.title}; {board.module}.

1. Generate a project for the board in STM32CubeMX/CubeIDE (DCMI + DMA, ETH + LwIP, FPU on).
2. Export TFLM with CMSIS-NN kernels from a tflite-micro checkout and add it to the project:
   ```sh
   python3 tensorflow/lite/micro/tools/project_generation/create_tflm_tree.py \\
     --makefile_options="TARGET=cortex_m_generic TARGET_ARCH=cortex-m7+fp OPTIMIZED_KERNEL_DIR=cmsis_nn" tflm_tree
   ```
3. Add these files to `Core/Src` and `Core/Inc` with your application (`tierlite_node.cc`, the loop
   above); compile as C++17 with `-fno-rtti -fno-exceptions`.
4. Place the arena in AXI SRAM (the largest contiguous block):
   `__attribute__((section(".axisram"), aligned(16))) static uint8_t tensor_arena[TIERLITE_ARENA_BYTES];`
   with a matching `.axisram` output section in the linker script.
"""
    else:
        steps = f"""## Build with Zephyr / nRF Connect SDK

Board: {board.title}; {board.module}.

```sh
west config manifest.project-filter -- +tflite-micro && west update   # TFLM is an optional module
```

`prj.conf`:

```
CONFIG_CPP=y
CONFIG_STD_CPP17=y
CONFIG_TENSORFLOW_LITE_MICRO=y
CONFIG_TENSORFLOW_LITE_MICRO_CMSIS_NN_KERNELS=y
CONFIG_MAIN_STACK_SIZE=4096
CONFIG_BT=y
CONFIG_BT_PERIPHERAL=y
```

Add these files to `src/` next to your application (`tierlite_node.cc` with the loop above) and
`target_sources(app PRIVATE src/tierlite_node.cc src/tierlite_model_data.cc)`, then
`west build -b nrf52840dk/nrf52840 && west flash` (`nrf52840dk_nrf52840` before Zephyr 3.7).
"""
    warn = "".join(f"\n> warning: {w}\n" for w in fit.warnings)
    return common + "\n" + steps + "\n" + mqtt + "\n" + warn


def write_sources(out: Path, model: EndModel, board: Board, graph: ModelGraph, arena: int, fit: FitReport,
                  node_id: str, prefix: str) -> list[Path]:
    files = model_data_sources(model.data)
    files["tierlite_op_resolver.h"] = op_resolver_source(graph, model.path.name)
    files["tierlite_config.h"] = config_header(model, board, arena, node_id, prefix)
    files["tierlite_exit.h"] = EXIT_HEADER
    if model.feature is not None:
        files["tierlite_wire.h"] = wire_header(model)
    files["README.md"] = readme(model, board, fit, graph, arena)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


# -- the command ----------------------------------------------------------------------------------
class MicroCheck:
    """The board-independent TFLite Micro checks of one model, each computed once on demand."""

    def __init__(self, model: EndModel, frames_dir: str | Path | None = None, parity_frames: int = 8):
        require_integer_io(model)
        self.model = model
        self.graph = read_graph(model.data, model.path.name)
        op_resolver_source(self.graph, model.path.name)  # unsupported ops fail before the slow checks
        self._frames_dir, self._count = frames_dir, parity_frames
        self._arena: int | None = None
        self._parity: ParityReport | None = None
        self._latency: float | None = None
        self._frames: np.ndarray | None = None

    @property
    def arena(self) -> int:
        if self._arena is None:
            self._arena = measure_arena(self.model)
        return self._arena

    @property
    def frames(self) -> np.ndarray:
        if self._frames is None:
            self._frames = load_frames(self.model, self._frames_dir, self._count)
        return self._frames

    @property
    def parity(self) -> ParityReport:
        if self._parity is None:
            self._parity = check_parity(self.model, self.frames, self.graph, self.arena)
            if not self._parity.ok:
                raise ParityMismatch(
                    f"{self.model.path.name}: TFLite Micro's {', '.join(self._parity.diverging_ops)} differs from "
                    f"LiteRT's reference kernel by {self._parity.kernel_steps} quantization steps on identical "
                    f"inputs (tolerance {PARITY_TOLERANCE}; {self._parity.frames} frames)")
        return self._parity

    @property
    def latency_ms(self) -> float:
        if self._latency is None:
            self._latency = tflm_latency_ms(self.model, self.arena, self.frames)
        return self._latency


def _write_report(report: dict[str, Any], out: Path | None) -> dict[str, Any]:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "firmware.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _base_report(model: EndModel, board: Board, src: str | Path) -> dict[str, Any]:
    return {"board": board.name, "board_title": board.title, "kind": board.kind, "runtime": board.runtime,
            "source": str(src), "model": model.path.name, "model_name": model.name,
            "model_version": model.version, "model_bytes": len(model.data)}


def firmware_for_mcu(check: MicroCheck, board: Board, out: Path | None, node_id: str | None = None,
                     prefix: str = "tierlite", src: str | Path = "") -> dict[str, Any]:
    """Fit, parity, latency, then the sources. DoesNotFit is raised after firmware.json is written."""
    model = check.model
    fit = check_fit(board, len(model.data), check.arena, model.path.name)
    report = _base_report(model, board, src or model.path)
    report.update(arena_bytes=check.arena, ops=check.graph.ops, fit=asdict(fit),
                  tflm_latency_ms_host=round(check.latency_ms, 3))
    if not fit.fits:
        raise DoesNotFit(f"{model.path.name} does not fit {board.name}: " + "; ".join(fit.problems),
                         _write_report(report, out))
    report["parity"] = asdict(check.parity)
    if out is not None:
        written = write_sources(out, model, board, check.graph, check.arena, fit, node_id or board.name, prefix)
        report["files"] = [p.name for p in written] + ["firmware.json"]
    return _write_report(report, out)


def firmware_for_linux(model: EndModel, board: Board, out: Path | None, src: str | Path = "") -> dict[str, Any]:
    """Linux nodes run the bundle with `tierlite device --board`: check the budget, that LiteRT loads
    the model here, and for Edge TPU boards readiness (+ compile when edgetpu_compiler is present)."""
    from tierlite.converters.edgetpu import (add_to_bundle, compile_edgetpu, compiler_path, edgetpu_check,
                                             static_batch)
    from tierlite.runtimes import open_runtime

    fit = check_fit(board, len(model.data), None, model.path.name)
    report = _base_report(model, board, src or model.path)
    report["fit"] = asdict(fit)
    if not fit.fits:
        raise DoesNotFit(f"{model.path.name} does not fit {board.name}: " + "; ".join(fit.problems),
                         _write_report(report, out))
    rt = open_runtime(model.path, "litert", {"threads": min(board.threads, os.cpu_count() or 1)})
    frames = load_frames(model, None, 1)
    x = frame_to_input(frames[0], model.input) if model.input.dtype in ("int8", "uint8") else \
        frames[0].reshape(model.input.shape).astype(np.float32)
    rt.run([x])
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        rt.run([x])
        times.append(time.perf_counter() - t0)
    report["litert_latency_ms_host"] = round(statistics.median(times) * 1000, 3)
    if board.runtime == "edgetpu":
        data, fixed = static_batch(model.data)
        etpu = edgetpu_check(data, model.path.name)
        if fixed:
            etpu.notes.append(f"dynamic batch dimension fixed to 1 for the Edge TPU ({fixed} tensors)")
        if etpu.ready:
            if compiler_path() is None:
                etpu.message = ("edgetpu_compiler is not on PATH, nothing compiled: install edgetpu-compiler "
                                "(x86-64 Debian/Ubuntu) and re-run to add the compiled model to the bundle "
                                "(until then the node runs the end segment on its CPU)")
            else:
                dest = model.bundle_root or out or (Path(src).parent if src else model.path.parent)
                compiled, etpu.compiler_log = compile_edgetpu(data, model.path.stem, Path(dest))
                etpu.compiled = str(compiled)
                if model.bundle_root is not None:
                    add_to_bundle(model.bundle_root, compiled)
                    etpu.message = f"compiled {compiled.name} and added it to the bundle's files"
                else:
                    etpu.message = f"compiled {compiled}"
        report["edgetpu"] = asdict(etpu)
        if not etpu.ready:
            raise NotEdgeTPUReady(f"{model.path.name} is not Edge TPU-ready: " + "; ".join(etpu.problems),
                                  _write_report(report, out))
    return _write_report(report, out)


def resolve_boards(spec: str) -> list[Board]:
    """`--board pi4`, `--board a,b`, `--board mcu` / `linux` / `all`, or a path to a board YAML."""
    from tierlite.boards import list_boards

    boards: list[Board] = []
    for name in (s.strip() for s in spec.split(",")):
        if name in ("mcu", "linux", "all"):
            boards += [b for b in list_boards() if name == "all" or b.kind == name]
        elif name:
            boards.append(load_board(name))
    return list({b.name: b for b in boards}.values())  # each board once, in the order given


def markdown_table(reports: list[dict[str, Any]]) -> str:
    rows = ["| board | model bytes | flash budget | arena bytes (measured) | RAM budget | fits | "
            "latency here, ms | notes |", "|---|---:|---:|---:|---:|---|---:|---|"]
    for r in reports:
        fit = r.get("fit", {})
        arena = r.get("arena_bytes")
        if "tflm_latency_ms_host" in r:
            latency = f"{r['tflm_latency_ms_host']:.2f} (TFLM)"
        elif "litert_latency_ms_host" in r:
            latency = f"{r['litert_latency_ms_host']:.2f} (LiteRT)"
        else:
            latency = ""
        notes = list(fit.get("problems", [])) + list(fit.get("warnings", []))
        if "edgetpu" in r:
            e = r["edgetpu"]
            notes.append("Edge TPU-ready" if e["ready"] else "not Edge TPU-ready: " + "; ".join(e["problems"]))
        rows.append(f"| {r['board']} | {r['model_bytes']:,} | {fit.get('model_budget', 0):,} | "
                    f"{'-' if arena is None else f'{arena:,}'} | {fit.get('arena_budget', 0):,} "
                    f"({r.get('arena_in', '')}) | {'yes' if fit.get('fits') else 'NO'} | {latency} | "
                    f"{'; '.join(notes)} |")
    return "\n".join(rows)


def configure_firmware(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", help="bundle directory or .tar.gz (its end segment), or any .tflite")
    parser.add_argument("--board", help="board profile name (see --list-boards), comma-separated names, "
                                        "'mcu', 'linux' or 'all', or a path to a board YAML")
    parser.add_argument("--out", help="output directory (one subdirectory per board when several)")
    parser.add_argument("--node-id", help="node id for the MQTT topics (default: the board name)")
    parser.add_argument("--mqtt-prefix", default="tierlite", help="MQTT topic prefix (default: tierlite)")
    parser.add_argument("--threshold", type=float,
                        help="exit threshold (normalized entropy); default: the bundle's, 1.0 for a bare .tflite")
    parser.add_argument("--frames", help="image folder for the parity check (default: seeded synthetic frames)")
    parser.add_argument("--parity-frames", type=int, default=8, help="frames in the parity check (default 8)")
    parser.add_argument("--list-boards", action="store_true", help="list the packaged board profiles and exit")


def _print_report(r: dict[str, Any]) -> None:
    fit = r["fit"]
    line = (f"{r['board']}: {'fits' if fit['fits'] else 'DOES NOT FIT'}: model {r['model_bytes']:,} B "
            f"(flash budget {fit['model_budget']:,} B)")
    if r.get("arena_bytes") is not None:
        line += f", arena {r['arena_bytes']:,} B measured on TFLite Micro (RAM budget {fit['arena_budget']:,} B)"
    print(line)
    for w in fit["warnings"]:
        print(f"  warning: {w}")
    if "parity" in r:
        p = r["parity"]
        where = f" (first diverging op: {', '.join(p['diverging_ops'])}, {p['kernel_steps']} step)" \
            if p["diverging_ops"] else ""
        print(f"  parity on {p['frames']} frames: TFLite Micro equals LiteRT reference kernels on "
              f"{p['frames_exact']}/{p['frames']} frames{where}, outputs max "
              f"{max(p['max_steps_vs_reference'])} step(s) off, top-1 agreement "
              f"{p['top1_agreement_vs_reference']:.0%}; vs LiteRT default kernels max "
              f"{max(p['max_steps_vs_default'])} step(s), top-1 agreement {p['top1_agreement_vs_default']:.0%}, "
              f"exit agreement {p['exit_agreement_vs_default']:.0%}")
    if "tflm_latency_ms_host" in r:
        print(f"  TFLite Micro latency on this host: {r['tflm_latency_ms_host']} ms (reference kernels; "
              "not the board's speed)")
    if "litert_latency_ms_host" in r:
        print(f"  LiteRT latency on this host: {r['litert_latency_ms_host']} ms")
    if "edgetpu" in r:
        e = r["edgetpu"]
        print(f"  Edge TPU: {'ready' if e['ready'] else 'NOT ready: ' + '; '.join(e['problems'])}"
              + "".join(f"; {n}" for n in e["notes"]))
        if e["message"]:
            print(f"  {e['message']}")
    if r.get("files"):
        print(f"  wrote {', '.join(r['files'])}")


def run_firmware(args: argparse.Namespace) -> int:
    from tierlite.boards import list_boards

    if args.list_boards:
        for b in list_boards():
            print(f"{b.name:18} {b.kind:5} {b.runtime:8} threads={b.threads} model<={format_bytes(b.budget.model)} "
                  f"arena<={format_bytes(b.budget.arena)} ({b.budget.arena_in})  {b.title}")
        return 0
    if not args.source or not args.board:
        raise ConfigError("give a bundle or .tflite and --board NAME (or --list-boards)")
    boards = resolve_boards(args.board)
    if not boards:
        raise ConfigError(f"--board {args.board!r} names no board")
    model = load_end_model(args.source, args.threshold)
    out = Path(args.out) if args.out else None
    several = len(boards) > 1
    check = None
    reports, failures = [], []
    for board in boards:
        board_out = (out / board.name if several else out) if out else None
        try:
            if board.is_mcu:
                check = check or MicroCheck(model, args.frames, args.parity_frames)
                r = firmware_for_mcu(check, board, board_out, args.node_id, args.mqtt_prefix, args.source)
            else:
                r = firmware_for_linux(model, board, board_out, args.source)
        except BoardCheckFailed as e:
            if not several:
                raise
            failures.append(str(e))
            r = e.report
        r["arena_in"] = board.budget.arena_in
        reports.append(r)
        _print_report(r)
    if several:
        print()
        print(markdown_table(reports))
    if failures:
        print(f"error: {len(failures)} of {len(boards)} boards failed the checks (see above)", file=sys.stderr)
        return 2
    return 0
