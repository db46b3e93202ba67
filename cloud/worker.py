"""The cloud worker: ESCALATE messages in (shared subscription), final segment, ANSWER back to the
node, and every escalated frame into the hard-example store."""
from __future__ import annotations

import logging
import time

from tierlite import topics, wire
from tierlite.bundle import Bundle
from tierlite.config import CloudConfig
from tierlite.errors import WireError
from tierlite.mqtt import MqttClient, default_client_id
from tierlite.policy import decide
from tierlite.segment import TierModel
from tierlite.tierworker import TierWorker

__all__ = ["CloudWorker"]

log = logging.getLogger("tierlite.cloud")


class CloudWorker(TierWorker):
    tier, consumes = "cloud", "escalation"

    def __init__(self, config: CloudConfig, bundle: Bundle | None = None, store=None):
        from tierlite.cloud.store import HardExampleStore

        super().__init__(config.prefix, config.broker.qos, config.worker_id,
                         topics.cloud_status(config.prefix, config.worker_id))
        self.config = config
        self._model = self._load(bundle or Bundle.load(config.bundle))
        self.store = store if store is not None else (
            HardExampleStore(config.store.path, config.store.batch, config.store.flush_interval)
            if config.store.enabled else None)
        self._stored_reported = 0
        self.mqtt = MqttClient(config.broker, default_client_id("cloud", config.worker_id),
                               will=self._will(), on_connect=self._on_connect)
        share = config.share_group if config.broker.protocol == "5" else None
        self.mqtt.subscribe(topics.node_filter(self.prefix, topics.ESCALATE).shared(share), self.on_escalate,
                            self._qos.escalate)
        self.retrain = None  # co-updating (tierlite.cloud.retrain), with a `retrain:` section
        if config.retrain is not None:
            from tierlite.cloud.retrain import RetrainScheduler
            self.retrain = RetrainScheduler(config, self.mqtt)

    def _load(self, bundle: Bundle) -> TierModel:
        return TierModel.load(bundle, "cloud", self.config.runtime, {"threads": self.config.threads})

    def on_escalate(self, topic: str, payload: bytes) -> None:
        t0 = time.perf_counter()
        m = self._model
        spec = m.spec_in
        try:
            node = topics.node_of(topic, self.prefix)
            msg = wire.decode_tensor_message(payload, spec)
        except WireError as e:
            self._reject(topic, payload, e)
            return
        out = m.segment.run(msg.tensor)
        _, label, conf, entropy = decide(out.logits, m.threshold)
        reply = wire.encode_answer("cloud", msg.frame_id, label, conf, entropy, m.bundle.name, m.bundle.version)
        self.mqtt.publish(topics.node_topic(self.prefix, node, topics.ANSWER), reply, self._qos.answer)
        self.processed += 1
        self.metrics.frame(node, "answered", len(payload), time.perf_counter() - t0, (wire.now_us() - msg.sent_us) / 1e6)
        self.metrics.sent("answer", len(reply))
        if self.store is not None:
            end = spec.end_feature
            self.store.add(
                node=node, frame_id=msg.frame_id, bundle_name=m.bundle.name, bundle_version=m.bundle.version,
                sent_us=msg.sent_us, feature=msg.feature, feature_shape=spec.feature.shape,
                feature_scale=spec.feature.scale, feature_zero_point=spec.feature.zero_point,
                logits={"end": msg.exit_logits[0], "edge": msg.exit_logits[1], "cloud": out.logits},
                label=label, confidence=conf, entropy=entropy,
                end_feature=msg.end_feature, end_feature_shape=end.shape if msg.end_feature is not None else None,
                end_feature_encoding=spec.end_encoding, end_feature_scale=end.scale, end_feature_zero_point=end.zero_point)

    def _housekeeping(self) -> None:
        if self.store is not None:
            try:
                self.store.flush_if_due()
            except Exception as e:  # a full disk must not stop answering
                log.error("hard-example store write failed: %s", e)
            self.metrics.stored_rows(self.store.written - self._stored_reported)
            self._stored_reported = self.store.written
        if self.retrain is not None:
            self.retrain.tick(self.store.written if self.store is not None else 0)

    def run(self) -> int:
        from tierlite.service import wait_for_stop

        if self.config.metrics_port is not None:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_bind)
        self.mqtt.start()
        m = self._model
        log.info("cloud worker %s: %s v%d, store %s", self.config.worker_id, m.bundle.name, m.bundle.version,
                 self.store.path if self.store is not None else "off")
        wait_for_stop(self.stop_event, self._housekeeping, 0.1)
        self.mqtt.stop(final=[self._will()])
        if self.retrain is not None:
            self.retrain.close()
        if self.store is not None:
            self.store.close()
        log.info("cloud worker %s: %d frames, %d rejected messages", self.config.worker_id, self.processed, self.rejected)
        return 0
