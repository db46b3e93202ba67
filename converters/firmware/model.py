"""The model to deploy: a bundle's end segment or a bare .tflite, with its tensors' quantization
and what the bundle says about it (output roles, exit threshold, feature encoding)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.errors import BundleError, ConfigError


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


def litert_reference(path: Path, preserve: bool = False):
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
    rt = litert_reference(path)
    inputs = [Tensor(d.name, tuple(d.shape), d.dtype.name, d.scale, d.zero_point) for d in rt.inputs]
    outputs = [Tensor(d.name, tuple(d.shape), d.dtype.name, d.scale, d.zero_point) for d in rt.outputs]
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[-1] not in (1, 3):
        raise ConfigError(f"{path}: expected one image input [1,H,W,C], got {[t.shape for t in inputs]}")
    if bundle is not None:
        seg = bundle.segment("end")
        if seg.test_time_augmentation and threshold is None:
            # The firmware decides on the frame alone; the bundle's threshold assumes the mirror average.
            raise ConfigError(f"{src}: the bundle's end exit is calibrated with {seg.test_time_augmentation} "
                              "test-time augmentation, which the firmware does not run: recalibrate a copy with "
                              "`tierlite calibrate --end-tta none --write`, or pass --threshold")
        if bundle.encoding.kind not in ("int8", "binary"):
            raise ConfigError(f"{src}: the bundle sends its feature as {bundle.encoding.kind} "
                              f"{bundle.encoding.bits}-bit levels, which the firmware does not encode: recalibrate "
                              "a copy with `tierlite calibrate --feature-bits 8 --write`")
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
