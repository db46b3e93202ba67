"""tflite-runtime 2.14 (older Pi and Coral images; needs numpy<2)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tierlite.errors import RuntimeUnavailable
from tierlite.runtimes.litert import InterpreterRuntime


@dataclass(frozen=True)
class TFLiteRuntimeConfig:
    threads: int = 1


class TFLiteRuntime(InterpreterRuntime):
    key = "tflite-runtime"

    def __init__(self, model_path: str | Path, config: TFLiteRuntimeConfig | None = None):
        config = config or TFLiteRuntimeConfig()
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as e:
            raise RuntimeUnavailable(f"tflite-runtime is not installed ({e})") from None
        def reopen():
            return Interpreter(model_path=str(model_path), num_threads=config.threads)

        try:
            interp = reopen()
        except (ValueError, RuntimeError, SystemError) as e:
            # SystemError: tflite-runtime 2.14 under numpy 2 fails in CreateWrapperFromFile.
            raise RuntimeUnavailable(f"tflite-runtime cannot load {model_path}: {e}") from None
        super().__init__(model_path, interp, reopen)
