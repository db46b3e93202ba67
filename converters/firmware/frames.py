"""Sample frames for the checks: images from a folder or seeded synthetic scenes, and one frame
as the model's input tensor."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tierlite.converters.firmware.model import EndModel, Tensor
from tierlite.errors import ConfigError


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
