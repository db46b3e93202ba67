"""The offline pass of `tierlite bench accuracy`: the test frames, and every tier of every
bundle (plus reference models) run on every frame, block by block, timing each tier."""
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

    def run_block(self, idx: range, images: np.ndarray) -> None:
        """Frames `idx` through every tier, tier after tier: each tier's segment runs back to back
        over the block, as on its own device (a camera runs only the end model, frame after frame),
        so the timing is not of caches the other tiers' models just evicted. A tier's time = the
        wire decode of what it receives + invoke + the exit decision (`decide`, what
        DeviceDaemon.process_frame times as decision_ms on the end)."""
        from tierlite.policy import decide
        from tierlite.wire import FeatureEncoding, decode_feature, encode_feature

        payloads: list[bytes] = []
        shape, enc = (), self.encoding
        for k, seg in enumerate(self.segments):
            threshold = self.bundle.thresholds.get(self.tiers[k])
            sent, sent_shape = [], ()
            for j, i in enumerate(idx):
                t0 = time.perf_counter()
                # a receiving tier decodes the wire payload: exactly what the wire delivers
                x = images[i][None] if k == 0 else decode_feature(payloads[j], shape, enc)
                out = seg.run(x)
                decide(out.logits, threshold)
                self.seconds[k][i] = time.perf_counter() - t0
                self.logits[k][i] = out.logits
                if out.feature is not None:
                    # end -> edge in the bundle's encoding (binary: 1 bit per element), edge -> cloud int8
                    sent.append(encode_feature(out.feature, self.encoding if k == 0 else FeatureEncoding.INT8))
                    sent_shape = out.feature.shape
            if not sent:
                break
            self.feature_bytes[k] = len(sent[-1])
            payloads, shape = sent, sent_shape
            enc = self.encoding if k == 0 else FeatureEncoding.INT8

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


BLOCK_FRAMES = 64  # frames per block of the offline pass: long enough for a model to run warm


def run_offline(frames: Frames, chains: list[ChainRunner], refs: list[ReferenceRunner],
                progress: bool) -> np.ndarray:
    """Every model on every frame, block by block: within a block of BLOCK_FRAMES frames each model
    runs back to back (each tier as on its own device, warm), and the blocks alternate between all
    models, so background load on the machine still hits every configuration alike. (Frame-major,
    the camera's 65 KB end model ran right after the 5.9 MB cloud segment and reference models had
    evicted it from the caches: 0.22-0.31 ms p50 instead of ~0.12 ms; issue 15.) Returns per-frame
    JPEG decode seconds (offload's cloud cost)."""
    from tierlite.data import decode_image

    n = len(frames.labels)
    decode_s = np.zeros(n)
    size = frames.images.shape[1:3]
    bar = Progress(n, "offline chain (all models, every frame)", enabled=progress)
    for start in range(0, n, BLOCK_FRAMES):
        block = range(start, min(start + BLOCK_FRAMES, n))
        for i in block:
            jpeg = frames.paths[i].read_bytes()
            t0 = time.perf_counter()
            decode_image(jpeg, size)
            decode_s[i] = time.perf_counter() - t0
        for chain in chains:
            chain.run_block(block, frames.images)
        for ref in refs:
            for i in block:
                ref.run(i, frames.images[i])
        bar.update(len(block))
    bar.close()
    return decode_s
