"""What the edge and cloud workers share: the current model (swapped atomically between two
messages), counters and metrics, the drop-count-log-REJECT path for bad network input, and the
retained online/offline status. Each worker adds its own `_load` and message handler."""
from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from tierlite import topics, wire
from tierlite.bundle import Bundle
from tierlite.errors import WireError
from tierlite.metrics import TierMetrics
from tierlite.mqtt import Message
from tierlite.ratelimit import LogThrottle
from tierlite.segment import TierModel

__all__ = ["TierWorker"]

log = logging.getLogger("tierlite.tierworker")


class TierWorker:
    tier = ""     # "edge" or "cloud": the tier that answers, in replies and metrics
    consumes = ""  # what arrives, for log lines: "feature" / "escalation"

    def __init__(self, prefix: str, qos, worker_id: str, status_topic: str):
        self.prefix = prefix
        self._qos = qos
        self.worker_id = worker_id
        self._status_topic = status_topic
        self.metrics = TierMetrics(self.tier)
        self.stop_event = threading.Event()
        self.processed = 0
        self.rejected = 0
        self._reject_log = LogThrottle(10.0)  # one line per reason per 10 s, with the count held back
        self._model: TierModel | None = None  # set by the subclass from its `_load`
        self.mqtt: Any = None

    def _load(self, bundle: Bundle) -> TierModel:
        raise NotImplementedError

    def _status_fields(self) -> dict[str, Any]:
        """Extra fields of the online status (e.g. the threshold in force)."""
        return {}

    @property
    def bundle(self) -> Bundle:
        return self._model.bundle

    def swap_bundle(self, bundle: Bundle) -> None:
        """Replace the model between two messages (same contract as DeviceDaemon.swap_bundle)."""
        new = self._load(bundle)
        old, self._model = self._model, new
        log.info("%s model swapped: %s v%d -> %s v%d", self.tier, old.bundle.name, old.bundle.version,
                 bundle.name, bundle.version)
        self._on_connect()

    def _reject(self, topic: str, payload: bytes, err: WireError) -> None:
        """A message we cannot use: count it, log the first ones, and tell the node when we can."""
        self.rejected += 1
        self.metrics.reject(wire.reason_of(err))
        self._reject_log.log(log, logging.WARNING, wire.reason_of(err), "%s worker: dropped %s on %s "
                             "(%d dropped so far): %s", self.tier, self.consumes, topic[:100], self.rejected, err)
        reject = self._reject_reply(topic, payload, err)
        if reject is not None:
            self.mqtt.send(reject)
            self.metrics.sent("reject", len(reject.payload))

    def _reject_reply(self, topic: str, payload: bytes, err: WireError) -> Message | None:
        """A REJECT for the node when the header and topic still say which node and frame it was
        and the reason is one the node should act on; None when there is no one to tell."""
        peek = wire.peek_frame(payload)
        if peek is None or wire.reason_of(err) not in wire.REJECT_REASONS_WORTH_ANSWERING:
            return None
        try:
            node = topics.node_of(topic, self.prefix)
        except WireError:
            return None
        b = self._model.bundle
        return Message(topics.node_topic(self.prefix, node, topics.ANSWER),
                       wire.encode_reject(self.tier, peek[1], err, b.name, b.version), self._qos.answer)

    def _status(self, state: str) -> bytes:
        doc: dict[str, Any] = {"worker": self.worker_id, "state": state}
        if state == "online":
            b = self._model.bundle
            doc.update(pid=os.getpid(), model=b.name, model_version=b.version, **self._status_fields())
        return json.dumps(doc).encode()

    def _will(self) -> Message:
        return Message(self._status_topic, self._status("offline"), 1, True)

    def _on_connect(self) -> None:
        self.mqtt.publish(self._status_topic, self._status("online"), 1, retain=True)

    def stop(self) -> None:
        self.stop_event.set()
