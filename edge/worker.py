"""An edge worker: takes FEATURE messages from a shared subscription, runs the edge segment, answers
confident frames and escalates the rest to the cloud tier.

Work happens on paho's network thread: no queue hop, and backpressure is the broker's (several
worker processes split the load through $share/<group>/...). With `batch.max_size` > 1 (the
default) the messages already waiting on the socket run as one batch (MessageBatcher,
`on_feature_batch`: one interpreter call, vectorised decode/decide/encode, one write for the
replies); a lone message still runs at once. `batch.max_size: 1` takes one message at a time.
Bad input is dropped, counted (tierlite_rejected_messages_total) and logged, and the node gets a REJECT when
the header is readable, so it answers locally at once.

Run by the gateway as `python -m tierlite.edge.worker --config edge.yaml --index N`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from tierlite import topics, wire
from tierlite.bundle import Bundle
from tierlite.config import EdgeConfig
from tierlite.errors import WireError
from tierlite.mqtt import Message, MqttClient, default_client_id
from tierlite.policy import decide, decide_batch
from tierlite.ratelimit import KeyedBuckets, LogThrottle
from tierlite.segment import Segment, TierModel
from tierlite.tierworker import TierWorker

__all__ = ["EdgeWorker", "main"]

log = logging.getLogger("tierlite.edge.worker")


class EdgeWorker(TierWorker):
    tier, consumes = "edge", "feature"

    def __init__(self, config: EdgeConfig, index: int = 0, bundle: Bundle | None = None,
                 runtime_options: dict | None = None):
        super().__init__(config.prefix, config.broker.qos, f"{config.gateway_id}-w{index}",
                         topics.gateway_worker(config.prefix, config.gateway_id, index))
        self.config = config
        self.index = index
        self.options = {"threads": config.threads, **(runtime_options or {})}
        self.metrics.configure_labels(config.metrics_labels.nodes, config.metrics_labels.max_nodes)
        nb = config.node_budget  # per node, in each worker (see NodeBudgetConfig)
        self._budget = KeyedBuckets(nb.rate, nb.burst, nb.max_nodes) if nb.enabled else None
        self.over_budget = 0
        self._budget_log = LogThrottle(10.0)
        bundle = bundle or Bundle.load(config.bundle)
        self.updates = None  # signed model updates (tierlite.update), with an `update:` section
        if config.update is not None and config.update.enabled:
            from tierlite.update import UpdateManager
            own = config.update.model_copy(update={"state_dir": str(Path(config.update.state_dir) / f"worker-{index}")})
            self.updates = UpdateManager(
                own, f"{config.gateway_id}-w{index}", ["edge"], swap=lambda b, segments: self.swap_bundle(b),
                prefix=self.prefix, segment_factory=lambda b, tier: Segment(b, tier, config.runtime, self.options, True))
            bundle = self.updates.startup(bundle)
        self._model = self._load(bundle)
        self.mqtt = MqttClient(config.broker, default_client_id("edge", self.worker_id),
                               will=self._will(), on_connect=self._on_connect)
        share = config.share_group if config.broker.protocol == "5" else None
        handler = self._batcher(self.on_feature_batch, self.on_feature, config.batch)
        self.mqtt.subscribe(topics.node_filter(self.prefix, topics.FEATURE).shared(share), handler,
                            self._qos.feature)
        if self.updates is not None:
            self.updates.attach(self.mqtt)

    def _load(self, bundle: Bundle) -> TierModel:
        model = TierModel.load(bundle, "edge", self.config.runtime, self.options, self.config.threshold)
        model.segment.prepare_batches(self.config.batch.max_size)  # before traffic: no batch waits for one
        return model

    def _status_fields(self) -> dict:
        return {"threshold": self._model.threshold}

    # -- message path ------------------------------------------------------------------------
    def on_feature(self, topic: str, payload: bytes) -> None:
        t0 = time.perf_counter()
        m = self._model
        try:
            node = topics.node_of(topic, self.prefix)
            if self._budget is not None and not self._budget.allow(node):
                self._over_budget(node, payload)
                return
            msg = wire.decode_tensor_message(payload, m.spec_in)
        except WireError as e:
            self._reject(topic, payload, e)
            return
        q = msg.tensor
        out = m.segment.run(q)
        confident, label, conf, entropy = decide(out.logits, m.threshold)
        if self.updates is not None and not msg.audit:
            self.updates.observe("edge", q, out.logits, escalated=not confident)
        if msg.audit:  # the node answered it already: on to the cloud for scoring, nothing back (issue 13)
            reply = b""
            if m.spec_out is not None:
                reply = wire.encode_tensor_message(
                    m.spec_out, msg.frame_id, out.feature, [msg.exit_logits[0], out.logits], sent_us=msg.sent_us,
                    end_feature=msg.feature if self.config.forward_end_feature else None, audit=True)
                self.mqtt.publish(topics.node_topic(self.prefix, node, topics.ESCALATE), reply, self._qos.escalate)
            outcome, kind = "audited", "escalate"
        elif confident:
            reply = wire.encode_answer("edge", msg.frame_id, label, conf, entropy, m.bundle.name, m.bundle.version)
            self.mqtt.publish(topics.node_topic(self.prefix, node, topics.ANSWER), reply, self._qos.answer)
            outcome, kind = "answered", "answer"
        else:
            reply = wire.encode_tensor_message(
                m.spec_out, msg.frame_id, out.feature, [msg.exit_logits[0], out.logits], sent_us=msg.sent_us,
                end_feature=msg.feature if self.config.forward_end_feature else None)
            self.mqtt.publish(topics.node_topic(self.prefix, node, topics.ESCALATE), reply, self._qos.escalate)
            outcome, kind = "escalated", "escalate"
        self.processed += 1
        self.metrics.frame(node, outcome, len(payload), time.perf_counter() - t0,
                           (wire.now_us() - msg.sent_us) / 1e6)
        self.metrics.sent(kind, len(reply))

    def on_feature_batch(self, items: list[tuple[str, bytes]]) -> None:
        """What on_feature does, for a batch of (topic, payload): the same outcome and reply per
        message, with one segment call, vectorised decode, decision and encode, and one write."""
        t0 = time.perf_counter()
        m = self._model
        nodes, received, payloads = [], [], []
        for topic, payload in items:
            try:
                node = topics.node_of(topic, self.prefix)
            except WireError as e:
                self._reject(topic, payload, e)
                continue
            if self._budget is not None and not self._budget.allow(node):
                self._over_budget(node, payload)
                continue
            nodes.append(node)
            received.append(topic)
            payloads.append(payload)
        if not payloads:
            return
        batch = self._decode_batch(m.spec_in, received, payloads)
        if batch is None:
            return
        n = len(batch)
        out = m.segment.run_batch(batch.tensor)
        confident, label, conf, entropy = decide_batch(out.logits, m.threshold)
        audit = batch.audit
        # Audits go on to the cloud for scoring, nothing back to the node (issue 13); unsure frames escalate.
        up = [r for r in range(n) if (audit[r] and m.spec_out is not None) or (not audit[r] and not confident[r])]
        replies: list[tuple[str, bytes, int]] = []
        kinds: list[str | None] = [None] * n  # reply kind and size per row, for the metrics
        sizes = [0] * n
        if up:
            escalations = wire.encode_tensor_batch(
                m.spec_out, [batch.frame_id[r] for r in up], out.feature[up], [batch.exit_logits[0][up], out.logits[up]],
                [batch.sent_us[r] for r in up],
                [batch.feature[r] for r in up] if self.config.forward_end_feature else None, [audit[r] for r in up])
            for r, message in zip(up, escalations):
                replies.append((topics.node_topic(self.prefix, nodes[batch.index[r]], topics.ESCALATE), message,
                                self._qos.escalate))
                kinds[r], sizes[r] = "escalate", len(message)
        b = m.bundle
        for r in range(n):
            if not audit[r] and confident[r]:
                answer = wire.encode_answer("edge", batch.frame_id[r], int(label[r]), float(conf[r]),
                                            float(entropy[r]), b.name, b.version)
                replies.append((topics.node_topic(self.prefix, nodes[batch.index[r]], topics.ANSWER), answer,
                                self._qos.answer))
                kinds[r], sizes[r] = "answer", len(answer)
        self._publish_replies(replies)
        if self.updates is not None:
            for r in range(n):
                if not audit[r]:
                    self.updates.observe("edge", batch.tensor[r:r + 1], out.logits[r], escalated=not confident[r])
        self.processed += n
        share = (time.perf_counter() - t0) / n  # each message's share of the batch's time
        now = wire.now_us()
        for r in range(n):
            i = batch.index[r]
            outcome = "audited" if audit[r] else "answered" if confident[r] else "escalated"
            self.metrics.frame(nodes[i], outcome, len(payloads[i]), share, (now - batch.sent_us[r]) / 1e6)
            if kinds[r] is not None:
                self.metrics.sent(kinds[r], sizes[r])

    def _over_budget(self, node: str, payload: bytes) -> None:
        """Over the node's escalation budget: no decode, no segment; a REJECT (reason budget) so
        the node answers with its own exit at once. Counted per node, logged throttled."""
        self.over_budget += 1
        self.metrics.budget_reject(node)
        self.metrics.reject("budget")
        self._budget_log.log(log, logging.WARNING, "budget", "edge worker %s: node %s over its escalation budget "
                             "(%d refused so far)", self.worker_id, node[:64], self.over_budget)
        peek = wire.peek_frame(payload)
        if peek is None or payload[5] & wire.FLAG_AUDIT:  # an audit: the node waits for nothing (issue 13)
            return
        b = self._model.bundle
        reply = wire.encode_reject(self.tier, peek[1], wire.wire_error("budget", "over budget"), b.name, b.version)
        self.mqtt.send(Message(topics.node_topic(self.prefix, node, topics.ANSWER), reply, self._qos.answer))
        self.metrics.sent("reject", len(reply))

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.mqtt.start()

    def run(self) -> int:
        from tierlite.service import wait_for_stop

        self.start()
        m = self._model
        log.info("edge worker %s: %s v%d, edge threshold %.3f, %s", self.worker_id, m.bundle.name,
                 m.bundle.version, m.threshold, "escalating to the cloud tier" if m.spec_out else "no cloud tier")
        wait_for_stop(self.stop_event)
        if self.batcher is not None:
            self.batcher.stop()
        log.info("edge worker %s: %d frames, %d rejected messages", self.worker_id, self.processed, self.rejected)
        if self.updates is not None:
            self.updates.close()
        self.mqtt.stop(final=[self._will()])
        return 0


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
