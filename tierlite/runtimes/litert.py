"""ai-edge-litert (the default runtime; XNNPACK on CPU)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tierlite.errors import RuntimeUnavailable
from tierlite.runtimes.base import Runtime, TensorDetail, detail_from_interpreter


@dataclass(frozen=True)
class LiteRTConfig:
    threads: int = 1


class InterpreterRuntime(Runtime):
    """Shared by every plugin whose library exposes the tf.lite.Interpreter API."""

    def __init__(self, model_path: str | Path, interpreter, reopen=None):
        """reopen: makes a fresh interpreter of the same model and settings (for `batched`)."""
        super().__init__(model_path)
        self._reopen = reopen
        self._interp = interpreter
        self._interp.allocate_tensors()
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()

    @property
    def inputs(self) -> list[TensorDetail]:
        return [detail_from_interpreter(d) for d in self._in]

    @property
    def outputs(self) -> list[TensorDetail]:
        return [detail_from_interpreter(d) for d in self._out]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        for d, x in zip(self._in, inputs):
            self._interp.set_tensor(d["index"], x)
        self._interp.invoke()
        return [self._interp.get_tensor(d["index"]) for d in self._out]

    def batched(self, n: int) -> "InterpreterRuntime | None":
        if self._reopen is None or any(len(d["shape"]) == 0 for d in self._in):
            return None
        interp = self._reopen()
        try:
            for d in interp.get_input_details():
                interp.resize_tensor_input(d["index"], [n, *d["shape"][1:]])
            twin = InterpreterRuntime(self.model_path, interp)
        except (ValueError, RuntimeError):  # a reshape with a hard-coded batch of 1, a delegate that refuses
            return None
        if any(o.shape[:1] != (n,) for o in twin.outputs):
            return None
        return twin

    def op_names(self) -> list[str]:
        return [op["op_name"] for op in self._interp._get_ops_details()]


class LiteRTRuntime(InterpreterRuntime):
    key = "litert"

    def __init__(self, model_path: str | Path, config: LiteRTConfig | None = None):
        config = config or LiteRTConfig()
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise RuntimeUnavailable(f"ai-edge-litert is not installed ({e}); pip install 'tierlite[device]'") from None
        def reopen():
            return Interpreter(model_path=str(model_path), num_threads=config.threads)

        try:
            interp = reopen()
        except (ValueError, RuntimeError) as e:
            raise RuntimeUnavailable(f"LiteRT cannot load {model_path}: {e}") from None
        super().__init__(model_path, interp, reopen)
