"""`tierlite bench runtime`: latency and throughput of the co-inference runtime on loopback.

Measured, each over real Mosquitto and real processes (`python -m tierlite ...`):
  camera decision   end segment + exit decision per frame, in this process (the device's code path)
  escalation RTT    a `tierlite device` process at a paced rate with end threshold 0 (every frame goes
                    up); edge threshold 0 -> end->edge->cloud->result, edge threshold 1 -> end->edge->result;
                    latency = frame in hand -> result event on the node (its own monotonic clock)
  edge throughput   one, then two edge workers (shared subscription) answering every feature
                    (edge threshold 1), fed real FEATURE messages as fast as they take them by a raw-socket
                    MQTT publisher (no Python client overhead in the generator); escalations/s = worker
                    frames counter (Prometheus) over a steady window, the backlog kept bounded.
Bounded in time and count; prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

from tierlite import topics
from tierlite.tools.bench.report import cpu_model, cpu_seconds
from tierlite.tools.stack import (Broker, TierProcess, free_port, prepare_bundle, quiet, read_jsonl, wait_until,
                                  write_yaml)

TARGETS = {"camera_decision_p50_ms": 0.2, "escalation_p99_ms": 10.0, "escalations_per_s_per_worker": 3000}


def configure_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", help="bundle to serve (default: train a small one on digits in --workdir)")
    p.add_argument("--data", help="image folder of frames (<class>/*.jpg; default: the digits test frames)")
    p.add_argument("--workdir", default="bench-runtime-work", help="scratch folder (bundle, configs, logs)")
    p.add_argument("--out", default="bench-runtime.json", help="JSON results file (default bench-runtime.json)")
    p.add_argument("--decision-frames", type=int, default=2000, help="frames for camera decision latency")
    p.add_argument("--rtt-frames", type=int, default=500, help="frames per round-trip measurement")
    p.add_argument("--rtt-fps", type=float, default=100.0, help="paced frame rate of the round-trip node")
    p.add_argument("--seconds", type=float, default=5.0, help="steady window per throughput measurement")
    p.add_argument("--max-workers", type=int, default=2, help="measure throughput for 1..N edge workers")


# -- a minimal raw MQTT 3.1.1 publisher: the load generator must not be the bottleneck ----------
def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _connect(port: int, client_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack(">H", 120) + struct.pack(">H", len(cid)) + cid
    sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
    ack = sock.recv(4)
    if len(ack) != 4 or ack[0] != 0x20 or ack[3] != 0:
        raise ConnectionError(f"broker refused the load generator: {ack!r}")
    return sock


def _publish_packet(topic: str, payload: bytes) -> bytes:
    t = topic.encode()
    body = struct.pack(">H", len(t)) + t + payload
    return b"\x30" + _remaining_length(len(body)) + body


# -- measurements --------------------------------------------------------------------------------
def _frames(data: Path, bundle, limit: int) -> np.ndarray:
    from tierlite.data import load_image_folder

    return load_image_folder(data, tuple(bundle.input_shape[1:3]), limit=limit, seed=0).images


def camera_decision(bundle, images: np.ndarray, n: int) -> dict[str, Any]:
    """End segment + exit decision, exactly what DeviceDaemon.process_frame times as decision_ms."""
    from tierlite.policy import decide
    from tierlite.segment import Segment

    seg = Segment(bundle, "end")
    thr = bundle.thresholds.get("end", 0.5)
    for img in images[:50]:
        decide(seg.run(img[None]).logits, thr)
    times = []
    for i in range(n):
        img = images[i % len(images)][None]
        t0 = time.perf_counter()
        decide(seg.run(img).logits, thr)
        times.append((time.perf_counter() - t0) * 1000)
    return {"frames": n, **_pct(times)}


def _pct(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50": None, "p99": None}
    return {"p50": round(float(np.percentile(ms, 50)), 4), "p99": round(float(np.percentile(ms, 99)), 4),
            "mean": round(float(np.mean(ms)), 4)}


class _Stack:
    def __init__(self, work: Path, bundle_dir: Path, port: int, prefix: str = "bench"):
        self.work, self.bundle_dir, self.port, self.prefix = work, bundle_dir, port, prefix

    def gateway(self, workers: int, threshold: float):
        mport = free_port()
        cfg = write_yaml(self.work / f"edge-{workers}w-t{threshold:g}.yaml", {
            "bundle": str(self.bundle_dir), "prefix": self.prefix, "broker": {"port": self.port},
            "mosquitto": {"managed": False}, "discovery": {"advertise": False}, "workers": workers,
            "threshold": threshold, "metrics_port": mport,
            "node_budget": {"enabled": False}})  # 8 load nodes at saturation: capacity, not the per-node budget
        proc = TierProcess(f"edge-{workers}w-t{threshold:g}", ["edge", "--config", str(cfg)], self.work)
        wait_until(lambda: "gateway ready" in proc.log() or not proc.running(), 60, "the edge gateway")
        return proc, mport

    def device_rtt(self, name: str, data: Path, frames: int, fps: float) -> list[dict]:
        results = self.work / f"{name}.jsonl"
        results.unlink(missing_ok=True)
        cfg = write_yaml(self.work / f"{name}.yaml", {
            "node_id": name, "bundle": str(self.bundle_dir), "prefix": self.prefix, "broker": {"port": self.port},
            "source": {"uri": str(data), "fps": fps, "loop": True, "limit": frames}, "threshold": 0.0,
            "deadline_ms": 1000, "wait_for_broker": 10, "results_file": str(results)})
        proc = TierProcess(name, ["device", "--config", str(cfg)], self.work)
        proc.wait(frames / fps + 60)
        return read_jsonl(results)


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


def edge_throughput(port: int, metrics_port: int, payloads: list[bytes], seconds: float, prefix: str,
                    worker_pids: list[int] | None = None, nodes: int = 8, backlog: int = 2000) -> dict[str, Any]:
    from tierlite.metrics import scrape

    url = f"http://127.0.0.1:{metrics_port}/metrics"

    last = [0.0]

    def processed() -> float:
        try:  # a busy gateway may refuse a scrape now and then: keep the last reading
            last[0] = sum(v for k, v in scrape(url, timeout=5).items() if k.startswith("tierlite_frames_total"))
        except OSError:
            pass
        return last[0]

    packets = [_publish_packet(topics.node_topic(prefix, f"load{i % nodes}", topics.FEATURE), p) for i, p in enumerate(payloads)]
    chunk = b"".join(packets[:50])
    sock = _connect(port, f"bench-load-{os.getpid()}")
    sent, start = 0, processed()
    t_begin = time.monotonic()
    t_window = t_begin + 1.0  # warm-up before the steady window
    t_end = t_window + seconds
    window: list[tuple[float, float]] = []
    next_poll = 0.0
    done, lost, progress_at, seen = start, 0, time.monotonic(), start
    try:
        while True:
            now = time.monotonic()
            if now >= next_poll:
                done = processed()
                next_poll = now + 0.25
                if now >= t_window and (not window or window[-1][0] < now):
                    window.append((now, done, _cpu_seconds(worker_pids or [])))
                if now >= t_end:
                    break
            if done != seen:
                seen, progress_at = done, now
            elif now - progress_at > 1.0 and sent - (done - start) - lost >= backlog:
                lost = sent - (done - start)  # no progress: those were dropped (QoS 0), not queued
                progress_at = now
            if sent - (done - start) - lost < backlog:
                sock.sendall(chunk)
                sent += 50
            else:
                time.sleep(0.001)
    finally:
        sock.close()
    (t1, n1, c1), (t2, n2, c2) = window[0], window[-1]
    cpu = c2 - c1
    return {"per_s": round((n2 - n1) / (t2 - t1), 1), "window_s": round(t2 - t1, 2), "sent": sent,
            "processed": int(n2 - start), "worker_cpu_s": round(cpu, 2),
            # what one worker would sustain with a core to itself: messages per CPU-second it used
            "per_cpu_s": round((n2 - n1) / cpu, 1) if cpu > 0 else None}


def run_runtime(args: argparse.Namespace) -> int:
    from tierlite.bundle import Bundle
    from tierlite.data import make_digits_folder
    from tierlite.errors import ConfigError
    from tierlite.segment import Segment
    from tierlite.wire import Kind, boundary_spec, encode_tensor_message

    if args.max_workers < 1 or args.seconds <= 0 or args.rtt_frames < 10 or args.decision_frames < 10:
        raise ConfigError("--max-workers >= 1, --seconds > 0, --rtt-frames and --decision-frames >= 10")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.bundle:
        bundle_dir = Path(args.bundle)
        data = Path(args.data) if args.data else make_digits_folder(work / "digits") / "test"
    else:
        digits = make_digits_folder(work / "digits")
        print("== bundle: small preset on digits (trained once, then reused from --workdir)")
        with quiet(work / "train.log"):
            bundle_dir = prepare_bundle(digits / "train", work / "bundle")
        data = Path(args.data) if args.data else digits / "test"
    bundle = Bundle.load(bundle_dir)
    images = _frames(data, bundle, 500)
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "command": "tierlite bench runtime " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                       if k in ("decision_frames", "rtt_frames", "rtt_fps", "seconds", "max_workers")),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(), "load_average_at_start": load_before,
        "bundle": f"{bundle.name} v{bundle.version}", "targets": TARGETS}

    print(f"== camera decision latency ({args.decision_frames} frames, end segment + exit, this process)")
    result["camera_decision_ms"] = camera_decision(bundle, images, args.decision_frames)

    broker = Broker(work / "broker").start()
    stack = _Stack(work, bundle_dir, broker.port)
    cloud_cfg = write_yaml(work / "cloud.yaml", {"bundle": str(bundle_dir), "prefix": stack.prefix,
                                                 "broker": {"port": broker.port}, "metrics_port": None,
                                                 "store": {"path": str(work / "hard.sqlite")}})
    cloud = TierProcess("cloud", ["cloud", "--config", str(cloud_cfg)], work)
    try:
        wait_until(lambda: "mqtt: connected" in cloud.log(), 30, "the cloud worker")
        end = Segment(bundle, "end")
        spec = boundary_spec(bundle, Kind.FEATURE)
        payloads = []
        for i, img in enumerate(images[:200]):
            o = end.run(img[None])
            payloads.append(encode_tensor_message(spec, i, o.feature, [o.logits]))
        result["feature_message_bytes"] = len(payloads[0])

        for label, threshold, tier in (("cloud", 0.0, "cloud"), ("edge", 1.0, "edge")):
            print(f"== escalation round trip end->edge->{'cloud->' if tier == 'cloud' else ''}result "
                  f"({args.rtt_frames} frames at {args.rtt_fps:g} fps, one edge worker)")
            gw, mport = stack.gateway(1, threshold)
            try:
                rows = stack.device_rtt(f"rtt-{label}", data, args.rtt_frames, args.rtt_fps)
                ok = [r["latency_ms"] for r in rows if r["tier"] == tier and not r["fallback"]]
                result[f"escalation_rtt_{label}_ms"] = {"frames": len(rows), "answered": len(ok),
                                                        "fallbacks": sum(r["fallback"] for r in rows), **_pct(ok)}
                if tier == "edge":
                    print("== edge worker throughput, 1 worker")
                    result["edge_throughput"] = {"1": edge_throughput(broker.port, mport, payloads, args.seconds,
                                                                      stack.prefix, _children(gw.proc.pid))}
            finally:
                gw.stop()
        for n in range(2, args.max_workers + 1):
            print(f"== edge worker throughput, {n} workers (shared subscription)")
            gw, mport = stack.gateway(n, 1.0)
            try:
                result["edge_throughput"][str(n)] = edge_throughput(broker.port, mport, payloads, args.seconds,
                                                                   stack.prefix, _children(gw.proc.pid))
            finally:
                gw.stop()
    finally:
        cloud.stop()
        broker.stop()
    result["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    _print(result, args.out)
    return 0


def _machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()}


def _print(r: dict[str, Any], out: str) -> None:
    d, c, e = r["camera_decision_ms"], r["escalation_rtt_cloud_ms"], r["escalation_rtt_edge_ms"]
    tp = r["edge_throughput"]
    print(f"\n{'figure':52} {'measured':>16} {'target':>10}")
    print(f"{'camera decision p50 / p99 (ms)':52} {d['p50']:>7.3f} / {d['p99']:<6.3f} {'<= 0.2':>10}")
    print(f"{'escalation end->edge->cloud->result p50 / p99 (ms)':52} {c['p50']:>7.2f} / {c['p99']:<6.2f} {'p99 <= 10':>10}")
    print(f"{'escalation end->edge->result p50 / p99 (ms)':52} {e['p50']:>7.2f} / {e['p99']:<6.2f} {'':>10}")
    for n, row in tp.items():
        print(f"{f'escalations/s, {n} edge worker(s), wall clock':52} {row['per_s']:>16,.0f} {'>= 3,000' if n == '1' else '':>10}")
    for n, row in tp.items():
        per_cpu = f"{row['per_cpu_s']:,.0f}" if row.get("per_cpu_s") else "-"
        print(f"{f'  per worker CPU-second ({n} worker(s))':52} {per_cpu:>16}")
    print(f"fallbacks: cloud RTT run {c['fallbacks']}, edge RTT run {e['fallbacks']}; feature message "
          f"{r['feature_message_bytes']} B; load average {r['load_average_at_start'][0]:.1f} at start "
          f"on {r['machine']['cores']} cores\nwritten {out}")
