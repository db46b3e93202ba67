"""An edge worker: takes FEATURE messages from a shared subscription, runs the edge segment, answers
confident frames and escalates the rest to the cloud tier.

Work happens on paho's network thread, one message at a time: no queue hop, and backpressure is
the broker's (several worker processes split the load through $share/<group>/...). Bad input is
dropped, counted (tierlite_rejected_messages_total) and logged, and the node gets a REJECT when
the header is readable, so it answers locally at once.

Run by the gateway as `python -m tierlite.edge.worker --config edge.yaml --index N`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tierlite import wire
from tierlite.bundle import Bundle
from tierlite.config import EdgeConfig
from tierlite.errors import BundleError, WireError
from tierlite.metrics import TierMetrics
from tierlite.mqtt import MqttClient, default_client_id
from tierlite.policy import decide
from tierlite.segment import Segment, decode_feature

log = logging.getLogger("tierlite.edge.worker")


@dataclass
class _Model:
    bundle: Bundle
    segment: Segment
    threshold: float
    spec_in: wire.BoundarySpec
    spec_out: wire.BoundarySpec | None  # None: the bundle has no cloud tier, the edge answers all


class EdgeWorker:
    def __init__(self, config: EdgeConfig, index: int = 0, bundle: Bundle | None = None,
                 runtime_options: dict | None = None):
        self.config = config
        self.index = index
        self.prefix = config.prefix
        self.options = {"threads": config.threads, **(runtime_options or {})}
        bundle = bundle or Bundle.load(config.bundle)
        self.updates = None  # signed model updates (tierlite.update), with an `update:` section
        if config.update is not None and config.update.enabled:
            import dataclasses

            from tierlite.update import UpdateManager
            own = dataclasses.replace(config.update, state_dir=str(Path(config.update.state_dir) / f"worker-{index}"))
            self.updates = UpdateManager(
                own, f"{config.gateway_id}-w{index}", ["edge"], swap=lambda b, segments: self.swap_bundle(b),
                prefix=self.prefix, segment_factory=lambda b, tier: Segment(b, tier, config.runtime, self.options, True))
            bundle = self.updates.startup(bundle)
        self._model = self._load(bundle)
        self.metrics = TierMetrics("edge")
        self.stop_event = threading.Event()
        self.processed = 0
        self.rejected = 0
        qos = config.broker.qos
        self._qos = qos
        self.worker_id = f"{config.gateway_id}-w{index}"
        self._status_topic = f"{self.prefix}/_gateway/{config.gateway_id}/worker/{index}"
        gone = json.dumps({"worker": self.worker_id, "state": "offline"}).encode()
        self.mqtt = MqttClient(config.broker, default_client_id("edge", self.worker_id),
                               will=(self._status_topic, gone, 1, True), on_connect=self._on_connect)
        feature_filter = f"{self.prefix}/+/feature"
        if config.broker.protocol == "5":
            feature_filter = f"$share/{config.share_group}/{feature_filter}"
        self.mqtt.subscribe(feature_filter, self.on_feature, qos.feature)
        if self.updates is not None:
            self.updates.attach(self.mqtt)

    def _load(self, bundle: Bundle) -> _Model:
        segment = Segment(bundle, "edge", self.config.runtime, self.options, fallback=True)
        spec_out = wire.boundary_spec(bundle, wire.Kind.ESCALATE) if "cloud" in bundle.segments else None
        threshold = self.config.threshold if self.config.threshold is not None else bundle.thresholds.get("edge")
        if spec_out is None:
            threshold = 1.0
        elif threshold is None:
            raise BundleError(f"bundle {bundle.name} v{bundle.version} has no 'edge' threshold; set `threshold`")
        return _Model(bundle, segment, float(threshold), wire.boundary_spec(bundle, wire.Kind.FEATURE), spec_out)

    def swap_bundle(self, bundle: Bundle) -> None:
        """Replace the edge model between two messages (same contract as DeviceDaemon.swap_bundle)."""
        new = self._load(bundle)
        old, self._model = self._model, new
        log.info("edge model swapped: %s v%d -> %s v%d", old.bundle.name, old.bundle.version,
                 bundle.name, bundle.version)
        self._on_connect()

    @property
    def bundle(self) -> Bundle:
        return self._model.bundle

    # -- message path ------------------------------------------------------------------------
    def on_feature(self, topic: str, payload: bytes) -> None:
        t0 = time.perf_counter()
        m = self._model
        try:
            node = wire.node_of(topic, self.prefix)
            msg = wire.decode_tensor_message(payload, m.spec_in)
            q = decode_feature(msg.feature, m.spec_in.input_info.shape, m.spec_in.encoding)
        except WireError as e:
            self._reject(topic, payload, e)
            return
        out = m.segment.run(q)
        confident, label, conf, entropy = decide(out.logits, m.threshold)
        if self.updates is not None:
            self.updates.observe("edge", q, out.logits, escalated=not confident)
        if confident:
            reply = wire.encode_answer("edge", msg.frame_id, label, conf, entropy, m.bundle.name, m.bundle.version)
            self.mqtt.publish(wire.topic(self.prefix, node, "answer"), reply, self._qos.answer)
            outcome, kind = "answered", "answer"
        else:
            reply = wire.encode_tensor_message(
                m.spec_out, msg.frame_id, out.feature, [msg.exit_logits[0], out.logits], sent_us=msg.sent_us,
                end_feature=msg.feature if self.config.forward_end_feature else None)
            self.mqtt.publish(wire.topic(self.prefix, node, "escalate"), reply, self._qos.escalate)
            outcome, kind = "escalated", "escalate"
        self.processed += 1
        self.metrics.frame(node, outcome, len(payload), time.perf_counter() - t0,
                           (wire.now_us() - msg.sent_us) / 1e6)
        self.metrics.sent(kind, len(reply))

    def _reject(self, topic: str, payload: bytes, err: WireError) -> None:
        self.rejected += 1
        reason = wire.reason_of(err)
        self.metrics.reject(reason)
        if self.rejected <= 10 or self.rejected % 1000 == 0:
            log.warning("dropped feature on %s (%d dropped so far): %s", topic[:100], self.rejected, err)
        m = self._model
        reject = wire.reject_reply("edge", self.prefix, topic, payload, err, m.bundle.name, m.bundle.version)
        if reject is not None:
            self.mqtt.publish(reject[0], reject[1], self._qos.answer)
            self.metrics.sent("reject", len(reject[1]))

    # -- lifecycle ---------------------------------------------------------------------------
    def _on_connect(self) -> None:
        m = self._model
        self.mqtt.publish(self._status_topic, json.dumps(
            {"worker": self.worker_id, "state": "online", "pid": os.getpid(), "model": m.bundle.name,
             "model_version": m.bundle.version, "threshold": m.threshold}), 1, retain=True)

    def start(self) -> None:
        self.mqtt.start()

    def run(self) -> int:
        from tierlite.service import wait_for_stop

        self.start()
        m = self._model
        log.info("edge worker %s: %s v%d, edge threshold %.3f, %s", self.worker_id, m.bundle.name,
                 m.bundle.version, m.threshold, "escalating to the cloud tier" if m.spec_out else "no cloud tier")
        wait_for_stop(self.stop_event)
        log.info("edge worker %s: %d frames, %d rejected messages", self.worker_id, self.processed, self.rejected)
        if self.updates is not None:
            self.updates.close()
        self.mqtt.stop(final=[(self._status_topic, json.dumps({"worker": self.worker_id, "state": "offline"}).encode(), 1, True)])
        return 0

    def stop(self) -> None:
        self.stop_event.set()


def main(argv: list[str] | None = None) -> int:
    from tierlite.config import load_config
    from tierlite.errors import TierliteError
    from tierlite.logs import setup_logging
    from tierlite.service import run_until_signal

    p = argparse.ArgumentParser(prog="tierlite-edge-worker", description="one edge worker process (started by `tierlite edge`)")
    p.add_argument("--config", required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--log-level", default="info")
    p.add_argument("--log-format", default="text")
    args = p.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        cfg = load_config(args.config, EdgeConfig)
        if os.environ.get("TIERLITE_EDGE_BROKER_PORT"):  # the gateway's managed broker
            cfg.broker.host = os.environ.get("TIERLITE_EDGE_BROKER_HOST", cfg.broker.host)
            cfg.broker.port = int(os.environ["TIERLITE_EDGE_BROKER_PORT"])
        worker = EdgeWorker(cfg, args.index)
    except TierliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_until_signal(worker.run, worker.stop)


if __name__ == "__main__":
    sys.exit(main())
