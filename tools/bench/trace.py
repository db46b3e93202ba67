"""The offline pass of `tierlite bench accuracy`: the test frames, and every tier of every
bundle (plus reference models) run on every frame, frame-major, timing each tier."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.errors import ConfigError, DataError
from tierlite.tools.bench.report import Progress


# -- frames --------------------------------------------------------------------------------------
@dataclass
class Frames:
    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    labels: np.ndarray  # (N,)
    classes: list[str]
    paths: list[Path]
    jpeg_bytes: np.ndarray  # (N,) size of each frame's file: what offload sends


def load_frames(data: str | Path, size: tuple[int, int], limit: int | None, seed: int, progress: bool) -> Frames:
    from tierlite.data import load_image_folder

    data = Path(data)
    if not data.is_dir():
        raise DataError(f"test frames not found: {data} (pass --data DIR, an image folder <class>/*.jpg)")
    s = load_image_folder(data, size=size, limit=limit, seed=seed, progress=progress)
    return Frames(s.images, s.labels, s.classes, s.paths, np.array([p.stat().st_size for p in s.paths]))


# -- offline trace: every tier of a bundle on every frame ----------------------------------------
@dataclass
class ChainTrace:
    """What one bundle's chain does on every frame, independent of thresholds."""
    name: str
    tiers: list[str]
    logits: list[np.ndarray]  # per tier, (N, C)
    seconds: list[np.ndarray]  # per tier, (N,) compute time; end includes the exit decision
    feature_bytes: list[int]  # encoded size of the feature each tier sends up (last tier: 0)
    camera_model_bytes: int
    thresholds: dict[str, float]  # the bundle's own (manifest) thresholds
    bundle: Any = None


class ChainRunner:
    """Runs one bundle's segments frame by frame, timing each tier, through the wire codec."""

    def __init__(self, name: str, bundle, runtime: str, threads: int, n: int):
        from tierlite.segment import Segment

        self.name, self.bundle = name, bundle
        self.tiers = [t for t in ("end", "edge", "cloud") if t in bundle.segments]
        opts = {"threads": threads}
        self.segments = [Segment(bundle, t, runtime=runtime, options=opts) for t in self.tiers]
        self.encoding = bundle.feature_encoding
        classes = len(bundle.labels)
        self.logits = [np.zeros((n, classes), np.float32) for _ in self.tiers]
        self.seconds = [np.zeros(n) for _ in self.tiers]
        self.feature_bytes = [0] * len(self.tiers)

    def run(self, i: int, image: np.ndarray) -> None:
        from tierlite.policy import normalized_entropy, softmax
        from tierlite.wire import FeatureEncoding, decode_feature, encode_feature

        x = image[None]
        payload, shape, enc = b"", (), self.encoding
        for k, seg in enumerate(self.segments):
            t0 = time.perf_counter()
            if k > 0:  # a receiving tier decodes the wire payload: exactly what the wire delivers
                x = decode_feature(payload, shape, enc)
            out = seg.run(x)
            normalized_entropy(softmax(out.logits))  # the exit decision is part of the tier's work
            self.seconds[k][i] = time.perf_counter() - t0
            self.logits[k][i] = out.logits
            if out.feature is None:
                break
            # end -> edge in the bundle's encoding (binary: 1 bit per element), edge -> cloud int8
            enc = self.encoding if k == 0 else FeatureEncoding.INT8
            payload, shape = encode_feature(out.feature, enc), out.feature.shape
            self.feature_bytes[k] = len(payload)

    def trace(self) -> ChainTrace:
        return ChainTrace(self.name, self.tiers, self.logits, self.seconds, self.feature_bytes,
                          self.bundle.segment("end").bytes, self.bundle.thresholds, self.bundle)


class ReferenceRunner:
    """A single-model reference (e.g. MLPerf Tiny ResNet-8) on the camera: int8 input pixel-128."""

    def __init__(self, path: Path, runtime: str, threads: int, n: int):
        from tierlite.runtimes import open_runtime

        self.path, self.name = path, path.stem
        self.rt = open_runtime(path, runtime, {"threads": threads}, fallback=True)
        self.input = self.rt.inputs[0]
        self.logits: np.ndarray | None = None
        self.seconds = np.zeros(n)
        self.n = n

    def run(self, i: int, image: np.ndarray) -> None:
        t0 = time.perf_counter()
        if self.input.dtype == np.int8:
            x = (image.astype(np.int16) - 128).astype(np.int8)[None]
        else:
            x = image.astype(self.input.dtype)[None]
        scores = self.rt.run([x.reshape(self.input.shape)])[0].reshape(-1)
        int(scores.argmax())  # the decision is part of the camera's work
        self.seconds[i] = time.perf_counter() - t0
        if self.logits is None:
            self.logits = np.zeros((self.n, scores.size), np.float32)
        self.logits[i] = scores


def reference_paths(specs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("*.tflite"))
            if not found:
                raise ConfigError(f"--reference {p}: no .tflite files in this folder")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise ConfigError(f"--reference {p}: no such file or folder")
    return paths


def run_offline(frames: Frames, chains: list[ChainRunner], refs: list[ReferenceRunner],
                progress: bool) -> np.ndarray:
    """Frame-major pass over every model; returns per-frame JPEG decode seconds (offload's cloud cost)."""
    from tierlite.data import decode_image

    n = len(frames.labels)
    decode_s = np.zeros(n)
    size = frames.images.shape[1:3]
    bar = Progress(n, "offline chain (all models, every frame)", enabled=progress)
    for i in range(n):
        jpeg = frames.paths[i].read_bytes()
        t0 = time.perf_counter()
        decode_image(jpeg, size)
        decode_s[i] = time.perf_counter() - t0
        for runner in (*chains, *refs):
            runner.run(i, frames.images[i])
        bar.update()
    bar.close()
    return decode_s

