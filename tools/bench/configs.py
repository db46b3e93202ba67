"""Configurations of `tierlite bench accuracy`: the exit policy applied to an offline trace at
given thresholds (or camera-only, cloud-only offload, a reference model), and the bytes each
sends up as MQTT packets."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.tools.bench.report import latency_ms
from tierlite.tools.bench.trace import ChainTrace, Frames, ReferenceRunner


# -- metrics per configuration ----------------------------------------------------------------------
@dataclass
class ConfigResult:
    name: str
    kind: str  # tierlite | camera-only | cloud-only | reference
    tier: np.ndarray  # (N,) index of the tier that decided
    labels: np.ndarray  # (N,) predicted class
    uplink_payload: np.ndarray  # (N,) camera uplink payload bytes per frame
    uplink_mqtt: np.ndarray  # (N,) the same as MQTT PUBLISH packets on the wire
    camera_s: np.ndarray | None  # (N,) camera decision latency (None: the camera decides nothing)
    e2e_s: np.ndarray  # (N,) offline end-to-end compute latency
    camera_model_bytes: int
    thresholds: dict[str, float] = field(default_factory=dict)
    drop: float | None = None
    bundle_dir: Path | None = None  # for the real-runtime pass
    tiers: tuple[str, ...] = ("end", "edge", "cloud")
    threshold_source: str = ""
    edge_to_cloud: np.ndarray | None = None  # (N,) edge feature bytes sent on to the cloud (the WAN, per site)

    def row(self, truth: np.ndarray) -> dict[str, Any]:
        n = len(truth)
        share = {t: 100.0 * float(np.mean(self.tier == k)) for k, t in enumerate(self.tiers)}
        cam = latency_ms(self.camera_s) if self.camera_s is not None else latency_ms([])
        e2e = latency_ms(self.e2e_s)
        return {
            "config": self.name, "kind": self.kind, "frames": n,
            "drop_pt": self.drop, "thresholds": self.thresholds, "threshold_source": self.threshold_source,
            "top1": 100.0 * float(np.mean(self.labels == truth)),
            "share_end": share.get("end", 0.0), "share_edge": share.get("edge", 0.0),
            "share_cloud": share.get("cloud", 0.0),
            "uplink_payload_B": float(self.uplink_payload.mean()),
            "uplink_mqtt_B": float(self.uplink_mqtt.mean()),
            "camera_p50_ms": cam["p50_ms"], "camera_p99_ms": cam["p99_ms"],
            "e2e_offline_p50_ms": e2e["p50_ms"], "e2e_offline_p99_ms": e2e["p99_ms"],
            "camera_model_B": self.camera_model_bytes,
            "edge_to_cloud_payload_B": float(self.edge_to_cloud.mean()) if self.edge_to_cloud is not None else None,
        }


def cascade(trace: ChainTrace, name: str, kind: str, thresholds: dict[str, float], escalation_wire: int,
            drop: float | None = None) -> ConfigResult:
    """Apply the exit policy at `thresholds` to a traced chain. escalation_wire: MQTT bytes of one
    escalation message around the feature payload (header + topic + properties + fixed header)."""
    from tierlite.policy import chain_decisions

    thr = [thresholds[t] for t in trace.tiers[:-1]]
    tier, labels = chain_decisions(trace.logits, thr)
    escalated = tier > 0
    payload = np.where(escalated, trace.feature_bytes[0], 0)
    mqtt = np.where(escalated, trace.feature_bytes[0] + escalation_wire, 0)
    # Offline e2e: a frame pays for every tier up to the one that decides it.
    spent = np.stack(trace.seconds, axis=1)
    visited = np.arange(len(trace.tiers))[None, :] <= tier[:, None]
    e2e = (spent * visited).sum(axis=1)
    wan = np.where(tier > 1, trace.feature_bytes[1], 0) if len(trace.tiers) > 2 else None
    return ConfigResult(name, kind, tier, labels, payload, mqtt, trace.seconds[0], e2e, trace.camera_model_bytes,
                        dict(thresholds), drop, tiers=tuple(trace.tiers), edge_to_cloud=wan)


def camera_only(trace: ChainTrace, name: str) -> ConfigResult:
    n = trace.logits[0].shape[0]
    zero = np.zeros(n)
    return ConfigResult(name, "camera-only", np.zeros(n, np.int64), trace.logits[0].argmax(1), zero, zero,
                        trace.seconds[0], trace.seconds[0].copy(), trace.camera_model_bytes,
                        tiers=tuple(trace.tiers))


def cloud_only(trace: ChainTrace, frames: Frames, decode_s: np.ndarray) -> ConfigResult:
    """Sedna-style offload: the JPEG goes up; the cloud decodes it and runs the whole chain."""
    n = len(frames.labels)
    last = len(trace.tiers) - 1
    e2e = decode_s + np.stack(trace.seconds, axis=1).sum(axis=1)
    return ConfigResult("cloud-only offload (JPEG, full chain in cloud)", "cloud-only", np.full(n, last),
                        trace.logits[-1].argmax(1), frames.jpeg_bytes.astype(float),
                        np.array([offload_message_bytes(int(b)) for b in frames.jpeg_bytes], dtype=float),
                        None, e2e, 0, tiers=tuple(trace.tiers))


def reference_config(ref: ReferenceRunner) -> ConfigResult:
    n = ref.n
    zero = np.zeros(n)
    return ConfigResult(f"reference {ref.name} (camera)", "reference", np.zeros(n, np.int64), ref.logits.argmax(1),
                        zero, zero, ref.seconds, ref.seconds.copy(), ref.path.stat().st_size)


# -- MQTT framing --------------------------------------------------------------------------------
def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def mqtt_publish_bytes(topic: str, payload_len: int, qos: int = 0, properties: bytes | None = None) -> int:
    """Bytes of one MQTT PUBLISH packet: fixed header (type byte + remaining length), topic,
    packet id (QoS > 0), MQTT 5 properties (`properties` = the packed block incl. its length;
    None for MQTT 3.1.1) and the payload."""
    variable = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + (len(properties) if properties is not None else 0)
    remaining = variable + payload_len
    return 1 + _varint_len(remaining) + remaining



DEFAULT_NODE = "cam-0001"  # node id used for topic lengths (8 characters)


def escalation_overhead(bundle, node: str = DEFAULT_NODE, prefix: str = "tierlite") -> int:
    """Bytes an escalation costs on MQTT beyond its feature payload: a real FEATURE message
    (tierlite.wire header, shape, end logits) in an MQTT 5 PUBLISH at the configured QoS on
    <prefix>/<node>/feature (tierlite.mqtt sends no properties: a 1-byte empty block)."""
    from tierlite.config import QoSConfig
    from tierlite.topics import node_topic as topic
    from tierlite.wire import Kind, boundary_spec, encode_tensor_message

    spec = boundary_spec(bundle, Kind.FEATURE)
    feature = np.full(spec.feature.shape, spec.feature.zero_point, dtype=np.int8)
    if bundle.feature_encoding["kind"] == "binary":
        feature[...] = bundle.feature_encoding["low"]
    logits = [np.zeros(c.n_classes, np.float32) for c in spec.exits]
    message = encode_tensor_message(spec, 1, feature, logits)
    total = mqtt_publish_bytes(topic(prefix, node, "feature"), len(message), QoSConfig().feature, b"\x00")
    return total - spec.feature_size


def offload_message_bytes(jpeg_bytes: int, node: str = DEFAULT_NODE, prefix: str = "tierlite") -> int:
    """An offloaded frame on MQTT (tierlite.tools.bench.offload): frame id + JPEG in an MQTT 5 PUBLISH,
    QoS 0, no properties - the least an offload message can carry."""
    import struct

    from tierlite.tools.bench.offload import FRAME_ID, offload_topic

    return mqtt_publish_bytes(offload_topic(prefix, node), struct.calcsize(FRAME_ID) + jpeg_bytes, 0, b"\x00")
