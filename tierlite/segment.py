"""Run one bundle segment on a runtime plugin, speaking the manifest's roles (feature, logits),
and encode/decode boundary features for the wire (int8 raw or bit-packed binary)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from tierlite.bundle import Bundle, TensorInfo
from tierlite.errors import BundleError, RuntimeUnavailable, WireError
from tierlite.profiles import end_profiles
from tierlite.runtimes import open_runtime

log = logging.getLogger("tierlite.segment")


@dataclass
class SegmentOutput:
    feature: np.ndarray | None  # quantized boundary tensor as the model gives it (None for cloud)
    logits: np.ndarray  # dequantized float32, shape (classes,)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if scale == 0.0:  # float tensor
        return q.astype(np.float32)
    return (q.astype(np.float32) - zero_point) * scale


class Segment:
    """One tier's model. Checks that the loaded file matches what the manifest says."""

    def __init__(self, bundle: Bundle, tier: str, runtime: str = "litert",
                 options: dict | None = None, fallback: bool = True):
        self.bundle, self.tier = bundle, tier
        self.info = bundle.segment(tier)
        self.runtime = self._open(runtime, options, fallback)
        self._check_io(self.runtime)
        # Condition profiles (tierlite.profiles): same tensors, other statistics, picked per frame.
        self.profiles = []
        if tier == "end":
            for file, selector in end_profiles(bundle.manifest):
                rt = open_runtime(bundle.root / file, runtime, options, fallback=fallback)
                self._check_io(rt)
                self.profiles.append((selector, rt))
        self._feature = self.info.output("feature")
        self._logits = self.info.output("logits")
        if self._logits is None:
            raise BundleError(f"{tier} segment has no output with role 'logits'")

    def _open(self, runtime: str, options: dict | None, fallback: bool):
        compiled = self.bundle.model_file(self.tier, runtime)
        if compiled != self.bundle.segment_path(self.tier):
            try:
                return open_runtime(compiled, runtime, options)
            except RuntimeUnavailable as e:
                if not fallback:
                    raise
                # An Edge TPU-compiled model only runs through the delegate: fall back to the plain file.
                log.warning("%s; running the plain %s segment instead", e, self.tier)
        return open_runtime(self.bundle.segment_path(self.tier), runtime, options, fallback=fallback)

    def _check_io(self, runtime) -> None:
        pairs = [("input", m, r) for m, r in zip(self.info.inputs, runtime.inputs)]
        pairs += [("output", m, runtime.outputs[m.index]) for m in self.info.outputs
                  if m.index < len(runtime.outputs)]
        if len(self.info.inputs) != len(runtime.inputs) or len(pairs) != len(self.info.inputs) + len(self.info.outputs):
            raise BundleError(f"{self.tier} segment: tensor count differs from the manifest")
        for kind, m, r in pairs:
            if tuple(r.shape) != m.shape or r.dtype.name != m.dtype or (
                    r.scale and not np.isclose(r.scale, m.scale)) or r.zero_point != m.zero_point:
                raise BundleError(f"{self.tier} segment {kind} {m.name!r}: model has {r.shape} {r.dtype.name} "
                                  f"q=({r.scale:g},{r.zero_point}), manifest says {m.shape} {m.dtype} "
                                  f"q=({m.scale:g},{m.zero_point})")

    @property
    def input_info(self) -> TensorInfo:
        return self.info.inputs[0]

    def run(self, x: np.ndarray) -> SegmentOutput:
        spec = self.input_info
        if x.shape != spec.shape:
            if x.size != int(np.prod(spec.shape)):
                raise WireError(f"{self.tier} segment expects shape {spec.shape}, got {x.shape}")
            x = x.reshape(spec.shape)
        if x.dtype.name != spec.dtype:
            raise WireError(f"{self.tier} segment expects {spec.dtype}, got {x.dtype.name}")
        outs = self._runtime_for(x).run([x])
        lo = self._logits
        logits = dequantize(outs[lo.index], lo.scale, lo.zero_point).reshape(-1)
        feature = outs[self._feature.index] if self._feature is not None else None
        return SegmentOutput(feature, logits)

    def _runtime_for(self, x: np.ndarray):
        for selector, runtime in self.profiles:
            if selector.picks(x)[0]:
                return runtime
        return self.runtime


# -- boundary feature codecs ----------------------------------------------------------------
def encode_feature(q: np.ndarray, encoding: dict[str, Any]) -> bytes:
    """int8: raw bytes. binary: 1 bit per element (1 = high), big-endian bit order (np.packbits)."""
    if encoding["kind"] == "binary":
        return np.packbits(q.reshape(-1) == encoding["high"]).tobytes()
    return np.ascontiguousarray(q, dtype=np.int8).tobytes()


def encoded_size(shape: tuple[int, ...], encoding: dict[str, Any]) -> int:
    n = int(np.prod(shape))
    return (n + 7) // 8 if encoding["kind"] == "binary" else n


def decode_feature(payload: bytes | memoryview, shape: tuple[int, ...], encoding: dict[str, Any]) -> np.ndarray:
    expected = encoded_size(shape, encoding)
    if len(payload) != expected:
        raise WireError(f"feature payload is {len(payload)} bytes, shape {shape} needs {expected}")
    if encoding["kind"] == "binary":
        bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), count=int(np.prod(shape)))
        q = np.where(bits.astype(bool), np.int8(encoding["high"]), np.int8(encoding["low"]))
        return q.astype(np.int8).reshape(shape)
    return np.frombuffer(payload, dtype=np.int8).reshape(shape).copy()
