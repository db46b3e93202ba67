"""Coral Edge TPU through the libedgetpu delegate (LiteRT or tflite-runtime as the host)."""
from __future__ import annotations

import ctypes.util
from dataclasses import dataclass
from pathlib import Path

from tierlite.errors import RuntimeUnavailable
from tierlite.runtimes.litert import InterpreterRuntime

LIBEDGETPU = "libedgetpu.so.1"


@dataclass(frozen=True)
class EdgeTPUConfig:
    device: str = ""  # "", "usb", "usb:0", "pci:0"
    threads: int = 1


def libedgetpu_present() -> bool:
    return ctypes.util.find_library("edgetpu") is not None


class EdgeTPURuntime(InterpreterRuntime):
    key = "edgetpu"

    def __init__(self, model_path: str | Path, config: EdgeTPUConfig | None = None):
        config = config or EdgeTPUConfig()
        if not libedgetpu_present():
            raise RuntimeUnavailable(f"{LIBEDGETPU} not found (install the Coral runtime, libedgetpu1-std)")
        try:
            from ai_edge_litert.interpreter import Interpreter, load_delegate
        except ImportError:
            try:
                from tflite_runtime.interpreter import Interpreter, load_delegate
            except ImportError as e:
                raise RuntimeUnavailable(f"no TFLite interpreter to host the Edge TPU delegate ({e})") from None
        options = {"device": config.device} if config.device else {}
        try:
            delegate = load_delegate(LIBEDGETPU, options)
            interp = Interpreter(model_path=str(model_path), experimental_delegates=[delegate],
                                 num_threads=config.threads)
        except (ValueError, RuntimeError, OSError) as e:
            raise RuntimeUnavailable(f"Edge TPU delegate failed for {model_path}: {e}") from None
        super().__init__(model_path, interp)
