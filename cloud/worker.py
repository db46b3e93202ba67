"""The cloud worker: ESCALATE messages in (shared subscription), final segment, ANSWER back to the
node, and every escalated frame into the hard-example store."""
from __future__ import annotations

import json
import logging
import time

from tierlite import topics, wire
from tierlite.bundle import Bundle
from tierlite.config import CloudConfig
from tierlite.errors import WireError
from tierlite.mqtt import MqttClient, default_client_id
from tierlite.policy import decide, decide_batch
from tierlite.segment import SegmentOutput, TierModel
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
        self.metrics.configure_labels(config.metrics_labels.nodes, config.metrics_labels.max_nodes)
        self._model = self._load(bundle or Bundle.load(config.bundle))
        self.store = store if store is not None else (
            HardExampleStore.from_config(config.store) if config.store.enabled else None)
        self._stored_reported = 0
        self._events_reported: dict[str, int] = {}
        self.mqtt = MqttClient(config.broker, default_client_id("cloud", config.worker_id),
                               will=self._will(), on_connect=self._on_connect)
        share = config.share_group if config.broker.protocol == "5" else None
        handler = self._batcher(self.on_escalate_batch, self.on_escalate, config.batch)  # dynamic batching (issue 15)
        # One pool for every site: <prefix>/<node>/escalate, and <prefix>/<site>/<node>/escalate from site bridges.
        for escalations in (topics.node_filter(self.prefix, topics.ESCALATE),
                            topics.site_node_filter(self.prefix, topics.ESCALATE)):
            self.mqtt.subscribe(escalations.shared(share), handler, self._qos.escalate)
        # Audits and drift (issue 13): every worker sees every node's retained drift event.
        self.audits: dict = {}  # node -> AgreementWindow
        self.drift: dict[str, dict] = {}  # node -> its latest drift event
        self._status_due = 0.0
        self.mqtt.subscribe(topics.node_filter(self.prefix, topics.DRIFT), self.on_drift, 1)
        self.retrain = None  # co-updating (tierlite.cloud.retrain), with a `retrain:` section
        if config.retrain is not None:
            from tierlite.cloud.retrain import RetrainScheduler
            self.retrain = RetrainScheduler(config, self.mqtt, self.store)

    def _load(self, bundle: Bundle) -> TierModel:
        model = TierModel.load(bundle, "cloud", self.config.runtime, {"threads": self.config.threads})
        model.segment.prepare_batches(self.config.batch.max_size)  # before traffic: no batch waits for one
        return model

    def on_escalate(self, topic: str, payload: bytes) -> None:
        t0 = time.perf_counter()
        m = self._model
        spec = m.spec_in
        try:
            sender = topics.sender_of(topic, self.prefix)  # the answer goes back to its site only
            node = sender.key
            msg = wire.decode_tensor_message(payload, spec)
        except WireError as e:
            self._reject(topic, payload, e)
            return
        out = m.segment.run(msg.tensor)
        _, label, conf, entropy = decide(out.logits, m.threshold)
        if msg.audit:  # answered by the node already: score it, store it, send nothing back
            self._score_audit(node, int(msg.exit_logits[0].argmax()) == label, label)
            self.processed += 1
            self.metrics.frame(node, "audited", len(payload), time.perf_counter() - t0,
                               (wire.now_us() - msg.sent_us) / 1e6)
            self._store(node, m, spec, msg, out, label, conf, entropy)
            return
        reply = wire.encode_answer("cloud", msg.frame_id, label, conf, entropy, m.bundle.name, m.bundle.version)
        self.mqtt.publish(sender.topic(self.prefix, topics.ANSWER), reply, self._qos.answer)
        self.processed += 1
        self.metrics.frame(node, "answered", len(payload), time.perf_counter() - t0, (wire.now_us() - msg.sent_us) / 1e6)
        self.metrics.sent("answer", len(reply))
        self._store(node, m, spec, msg, out, label, conf, entropy)

    def on_escalate_batch(self, items: list[tuple[str, bytes]]) -> None:
        """What on_escalate does, for a batch of (topic, payload): one segment call, vectorised
        decode and decision, the answers in one write; each frame stored and scored as before."""
        t0 = time.perf_counter()
        m = self._model
        spec = m.spec_in
        senders, received, payloads = [], [], []
        for topic, payload in items:
            try:
                senders.append(topics.sender_of(topic, self.prefix))  # the answer goes back to its site only
            except WireError as e:
                self._reject(topic, payload, e)
                continue
            received.append(topic)
            payloads.append(payload)
        if not payloads:
            return
        batch = self._decode_batch(spec, received, payloads)
        if batch is None:
            return
        n = len(batch)
        out = m.segment.run_batch(batch.tensor)
        _, label, conf, entropy = decide_batch(out.logits, m.threshold)
        replies = []
        for r in range(n):
            if not batch.audit[r]:
                replies.append((senders[batch.index[r]].topic(self.prefix, topics.ANSWER),
                                wire.encode_answer("cloud", batch.frame_id[r], int(label[r]), float(conf[r]),
                                                   float(entropy[r]), m.bundle.name, m.bundle.version),
                                self._qos.answer))
        self._publish_replies(replies)
        self.processed += n
        share = (time.perf_counter() - t0) / n  # each message's share of the batch's time
        now = wire.now_us()
        for r in range(n):
            i = batch.index[r]
            node = senders[i].key
            if batch.audit[r]:  # answered by the node already: score it, store it, send nothing back
                self._score_audit(node, int(batch.exit_logits[0][r].argmax()) == int(label[r]), int(label[r]))
            else:
                self.metrics.sent("answer", wire.ANSWER_STRUCT.size)
            self.metrics.frame(node, "audited" if batch.audit[r] else "answered", len(payloads[i]), share,
                               (now - batch.sent_us[r]) / 1e6)
            if self.store is not None:
                self._store(node, m, spec, batch.message(r), SegmentOutput(None, out.logits[r]), int(label[r]),
                            float(conf[r]), float(entropy[r]))

    def _store(self, node, m, spec, msg, out, label, conf, entropy) -> None:
        if self.store is not None:
            end = spec.end_feature
            self.store.add(
                node=node, frame_id=msg.frame_id, bundle_name=m.bundle.name, bundle_version=m.bundle.version,
                sent_us=msg.sent_us, feature=msg.feature, feature_shape=spec.feature.shape,
                feature_scale=spec.feature.scale, feature_zero_point=spec.feature.zero_point,
                logits={"end": msg.exit_logits[0], "edge": msg.exit_logits[1], "cloud": out.logits},
                label=label, confidence=conf, entropy=entropy,
                end_feature=msg.end_feature, end_feature_shape=end.shape if msg.end_feature is not None else None,
                end_feature_encoding=spec.end_encoding, end_feature_scale=end.scale, end_feature_zero_point=end.zero_point,
                audit=msg.audit)

    # -- audits and drift (issue 13, docs/DRIFT.md) -------------------------------------------------
    def _score_audit(self, node: str, agree: bool, teacher_label: int | None = None) -> None:
        from tierlite.drift import REFERENCE_KEY, AgreementWindow, agreement_fall

        w = self.audits.get(node)
        if w is None:
            w = self.audits[node] = AgreementWindow(self.config.audit_window,
                                                    self._model.bundle.manifest.get(REFERENCE_KEY))
        w.add(agree, teacher_label)
        est = w.estimate()
        self.metrics.audit(node, est)
        why = agreement_fall(est, self.config.audit_min_frames, self.config.audit_min_agreement)
        if self.retrain is not None and why is not None:  # None too while the teacher itself is suspect
            self.retrain.request(f"node {node}: {why}")

    def on_drift(self, topic: str, payload: bytes) -> None:
        try:
            node = topics.node_of(topic, self.prefix)
            event = json.loads(payload) if payload else {}
        except (WireError, ValueError):
            return
        if not isinstance(event, dict):
            return
        alarm = bool(event.get("alarm"))
        was = bool(self.drift.get(node, {}).get("alarm"))
        self.drift[node] = event
        self.metrics.drift(node, alarm)
        if alarm and not was:
            log.warning("node %s reports drift (%s)", node, ", ".join(event.get("triggered") or []) or "?")
            if self.retrain is not None:
                self.retrain.request(f"node {node}: drift alarm ({', '.join(event.get('triggered') or [])})")

    def _status_fields(self) -> dict:
        fields = {"audits": {n: w.estimate() for n, w in list(self.audits.items())},
                  "drift": {n: {k: e.get(k) for k in ("alarm", "scores", "triggered", "model_version")}
                            for n, e in list(self.drift.items())}}
        if self.retrain is not None:  # a requested run waiting for hard examples says so here
            fields["retrain"] = self.retrain.status()
        return fields

    def _housekeeping(self) -> None:
        now = time.monotonic()
        waiting = self.retrain is not None and self.retrain.pending is not None
        if now >= self._status_due and (self.audits or self.drift or waiting) and self.mqtt.connected:
            self._status_due = now + 5.0
            self._on_connect()  # the retained status, with the audit and drift figures
        if self.store is not None:
            try:
                self.store.flush_if_due()
            except Exception as e:  # a full disk must not stop answering
                log.error("hard-example store write failed: %s", e)
            self.metrics.stored_rows(self.store.written - self._stored_reported)
            self._stored_reported = self.store.written
            for event, n in getattr(self.store, "events", {}).items():
                if n != self._events_reported.get(event, 0):
                    self.metrics.store_event(event, n - self._events_reported.get(event, 0))
                    self._events_reported[event] = n
        if self.retrain is not None:
            self.retrain.tick(self.store.written if self.store is not None else 0)
            self.metrics.retrain(self.retrain.status())

    def run(self) -> int:
        from tierlite.service import wait_for_stop

        if self.config.metrics_port is not None:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_bind)
        self.mqtt.start()
        m = self._model
        log.info("cloud worker %s: %s v%d, store %s", self.config.worker_id, m.bundle.name, m.bundle.version,
                 self.store.path if self.store is not None else "off")
        wait_for_stop(self.stop_event, self._housekeeping, 0.1)
        if self.batcher is not None:
            self.batcher.stop()
        self.mqtt.stop(final=[self._will()])
        if self.retrain is not None:
            self.retrain.close()
        if self.store is not None:
            self.store.close()
        log.info("cloud worker %s: %d frames, %d rejected messages", self.config.worker_id, self.processed, self.rejected)
        return 0
