"""The checks before any source is written: integer I/O, TFLite Micro kernels for every op, fit
(model bytes vs flash, measured arena vs RAM) and parity (TFLite Micro vs LiteRT's kernels on the
same frames). MicroCheck runs each board-independent check once per model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.boards import Board, format_bytes
from tierlite.converters.firmware.frames import frame_to_input, load_frames
from tierlite.converters.firmware.graph import ModelGraph, read_graph
from tierlite.converters.firmware.model import EndModel, litert_reference
from tierlite.converters.firmware.tflm_host import captured_stderr, measure_arena, tflm_latency_ms
from tierlite.errors import ConfigError, TierliteError

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


def require_integer_io(model: EndModel) -> None:
    for kind, tensors in (("input", model.inputs), ("output", model.outputs)):
        for t in tensors:
            if t.dtype not in ("int8", "uint8"):
                raise ConfigError(f"{model.path.name}: {kind} {t.name!r} is {t.dtype}; firmware needs a "
                                  "full-integer (int8/uint8) model, convert it with full int8 quantization")


def require_tflm_ops(graph: ModelGraph, where: str) -> None:
    """Every op of the model has a TFLite Micro kernel (and a resolver method to register it)."""
    if graph.custom_ops:
        raise ConfigError(f"{where}: custom ops {', '.join(graph.custom_ops)} have no TFLite Micro kernel here")
    missing = [op for op in graph.ops if op not in TFLM_RESOLVER_METHODS]
    if missing:
        raise ConfigError(f"{where}: TFLite Micro has no kernel for {', '.join(missing)}")


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

    reference = litert_reference(model.path, preserve=True)
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


class MicroCheck:
    """The board-independent TFLite Micro checks of one model, each computed once on demand."""

    def __init__(self, model: EndModel, frames_dir: str | Path | None = None, parity_frames: int = 8):
        require_integer_io(model)
        self.model = model
        self.graph = read_graph(model.data, model.path.name)
        require_tflm_ops(self.graph, model.path.name)  # unsupported ops fail before the slow checks
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
