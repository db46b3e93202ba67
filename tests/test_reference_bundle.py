"""The reference bundle shipped in models/cifar10 (when this checkout has it): it loads, its files
match their sha256, every segment file matches its manifest entry, each tier's input is exactly the
previous tier's feature output (shape, dtype, quantization), and frames run through the whole
chain over the wire codec."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tierlite.bundle import TIERS, Bundle

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "cifar10"
pytestmark = pytest.mark.skipif(not (REFERENCE / "manifest.json").is_file(), reason="no models/cifar10 here")


def _io(t):
    return t.shape, t.dtype, round(t.scale, 9), t.zero_point


def test_reference_bundle_loads_and_its_boundaries_line_up():
    bundle = Bundle.load(REFERENCE, verify=True)  # every file's sha256 against the manifest
    assert [t for t in TIERS if t in bundle.segments] == list(TIERS)
    for producer, consumer in zip(TIERS, TIERS[1:]):
        feature = bundle.segment(producer).output("feature")
        assert feature is not None, f"{producer} has no feature output"
        assert _io(feature) == _io(bundle.segment(consumer).inputs[0]), f"{producer} -> {consumer}"


def test_reference_bundle_runs_end_to_end_through_the_wire_codec():
    from tierlite.segment import Segment
    from tierlite.wire import FeatureEncoding, decode_feature, encode_feature

    bundle = Bundle.load(REFERENCE)
    segments = [Segment(bundle, t) for t in TIERS]  # each checks its file's tensors against the manifest
    frames = np.random.default_rng(0).integers(0, 256, (8, *bundle.input_shape[1:]), dtype=np.uint8)
    for frame in frames:
        x = frame[None]
        for k, seg in enumerate(segments):
            out = seg.run(x)
            assert out.logits.shape[-1] == len(bundle.labels) and np.isfinite(out.logits).all()
            if out.feature is None:
                break
            enc = bundle.encoding if k == 0 else FeatureEncoding.INT8
            x = decode_feature(encode_feature(out.feature, enc), out.feature.shape, enc)
        assert k == len(TIERS) - 1
