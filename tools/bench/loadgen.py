"""Load generator: simulated camera nodes publishing real escalations over real MQTT.

Each simulated node is one MQTT connection (as a camera would hold), subscribed to its own
<prefix>/<node>/answer. Escalations are real FEATURE messages: the end segment run on real
frames, keeping the frames its exit is unsure of at the bundle's threshold (what a node really
sends), encoded once with tierlite.wire; each send patches a unique frame id and the send time
into the header. Sending is open-loop at an offered rate (a scheduler thread
that never waits for answers, so a slow system cannot slow the offered load and hide its own
latency), round-robin over the nodes. Latency = answer received - message sent, same clock.

The one load generator of the benchmarks: `tierlite bench fleet` and `tierlite bench runtime` both
drive it (tools/bench/fleet.py `measure_fleet`: rate steps, knee, batching on vs off).
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tierlite.tools.bench.report import latency_ms

# frame_id (uint32) and sent_us (uint64) sit right after these fields of tierlite.wire.TENSOR_HEADER
_ID_OFFSET = struct.calcsize("<2sBBBBBBII")
_ID_SENT = struct.Struct("<IQ")


def real_escalations(bundle, images: np.ndarray, runtime: str = "litert", threads: int = 1,
                     limit: int | None = None) -> list[bytes]:
    """FEATURE messages for the frames of `images` that the node really escalates (end exit unsure
    at the bundle's end threshold), at most `limit`: the real end segment's feature and exit logits,
    encoded with tierlite.wire exactly as a node sends them (frame id and time patched per send).
    If no frame is unsure (an easy data set), every frame is used, so the load still exists."""
    from tierlite.policy import decide
    from tierlite.segment import Segment
    from tierlite.wire import Kind, boundary_spec, encode_tensor_message

    end = Segment(bundle, "end", runtime=runtime, options={"threads": threads})
    spec = boundary_spec(bundle, Kind.FEATURE)
    threshold = bundle.thresholds.get("end", 1.0)
    unsure, every = [], []
    for img in images:
        o = end.run(img[None])
        message = encode_tensor_message(spec, 0, o.feature, [o.logits], sent_us=0)
        every.append(message)
        if not decide(o.logits, threshold)[0]:
            unsure.append(message)
        if limit is not None and len(unsure) >= limit:
            break
    return (unsure or every)[:limit]


class OpenLoopSchedule:
    """The send times of one open-loop rate window, shared by every load generator (MQTT here,
    HTTP in tools/bench/offload.py): message k is due at t0 + k / rate whatever the answers do, so
    a slow system cannot slow the offered load and hide its own latency. A sender that falls behind
    sends everything due at once and records how far behind it was (`behind_s`)."""

    def __init__(self, rate: float, total: int):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.total = total
        self.interval_ns = 1e9 / rate
        self.next = 0  # the next message to send
        self.behind_s = 0.0
        self.t0 = time.monotonic_ns()

    @property
    def done(self) -> bool:
        return self.next >= self.total

    def due_ns(self, k: int) -> int:
        """Scheduled send time of message k (time.monotonic_ns clock)."""
        return self.t0 + int(k * self.interval_ns)

    def wait_s(self) -> float:
        """Seconds until the next message is due; 0 when it is due (or late) now."""
        now = time.monotonic_ns()
        due = self.due_ns(self.next)
        if due > now:
            return (due - now) / 1e9
        self.behind_s = max(self.behind_s, (now - due) / 1e9)
        return 0.0

    def due(self) -> Iterator[tuple[int, int]]:
        """(k, scheduled send time) of every message due now, in order."""
        now = time.monotonic_ns()
        while self.next < self.total and self.due_ns(self.next) <= now:
            k = self.next
            self.next += 1
            yield k, self.due_ns(k)


@dataclass
class StepResult:
    """One offered-rate window."""
    offered_per_s: float
    duration_s: float
    sent: int
    answered: int
    lost: int
    duplicated: int
    rejected: int
    send_failures: int
    achieved_per_s: float  # answers received per second of the sending window
    latency: dict[str, Any]
    answered_by: dict[str, int] = field(default_factory=dict)  # tier name -> answers
    behind_s: float = 0.0  # how far the sender fell behind its schedule (load generator saturated)
    cpu_percent: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class FleetLoad:
    """N node connections to one broker, driven by one thread (paho's external-loop API, one
    selector over every socket): the sender and the answer reader never contend for the GIL, so the
    generator itself is not what saturates first. start() connects; step() runs one rate window."""

    def __init__(self, host: str, port: int, messages: list[bytes], nodes: int = 100,
                 prefix: str = "tierlite", node_prefix: str = "sim", qos: int = 0):
        if not messages:
            raise ValueError("no escalation messages to replay")
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.host, self.port, self.prefix, self.qos = host, port, prefix, qos
        self.messages = messages
        self.node_ids = [f"{node_prefix}-{i:04d}" for i in range(nodes)]
        self._clients: list[Any] = []
        self._sel = None
        self._sent_ns: dict[int, int] = {}
        self._answers: dict[int, int] = {}  # frame id -> receive time (first answer)
        self._dups = 0
        self._rejects = 0
        self._tiers: dict[str, int] = {}
        self._next_id = 1

    # -- connections ----------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        import selectors
        import socket

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from tierlite.topics import node_topic as topic

        self._sel = selectors.DefaultSelector()
        for node in self.node_ids:
            c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"tierlite-bench-{node}", protocol=paho.MQTTv5)
            c.max_inflight_messages_set(1000)
            c.max_queued_messages_set(0)
            c.on_message = self._on_message
            c.connect(self.host, self.port, keepalive=60, clean_start=True)
            c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.subscribe(topic(self.prefix, node, "answer"), self.qos)
            self._sel.register(c.socket(), selectors.EVENT_READ, c)
            self._clients.append(c)
        deadline = time.monotonic() + timeout
        while not all(c.is_connected() for c in self._clients):
            if time.monotonic() > deadline:
                raise TimeoutError(f"load generator: node connections not up within {timeout:.0f}s")
            self._pump(0.05)
        self._pump(0.3)  # subscription acknowledgements

    def stop(self) -> None:
        for c in self._clients:
            try:
                c.disconnect()
            except (OSError, ValueError):
                pass
        self._clients = []
        if self._sel is not None:
            self._sel.close()
            self._sel = None

    def _pump(self, timeout: float) -> None:
        """Read whatever arrived (up to `timeout` s), flush pending writes, keepalives."""
        for key, _ in self._sel.select(max(timeout, 0.0)):
            key.data.loop_read(100)
        for c in self._clients:
            if c.want_write():
                c.loop_write()

    def _on_message(self, client, userdata, message) -> None:
        from tierlite.wire import Kind, decode_answer

        now = time.monotonic_ns()
        try:
            a = decode_answer(message.payload)
        except Exception:  # a malformed answer counts as a reject; the generator never dies
            self._rejects += 1
            return
        if a.kind == Kind.REJECT:
            self._rejects += 1
        elif a.frame_id in self._answers:
            self._dups += 1
        elif a.frame_id in self._sent_ns:
            self._answers[a.frame_id] = now
            self._tiers[a.tier] = self._tiers.get(a.tier, 0) + 1

    # -- one window ----------------------------------------------------------------------------
    def step(self, rate: float, duration: float, drain: float = 2.0, max_messages: int | None = None,
             cpu_pids: dict[str, int] | None = None) -> StepResult:
        """Offer `rate` escalations/s for `duration` s (at most max_messages), then wait up to
        `drain` s for the last answers. Frame ids are unique across steps."""
        from tierlite.tools.bench.report import CpuMeter
        from tierlite.topics import node_topic as topic

        total = int(rate * duration)
        if max_messages is not None:
            total = min(total, max_messages)
        self._sent_ns, self._answers, self._dups, self._rejects, self._tiers = {}, {}, 0, 0, {}
        topics = [topic(self.prefix, n, "feature") for n in self.node_ids]
        bufs = [bytearray(m) for m in self.messages]
        n_nodes, n_msgs = len(self._clients), len(bufs)
        meter = CpuMeter(cpu_pids or {})
        meter.start()
        failures = 0
        last_misc = time.monotonic()
        schedule = OpenLoopSchedule(rate, total)
        while not schedule.done:
            wait = schedule.wait_s()
            if wait > 0:
                self._pump(wait)
                continue
            for k, _ in schedule.due():  # everything due: send it
                fid = self._next_id
                self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
                buf = bufs[k % n_msgs]
                _ID_SENT.pack_into(buf, _ID_OFFSET, fid, time.time_ns() // 1000)
                self._sent_ns[fid] = time.monotonic_ns()
                info = self._clients[k % n_nodes].publish(topics[k % n_nodes], bytes(buf), self.qos)
                failures += info.rc != 0
            self._pump(0)
            if time.monotonic() - last_misc > 1.0:
                for c in self._clients:
                    c.loop_misc()
                last_misc = time.monotonic()
        send_end = time.monotonic_ns()
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline and len(self._answers) + self._rejects < total:
            self._pump(0.01)
        cpu = meter.stop()
        lat = [(self._answers[f] - s) / 1e9 for f, s in self._sent_ns.items() if f in self._answers]
        answered = len(lat)
        in_window = sum(1 for r in self._answers.values() if r <= send_end)
        window = max((send_end - schedule.t0) / 1e9, 1e-9)
        return StepResult(
            offered_per_s=rate, duration_s=window, sent=total, answered=answered,
            lost=total - answered - self._rejects, duplicated=self._dups, rejected=self._rejects,
            send_failures=failures, achieved_per_s=in_window / window, latency=latency_ms(lat),
            answered_by=dict(self._tiers), behind_s=schedule.behind_s, cpu_percent=cpu)


def load_messages(bundle_path: str | Path, data: str | Path, frames: int, seed: int = 0,
                  runtime: str = "litert") -> tuple[Any, list[bytes]]:
    """(bundle, up to `frames` real escalations) from a stratified sample of `data` (4x as many frames
    are read, since the camera keeps most frames)."""
    from tierlite.bundle import Bundle
    from tierlite.data import load_image_folder

    bundle = Bundle.load(bundle_path)
    imgs = load_image_folder(data, size=tuple(bundle.input_shape[1:3]), limit=4 * frames, seed=seed)
    return bundle, real_escalations(bundle, imgs.images, runtime, limit=frames)
