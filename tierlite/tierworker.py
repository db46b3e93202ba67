"""What the edge and cloud workers share: the current model (swapped atomically between two
messages), counters and metrics, the drop-count-log-REJECT path for bad network input, the
retained online/offline status, and dynamic batching (`MessageBatcher`). Each worker adds its own
`_load` and message handlers (one message, and a batch)."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable

from tierlite import topics, wire
from tierlite.bundle import Bundle
from tierlite.errors import WireError
from tierlite.metrics import TierMetrics
from tierlite.mqtt import Message
from tierlite.ratelimit import LogThrottle
from tierlite.segment import TierModel

__all__ = ["MessageBatcher", "TierWorker"]

log = logging.getLogger("tierlite.tierworker")


class MessageBatcher:
    """Dynamic batching on paho's network thread (issue 15), with no thread hop and no timer on the
    way: each message joins the batch, and the batch runs as soon as no more input waits on the
    socket - so a lone message runs at once, never held back for a window - or when it holds
    `max_size` messages, or when its oldest has waited `max_wait_s` while input kept arriving.
    Under load, what arrived while the last batch ran is already on the socket: batches grow with
    the load by themselves. A watcher thread (`start`) runs a batch left behind when the input that
    was waiting turned out not to be for this handler (a ping, another topic); it sleeps while
    nothing is left waiting, so an idle or lightly loaded worker pays no timer."""

    def __init__(self, handle: Callable[[list[tuple[str, bytes]]], None], max_size: int, max_wait_s: float,
                 more_waiting: Callable[[], bool]):
        self._handle, self.max_size, self.max_wait_s = handle, max_size, max_wait_s
        self._more_waiting = more_waiting
        self._items: list[tuple[str, bytes]] = []
        self._first = 0.0
        self._lock = threading.Lock()  # the handler never runs twice at once (paho thread vs watcher)
        self._left = threading.Event()  # set while a batch waits for more input
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.batches = 0
        self.messages = 0

    def start(self) -> None:
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="batch-watcher", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self._left.set()
        self.flush()

    def _watch(self) -> None:
        check = max(self.max_wait_s, 0.01)  # a safety net, not the usual path: no need to be prompt
        while not self._stop.is_set():
            if not self._left.wait(1.0):
                continue
            self._stop.wait(check)
            with self._lock:
                try:
                    if self._items and time.monotonic() - self._first >= self.max_wait_s:
                        self._run()
                except Exception:  # as MqttClient's guard on paho's thread: one bad batch never stops the watcher
                    log.exception("batch handler failed")
                if not self._items:
                    self._left.clear()

    def add(self, topic: str, payload: bytes) -> None:
        with self._lock:
            items = self._items
            if not items:
                self._first = time.monotonic()
            items.append((topic, payload))
            if (len(items) < self.max_size and time.monotonic() - self._first < self.max_wait_s
                    and self._more_waiting()):
                if not self._left.is_set():
                    self._left.set()
                return
            self._run()

    def flush(self) -> None:
        """Run whatever is waiting now (shutdown)."""
        with self._lock:
            if self._items:
                self._run()

    def _run(self) -> None:
        items, self._items = self._items, []
        self.batches += 1
        self.messages += len(items)
        self._handle(items)

    @property
    def mean_size(self) -> float | None:
        return self.messages / self.batches if self.batches else None


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
        self.batcher: MessageBatcher | None = None  # set by `_batcher` when batching is on

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

    def _batcher(self, handle_batch, handle_one, config) -> Any:
        """The MQTT handler for this worker's input: `handle_one` per message when batching is off
        (batch.max_size 1), else a MessageBatcher feeding `handle_batch` (kept in self.batcher)."""
        self.batcher = None
        if config.max_size <= 1:
            return handle_one
        def handle(items: list[tuple[str, bytes]]) -> None:
            # A batch of one (a lightly loaded worker) takes the one-message path: cheaper than numpy
            # on one row, and the same outcome.
            if len(items) == 1:
                handle_one(*items[0])
            else:
                handle_batch(items)

        self.batcher = MessageBatcher(handle, config.max_size, config.max_wait_ms / 1000.0,
                                      lambda: self.mqtt.input_waiting())
        self.batcher.start()
        return self.batcher.add

    def _decode_batch(self, spec, topics_in: list[str], payloads: list[bytes]) -> "wire.TensorBatch | None":
        """A batch's payloads decoded together; each bad one dropped, counted and answered with a
        REJECT as in the one-message path. None when none is usable."""
        batch, errors = wire.decode_tensor_batch(payloads, spec)
        for i, e in errors:
            self._reject(topics_in[i], payloads[i], e)
        return batch if len(batch) else None

    def _publish_replies(self, replies: list[tuple[str, bytes, int]]) -> None:
        """A batch's replies: the QoS-0 ones as one write (MqttClient.publish_batch), others one by one."""
        plain = [(t, p) for t, p, q in replies if q == 0]
        if plain:
            self.mqtt.publish_batch(plain)
        for t, p, q in replies:
            if q != 0:
                self.mqtt.publish(t, p, q)

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
            sender = topics.sender_of(topic, self.prefix)  # a site's node hears back on its own site
        except WireError:
            return None
        b = self._model.bundle
        return Message(sender.topic(self.prefix, topics.ANSWER),
                       wire.encode_reject(self.tier, peek[1], err, b.name, b.version), self._qos.answer)

    def _status(self, state: str) -> bytes:
        doc: dict[str, Any] = {"worker": self.worker_id, "state": state}
        if state == "online":
            b = self._model.bundle
            doc.update(pid=os.getpid(), model=b.name, model_version=b.version, **self._status_fields())
            if self.batcher is not None:
                doc["batch"] = {"max_size": self.batcher.max_size, "max_wait_ms": self.batcher.max_wait_s * 1000}
        return json.dumps(doc).encode()

    def _will(self) -> Message:
        return Message(self._status_topic, self._status("offline"), 1, True)

    def _on_connect(self) -> None:
        self.mqtt.publish(self._status_topic, self._status("online"), 1, retain=True)

    def stop(self) -> None:
        self.stop_event.set()
