"""End-to-end latency through the real runtime, on a subset of the benchmark frames.

tierlite configurations: a real camera node (tierlite.device.daemon.DeviceDaemon, in this
process) against `tierlite edge` + `tierlite cloud` processes on loopback (tierlite.tools.stack),
running a copy of the bundle whose manifest holds the configuration's thresholds. Latency is the
daemon's own result event: frame in hand -> result (camera decision for frames it keeps).

cloud-only offload: the node publishes each frame's JPEG file (4-byte frame id + JPEG) to a
Sedna-style offload worker process (tierlite.tools.bench.offload: decode, full chain, answer) through a
Mosquitto with the edge gateway's generated config (tierlite.tools.stack.Broker); latency =
publish -> answer.

Frames are offered one at a time at --e2e-fps (a camera's pace), so latency is not queueing.
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.errors import TierliteError
from tierlite.tools.bench.report import Progress, latency_ms, say
from tierlite.tools.stack import Broker, Stack, TierProcess

E2E_FPS = 50.0
NODE = "cam-0001"


def measure_e2e(configs, frames, idx: np.ndarray, args) -> dict[str, dict[str, Any]]:
    """{config name: {e2e_real_*: ...}} for tierlite and cloud-only configurations."""
    out: dict[str, dict[str, Any]] = {}
    fps = getattr(args, "e2e_fps", E2E_FPS)
    for c in configs:
        say(f"real runtime, {len(idx)} frames: {c.name}")
        if c.kind == "cloud-only":
            out[c.name] = run_offload(frames, idx, c.bundle_dir, fps, args.runtime, not args.quiet)
        else:
            out[c.name] = run_tierlite(c, frames, idx, fps, args.runtime, not args.quiet)
    return out


def bundle_with_thresholds(bundle_dir: Path, thresholds: dict[str, float], dest: Path) -> Path:
    """A copy of the bundle whose manifest carries `thresholds` (what every tier then reads)."""
    from tierlite.bundle import MANIFEST, write_manifest

    shutil.copytree(bundle_dir, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["thresholds"] = {k: float(v) for k, v in thresholds.items()}
    write_manifest(dest, manifest)
    return dest


def _summary(events: list[dict[str, Any]], labels: np.ndarray, expected: int) -> dict[str, Any]:
    lat = [e["latency_ms"] / 1e3 for e in events]
    escalated = [e["latency_ms"] / 1e3 for e in events if e.get("tier") != "end" or e.get("bytes_up", 0) > 0]
    all_ms, esc_ms = latency_ms(lat), latency_ms(escalated)
    tiers = [e.get("tier") for e in events]
    correct = [e["label"] == labels[int(e["source"])] for e in events]
    decision = latency_ms([e["decision_ms"] / 1e3 for e in events if "decision_ms" in e])
    return {
        "camera_real_p50_ms": decision["p50_ms"], "camera_real_p99_ms": decision["p99_ms"],
        "e2e_real_n": len(events), "e2e_real_p50_ms": all_ms["p50_ms"], "e2e_real_p99_ms": all_ms["p99_ms"],
        "escalation_real_n": esc_ms["n"], "escalation_real_p50_ms": esc_ms["p50_ms"],
        "escalation_real_p99_ms": esc_ms["p99_ms"],
        "real_top1": 100.0 * float(np.mean(correct)) if correct else None,
        "real_share": {t: 100.0 * tiers.count(t) / max(len(tiers), 1) for t in ("end", "edge", "cloud")},
        "real_fallbacks": sum(1 for e in events if e.get("fallback")),
        "real_missing": expected - len(events),
    }


def run_tierlite(config, frames, idx: np.ndarray, fps: float, runtime: str, progress: bool) -> dict[str, Any]:
    from tierlite.config import DeviceConfig, config_from_dict
    from tierlite.device.daemon import DeviceDaemon

    tmp = Path(tempfile.mkdtemp(prefix="tierlite-e2e-"))
    try:
        bundle_dir = bundle_with_thresholds(config.bundle_dir, config.thresholds, tmp / "bundle")
        with Stack(bundle_dir) as stack:
            cfg = config_from_dict({
                "node_id": NODE, "bundle": str(bundle_dir), "prefix": stack.prefix, "runtime": runtime,
                "source": {"uri": str(bundle_dir)},  # unused: frames are handed over one by one
                "broker": {"host": stack.host, "port": stack.port}}, DeviceConfig, where="bench node")
            node = DeviceDaemon(cfg)
            events: list[dict[str, Any]] = []
            done = threading.Condition()

            def collect(event: dict[str, Any]) -> None:
                with done:
                    events.append(event)
                    done.notify()

            node.add_result_listener(collect)
            node.start()
            if not node.mqtt.wait_connected(30):
                raise TierliteError("bench: the camera node could not connect to the edge broker")
            _warm_up(node, frames.images[idx[0]])
            events.clear()
            bar = Progress(len(idx), "  frames", enabled=progress)
            t0 = time.monotonic()
            for k, i in enumerate(idx):
                _pace(t0, k, fps)
                node.process_frame(frames.images[i], ref=str(int(i)))
                bar.update()
            bar.close()
            with done:
                done.wait_for(lambda: len(events) >= len(idx), timeout=cfg.deadline_ms / 1000 + 5)
            node.shutdown()
        return _summary(list(events), frames.labels, len(idx))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _warm_up(node, image: np.ndarray, n: int = 20) -> None:
    """A few frames first (escalated or not) so that first-call costs are not measured."""
    for _ in range(n):
        node.process_frame(image, ref="0")
        time.sleep(0.01)
    time.sleep(0.3)


def _pace(t0: float, k: int, fps: float) -> None:
    delay = t0 + k / fps - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_offload(frames, idx: np.ndarray, bundle_dir: Path, fps: float, runtime: str, progress: bool) -> dict[str, Any]:
    """Sedna-style baseline: JPEG up, the cloud decodes and runs the full chain, answer back."""
    from tierlite.tools.bench.offload import FRAME_ID, offload_topic
    from tierlite.config import BrokerConfig
    from tierlite.mqtt import MqttClient
    from tierlite.topics import node_topic as topic
    from tierlite.wire import decode_answer

    tmp = Path(tempfile.mkdtemp(prefix="tierlite-offload-"))
    mq = Broker(tmp).start()  # Mosquitto with the edge gateway's generated config
    port = mq.port
    worker = None
    client = None
    try:
        worker = TierProcess("offload", ["--port", str(port), "--bundle", str(bundle_dir), "--runtime", runtime],
                             tmp, module="tierlite.tools.bench.offload")
        sent: dict[int, float] = {}
        got: dict[int, tuple[float, int]] = {}
        cond = threading.Condition()

        def on_answer(_topic: str, payload: bytes) -> None:
            now = time.perf_counter()
            a = decode_answer(payload)
            with cond:
                if a.frame_id in sent and a.frame_id not in got:
                    got[a.frame_id] = (now - sent[a.frame_id], a.label)
                    cond.notify()

        client = MqttClient(BrokerConfig(host="127.0.0.1", port=port), "tierlite-bench-offload-node")
        client.subscribe(topic("tierlite", NODE, "answer"), on_answer)
        client.start()
        if not client.wait_connected(30):
            raise TierliteError("bench: offload node could not connect to Mosquitto")
        _wait_worker(client, worker)
        jpegs = {int(i): frames.paths[i].read_bytes() for i in idx}
        for k in range(20):  # warm-up
            fid = 0x80000000 + k
            with cond:
                sent[fid] = time.perf_counter()
            client.publish(offload_topic("tierlite", NODE), struct.pack(FRAME_ID, fid) + jpegs[int(idx[0])])
            time.sleep(0.01)
        time.sleep(0.5)
        with cond:
            sent.clear()
            got.clear()
        bar = Progress(len(idx), "  frames", enabled=progress)
        t0 = time.monotonic()
        for k, i in enumerate(idx):
            _pace(t0, k, fps)
            with cond:
                sent[int(i)] = time.perf_counter()
            client.publish(offload_topic("tierlite", NODE), struct.pack(FRAME_ID, int(i)) + jpegs[int(i)])
            bar.update()
        bar.close()
        with cond:
            cond.wait_for(lambda: len(got) >= len(idx), timeout=10)
            results = dict(got)
        lat = latency_ms([v[0] for v in results.values()])
        correct = [label == frames.labels[i] for i, (_, label) in results.items()]
        return {"e2e_real_n": lat["n"], "e2e_real_p50_ms": lat["p50_ms"], "e2e_real_p99_ms": lat["p99_ms"],
                "escalation_real_n": lat["n"], "escalation_real_p50_ms": lat["p50_ms"],
                "escalation_real_p99_ms": lat["p99_ms"],
                "real_top1": 100.0 * float(np.mean(correct)) if correct else None,
                "real_missing": len(idx) - len(results)}
    finally:
        if client is not None:
            client.stop(timeout=0.5)
        if worker is not None:
            worker.stop(10)
        mq.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_worker(client, worker: TierProcess, timeout: float = 60.0) -> None:
    """Until the offload worker's retained 'ready' status appears."""
    ready = threading.Event()
    client.subscribe("tierlite/_bench/offload/status", lambda t, p: ready.set(), 1)
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if not worker.running():
            raise TierliteError(f"bench: offload worker exited with code {worker.proc.returncode}: "
                                f"{worker.log()[-300:]}")
        if time.monotonic() > deadline:
            raise TierliteError(f"bench: offload worker not ready within {timeout:.0f}s")
