"""TensorFlow Lite Micro interpreter (pip tflite-micro): the microcontroller kernels, run on the
host for parity checks and arena measurement."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tierlite.errors import RuntimeUnavailable
from tierlite.runtimes.base import Runtime, TensorDetail, detail_from_interpreter


@dataclass(frozen=True)
class TFLMConfig:
    arena_bytes: int | None = None  # None: the library's default (10x the model size)


class TFLMRuntime(Runtime):
    key = "tflm"

    def __init__(self, model_path: str | Path, config: TFLMConfig | None = None):
        super().__init__(model_path)
        config = config or TFLMConfig()
        try:
            from tflite_micro.python.tflite_micro import runtime as tflm
        except ImportError as e:
            raise RuntimeUnavailable(f"tflite-micro is not installed ({e}); pip install 'tierlite[micro]'") from None
        try:
            self._interp = tflm.Interpreter.from_file(str(model_path), arena_size=config.arena_bytes)
        except (ValueError, RuntimeError) as e:
            raise RuntimeUnavailable(f"TFLite Micro cannot load {model_path}: {e}") from None
        # The TFLM wrapper has no tensor counts; read them from the flatbuffer it ships a schema for.
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

        graph = schema.Model.GetRootAs(self.model_path.read_bytes(), 0).Subgraphs(0)
        self._inputs = [detail_from_interpreter(self._interp.get_input_details(i)) for i in range(graph.InputsLength())]
        self._outputs = [detail_from_interpreter(self._interp.get_output_details(i)) for i in range(graph.OutputsLength())]

    @property
    def inputs(self) -> list[TensorDetail]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorDetail]:
        return self._outputs

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        for i, x in enumerate(inputs):
            self._interp.set_input(x, i)
        self._interp.invoke()
        return [np.array(self._interp.get_output(i)) for i in range(len(self._outputs))]
