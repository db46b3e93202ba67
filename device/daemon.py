"""The camera-node daemon: end segment + exit decision on every frame, escalation over MQTT for
unsure frames, exactly one result event per frame.

Threads: the frame loop (caller's thread) runs the model and publishes; paho's network thread
delivers answers; a reaper thread applies deadlines. A frame is resolved exactly once, by whoever
pops it from `_pending` first (answer, reject, deadline, disconnect); late answers are counted and
ignored. The model lives in one `TierModel` object that `swap_bundle()` replaces between frames.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tierlite import topics, wire
from tierlite.bundle import Bundle
from tierlite.config import DeviceConfig
from tierlite.drift import AuditSampler, DriftMonitor
from tierlite.errors import ConfigError, WireError
from tierlite.homeassistant import HomeAssistantOptions, HomeAssistantPublisher
from tierlite.linkstate import LinkFollower
from tierlite.metrics import NodeMetrics
from tierlite.mqtt import Message, MqttClient, default_client_id
from tierlite.policy import decide
from tierlite.segment import Segment, TierModel

__all__ = ["DeviceDaemon", "DeviceStats"]

log = logging.getLogger("tierlite.device")

STATUS_INTERVAL_S = 30.0


@dataclass
class _Pending:
    frame_id: int
    t0: float
    deadline: float
    decision_s: float
    label: int
    confidence: float
    entropy: float
    model: TierModel
    ref: str | None
    bytes_up: int


@dataclass
class DeviceStats:
    frames: int = 0
    by_tier: dict[str, int] = field(default_factory=lambda: {"end": 0, "edge": 0, "cloud": 0})
    fallbacks: dict[str, int] = field(default_factory=dict)
    bytes_up: int = 0
    late_answers: int = 0
    bad_answers: int = 0
    audits: int = 0  # confident frames also sent up as audits
    audit_bytes: int = 0


class DeviceDaemon:
    """One camera node. `run()` serves frames from the configured source until it ends or `stop()`."""

    def __init__(self, config: DeviceConfig, bundle: Bundle | None = None,
                 runtime: str | None = None, runtime_options: dict | None = None):
        self.config = config
        self.runtime = runtime or config.runtime
        self.runtime_options = {"threads": config.threads, **(runtime_options or {})}
        self.node = config.node_id
        self.prefix = config.prefix
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: dict[int, _Pending] = {}  # insertion order = deadline order
        self._next_frame = 0
        self.stop_event = threading.Event()
        self.stats = DeviceStats()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._results_file = _open_results(config.results_file) if config.results_file else None
        bundle = bundle or Bundle.load(config.bundle)
        self.updates = None  # signed model updates (tierlite.update), with an `update:` section
        if config.update is not None and config.update.enabled:
            from tierlite.update import UpdateManager
            self.updates = UpdateManager(
                config.update, self.node, ["end"], swap=lambda b, segments: self.swap_bundle(b), prefix=self.prefix,
                segment_factory=lambda b, tier: Segment(b, tier, self.runtime, self.runtime_options, fallback=True))
            bundle = self.updates.startup(bundle)  # a kept newer version survives restarts
        self._model = self._load(bundle)
        # Exit threshold that follows the link (tierlite.linkstate), when `adaptive` is enabled.
        self.adaptive = LinkFollower.for_bundle(config.adaptive, bundle.manifest, self._model.threshold)
        self._rng = random.Random()
        d = config.drift
        self._audits = AuditSampler(config.audit_rate, d.alarm_audit_rate, d.alarm_audit_floor)
        self._drift = self._drift_monitor(bundle)
        self._topics = {k: topics.node_topic(self.prefix, self.node, k) for k in topics.NODE_SUFFIXES}
        qos = config.broker.qos
        self._qos = qos
        offline = json.dumps({"node": self.node, "state": "offline", "reason": "connection lost"}).encode()
        self.mqtt = MqttClient(config.broker, default_client_id("device", self.node),
                               will=Message(self._topics[topics.STATUS], offline, qos.status, True),
                               on_connect=self._on_connect, on_disconnect=self._on_disconnect)
        self.mqtt.subscribe(self._topics[topics.ANSWER], self._on_answer, qos.answer)
        if self.updates is not None:
            self.updates.attach(self.mqtt)
        self._integrations(config)
        self._reaper = threading.Thread(target=self._reap, name="deadline-reaper", daemon=True)

    # -- model ----------------------------------------------------------------------------------
    def _load(self, bundle: Bundle) -> TierModel:
        return TierModel.load(bundle, "end", self.runtime, self.runtime_options, self.config.threshold)

    @property
    def bundle(self) -> Bundle:
        return self._model.bundle

    def swap_bundle(self, bundle: Bundle) -> None:
        """Replace the model between two frames (atomic: the frame loop reads `_model` once per
        frame). Loads the new end segment first; on any error the current model keeps running and
        the error propagates. Frames already escalated finish under the model that sent them."""
        new = self._load(bundle)
        old, self._model = self._model, new
        self.adaptive = LinkFollower.for_bundle(self.config.adaptive, bundle.manifest, new.threshold)
        in_alarm = self._drift is not None and self._drift.state.alarm
        self._drift = self._drift_monitor(bundle)  # the new version's reference statistics
        log.info("model swapped: %s v%d -> %s v%d", old.bundle.name, old.bundle.version, bundle.name, bundle.version)
        if in_alarm and self._drift is not None:  # the retained alarm was the old version's: say the new one starts clear
            self._publish_drift()
        self.publish_status()

    def add_result_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """fn(event) for every result event, called on the thread that resolved the frame."""
        self._listeners.append(fn)

    # -- frame path ------------------------------------------------------------------------------
    def process_frame(self, image: np.ndarray, ref: str | None = None) -> None:
        m = self._model
        t0 = time.perf_counter()
        out = m.segment.run(image[None] if image.ndim == 3 else image)
        follower = self.adaptive
        confident, label, conf, entropy = decide(out.logits, self._threshold(m))
        decision_s = time.perf_counter() - t0
        self._audits.observe(confident)
        if self.updates is not None:
            self.updates.observe("end", image, out.logits, escalated=not confident)
        with self._lock:
            frame_id = self._next_frame
            self._next_frame = (self._next_frame + 1) & 0xFFFFFFFF
        if confident:
            self._emit(m, frame_id, "end", label, conf, entropy, t0, decision_s, ref, 0, None)
            self._after_confident(m, frame_id, out, image)  # after the result: an audit never delays it
            return
        if self._drift is not None:
            self._observe_drift(out, image)
        reason = None
        if not self.mqtt.connected:
            reason = "offline"
        elif len(self._pending) >= self.config.max_pending:
            reason = "backlog"
        if follower is not None:
            follower.observe_backlog(len(self._pending))
        if reason:
            self._emit(m, frame_id, "end", label, conf, entropy, t0, decision_s, ref, 0, reason)
            return
        payload = wire.encode_tensor_message(m.spec_out, frame_id, out.feature, [out.logits])
        pending = _Pending(frame_id, t0, t0 + self.config.deadline_ms / 1000.0, decision_s, label, conf,
                           entropy, m, ref, len(payload))
        with self._lock:  # registered before publishing: the answer may beat publish() back
            self._pending[frame_id] = pending
            if len(self._pending) == 1:
                self._wake.notify()
        if not self.mqtt.publish(self._topics[topics.FEATURE], payload, self._qos.feature):
            self._fallback(frame_id, "offline")

    # -- audits and drift (issue 13, docs/DRIFT.md) -----------------------------------------------
    def _drift_monitor(self, bundle: Bundle) -> DriftMonitor | None:
        d = self.config.drift
        if not d.enabled:
            return None
        try:
            return DriftMonitor.from_bundle(bundle.manifest, window=d.window, step=d.step,
                                            clear_checks=d.clear_checks, threshold_scale=d.threshold_scale)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("bundle %s v%d: unusable drift reference (%s); no drift monitor", bundle.name, bundle.version, e)
            return None

    @property
    def threshold_in_use(self) -> float:
        return self._threshold(self._model)

    def _threshold(self, m: TierModel) -> float:
        """The camera exit's threshold now: the link follower's or the bundle's, times
        `drift.alarm_threshold_scale` while the drift monitor is in alarm (issue 13: frames the camera
        may be confidently wrong about get the deeper tiers' answer)."""
        follower = self.adaptive
        threshold = m.threshold if follower is None or m.spec_out is None else follower.threshold
        if self._drift is not None and self._drift.state.alarm and m.spec_out is not None:
            threshold *= self.config.drift.alarm_threshold_scale
        return threshold

    @property
    def audit_rate(self) -> float:
        """Share of confident frames audited now (raised while the drift monitor is in alarm)."""
        return self._audits.rate_now(self._drift is not None and self._drift.state.alarm)

    def _after_confident(self, m: TierModel, frame_id: int, out, image: np.ndarray) -> None:
        if self._drift is not None:
            self._observe_drift(out, image)
        rate = self.audit_rate
        if rate <= 0 or m.spec_out is None or self._rng.random() >= rate or not self.mqtt.connected:
            return  # (an end-only bundle has no tier above to audit with)
        payload = wire.encode_tensor_message(m.spec_out, frame_id, out.feature, [out.logits], audit=True)
        if self.mqtt.publish(self._topics[topics.FEATURE], payload, self._qos.feature):
            with self._lock:
                self.stats.audits += 1
                self.stats.audit_bytes += len(payload)
            if self.updates is not None:
                self.updates.share_frame(image)  # opted-in nodes only (privacy policy)

    def _observe_drift(self, out, image: np.ndarray) -> None:
        if out.feature is None:
            return
        changed = self._drift.update(out.feature, out.logits, image)  # image: which variant's reference
        if changed is None:
            return
        st = self._drift.state
        (log.warning if changed else log.info)("node %s: drift alarm %s at frame %d (%s)", self.node,
                                               "raised" if changed else "cleared", self._drift.frames,
                                               ", ".join(f"{k} {v:.4g}" for k, v in (st.scores or {}).items()))
        if self.mqtt.connected:
            self._publish_drift()
            self.publish_status()

    def _publish_drift(self) -> None:
        """The monitor's state as the node's retained drift event."""
        m = self._model
        event = {"node": self.node, "model": m.bundle.name, "model_version": m.bundle.version,
                 **self._drift.state.to_json(), "frames": self._drift.frames, "thresholds": self._drift.thresholds,
                 "ts": round(time.time(), 3)}
        self.mqtt.publish(self._topics[topics.DRIFT], json.dumps(event), self._qos.status, retain=True)

    def _fallback(self, frame_id: int, reason: str) -> None:
        with self._lock:
            p = self._pending.pop(frame_id, None)
        if p is not None:
            self._emit(p.model, p.frame_id, "end", p.label, p.confidence, p.entropy, p.t0, p.decision_s,
                       p.ref, p.bytes_up, reason)

    def _on_answer(self, topic: str, payload: bytes) -> None:
        try:
            ans = wire.decode_answer(payload)
        except WireError as e:
            self.stats.bad_answers += 1
            if self.stats.bad_answers <= 5 or self.stats.bad_answers % 1000 == 0:
                log.warning("dropped bad answer on %s (%d so far): %s", topic, self.stats.bad_answers, e)
            return
        with self._lock:
            p = self._pending.pop(ans.frame_id, None)
        if p is None:
            self.stats.late_answers += 1
            return
        if ans.kind == wire.Kind.REJECT:
            # over the node's escalation budget at that tier: its own reason, the model is fine
            reason = "budget" if ans.reason == wire.RejectReason.BUDGET else "rejected"
            if self.stats.fallbacks.get(reason, 0) == 0:
                log.warning("%s tier rejected frame %d (%s): answering locally", ans.tier, ans.frame_id, ans.reason.name.lower())
        elif ans.bundle_id != p.model.spec_out.bundle_id:
            reason = "rejected"  # answered by another model (any version of this one is fine: updates keep the boundary)
        else:
            if self.adaptive is not None:  # the escalation's round trip: link + gateway queue + compute
                self.adaptive.observe_answer(time.perf_counter() - p.t0 - p.decision_s)
            self._emit(p.model, p.frame_id, ans.tier, ans.label, ans.confidence, ans.entropy, p.t0,
                       p.decision_s, p.ref, p.bytes_up, None)
            return
        self._emit(p.model, p.frame_id, "end", p.label, p.confidence, p.entropy, p.t0, p.decision_s,
                   p.ref, p.bytes_up, reason)

    def _emit(self, m: TierModel, frame_id: int, tier: str, label: int, conf: float, entropy: float,
              t0: float, decision_s: float, ref: str | None, bytes_up: int, fallback: str | None) -> None:
        latency_ms = (time.perf_counter() - t0) * 1000.0
        labels = m.bundle.labels
        event = {
            "node": self.node, "frame": frame_id, "tier": tier, "label": label,
            "label_name": labels[label] if 0 <= label < len(labels) else str(label),
            "confidence": round(float(conf), 5), "entropy": round(float(entropy), 5),
            "latency_ms": round(latency_ms, 3), "decision_ms": round(decision_s * 1000.0, 4),
            "model": m.bundle.name, "model_version": m.bundle.version,
            "fallback": fallback is not None, "reason": fallback, "bytes_up": bytes_up,
            "ts": round(time.time(), 4), "source": ref,
        }
        line = json.dumps(event)
        s = self.stats
        with self._lock:
            s.frames += 1
            s.by_tier[tier] = s.by_tier.get(tier, 0) + 1
            s.bytes_up += bytes_up
            if fallback:
                s.fallbacks[fallback] = s.fallbacks.get(fallback, 0) + 1
            if self._results_file is not None:
                self._results_file.write(line + "\n")
        if self.mqtt.connected:
            self.mqtt.publish(self._topics[topics.RESULT], line, self._qos.result)
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:
                log.exception("result listener failed")

    # -- deadlines ----------------------------------------------------------------------------
    def _reap(self) -> None:
        while True:
            expired = []
            with self._lock:
                now = time.perf_counter()
                while self._pending:
                    p = next(iter(self._pending.values()))
                    if p.deadline > now:
                        break
                    expired.append(self._pending.pop(p.frame_id))
                if not expired:
                    if self.stop_event.is_set() and not self._pending:
                        return
                    wait = next(iter(self._pending.values())).deadline - now if self._pending else 0.5
                    self._wake.wait(min(max(wait, 0.0005), 0.5))
            for p in expired:
                if self.adaptive is not None:
                    self.adaptive.observe_deadline()
                self._emit(p.model, p.frame_id, "end", p.label, p.confidence, p.entropy, p.t0, p.decision_s,
                           p.ref, p.bytes_up, "deadline")

    # -- connection and status ------------------------------------------------------------------
    def _integrations(self, config: DeviceConfig) -> None:
        """Home Assistant discovery + throttled state, and this node's /metrics: both fed by result events."""
        self.home_assistant = self.metrics = None
        self.metrics_port: int | None = None  # where /metrics is served once start() ran
        if config.home_assistant.enabled:
            self.home_assistant = HomeAssistantPublisher(self.mqtt, self.prefix, self.node,
                                                         HomeAssistantOptions.from_config(config.home_assistant),
                                                         lambda: self.bundle)
            self.add_result_listener(self.home_assistant.on_result)
        if config.metrics_port is not None:
            updates = self.updates
            self.metrics = NodeMetrics(self.node, lambda: self.mqtt.connected,
                                       (lambda: updates.counters) if updates is not None else None)
            self.add_result_listener(self.metrics.on_result)

    def _on_connect(self) -> None:
        self.publish_status()
        if self.home_assistant is not None:
            self.home_assistant.publish_discovery()

    def _on_disconnect(self) -> None:
        # Nothing in flight will be answered on a dead connection: fall back now, not at the deadline.
        with self._lock:
            lost = list(self._pending)
        for frame_id in lost:
            self._fallback(frame_id, "offline")

    def status(self, state: str = "online") -> dict[str, Any]:
        m, s = self._model, self.stats
        return {"node": self.node, "state": state, "model": m.bundle.name, "model_version": m.bundle.version,
                "runtime": getattr(m.segment.runtime, "key", "?"), "threshold": m.threshold,
                "threshold_in_use": self.threshold_in_use, "pid": os.getpid(),
                "frames": s.frames, "by_tier": dict(s.by_tier), "fallbacks": dict(s.fallbacks),
                "bytes_up": s.bytes_up, "late_answers": s.late_answers, "bad_answers": s.bad_answers,
                "audits": {"rate": self.audit_rate, "sent": s.audits, "bytes": s.audit_bytes},
                "drift": self._drift.state.to_json() if self._drift is not None else None,
                "adaptive": self.adaptive.status() if self.adaptive is not None else None,
                "ts": round(time.time(), 3),
                **({"update": self.updates.status()} if self.updates is not None else {})}

    def publish_status(self, state: str = "online") -> None:
        self.mqtt.publish(self._topics[topics.STATUS], json.dumps(self.status(state)), self._qos.status, retain=True)

    # -- main loop --------------------------------------------------------------------------------
    def start(self) -> None:
        if self.metrics is not None and self.metrics_port is None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.metrics_bind)
        self.mqtt.start()
        if not self._reaper.is_alive():
            self._reaper.start()

    def run(self, source=None) -> int:
        """Serve every frame of `source` (default: the configured one), then drain and stop."""
        from tierlite.device.sources import FrameSource

        self.start()
        source = source or FrameSource(self.config.source, self._model.size, self.stop_event)
        m = self._model
        log.info("node %s: %s v%d, end threshold %.3f, source %s, broker %s", self.node, m.bundle.name,
                 m.bundle.version, m.threshold, source.describe() if hasattr(source, "describe") else "custom",
                 "auto (zeroconf)" if self.config.broker.auto else f"{self.config.broker.host}:{self.config.broker.port}")
        waited_until = time.monotonic() + self.config.wait_for_broker
        while not self.mqtt.wait_connected(0.05) and time.monotonic() < waited_until and not self.stop_event.is_set():
            pass  # a short grace period at boot, so the first frames are not all local fallbacks
        if not self.mqtt.connected:
            log.warning("no broker yet: unsure frames are answered locally until it appears")
        next_status = time.monotonic() + STATUS_INTERVAL_S
        try:
            for frame in source:
                self.process_frame(frame.image, frame.ref)
                if time.monotonic() >= next_status:
                    self.publish_status()
                    next_status = time.monotonic() + STATUS_INTERVAL_S
                if self.stop_event.is_set():
                    break
        finally:
            self.shutdown()
        return 0

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        """Let in-flight escalations finish (each is bounded by its deadline), then go offline."""
        self.stop_event.set()
        end = time.monotonic() + self.config.deadline_ms / 1000.0 + 1.0
        while self._pending and time.monotonic() < end:
            time.sleep(0.005)
        with self._lock:
            self._wake.notify()
        if self._reaper.is_alive():
            self._reaper.join(timeout=2.0)
        with self._lock:
            leftover = list(self._pending)
        for frame_id in leftover:  # reaper gone: never leave a frame without a result
            self._fallback(frame_id, "deadline")
        s = self.stats
        log.info("node %s: %d frames (end %d, edge %d, cloud %d; fallbacks %s), %d bytes up, %d late answers",
                 self.node, s.frames, s.by_tier.get("end", 0), s.by_tier.get("edge", 0), s.by_tier.get("cloud", 0),
                 s.fallbacks or "none", s.bytes_up, s.late_answers)
        self.mqtt.stop(final=[Message(self._topics[topics.STATUS], json.dumps(self.status("offline")).encode(),
                                      self._qos.status, True)])
        if self._results_file is not None:
            self._results_file.close()
            self._results_file = None
        if self.updates is not None:
            self.updates.close()


def _open_results(path) -> Any:
    """The results file, appended to line by line; its folder is made if missing."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", buffering=1)
    except OSError as e:
        raise ConfigError(f"results_file {path}: cannot append to it ({e.strerror or e})") from None
