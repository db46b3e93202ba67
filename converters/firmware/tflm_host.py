"""TFLite Micro on the build host: the smallest tensor arena the interpreter allocates with, and
its invoke time (reference kernels, not the board's speed)."""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time

import numpy as np

from tierlite.boards import format_bytes
from tierlite.converters.firmware.frames import frame_to_input
from tierlite.converters.firmware.model import EndModel
from tierlite.errors import ConfigError

ARENA_STEP = 16  # arena sizes are searched in 16-byte steps (TFLM aligns buffers to 16)


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
