"""`tierlite bench drift`: one co-updating round under a distribution shift the model never saw.

Scenario. The test folder is split into fleet frames and held-out evaluation frames. Every frame
is "filmed in low light": darkened (gain), sensor noise added (cv2.randn) and re-encoded as a
camera would (JPEG) -- no training run saw such frames (training augments by pad-crop and flips).

1. Fleet round (live: real `tierlite device` processes per node against `tierlite edge` and
   `tierlite cloud` processes on a loopback Mosquitto, tierlite.tools.stack): the nodes stream
   their drifted frames; the edge forwards what its exit is unsure of; the cloud answers and stores
   every hard example; nodes that opted in (--privacy raw) also upload the frames they escalated.
2. Retraining (tierlite.cloud.retrain) on what the fleet escalated: exit heads distilled from
   the cloud exit, thresholds re-calibrated on clean validation frames, verdict on a held-out
   slice of the store.
3. Delivery (live): the candidate is signed and published as a delta to the running nodes, a canary
   share first (tierlite.cloud.rollout); nodes and edge workers shadow-check and swap it in while
   streaming fresh drifted frames; their results say which version answered each frame.
4. Figures on the held-out evaluation frames, offline through each bundle's int8 chain (exactly
   what the nodes run): end-exit accuracy on drifted and on clean frames, the share of drifted
   frames the end escalates, system accuracy; and, from the live nodes, the escalation rate per
   model version on the same stream, update bytes per node, frames without a result.

--offline replaces the processes of steps 1 and 3 by running the same int8 chain in this process
and writing the same stores (quick runs, tests).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.cloud.retrain import END_SCOPES
from tierlite.errors import ConfigError, TierliteError
from tierlite.tools.bench.report import DEFAULT_DATA, Report, Target, markdown_table, say
from tierlite.tools.stack import Stack, TierProcess, read_jsonl, reference_bundle, write_yaml

log = logging.getLogger("tierlite.tools.bench.drift")

T_DRIFT_GAIN = Target("end-exit accuracy on drifted frames, gain", 5.0, True, " pt")
T_CLEAN_DROP = Target("end-exit accuracy on clean frames, drop", 0.5, False, " pt")
T_ESCALATION = Target("drifted frames escalated by the end, change", 0.0, False, " pt")


def configure_drift(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default=reference_bundle(), required=reference_bundle() is None,
                   help="the bundle the fleet runs (its checkpoint is not needed) (default: models/cifar10 when present)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"labelled test folder (default {DEFAULT_DATA})")
    p.add_argument("--replay", help="labelled training folder (default: 'train' beside --data)")
    p.add_argument("--nodes", type=int, default=4, help="camera nodes (default 4)")
    p.add_argument("--fleet-frames", type=int, default=2000, help="drifted frames the fleet streams in round 1")
    p.add_argument("--eval-frames", type=int, default=2000, help="held-out frames for the figures")
    p.add_argument("--live-frames", type=int, default=300,
                   help="frames per node streamed while the update rolls out (at most the frames loaded)")
    p.add_argument("--fps", type=float, default=50.0, help="frame rate per node (default 50)")
    p.add_argument("--gain", type=float, default=0.5, help="low-light gain on pixel values (default 0.5)")
    p.add_argument("--noise", type=float, default=8.0, help="sensor noise sigma, pixel units (default 8)")
    p.add_argument("--corruption", help="FAMILY:SEVERITY from tierlite.tools.bench.corruptions (noise, blur, fog, "
                   "low_light, contrast; 1..5) instead of --gain/--noise")
    p.add_argument("--privacy", choices=("raw", "features"), default="raw",
                   help="raw: nodes opt in to uploading escalated frames (end + edge heads retrained); "
                        "features: only boundary features leave the nodes (edge head retrained)")
    p.add_argument("--end-scope", choices=END_SCOPES, default="head",
                   help="retrain the end exit head (default), the end layers past the boundary tap (branch), "
                        "the whole end segment, or add a condition profile (all but head need the checkpoint)")
    p.add_argument("--hint-weight", type=float, default=1.0, help="boundary hint weight for --end-scope segment")
    p.add_argument("--checkpoint", help="the bundle's Keras checkpoint (--end-scope branch/segment; default <bundle>-work)")
    p.add_argument("--canary", type=float, default=0.25, help="share of nodes updated first (default 0.25)")
    p.add_argument("--margin", type=float, default=1.0, help="retraining verdict margin, points")
    p.add_argument("--offline", action="store_true", help="simulate the fleet in this process (no MQTT)")
    p.add_argument("--audit-rate", type=float, default=0.02,
                   help="--offline: nodes' audit share of confident frames (0 = as before issue 13; live nodes use their config)")
    p.add_argument("--alarm-audit-rate", type=float, default=0.25, help="audit share while a node's drift alarm is up")
    p.add_argument("--alarm-audit-floor", type=float, default=0.02,
                   help="while a node's drift alarm is up, audits are at least this share of all its frames, as far "
                        "as its confident frames allow (drift.alarm_audit_floor)")
    p.add_argument("--out", default="bench-out", help="output folder (results.json, drift.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")


# -- the corruption ---------------------------------------------------------------------------
def low_light(images: np.ndarray, gain: float, noise: float, seed: int, quality: int = 85) -> tuple[np.ndarray, list[bytes]]:
    """Frames as a camera gives them at night: pixel values x gain, Gaussian sensor noise of
    sigma `noise` (OpenCV's RNG, seeded), clipped, JPEG-encoded. Returns (RGB frames, JPEGs)."""
    import cv2

    rng = np.random.default_rng(seed)
    out, jpegs = np.empty_like(images), []
    noise_img = np.zeros(images.shape[1:], np.float32)
    for i, img in enumerate(images):
        cv2.setRNGSeed(int(rng.integers(1 << 30)))
        cv2.randn(noise_img, 0.0, noise)
        dark = cv2.addWeighted(img.astype(np.float32), gain, noise_img, 1.0, 0.0)
        bgr = cv2.cvtColor(np.clip(dark, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
        ok, jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        jpegs.append(jpg.tobytes())
        out[i] = cv2.cvtColor(cv2.imdecode(jpg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return out, jpegs


def _drift(images: np.ndarray, args, seed: int) -> tuple[np.ndarray, list[bytes]]:
    """The drift of this run: low light (--gain, --noise), or --corruption FAMILY:SEVERITY."""
    if not getattr(args, "corruption", None):
        return low_light(images, args.gain, args.noise, seed=seed)
    import cv2

    from tierlite.tools.bench.corruptions import corrupt

    fam, _, sev = args.corruption.partition(":")
    out = corrupt(images, fam, int(sev or 3), seed=seed)  # already JPEG round-tripped
    jpegs = [cv2.imencode(".jpg", cv2.cvtColor(x, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
             for x in out]
    return out, jpegs


# -- offline figures ---------------------------------------------------------------------------
def figures(bundle_dir: Path, clean: np.ndarray, drifted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """A bundle's figures on the held-out frames, through its int8 chain."""
    from tierlite.bundle import Bundle
    from tierlite.cloud.retrain import Chain
    from tierlite.converters.calibrate import evaluate
    from tierlite.policy import normalized_entropy, softmax

    bundle = Bundle.load(bundle_dir)
    chain, thr = Chain(bundle), bundle.thresholds
    out: dict[str, Any] = {"version": bundle.version, "thresholds": thr}
    for name, frames in (("clean", clean), ("drifted", drifted)):
        r = chain.from_frames(frames)
        exits = [r["end_logits"], r["edge_logits"], r["cloud_logits"]]
        op = evaluate(exits, labels, thr, (1, 1))
        out[name] = {"end_accuracy": 100 * float((exits[0].argmax(1) == labels).mean()),
                     "edge_accuracy": 100 * float((exits[1].argmax(1) == labels).mean()),
                     "cloud_accuracy": 100 * float((exits[2].argmax(1) == labels).mean()),
                     "end_escalation": 100 * float((normalized_entropy(softmax(exits[0])) > thr["end"]).mean()),
                     "system_accuracy": 100 * op.accuracy, "fractions": op.fractions}
    return out


# -- the fleet ----------------------------------------------------------------------------------
class Fleet:
    """Camera-node processes (`python -m tierlite device`), each streaming a folder of JPEGs."""

    def __init__(self, work: Path, bundle: Path, port: int, prefix: str, public_key: Path, share_frames: bool,
                 audit_rate: float = 0.02, alarm_audit_rate: float = 0.25, alarm_audit_floor: float = 0.02):
        self.work, self.bundle, self.port, self.prefix = work, bundle, port, prefix
        self.public_key, self.share_frames = public_key, share_frames
        self.audit_rate, self.alarm_audit_rate, self.alarm_audit_floor = audit_rate, alarm_audit_rate, alarm_audit_floor
        self.procs: dict[str, TierProcess] = {}

    def write_frames(self, node: str, phase: str, jpegs: list[bytes], labels: np.ndarray) -> Path:
        """One flat folder, named in the order given (the node's folder source streams sorted paths):
        class folders would stream every 0, then every 1, ..., which moves the class histogram the
        drift monitor tests on its own and hands the cloud audits of the last classes only."""
        root = self.work / f"{node}-{phase}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for i, (jpg, y) in enumerate(zip(jpegs, labels)):
            (root / f"{i:06d}-class{int(y):03d}.jpg").write_bytes(jpg)
        return root

    def start(self, node: str, phase: str, frames: Path, fps: float) -> Path:
        results = self.work / f"{node}-{phase}.jsonl"
        cfg = {"node_id": node, "bundle": str(self.bundle), "prefix": self.prefix,
               "broker": {"port": self.port, "reconnect_min": 0.1, "reconnect_max": 1.0},
               "source": {"uri": str(frames), "fps": fps}, "deadline_ms": 3000, "results_file": str(results),
               "audit_rate": self.audit_rate, "drift": {"alarm_audit_rate": self.alarm_audit_rate,
                                                                 "alarm_audit_floor": self.alarm_audit_floor},
               "update": {"trusted_keys": str(self.public_key), "state_dir": str(self.work / f"{node}-models"),
                          "share_frames": self.share_frames,
                          # the benchmark streams hours of a camera's escalations in seconds: no upload cap
                          "max_frame_uploads_per_minute": 1_000_000}}
        path = write_yaml(self.work / f"{node}-{phase}.yaml", cfg)
        self.procs[node] = TierProcess(f"{node}-{phase}", ["device", "--config", str(path)], self.work)
        return results

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node, p in self.procs.items():
            code = p.expect_exit(max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise TierliteError(f"bench: node {node} exited with {code} (logs in {self.work})")
        self.procs = {}

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop(10)
        self.procs = {}


def _read_results(paths: list[Path]) -> list[dict[str, Any]]:
    return [r for p in paths for r in read_jsonl(p)]


def live_rates(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model version: frames, share escalated by the end, answered by a fallback."""
    out: dict[str, Any] = {}
    for v in sorted({r["model_version"] for r in results}):
        rs = [r for r in results if r["model_version"] == v]
        esc = [r for r in rs if r["tier"] != "end" or r["fallback"]]
        out[f"v{v}"] = {"frames": len(rs), "escalated": 100 * len(esc) / len(rs),
                        "fallbacks": sum(r["fallback"] for r in rs)}
    return out


def simulate_fleet(bundle_dir: Path, frames: np.ndarray, nodes: list[str], store_path: Path, share_frames: bool,
                   audit_rate: float = 0.0, alarm_audit_rate: float = 0.25, seed: int = 0,
                   alarm_audit_floor: float = 0.0) -> dict[str, Any]:
    """--offline: what the live fleet round stores, computed by the same int8 chain in-process."""
    import cv2

    from tierlite.bundle import Bundle
    from tierlite.cloud.frames import FrameStore
    from tierlite.cloud.retrain import Chain, default_frames_path
    from tierlite.cloud.store import HardExampleStore
    from tierlite.policy import normalized_entropy, softmax
    from tierlite.wire import encode_feature

    bundle = Bundle.load(bundle_dir)
    r = Chain(bundle).from_frames(frames)
    end_esc = normalized_entropy(softmax(r["end_logits"])) > bundle.thresholds["end"]
    to_cloud = end_esc & (normalized_entropy(softmax(r["edge_logits"])) > bundle.thresholds["edge"])
    # Issue 13: each node audits a share of its confident frames (more while its drift monitor is in
    # alarm, tierlite.drift as the device runs it); audits reach the cloud and its store too.
    from tierlite.drift import AuditSampler, DriftMonitor

    audited = np.zeros(len(frames), bool)
    alarms: dict[str, int | None] = {}
    rng = np.random.default_rng(seed + 7)
    for k, node in enumerate(nodes):
        mon = DriftMonitor.from_bundle(bundle.manifest) if audit_rate > 0 else None
        sampler = AuditSampler(audit_rate, alarm_audit_rate, alarm_audit_floor)
        alarms[node] = None
        for i in range(k, len(frames), len(nodes)):
            sampler.observe(not end_esc[i])
            if mon is not None and mon.update(r["end_features"][i:i + 1], r["end_logits"][i]) and alarms[node] is None:
                alarms[node] = mon.frames
            rate = sampler.rate_now(mon is not None and mon.state.alarm)
            audited[i] = not end_esc[i] and rng.random() < rate
    enc, info = bundle.feature_encoding, bundle.segment("end").output("feature")
    store, fstore = HardExampleStore(store_path), FrameStore(default_frames_path(store_path))
    for i in np.flatnonzero(end_esc | audited):
        node = nodes[i % len(nodes)]
        if share_frames:
            ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(frames[i], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            fstore.add(node, bundle.name, bundle.version, jpg.tobytes())
        if to_cloud[i] or audited[i]:
            store.add(node=node, frame_id=int(i), bundle_name=bundle.name, bundle_version=bundle.version, sent_us=None,
                      feature=b"", feature_shape=(0,), feature_scale=0.0, feature_zero_point=0,
                      logits={"end": r["end_logits"][i], "edge": r["edge_logits"][i], "cloud": r["cloud_logits"][i]},
                      label=int(r["cloud_logits"][i].argmax()), confidence=0.0, entropy=0.0,
                      end_feature=encode_feature(r["end_features"][i], enc), end_feature_shape=info.shape,
                      end_feature_encoding=enc, end_feature_scale=info.scale, end_feature_zero_point=info.zero_point,
                      audit=bool(audited[i]))
    store.close()
    fstore.close()
    return {"frames": int(len(frames)), "escalated_by_end": 100 * float(end_esc.mean()),
            "reached_cloud": int((to_cloud | audited).sum()), "escalated_to_cloud": int(to_cloud.sum()),
            "audits": int(audited.sum()), "audit_rate": audit_rate, "alarm_at_frame": alarms}


# -- the benchmark ------------------------------------------------------------------------------
def run_drift(args: argparse.Namespace) -> int:
    from tierlite.bundle import Bundle
    from tierlite.cloud.retrain import default_frames_path
    from tierlite.data import load_image_folder
    from tierlite.cloud.signing import generate_keypair, load_private_key

    bundle_dir = Path(args.bundle).resolve()
    data = Path(args.data)
    replay = Path(args.replay) if args.replay else data.with_name("train")
    if not replay.is_dir():
        raise ConfigError(f"--replay: training folder not found: {replay}")
    out = Path(args.out)
    work = out / "drift-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from tierlite.tools.bench.drift_monitor import ensure_reference

    bundle_dir = ensure_reference(bundle_dir, replay, work)  # bundles from before issue 13: a copy with one
    parent = Bundle.load(bundle_dir)
    rep = Report("drift", out, args)
    t0 = time.monotonic()

    size = tuple(parent.input_shape[1:3])
    say(f"drift: loading {args.fleet_frames + args.eval_frames} frames from {data}")
    frames = load_image_folder(data, size, limit=args.fleet_frames + args.eval_frames, seed=args.seed)
    if frames.classes != parent.labels:
        raise ConfigError(f"{data}: classes differ from the bundle's labels")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(frames.labels))
    fleet_idx, eval_idx = order[:args.fleet_frames], order[args.fleet_frames:]
    eval_clean, eval_y = frames.images[eval_idx], frames.labels[eval_idx]
    eval_drift, _ = _drift(eval_clean, args, seed=args.seed + 10_000)
    nodes = [f"cam-{i + 1:02d}" for i in range(args.nodes)]
    share_frames = args.privacy == "raw"

    say("drift: figures of the running bundle on held-out clean and drifted frames")
    before = figures(bundle_dir, eval_clean, eval_drift, eval_y)
    priv, pub, _ = generate_keypair(work / "keys" / "update.key")
    key = load_private_key(priv)
    shards = np.array_split(fleet_idx, args.nodes)
    results: dict[str, Any] = {"scenario": {"gain": args.gain, "noise_sigma": args.noise, "jpeg_quality": 85,
                                            "corruption": args.corruption, "audit_rate": args.audit_rate,
                                            "nodes": args.nodes, "fleet_frames": int(len(fleet_idx)),
                                            "eval_frames": int(len(eval_idx)), "privacy": args.privacy,
                                            "end_scope": args.end_scope,
                                            "data": str(data), "bundle": str(bundle_dir)},
                               "before": before}

    if args.offline:
        store_path = work / "hard.sqlite"
        fleet_drift, _ = _drift(frames.images[fleet_idx], args, seed=args.seed + 1)
        results["fleet_round"] = simulate_fleet(bundle_dir, fleet_drift, nodes, store_path, share_frames,
                                                args.audit_rate, args.alarm_audit_rate, args.seed,
                                                args.alarm_audit_floor)
        say(f"drift: fleet round reached the cloud with {results['fleet_round']['reached_cloud']} frames "
            f"({results['fleet_round']['escalated_to_cloud']} escalated, {results['fleet_round']['audits']} audits); "
            f"drift alarm at frame {results['fleet_round']['alarm_at_frame']}")
        candidate = _retrain(store_path, default_frames_path(store_path), bundle_dir, replay, work, args)
        results["retrain"] = candidate.to_json()
        from tierlite.cloud.publish import build_artifact
        _, art = build_artifact(candidate.bundle_dir, parent=parent, private_key=key)
        results["update"] = art.to_json()
    else:
        results.update(_live(args, bundle_dir, parent, frames, shards, nodes, work, key, pub, replay, share_frames))
        candidate = results.pop("_candidate")
    say("drift: figures of the retrained bundle")
    after = figures(Path(candidate.bundle_dir), eval_clean, eval_drift, eval_y)
    results["after"] = after
    gain = after["drifted"]["end_accuracy"] - before["drifted"]["end_accuracy"]
    clean_drop = before["clean"]["end_accuracy"] - after["clean"]["end_accuracy"]
    esc_change = after["drifted"]["end_escalation"] - before["drifted"]["end_escalation"]
    results["targets"] = [T_DRIFT_GAIN.check(gain), T_CLEAN_DROP.check(clean_drop), T_ESCALATION.check(esc_change)]
    results["seconds"] = round(time.monotonic() - t0, 1)
    rep.results = results
    _write_markdown(rep, results)
    paths = rep.write()
    _print(results)
    say(f"drift: wrote {paths['results']} and {paths['markdown']}")
    return 0


def _retrain(store: Path, frames: Path, bundle_dir: Path, replay: Path, work: Path, args):
    from tierlite.cloud.retrain import PrivacyPolicy, RetrainOptions, retrain

    say("drift: retraining on what the fleet escalated")
    opts = RetrainOptions(store=store, bundle=bundle_dir, out=work / "candidate", frames=frames, replay=replay,
                          privacy=PrivacyPolicy(default=args.privacy), margin=args.margin, seed=args.seed,
                          cache_dir=work.parent / "cache", end_scope=args.end_scope, hint_weight=args.hint_weight,
                          checkpoint=Path(args.checkpoint) if args.checkpoint else None)
    opts.check()
    report = retrain(opts)
    say(report.summary())
    return report


def _live(args, bundle_dir, parent, frames, shards, nodes, work, key, pub, replay, share_frames) -> dict[str, Any]:
    from tierlite.cloud.retrain import default_frames_path
    from tierlite.cloud.rollout import connect, rollout

    out: dict[str, Any] = {}
    update = {"trusted_keys": str(pub), "state_dir": str(work / "edge-models")}
    # The cloud worker keeps frames from opted-in nodes; this benchmark runs the retraining itself, so
    # the worker's own scheduler must not start a second run when the nodes' drift alarms ask for one.
    # The bench streams a camera's hour in seconds: no per-node cap on the frames the cloud keeps.
    cloud_extra = {"retrain": {"replay": str(replay.resolve()), "every_examples": None, "every_seconds": None,
                               "min_interval_seconds": 1e9},
                   "store": {"frames_per_node_rate": 1000.0, "frames_per_node_burst": 10_000}}
    say("drift: starting the edge gateway and cloud worker")
    with Stack(bundle_dir, edge_workers=1, cloud_workers=1, edge_extra={"update": update},
               cloud_extra=cloud_extra) as stack:
        fleet = Fleet(work, bundle_dir, stack.port, stack.prefix, pub, share_frames, args.audit_rate,
                      args.alarm_audit_rate, args.alarm_audit_floor)
        drift = DriftEvents(stack.host, stack.port, stack.prefix)
        try:
            say(f"drift: round 1, {len(nodes)} nodes stream {sum(len(s) for s in shards)} drifted frames")
            paths = []
            for i, (node, idx) in enumerate(zip(nodes, shards)):
                imgs, jpegs = _drift(frames.images[idx], args, seed=args.seed + 1 + i)
                paths.append(fleet.start(node, "round1", fleet.write_frames(node, "round1", jpegs, frames.labels[idx]),
                                         args.fps))
            fleet.wait(timeout=120 + 3 * max(len(s) for s in shards) / args.fps)
            time.sleep(1.0)  # the cloud worker commits its last batch
            round1 = _read_results(paths)
            store = stack.dir / "hard-0.sqlite"
            out["fleet_round"] = {"frames": len(round1), "per_version": live_rates(round1), **_stored(store),
                                  "alarm_at_frame": drift.first_alarms(nodes)}
            say(f"drift: fleet round stored {out['fleet_round']['stored']} frames in the cloud "
                f"({out['fleet_round']['escalated_to_cloud']} escalated, {out['fleet_round']['audits']} audits); "
                f"nodes' drift alarm at frame {out['fleet_round']['alarm_at_frame']}")
            drift.clear()
            candidate = _retrain(store, default_frames_path(store), bundle_dir, replay, work, args)
            out["retrain"] = candidate.to_json()
            out["_candidate"] = candidate

            say(f"drift: round 2, nodes stream {args.live_frames} new drifted frames each while the update rolls out")
            paths, expected = [], 0
            for i, node in enumerate(nodes):
                idx = rng_choice(len(frames.labels), args.live_frames, args.seed + 100 + i)  # at most all frames
                expected += len(idx)
                _, jpegs = _drift(frames.images[idx], args, seed=args.seed + 200 + i)
                paths.append(fleet.start(node, "round2", fleet.write_frames(node, "round2", jpegs, frames.labels[idx]),
                                         args.fps))
            time.sleep(3.0)  # every node online and serving v1 frames before the update appears
            mqtt = connect(f"{stack.host}:{stack.port}")
            try:
                result = rollout(mqtt, candidate.bundle_dir, key, prefix=stack.prefix, parent=parent,
                                 canary=args.canary, canary_nodes=nodes[:1], hold_s=60)
            finally:
                mqtt.stop()
            fleet.wait(timeout=120 + 3 * args.live_frames / args.fps)
            round2 = _read_results(paths)
            out["update"] = result.artifact.to_json()
            out["rollout"] = {"stage": result.stage, "reason": result.reason,
                              "nodes": {n: (r.get("last_event") or {}).get("state") for n, r in result.reports.items()}}
            out["live_round"] = {"frames": len(round2), "expected": expected, "unanswered": expected - len(round2),
                                 "per_version": live_rates(round2), "drift_events": drift.events}
        finally:
            fleet.stop()
            drift.stop()
    return out


class DriftEvents:
    """The nodes' drift events (`<prefix>/<node>/drift`, issue 13) as the live fleet publishes them:
    when each node's alarm went up (its frame count then: the detection delay from the stream's first
    drifted frame) and, after the update, whether it came down."""

    def __init__(self, host: str, port: int, prefix: str):
        from tierlite import topics
        from tierlite.config import BrokerConfig
        from tierlite.mqtt import MqttClient

        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

        def handle(topic: str, payload: bytes) -> None:
            try:
                doc = json.loads(payload)
            except ValueError:
                return
            if isinstance(doc, dict):
                with self._lock:
                    self.events.append({k: doc.get(k) for k in ("node", "alarm", "frames", "model_version", "triggered")})

        self._client = MqttClient(BrokerConfig(host=host, port=port), "tierlite-bench-drift-watch")
        self._client.subscribe(str(topics.node_filter(prefix, topics.DRIFT)), handle, 1)
        self._client.start()

    def first_alarms(self, nodes: list[str]) -> dict[str, int | None]:
        with self._lock:
            return {n: next((e["frames"] for e in self.events if e["node"] == n and e["alarm"]), None) for n in nodes}

    def clear(self) -> None:
        with self._lock:
            self.events = []

    def stop(self) -> None:
        self._client.stop(timeout=0.5)


def _stored(store: Path) -> dict[str, int]:
    """What the live cloud worker kept: escalations and audits in its hard-example store."""
    from tierlite.cloud.store import HardExampleStore

    if not store.is_file():
        return {"stored": 0, "escalated_to_cloud": 0, "audits": 0}
    with HardExampleStore.open_readonly(store) as st:
        audits, total = st.count(audit=True), st.count()
    return {"stored": total, "escalated_to_cloud": total - audits, "audits": audits}


def rng_choice(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(n, min(k, n), replace=False)


def _write_markdown(rep: Report, r: dict[str, Any]) -> None:
    b, a = r["before"], r["after"]
    rows = [{"model": f"v{b['version']} (running)", **_row(b)}, {"model": f"v{a['version']} (retrained)", **_row(a)}]
    cols = [("model", "model", str), ("drift_end", "end exit, drifted %", None), ("clean_end", "end exit, clean %", None),
            ("drift_esc", "drifted escalated by end %", None), ("clean_esc", "clean escalated by end %", None),
            ("drift_sys", "system, drifted %", None), ("clean_sys", "system, clean %", None)]
    s = r["scenario"]
    drift = (f"Corruption {s['corruption']}" if s.get("corruption")
             else f"Low light (gain {s['gain']}) + sensor noise (sigma {s['noise_sigma']})")
    rep.add_markdown(f"{drift} + JPEG, "
                     f"{s['nodes']} nodes, {s['fleet_frames']} fleet frames, {s['eval_frames']} held-out frames, "
                     f"privacy `{s['privacy']}`.\n")
    rep.add_markdown(markdown_table(cols, rows))
    rep.add_markdown(markdown_table([("target", "target", str), ("goal", "goal", str), ("measured", "measured", None),
                                     ("status", "status", str)], r["targets"]))
    if "update" in r:
        u = r["update"]
        rep.add_markdown(f"Update v{u['version']}: {u['artifact_bytes']:,} B per node on the wire "
                         f"(bundle {u['bundle_bytes']:,} B; patched {', '.join(u['patched']) or '-'}; "
                         f"whole {', '.join(u['included']) or '-'}).")
    for key in ("fleet_round", "live_round"):
        if "per_version" in r.get(key, {}):
            rep.add_markdown(f"{key.replace('_', ' ')} (live, share escalated per model version): " + ", ".join(
                f"{v}: {x['escalated']:.1f} % of {x['frames']} frames ({x['fallbacks']} fallbacks)"
                for v, x in r[key]["per_version"].items()))


def _row(f: dict[str, Any]) -> dict[str, Any]:
    return {"drift_end": f["drifted"]["end_accuracy"], "clean_end": f["clean"]["end_accuracy"],
            "drift_esc": f["drifted"]["end_escalation"], "clean_esc": f["clean"]["end_escalation"],
            "drift_sys": f["drifted"]["system_accuracy"], "clean_sys": f["clean"]["system_accuracy"]}


def _print(r: dict[str, Any]) -> None:
    b, a = r["before"], r["after"]
    print(f"end-exit accuracy, drifted: {b['drifted']['end_accuracy']:.2f} -> {a['drifted']['end_accuracy']:.2f} %")
    print(f"end-exit accuracy, clean:   {b['clean']['end_accuracy']:.2f} -> {a['clean']['end_accuracy']:.2f} %")
    print(f"escalated by the end, drifted: {b['drifted']['end_escalation']:.1f} -> {a['drifted']['end_escalation']:.1f} %")
    print(f"system accuracy, drifted: {b['drifted']['system_accuracy']:.2f} -> {a['drifted']['system_accuracy']:.2f} %, "
          f"clean: {b['clean']['system_accuracy']:.2f} -> {a['clean']['system_accuracy']:.2f} %")
    if "update" in r:
        print(f"update: {r['update']['artifact_bytes']:,} B per node")
    for key in ("fleet_round", "live_round"):
        if "per_version" in r.get(key, {}):
            print(f"{key}: " + ", ".join(f"{v} escalated {x['escalated']:.1f} % of {x['frames']}"
                                         for v, x in r[key]["per_version"].items()))
    if "alarm_at_frame" in r.get("fleet_round", {}):
        print(f"fleet round: drift alarm at frame {r['fleet_round']['alarm_at_frame']} (per node)")
    if "live_round" in r:
        print(f"live round: {r['live_round']['unanswered']} frames without a result; rollout {r['rollout']['stage']}")
        print("live round drift events: " + (", ".join(
            f"{e['node']} v{e['model_version']} {'raised' if e['alarm'] else 'cleared'} at frame {e['frames']}"
            for e in r["live_round"].get("drift_events", [])) or "none"))
    for t in r["targets"]:
        print(f"target {t['target']}: {t['goal']}, measured {t['measured']:.2f}: {t['status']}")
