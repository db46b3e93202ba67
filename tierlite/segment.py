"""Run one bundle segment on a runtime plugin, speaking the manifest's roles (feature, logits),
and hold a tier's loaded model (`TierModel`: segment, exit threshold, the boundaries it speaks)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from tierlite import wire
from tierlite.bundle import Bundle, TensorInfo
from tierlite.conditions import end_variants
from tierlite.errors import BundleError, RuntimeUnavailable, WireError
from tierlite.policy import mirror, mirror_average
from tierlite.runtimes import open_runtime

__all__ = ["BatchOutput", "Segment", "SegmentOutput", "TierModel", "dequantize"]

log = logging.getLogger("tierlite.segment")

@dataclass
class SegmentOutput:
    feature: np.ndarray | None  # quantized boundary tensor as the model gives it (None for cloud)
    logits: np.ndarray  # dequantized float32, shape (classes,)


@dataclass
class BatchOutput:
    """`Segment.run_batch`: one row per frame, in the order given."""
    feature: np.ndarray | None  # (N, ...) quantized boundary tensors (None for cloud)
    logits: np.ndarray  # (N, classes) dequantized float32


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
        # Condition variants (tierlite.conditions): same tensors, other statistics, picked per frame.
        self.variants = []
        if tier == "end":
            for file, selector in end_variants(bundle.manifest):
                rt = open_runtime(bundle.root / file, runtime, options, fallback=fallback)
                self._check_io(rt)
                self.variants.append((selector, rt))
        self._feature = self.info.output("feature")
        self._logits = self.info.output("logits")
        self._runtime_key, self._options = runtime, options
        self._batched: dict[int, object] = {}  # batch size -> runtime with that batch dimension, or None
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
        rt = self._runtime_for(x)
        outs = rt.run([x])
        lo = self._logits
        logits = dequantize(outs[lo.index], lo.scale, lo.zero_point).reshape(-1)
        if self.info.test_time_augmentation:  # same runtime (condition variant) for the mirror image
            mirrored = rt.run([mirror(x)])[lo.index]
            logits = mirror_average(logits, dequantize(mirrored, lo.scale, lo.zero_point).reshape(-1))
        feature = outs[self._feature.index] if self._feature is not None else None
        return SegmentOutput(feature, logits)

    def run_batch(self, x: np.ndarray) -> BatchOutput:
        """Frames stacked on axis 0 (N, *input shape without its batch of 1), run in as few
        interpreter calls as the model allows: chunks of power-of-two sizes (13 = 8 + 4 + 1), each
        on an interpreter resized to that batch once and kept, so no frame is padded and no tensor
        reallocated per call. Per frame the int8 arithmetic is the batch-1 arithmetic (tested).
        A model that cannot take a batch dimension (or condition variants, picked per frame) runs
        frame by frame. With test-time augmentation the mirror images run as a second batch."""
        spec = self.input_info
        if x.dtype.name != spec.dtype:
            raise WireError(f"{self.tier} segment expects {spec.dtype}, got {x.dtype.name}")
        if x.shape[1:] != tuple(spec.shape[1:]):
            raise WireError(f"{self.tier} segment expects frames of shape {spec.shape[1:]}, got {x.shape[1:]}")
        out = self._run_batch(x)
        if self.info.test_time_augmentation:
            out.logits = mirror_average(out.logits, self._run_batch(mirror(x)).logits)
        return out

    def _run_batch(self, x: np.ndarray) -> BatchOutput:
        n = int(x.shape[0])
        lo, fe = self._logits, self._feature
        logits_q, features = [], []
        start = 0
        while start < n:
            size = 1 << ((n - start).bit_length() - 1)  # the largest power of two that fits
            rt = self._runtime_of_batch(size) if size > 1 else None
            if rt is None:
                for i in range(start, start + size):
                    outs = self._runtime_for(x[i:i + 1]).run([x[i:i + 1]])
                    logits_q.append(outs[lo.index].reshape(1, -1))
                    if fe is not None:
                        features.append(outs[fe.index])
            else:
                outs = rt.run([x[start:start + size]])
                logits_q.append(outs[lo.index].reshape(size, -1))
                if fe is not None:
                    features.append(outs[fe.index])
            start += size
        q = logits_q[0] if len(logits_q) == 1 else np.concatenate(logits_q)
        feature = None if fe is None else (features[0] if len(features) == 1 else np.concatenate(features))
        return BatchOutput(feature, dequantize(q, lo.scale, lo.zero_point))

    def prepare_batches(self, max_size: int) -> list[int]:
        """Open and warm (one call on zeros) the interpreters `run_batch` uses up to `max_size`, so no
        batch waits for an interpreter to be built or its weights packed: a worker calls this when
        it loads a model, before the model takes traffic. Returns the batch sizes ready."""
        spec = self.input_info
        self.runtime.run([np.zeros(spec.shape, dtype=spec.dtype)])  # batch 1 too: the first call packs weights
        ready = []
        size = 2
        while size <= max_size:
            rt = self._runtime_of_batch(size)
            if rt is None:
                break
            rt.run([np.zeros((size, *spec.shape[1:]), dtype=spec.dtype)])
            ready.append(size)
            size *= 2
        return ready

    def _runtime_of_batch(self, size: int):
        if self.variants:
            return None
        if size not in self._batched:
            rt = self.runtime.batched(size)
            if rt is None:
                log.info("%s segment: no batch dimension with runtime %s; frames run one by one",
                         self.tier, self._runtime_key)
            self._batched[size] = rt
        return self._batched[size]

    def _runtime_for(self, x: np.ndarray):
        for selector, runtime in self.variants:
            if selector.picks(x)[0]:
                return runtime
        return self.runtime


# -- a tier's model ---------------------------------------------------------------------------
_NEXT = {"end": "edge", "edge": "cloud", "cloud": None}
_SENDS = {"end": wire.Kind.FEATURE, "edge": wire.Kind.ESCALATE}  # what a tier sends up
_TAKES = {"edge": wire.Kind.FEATURE, "cloud": wire.Kind.ESCALATE}  # what it takes in


@dataclass(frozen=True)
class TierModel:
    """What one tier runs, swapped as one object between two frames: the segment, its exit
    threshold (None on the cloud: the last tier always answers) and the boundaries it speaks."""

    bundle: Bundle
    segment: Segment
    threshold: float | None
    spec_in: wire.BoundarySpec | None  # what arrives (None on the node)
    spec_out: wire.BoundarySpec | None  # what unsure frames go up as (None: no next tier in the bundle)

    @classmethod
    def load(cls, bundle: Bundle, tier: str, runtime: str, options: dict | None = None,
             threshold: float | None = None) -> "TierModel":
        """Load `tier` of `bundle`; `threshold` overrides the bundle's (a config's `threshold`)."""
        segment = Segment(bundle, tier, runtime, options, fallback=True)
        following = _NEXT[tier]
        spec_out = wire.boundary_spec(bundle, _SENDS[tier]) if following in bundle.segments else None
        spec_in = wire.boundary_spec(bundle, _TAKES[tier]) if tier in _TAKES else None
        if following is None:
            threshold = None
        elif spec_out is None:  # nowhere to escalate to: this tier answers every frame
            log.warning("bundle %s has no %s segment: the %s tier decides every frame", bundle.name, following, tier)
            threshold = 1.0
        else:
            threshold = threshold if threshold is not None else bundle.thresholds.get(tier)
            if threshold is None:
                raise BundleError(f"bundle {bundle.name} v{bundle.version} has no '{tier}' threshold; "
                                  f"set `threshold` in the config")
        return cls(bundle, segment, None if threshold is None else float(threshold), spec_in, spec_out)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the frames this segment takes."""
        shape = self.segment.input_info.shape
        return int(shape[1]), int(shape[2])
