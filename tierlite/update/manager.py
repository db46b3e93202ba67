"""The node side of model updates (camera nodes, edge workers): `UpdateManager` receives an
announcement and its chunks, vets and stages the artifact, shadow-checks the candidate on recent
frames, hands it to the tier for an atomic swap, watches the frames that follow and rolls back
if errors or escalations regress. docs/UPDATES.md tells the whole story."""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from tierlite import topics
from tierlite.bundle import Bundle
from tierlite.config import UpdateConfig
from tierlite.errors import TierliteError, UpdateError
from tierlite.policy import decide
from tierlite.ratelimit import LogThrottle
from tierlite.segment import Segment
from tierlite.update.artifacts import check_boundary, vet_artifact
from tierlite.update.delivery import ChunkAssembler, ReassemblyError, in_rollout, parse_announcement
from tierlite.update.frame_upload import encode_frame_upload
from tierlite.update.signing import verify_document
from tierlite.update.versions import VersionStore

__all__ = ["MAX_UNCONFIRMED_STARTS", "SegmentFactory", "SwapFn", "UpdateManager"]

log = logging.getLogger("tierlite.update")
NETWORK_REFUSAL_INTERVAL_S = 10.0  # refusals straight off the wire: one log line and report per kind per interval

MAX_UNCONFIRMED_STARTS = 1  # restarts tolerated while a new version is on probation
SegmentFactory = Callable[[Bundle, str], Any]  # (bundle, tier) -> object with .run(x) -> SegmentOutput
SwapFn = Callable[[Bundle, dict[str, Any]], None]  # install bundle + its loaded segments between frames


@dataclass
class _Watch:
    version: int
    previous: int
    baseline_escalation: float
    started: float
    frames: int = 0
    escalated: int = 0
    errors: int = 0


class UpdateManager:
    """Receives, verifies, shadow-checks, swaps in and if needed rolls back model updates for
    the tiers one process runs (("end",) on a camera node, ("edge",) in an edge worker).

    The owner (device daemon, edge worker) wires it in with three calls and one callback:
      bundle = manager.startup(configured_bundle)   # the version to run (survives restarts)
      manager.attach(mqtt_client)                   # a tierlite.mqtt.MqttClient, once
      manager.observe(tier, x, logits, escalated)   # after every frame it serves
    and `swap(bundle, segments)`, which must install the new model between two frames (e.g.
    replace the one reference the frame loop reads at the start of each frame).
    """

    def __init__(self, policy: UpdateConfig, node_id: str, tiers: Iterable[str], swap: SwapFn,
                 prefix: str = "tierlite", segment_factory: SegmentFactory | None = None):
        self.policy, self.node_id, self.prefix = policy, node_id, prefix
        self.tiers = tuple(tiers)
        self._swap = swap
        self._factory = segment_factory or Segment
        self._keys = policy.public_keys()
        self.store = VersionStore(policy.state_dir)
        self.bundle: Bundle | None = None
        self._lock = threading.Lock()
        self._recent: dict[str, deque] = {t: deque(maxlen=policy.recent_frames) for t in self.tiers}
        self._history: deque = deque(maxlen=policy.watch_frames)  # escalated flags before a swap
        # The running model's escalation rate as last measured (its confirmed watch): the baseline
        # of an update that follows before _history has refilled (back-to-back updates).
        self._last_baseline: float | None = None
        self._watch: _Watch | None = None
        self._assembly: tuple[dict[str, Any], ChunkAssembler] | None = None
        self._assembly_since = 0.0  # when the chunks were (last) requested
        self._client = None
        self._tasks: queue.Queue = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._deferred: bytes | None = None
        self._attempt: int | None = None  # version of the (signed) update being applied
        self._upload_window = [time.monotonic(), 0]  # [window start, frames uploaded in it]
        self._refused: set[str] = set()  # artifact sha256s already refused by this process
        self.counters = {"refused": 0, "applied": 0, "rolled_back": 0, "confirmed": 0, "dropped_messages": 0}
        self.last_event: dict[str, Any] = {}
        # Anyone who can publish on the update topic can send garbage: such refusals are counted
        # each, but logged and reported (retained) at most once per interval per kind.
        self._network_throttle = LogThrottle(NETWORK_REFUSAL_INTERVAL_S)

    # -- start-up ----------------------------------------------------------------------------
    def startup(self, configured: Bundle) -> Bundle:
        """The bundle this node should run: the newest kept version that loads, or the configured
        one if it is newer (an operator's manual install wins). Starts the worker thread."""
        st = self.store.state
        pending = st["pending"]
        if pending and pending["version"] == st["current"]:
            # Restarted while a new version was still on probation: once may be a power cut,
            # twice looks like the new version brings the process down.
            pending["starts"] += 1
            if pending["starts"] > MAX_UNCONFIRMED_STARTS:
                log.error("update: v%s was not confirmed across %d restarts; rolling back",
                          pending["version"], pending["starts"] - 1)
                self._reject(pending["version"])
                st["pending"] = None
        old_current, chosen = st["current"], None
        if old_current is not None and old_current > configured.version:
            for version in (old_current, st["previous"]):
                if version is None or version <= configured.version or not self.store.has(version):
                    continue
                try:
                    candidate = Bundle.load(self.store.path(version))  # every file's sha256
                    # kept versions came as signed updates: anything planted in state_dir is not
                    verify_document(candidate.manifest, self._keys, f"kept {candidate.name} v{version}")
                    for tier in self.tiers:
                        self._factory(candidate, tier)
                except Exception as e:  # noqa: BLE001 - any load failure means: use an older version
                    log.error("update: kept v%s fails to load (%s); rolling back", version, e)
                    self._reject(version)
                    continue
                chosen = candidate
                if version != old_current:
                    st["previous"] = None
                break
        if chosen is None:  # the configured bundle: first start, or an operator installed a newer one
            chosen = configured
            self.store.adopt(configured)
            if (old_current is not None and old_current < configured.version and self.store.has(old_current)
                    and old_current not in st["rejected"]):
                st["previous"] = old_current
            elif st["previous"] is not None and (st["previous"] >= configured.version or not self.store.has(st["previous"])):
                st["previous"] = None
        st["current"] = chosen.version
        pending = st["pending"]
        if pending and (pending["version"] != chosen.version or st["previous"] is None):
            st["pending"] = pending = None
        if pending:  # resume the probation the restart interrupted
            self._watch = _Watch(chosen.version, st["previous"], pending["baseline"], time.monotonic())
            self._last_baseline = pending["baseline"]
        self.store.save()
        self.bundle = chosen
        log.info("update: running %s v%s (previous kept: %s)", chosen.name, chosen.version,
                 f"v{st['previous']}" if st["previous"] else "none")
        self._worker = threading.Thread(target=self._work, name="tierlite-update", daemon=True)
        self._worker.start()
        return chosen

    def close(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=5)

    # -- MQTT ----------------------------------------------------------------------------------
    @property
    def topic(self) -> str:
        return topics.update_announcement(self.prefix, self._model)

    @property
    def _model(self) -> str:
        if self.bundle is None:
            raise RuntimeError("UpdateManager.startup() must run first")
        return self.bundle.name

    def attach(self, mqtt) -> None:
        """Subscribe on a tierlite.mqtt.MqttClient (call once: its subscriptions survive reconnects,
        and the retained announcement reaches a node that comes back online at once)."""
        self._client = mqtt
        mqtt.subscribe(self.topic, self.on_message, qos=1)

    def on_message(self, topic: str, payload: bytes) -> None:
        """Network input: never raises. Cheap; heavy work goes to the worker thread."""
        try:
            if topic == self.topic:
                self._on_announcement(payload)
            elif topic.startswith(self.topic + "/v"):
                self._on_chunk(topic, payload)
        except UpdateError as e:
            self._refuse(str(e), network=True)
        except Exception as e:  # noqa: BLE001 - a daemon must not die on a bad message
            self.counters["dropped_messages"] += 1
            if self._network_throttle.log(log, logging.ERROR, "dropped", "update: dropped a message on %s: %r (%d "
                                          "dropped so far)", topic, e, self.counters["dropped_messages"]):
                log.debug("update: dropped message traceback", exc_info=True)

    def _on_announcement(self, payload: bytes) -> None:
        if not payload:
            return  # the retained announcement was cleared (rollout halted)
        if not self.policy.enabled:
            return
        doc = parse_announcement(payload, self._keys, self._model)
        version = doc["version"]
        if version == self.bundle.version:
            return  # the retained announcement of what this node runs (seen on every reconnect)
        if version < self.bundle.version:
            raise UpdateError(f"update {doc['model']} v{version} is older than the running v{self.bundle.version} "
                              f"(downgrade or replay)")
        if version in self.store.state["rejected"]:
            log.info("update: ignoring v%s, rolled back on this node before", version)
            return
        if not in_rollout(self.node_id, doc["rollout"]):
            log.info("update: v%s announced for %.0f %% of nodes; this node waits for a later stage",
                     version, 100 * doc["rollout"]["share"])
            return
        art = doc["artifact"]
        if art["sha256"] in self._refused:
            log.debug("update: v%s artifact %s was refused already", version, art["sha256"][:12])
            return
        with self._lock:
            if self._assembly is not None:
                if self._assembly[0]["artifact"]["sha256"] == art["sha256"]:
                    return  # re-announcement (e.g. wider share) of what is being collected
                if self._assembly[0]["version"] > version:  # a replayed older one cannot displace it
                    log.info("update: ignoring v%s announced while collecting v%s", version,
                             self._assembly[0]["version"])
                    return
                self._drop_assembly()
            self._assembly = (doc, ChunkAssembler(art["sha256"], art["bytes"], art["chunks"],
                                                  self.policy.max_artifact_bytes))
            self._assembly_since = time.monotonic()
        log.info("update: %s v%s announced (%s B in %d chunk(s)); collecting", doc["model"], version,
                 f"{art['bytes']:,}", art["chunks"])
        if self._client is not None:
            self._client.subscribe(topics.update_chunks(self.prefix, self._model, version), self.on_message, qos=1)

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # cleared retained chunk
        with self._lock:
            if self._assembly is None:
                return
            doc, asm = self._assembly
            if not topics.update_chunks(self.prefix, self._model, doc["version"]).matches(topic):
                return
            try:
                data = asm.add(payload)
            except ReassemblyError:
                self._drop_assembly()  # the whole set is wrong: refuse it (a later announcement retries)
                raise
            except UpdateError as e:
                # A garbage chunk costs only itself: the good ones keep arriving, and the chunk
                # timeout re-requests the set (_retry_chunks) if the artifact never completes.
                self.counters["dropped_messages"] += 1
                self._network_throttle.log(log, logging.WARNING, "chunk", "update: ignored a bad chunk of v%s on %s: %s",
                                           doc["version"], topic, e)
                return
            if data is None:
                return
            self._drop_assembly()
        try:
            self._tasks.put_nowait(("artifact", data))
        except queue.Full:
            log.warning("update: worker busy; v%s will be retried on the next announcement", doc["version"])

    def _retry_chunks(self) -> None:
        """Chunk collection timed out: re-subscribe, so the broker sends the retained chunks again."""
        with self._lock:
            if self._assembly is None or time.monotonic() - self._assembly_since < self.policy.chunk_timeout:
                return
            doc, asm = self._assembly
            self._assembly_since = time.monotonic()
            log.warning("update: v%s still misses %d of %d chunk(s) after %.0f s; requesting them again",
                        doc["version"], asm.missing, asm.count, self.policy.chunk_timeout)
            if self._client is not None:
                chunks = topics.update_chunks(self.prefix, self._model, doc["version"])
                self._client.unsubscribe(chunks)
                self._client.subscribe(chunks, self.on_message, qos=1)

    def _drop_assembly(self) -> None:  # caller holds the lock
        doc = self._assembly[0]
        self._assembly = None
        if self._client is not None:
            self._client.unsubscribe(topics.update_chunks(self.prefix, self._model, doc["version"]))

    def submit(self, data: bytes) -> None:
        """Hand a whole artifact to the worker (the MQTT path does this after reassembly)."""
        self._tasks.put(("artifact", data), timeout=5)

    # -- frames --------------------------------------------------------------------------------
    def observe(self, tier: str, x: np.ndarray, logits: np.ndarray | None, escalated: bool, error: bool = False) -> None:
        """Called by the frame loop after each frame (cheap: a copy into a ring buffer)."""
        if escalated and tier == "end" and self.policy.share_frames and not error:
            self._share_frame(x)
        with self._lock:
            if logits is not None and not error and tier in self._recent:
                self._recent[tier].append((np.array(x, copy=True), np.asarray(logits, dtype=np.float32).copy()))
            w = self._watch
            if w is None:
                if not error:
                    self._history.append(bool(escalated))
                return
            w.frames += 1
            w.escalated += bool(escalated) and not error
            w.errors += bool(error)
            done = w.frames >= self.policy.watch_frames or time.monotonic() - w.started > self.policy.watch_seconds
        if done:
            self._enqueue_judge()

    def share_frame(self, x: np.ndarray) -> None:
        """An audited frame (issue 13): uploaded like an escalated one, only when the node opted in."""
        if self.policy.share_frames:
            self._share_frame(x)

    def _share_frame(self, x: np.ndarray) -> None:
        """Opted-in nodes: upload an escalated frame as JPEG (rate-limited, QoS 0, best effort)."""
        now = time.monotonic()
        if now - self._upload_window[0] >= 60.0:
            self._upload_window = [now, 0]
        if self._client is None or self.bundle is None or self._upload_window[1] >= self.policy.max_frame_uploads_per_minute:
            return
        import cv2

        img = np.asarray(x).reshape(np.asarray(x).shape[-3:])
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if ok and self._client.publish(topics.frame_upload(self.prefix, self._model, self.node_id),
                                       encode_frame_upload(jpg.tobytes(), self.bundle.version), 0):
            self._upload_window[1] += 1

    def _enqueue_judge(self) -> None:
        try:
            self._tasks.put_nowait(("judge", None))
        except queue.Full:
            pass

    # -- worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                kind, data = self._tasks.get(timeout=0.5)
            except queue.Empty:
                self._retry_chunks()
                w = self._watch
                if w is not None and time.monotonic() - w.started > self.policy.watch_seconds:
                    self._enqueue_judge()
                continue
            try:
                if kind == "artifact" and self._watch is not None:
                    self._deferred = data  # applied once the running update's watch ends
                elif kind == "artifact":
                    self._apply(data)
                elif kind == "judge":
                    self._judge()
                    if self._deferred is not None and self._watch is None:
                        data, self._deferred = self._deferred, None
                        self._apply(data)
            except UpdateError as e:
                self._refuse(str(e), data, self._attempt)
            except Exception as e:  # noqa: BLE001 - keep serving frames whatever an update does
                self._refuse(f"update failed unexpectedly: {e!r}", data, self._attempt)
                log.debug("update failure", exc_info=True)
            finally:
                self._attempt = None
                self._tasks.task_done()

    def _apply(self, data: bytes) -> None:
        if self._watch is not None:
            raise UpdateError("an update is still being watched; the next one waits for its verdict")
        current = self.bundle
        art = vet_artifact(data, self._keys, current, self.store.state["rejected"], self.policy.max_artifact_bytes)
        self._attempt = art.version  # signed from here on: refusals can name the version
        log.info("update: v%s signature ok (%s B, ships %s); staging", art.version, f"{art.size:,}",
                 ", ".join([*sorted(art.files), *(f"{f} (patch)" for f in sorted(art.patches))]) or "manifest only")
        candidate = self.store.stage(art)
        check_boundary(current, candidate)
        segments = {}
        for tier in self.tiers:
            try:
                segments[tier] = self._factory(candidate, tier)
            except Exception as e:  # noqa: BLE001 - any load failure refuses the update
                self._reject(candidate.version)
                raise UpdateError(f"update v{candidate.version}: {tier} segment fails to load in the shadow "
                                  f"interpreter: {e}") from None
            self._shadow_check(current, candidate, tier, segments[tier])
        with self._lock:
            baseline = self._pre_swap_baseline()
        try:
            self._swap(candidate, segments)
        except Exception as e:  # noqa: BLE001
            self._reject(candidate.version)
            raise UpdateError(f"update v{candidate.version} failed to load into the running tier ({e}); "
                              f"still on v{current.version}") from None
        st = self.store.state
        st["previous"], st["current"] = current.version, candidate.version
        st["pending"] = {"version": candidate.version, "starts": 0, "baseline": baseline}
        self.store.save()
        with self._lock:
            self.bundle = candidate
            self._watch = _Watch(candidate.version, current.version, baseline, time.monotonic())
        self.counters["applied"] += 1
        self._event("applied", candidate.version, f"v{current.version} -> v{candidate.version}; watching "
                    f"{self.policy.watch_frames} frames (escalation baseline {baseline:.2f})")

    def _shadow_check(self, current: Bundle, candidate: Bundle, tier: str, seg) -> None:
        with self._lock:
            recent = list(self._recent.get(tier, ()))
        what = f"update v{candidate.version} shadow check ({tier})"
        if not recent:  # nothing served yet: at least prove it runs on a well-formed input
            spec = candidate.segment(tier).inputs[0]
            out = seg.run(np.zeros(spec.shape, dtype=np.dtype(spec.dtype)))
            if not np.all(np.isfinite(out.logits)):
                raise UpdateError(f"{what}: non-finite logits on a blank input")
            log.info("update: %s: no recent frames yet; model loads and runs", what)
            return
        old_thr = current.thresholds.get(tier)
        new_thr = candidate.thresholds.get(tier)
        # A condition variant (tierlite.conditions) is made to answer otherwise on the frames its
        # selector picks: a drift the current model is confidently wrong about (issue 13), so its
        # agreement with the current model there is no test. Those frames are still run (finite
        # logits, escalation); agreement is asked of the frames the candidate's base end answers.
        variants = [sel for sel, _ in getattr(seg, "variants", ())]
        agree, sure, esc_old, esc_new, by_variant = 0, 0, 0, 0, 0
        for x, old_logits in recent:
            try:
                new_logits = seg.run(x).logits
            except TierliteError as e:
                raise UpdateError(f"{what}: fails on a recent frame: {e}") from None
            if not np.all(np.isfinite(new_logits)):
                raise UpdateError(f"{what}: non-finite logits on a recent frame")
            old_conf, old_label, _, _ = decide(old_logits, old_thr)
            new_conf, new_label, _, _ = decide(new_logits, new_thr)
            esc_old += not old_conf
            esc_new += not new_conf
            if any(sel.picks(x)[0] for sel in variants):
                by_variant += 1
            elif old_conf:
                sure += 1
                agree += old_label == new_label
        n = len(recent)
        agreement = agree / sure if sure else 1.0
        detail = (f"{n} frames: agreement {agreement:.2f} on {sure} the current model was sure of"
                  f"{f' ({by_variant} run by a condition variant not compared)' if by_variant else ''}, "
                  f"escalation {esc_old / n:.2f} -> {esc_new / n:.2f}")
        if sure and agreement < self.policy.min_agreement:
            self._reject(candidate.version)
            raise UpdateError(f"{what} failed: agreement {agreement:.2f} < {self.policy.min_agreement} ({detail})")
        if (esc_new - esc_old) / n > self.policy.max_shadow_escalation_increase:
            self._reject(candidate.version)
            raise UpdateError(f"{what} failed: escalation rate up more than "
                              f"{self.policy.max_shadow_escalation_increase} ({detail})")
        log.info("update: %s passed (%s)", what, detail)

    MIN_BASELINE_FRAMES = 20

    def _pre_swap_baseline(self) -> float:
        """Escalation rate of the running model: the frames since its swap when there are enough,
        else the rate its own watch measured (an update right after another is judged against the
        model it replaces, not against an empty history: no false rollback)."""
        n = len(self._history)
        if n >= self.MIN_BASELINE_FRAMES or self._last_baseline is None:
            return float(np.mean(self._history)) if n else (self._last_baseline or 0.0)
        return (float(np.sum(self._history)) + self._last_baseline * (self.MIN_BASELINE_FRAMES - n)) \
            / self.MIN_BASELINE_FRAMES

    def _judge(self) -> None:
        with self._lock:
            w = self._watch
            if w is None:
                return
            self._watch = None
            self._history.clear()
        if w.frames == 0:
            with self._lock:
                self._last_baseline = w.baseline_escalation
            self._confirm(w, "no frames served during the watch")
            return
        esc = w.escalated / max(1, w.frames - w.errors)
        err = w.errors / w.frames
        detail = (f"{w.frames} frames: escalation {w.baseline_escalation:.2f} -> {esc:.2f}, "
                  f"error rate {err:.2f}")
        if err > self.policy.max_error_rate:
            self._rollback(w, f"error rate {err:.2f} > {self.policy.max_error_rate} ({detail})")
        elif esc > w.baseline_escalation + self.policy.max_escalation_increase:
            self._rollback(w, f"escalation rate regressed past +{self.policy.max_escalation_increase} ({detail})")
        else:
            with self._lock:
                self._last_baseline = esc  # the new model's own rate: the next update's baseline
            self._confirm(w, detail)

    def _confirm(self, w: _Watch, detail: str) -> None:
        self.counters["confirmed"] += 1
        self.store.state["pending"] = None
        self.store.save()
        self.store.prune()
        self._event("confirmed", w.version, detail)

    def _rollback(self, w: _Watch, reason: str) -> None:
        previous = Bundle.load(self.store.path(w.previous))
        segments = {tier: self._factory(previous, tier) for tier in self.tiers}
        self._swap(previous, segments)
        self._reject(w.version)
        st = self.store.state
        st["current"], st["previous"], st["pending"] = previous.version, None, None
        self.store.save()
        with self._lock:
            self.bundle = previous
            self._last_baseline = w.baseline_escalation  # the previous model is back, and its rate
        self.counters["rolled_back"] += 1
        self._event("rolled_back", w.version, f"back to v{previous.version}: {reason}", logging.WARNING)

    def _reject(self, version: int) -> None:
        st = self.store.state
        if version not in st["rejected"]:
            st["rejected"].append(version)
        if st["current"] == version:
            st["current"] = st["previous"]
        self.store.save()

    def _refuse(self, reason: str, data: bytes | None = None, version: int | None = None,
                network: bool = False) -> None:
        """network: refused straight off the wire (announcement): throttled, see __init__."""
        if data:  # do not fetch the same bad artifact again when its announcement is re-sent
            self._refused.add(hashlib.sha256(data).hexdigest())
        self.counters["refused"] += 1
        # Throttled per kind of refusal (numbers masked), so a flood of one kind stays one line while
        # a different refusal (unsigned, then an untrusted key) is still reported at once.
        kind = "announcement: " + re.sub(r"\d+", "#", reason)[:120] if network else None
        self._event("refused", version, reason, logging.WARNING, throttle=kind)

    def _event(self, state: str, version: int | None, detail: str, level: int = logging.INFO,
               throttle: str | None = None) -> None:
        named = version is not None and state != "refused"  # a refusal's reason names the version
        line = f"update {state}" + (f" v{version}" if named else "") + f": {detail}"
        self.last_event = {"state": state, "version": version, "detail": detail, "ts": round(time.time(), 3)}
        if throttle is None:
            log.log(level, "%s", line)
        elif not self._network_throttle.log(log, level, throttle, "%s", line):
            return  # held back: counted, in last_event, in the next report that goes out
        if self._client is not None and self.bundle is not None:
            try:
                self._client.publish(topics.update_report(self.prefix, self._model, self.node_id),
                                     json.dumps({"node": self.node_id, **self.status()}).encode(), qos=1, retain=True)
            except Exception:  # noqa: BLE001 - a report is best effort
                log.debug("update report not sent", exc_info=True)

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For the owner's status message: what runs, what is kept, the last update event."""
        st = self.store.state
        w = self._watch
        return {"model": self.bundle.name if self.bundle else None,
                "version": self.bundle.version if self.bundle else None,
                "previous": st["previous"], "rejected": list(st["rejected"]),
                "watching": None if w is None else {"version": w.version, "frames": w.frames},
                "last_event": self.last_event, "counters": dict(self.counters)}

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Tests and CLIs: wait until queued updates are processed (not the watch)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._tasks.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False
