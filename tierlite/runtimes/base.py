"""The one interface every runtime plugin implements (one module per backend, Frigate-style:
its config dataclass beside its runtime class)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class TensorDetail:
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float
    zero_point: int
    name: str = ""


class Runtime(ABC):
    """A loaded model. Inputs and outputs are in the model's own order and quantized dtype."""

    key: ClassVar[str]  # plugin name used in configs: "litert", "tflite-runtime", "edgetpu", "tflm"

    def __init__(self, model_path: str | Path, config: Any = None):
        self.model_path = Path(model_path)

    @property
    @abstractmethod
    def inputs(self) -> list[TensorDetail]: ...

    @property
    @abstractmethod
    def outputs(self) -> list[TensorDetail]: ...

    @abstractmethod
    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Invoke once; returns copies of every output (safe to keep across calls)."""

    def batched(self, n: int) -> "Runtime | None":
        """The same model with a leading batch dimension of `n` (a separate interpreter), or None
        where this backend or model cannot take one (callers then run the frames one by one)."""
        return None


def detail_from_interpreter(d: dict) -> TensorDetail:
    """Both LiteRT-style and TFLM-style detail dicts carry 'quantization_parameters'."""
    q = d.get("quantization_parameters") or {}
    scales, zps = q.get("scales", []), q.get("zero_points", [])
    scale = float(scales[0]) if len(scales) else float(d.get("quantization", (0.0, 0))[0])
    zp = int(zps[0]) if len(zps) else int(d.get("quantization", (0.0, 0))[1])
    return TensorDetail(tuple(int(x) for x in d["shape"]), np.dtype(d["dtype"]), scale, zp, str(d.get("name", "")))
