"""The partition planner against reality (docs/PARTITIONING.md): for each link (bandwidth shaped
with `tc tbf` between two network namespaces this bench creates) and each candidate cut, a
re-cut two-segment bundle runs through the real runtime: `tierlite device` in the node namespace,
the edge gateway (Mosquitto + one edge worker) in the gateway namespace, a small TCP relay in
front of the gateway's loopback-only broker (which can also add one-way delay: `tc netem` is not
in this kernel). Every frame escalates (the cut comparison, Neurosurgeon's question); the measured
p50 of each cut is set against the planner's prediction, whose link is the tbf rate and burst
and the RTT measured by an MQTT echo through the same path.

    python -m tierlite.tools.bench.partition run --workdir W --frames DIR --out partition.json
        [--mbits 1 10 100] [--frames-per-run 40] [--delay-ms 0]

Needs root (ip netns, tc); without it, or if a namespace cannot be made, it says so and runs on
loopback with the planner's link set to what loopback is (no shaping).
Internal subcommands (run inside a namespace by the bench): `gateway`, `probe`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("tierlite.bench.partition")

GW_ADDR, NODE_ADDR = "10.216.0.1", "10.216.0.2"
RELAY_PORT = 18830
BURST_BYTES = 1600  # the smallest tbf bucket that passes a 1514-byte frame
PROBE_REQUEST, PROBE_REPLY = "tlp/probe/request", "tlp/probe/reply"
WARMUP_FRAMES = 5  # connection set-up and first-invoke costs are not the link's


# -- namespaces and shaping -----------------------------------------------------------------------
def _sh(*cmd: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise OSError(f"{' '.join(cmd)}: {res.stderr.strip()}")


class Namespaces:
    """Two namespaces joined by a veth pair; `shape(bps)` sets tbf both ways."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.gw, self.node = f"tlp-gw-{tag}", f"tlp-node-{tag}"
        self.gw_if, self.node_if = f"tlpg{tag}", f"tlpn{tag}"

    def __enter__(self) -> "Namespaces":
        try:
            for ns in (self.gw, self.node):
                _sh("ip", "netns", "add", ns)
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "link", "add", self.gw_if, "netns", self.gw, "type", "veth", "peer", "name", self.node_if,
                "netns", self.node)
            for ns, ifname, addr in ((self.gw, self.gw_if, GW_ADDR), (self.node, self.node_if, NODE_ADDR)):
                _sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", ifname)
                _sh("ip", "-n", ns, "link", "set", ifname, "up")
        except OSError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in (self.node, self.gw):  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def shape(self, bps: float) -> None:
        for ns, ifname in ((self.node, self.node_if), (self.gw, self.gw_if)):
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", ifname, "root", "tbf",
                "rate", f"{int(bps)}bit", "burst", str(BURST_BYTES), "latency", "2s")

    def prefix(self, which: str) -> list[str]:
        return ["ip", "netns", "exec", self.gw if which == "gw" else self.node]


# -- relay (gateway namespace) --------------------------------------------------------------------
async def _pipe(reader, writer, delay_s: float) -> None:
    """Copy one direction; with a delay, each chunk leaves `delay_s` after it arrived, in order."""
    queue: asyncio.Queue = asyncio.Queue()

    async def send():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay_s, data))
    finally:
        queue.put_nowait((0.0, None))
        await sender


async def _relay(listen: str, port: int, target_port: int, delay_s: float) -> None:
    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, delay_s), _pipe(up_reader, writer, delay_s),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, listen, port)
    async with server:
        await server.serve_forever()


def serve_gateway(bundle: str, listen: str, port: int, delay_ms: float) -> int:
    from tierlite.tools.stack import Stack

    from tierlite.config import BrokerConfig
    from tierlite.mqtt import MqttClient

    with Stack(bundle, edge_workers=1, cloud_workers=0) as stack:
        # An echo beside the edge worker: the probe's path is an escalation's, minus the compute.
        echo = MqttClient(BrokerConfig(host="127.0.0.1", port=stack.port), f"tlp-echo-{os.getpid()}")
        echo.subscribe(PROBE_REQUEST, lambda t, p: echo.publish(PROBE_REPLY, p, 0), 0)
        echo.start()
        threading.Thread(target=lambda: asyncio.run(_relay(listen, port, stack.port, delay_ms / 1000.0)),
                         daemon=True).start()
        print("READY", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(0.2):
            if not all(p.running() for p in stack.procs.values()):
                print("gateway process exited", file=sys.stderr)
                return 1
        echo.stop()
    return 0


def probe_rtt(host: str, port: int, count: int) -> float:
    """Median round trip (s) of a 1-byte message node -> broker -> echo beside the edge worker -> node."""
    from tierlite.config import BrokerConfig
    from tierlite.mqtt import MqttClient

    got = threading.Event()
    client = MqttClient(BrokerConfig(host=host, port=port), f"tlp-probe-{os.getpid()}")
    client.subscribe(PROBE_REPLY, lambda t, p: got.set(), 0)
    client.start()
    if not client.wait_connected(10):
        raise OSError(f"probe: no broker at {host}:{port}")
    time.sleep(0.3)  # the subscription is in place
    rtts = []
    for _ in range(count):
        got.clear()
        t0 = time.perf_counter()
        client.publish(PROBE_REQUEST, b"x", 0)
        if got.wait(2.0):
            rtts.append(time.perf_counter() - t0)
        time.sleep(0.02)
    client.stop()
    if not rtts:
        raise OSError("probe: no echo came back")
    return statistics.median(rtts)


# -- bundles of re-cut segments -------------------------------------------------------------------
def write_cut_bundle(unsplit, cut_name: str, labels: list[str], out: Path, points: list[dict] | None = None) -> Path:
    """A two-segment bundle: end = head (frame -> cut tensor + camera exit), edge = tail (-> final logits)."""
    from tierlite.converters.partition import write_recut_bundle

    return write_recut_bundle(unsplit, [cut_name], labels, out, operating_points=points)


def message_overhead(bundle_dir: Path, node: str = "n1", prefix: str = "tierlite") -> int:
    """Bytes an escalation carries beyond its cut tensor: tierlite wire header + exit logits + MQTT
    PUBLISH header and topic (QoS 0)."""
    import numpy as np

    from tierlite import topics, wire
    from tierlite.bundle import Bundle

    b = Bundle.load(bundle_dir)
    spec = wire.boundary_spec(b, wire.Kind.FEATURE)
    feat = spec.feature
    payload = wire.encode_tensor_message(spec, 0, np.zeros(feat.shape, np.int8), [np.zeros(len(b.labels), np.float32)])
    topic = topics.node_topic(prefix, node, topics.FEATURE)
    variable = 2 + len(topic) + 1  # topic length + topic + MQTT 5 property length (none)
    size = variable + len(payload)
    return int(size - int(np.prod(feat.shape)) + 1 + (1 if size < 128 else 2 if size < 16384 else 3))


# -- one measured run -----------------------------------------------------------------------------
def run_node(prefix_cmd: list[str], bundle: Path, frames: Path, host: str, port: int, limit: int, fps: float,
             workdir: Path, adaptive: dict | None = None, threshold: float | None = 0.0,
             during=None, deadline_ms: float = 10000.0) -> list[dict]:
    from tierlite.tools.stack import read_jsonl, write_yaml

    results = workdir / "results.jsonl"
    results.unlink(missing_ok=True)
    cfg = {"node_id": "n1", "bundle": str(bundle), "source": {"uri": str(frames), "fps": fps, "limit": limit,
                                                              "loop": True},
           "broker": {"host": host, "port": port}, "deadline_ms": deadline_ms, "wait_for_broker": 15.0,
           "results_file": str(results), "audit_rate": 0.0, "drift": {"enabled": False}}
    if threshold is not None:
        cfg["threshold"] = threshold
    if adaptive:
        cfg["adaptive"] = adaptive
    conf = write_yaml(workdir / "node.yaml", cfg)
    with open(workdir / "node.log", "wb") as logf:
        proc = subprocess.Popen(prefix_cmd + [sys.executable, "-m", "tierlite", "--log-level", "info", "device",
                                              "--config", str(conf)], stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if during is not None:
            during(proc)
        try:
            proc.wait(timeout=limit / fps + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise OSError(f"node did not finish; see {workdir / 'node.log'}") from None
    if proc.returncode:
        raise OSError(f"node exited {proc.returncode}: {(workdir / 'node.log').read_text()[-1500:]}")
    return read_jsonl(results)


def latency_summary(events: list[dict]) -> dict:
    import numpy as np
    used = [e for e in events if e["frame"] >= WARMUP_FRAMES]
    up = [e["latency_ms"] for e in used if e["tier"] != "end" and not e["fallback"]]
    allms = [e["latency_ms"] for e in used]
    return {"frames": len(used), "escalated_answered": len(up),
            "fallbacks": sum(1 for e in used if e["fallback"]),
            "p50_ms": float(np.percentile(allms, 50)) if allms else None,
            "p99_ms": float(np.percentile(allms, 99)) if allms else None,
            "escalated_p50_ms": float(np.percentile(up, 50)) if up else None}


class Gateway:
    def __init__(self, prefix_cmd: list[str], bundle: Path, listen: str, delay_ms: float, log_path: Path):
        self.log_path = log_path
        self.out = open(log_path, "wb")
        self.proc = subprocess.Popen(prefix_cmd + [sys.executable, "-m", "tierlite.tools.bench.partition", "gateway",
                                                   "--bundle", str(bundle), "--listen", listen, "--port",
                                                   str(RELAY_PORT), "--delay-ms", str(delay_ms)],
                                     stdout=self.out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        deadline = time.monotonic() + 120
        while b"READY" not in log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise OSError(f"gateway did not start: {log_path.read_text()[-1500:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


def probe(prefix_cmd: list[str], host: str, count: int = 30) -> float:
    res = subprocess.run(prefix_cmd + [sys.executable, "-m", "tierlite.tools.bench.partition", "probe", "--host", host,
                                       "--port", str(RELAY_PORT), "--count", str(count)],
                         capture_output=True, text=True, timeout=120)
    if res.returncode:
        raise OSError(f"probe failed: {res.stderr[-800:]}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["rtt_s"])


# -- the bench --------------------------------------------------------------------------------
def run_bench(args) -> int:
    from tierlite.converters.partition import profile_model
    from tierlite.partition import Link, Power, Profile, predict

    t0 = time.monotonic()
    cpu0 = time.process_time()
    args.frames, args.workdir = args.frames.resolve(), args.workdir.resolve()  # the node runs elsewhere
    prof_json, unsplit, meta = profile_model(args.workdir, repeats=args.repeats, limit=args.limit)
    prof = Profile.from_json(prof_json)
    labels = _labels(args.frames)
    work = Path(tempfile.mkdtemp(prefix="tierlite-partition-"))
    cuts = {}
    for c in prof.candidates:
        if c.exit_on_device:
            cuts[c.name] = (c, write_cut_bundle(unsplit, c.name, labels, work / f"bundle-{c.name}"))
        else:
            log.warning("cut %s: no camera exit before it; not runnable as a tierlite bundle (planned only)", c.name)
    ns: Namespaces | None = None
    try:
        ns = Namespaces().__enter__()
        mode = "netns+tbf"
    except OSError as e:
        print(f"note: no network namespace ({e}); falling back to loopback without shaping", file=sys.stderr)
        mode = "loopback"
    report = {"mode": mode, "workdir": str(args.workdir), "delay_ms_each_way": args.delay_ms,
              "burst_bytes": BURST_BYTES, "profile": prof_json, "links": []}
    try:
        links = args.mbits if ns is not None else [0.0]
        rows = {m: [] for m in links}
        rtts = {}
        for name, (cand, bundle) in cuts.items():
            gw_prefix = ns.prefix("gw") if ns else []
            node_prefix = ns.prefix("node") if ns else []
            listen = GW_ADDR if ns else "127.0.0.1"
            gw = Gateway(gw_prefix, bundle, listen, args.delay_ms, work / f"gateway-{name}.log")
            try:
                overhead = message_overhead(bundle)
                for mbit in links:
                    if ns is not None:
                        ns.shape(mbit * 1e6)
                    rtts[mbit] = probe(node_prefix, listen)  # right before the run: the host's load drifts
                    bw = mbit * 1e6 if mbit else 10e9  # loopback: effectively unshaped
                    link = Link(bw, rtts[mbit], overhead, BURST_BYTES if mbit else 0)
                    wire_bits = link.wire_bytes(cand.cut_bytes) * 8
                    fps = min(args.max_fps, 0.3 * bw / wire_bits)  # a third of the link: no queue builds
                    events = run_node(node_prefix, bundle, args.frames, listen, RELAY_PORT, args.frames_per_run,
                                      fps, work)
                    summary = latency_summary(events)
                    pred = predict(cand, None, link, Power())
                    row = {"cut": name, "cut_bytes": cand.cut_bytes, "trained": cand.trained, "fps": round(fps, 2),
                           "overhead_bytes": overhead, "rtt_ms": round(rtts[mbit] * 1e3, 3),
                           "predicted_p50_ms": round(pred.p50_s * 1e3, 3), **summary}
                    rows[mbit].append(row)
                    print(f"{mbit:>6g} Mbit/s  {name:<16} {cand.cut_bytes:>6} B  predicted {row['predicted_p50_ms']:8.2f} ms"
                          f"  measured p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms"
                          f"  ({summary['escalated_answered']}/{summary['frames']} answered, {fps:.1f} fps)", flush=True)
            finally:
                gw.stop()
        for mbit in links:
            r = rows[mbit]
            pick = min(r, key=lambda x: x["predicted_p50_ms"])
            best = min(r, key=lambda x: x["p50_ms"])
            gap = pick["p50_ms"] / best["p50_ms"] - 1.0
            report["links"].append({"mbit": mbit, "rows": r, "planner_pick": pick["cut"],
                                    "measured_best": best["cut"], "pick_vs_best": round(gap, 4),
                                    "within_10pct": gap <= 0.10})
            print(f"{mbit:g} Mbit/s: planner picks {pick['cut']} ({pick['p50_ms']:.2f} ms measured), measured best "
                  f"{best['cut']} ({best['p50_ms']:.2f} ms): {gap * 100:+.1f} %")
        if args.adaptive and ns is not None:
            report["adaptive"] = adaptive_run(args, ns, prof, unsplit, labels, work)
    finally:
        if ns is not None:
            ns.__exit__()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["bench_wall_s"] = round(time.monotonic() - t0, 1)
    report["bench_process_cpu_s"] = round(time.process_time() - cpu0, 1)
    report["note"] = "2-core host shared with a training job; device and server both run on this host"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out}")
    return 0 if all(x["within_10pct"] for x in report["links"]) else 1


def adaptive_run(args, ns: Namespaces, prof, unsplit, labels, work: Path) -> dict:
    """The link drops mid-run (fast -> slow -> fast); the adaptive node against nodes fixed at each
    operating point: p99 and accuracy-relevant share of frames escalated."""
    cut = next(c for c in prof.candidates if c.trained and c.exit_on_device)
    points = [{"name": o.name, "thresholds": {"end": o.end_threshold}, "device_fraction": o.device_fraction,
               "accuracy": o.accuracy} for o in prof.operating_points if o.device_fraction < 1.0]
    points = [points[0], points[len(points) // 2], points[-1]]
    bundle = write_cut_bundle(unsplit, cut.name, labels, work / "bundle-adaptive", points)
    phases = [(args.adaptive_fast, 6.0), (args.adaptive_slow, 12.0), (args.adaptive_fast, 12.0)]
    fps = args.adaptive_fps
    limit = int(sum(d for _, d in phases) * fps)

    def change_link(proc):
        def run():
            time.sleep(4.0)  # node start-up, then the phases
            for mbit, dur in phases:
                ns.shape(mbit * 1e6)
                end = time.monotonic() + dur
                while time.monotonic() < end and proc.poll() is None:
                    time.sleep(0.1)
        threading.Thread(target=run, daemon=True).start()

    gw = Gateway(ns.prefix("gw"), bundle, GW_ADDR, args.delay_ms, work / "gateway-adaptive.log")
    out = {"cut": cut.name, "phases_mbit_s": phases, "fps": fps, "points": points, "runs": {}}
    try:
        adaptive = {"enabled": True, "target_ms": args.adaptive_target_ms, "window": 10, "min_dwell_s": 1.0}
        configs = [("adaptive", adaptive, None)] + [(f"fixed {p['name']}", None, p["thresholds"]["end"]) for p in points]
        for label, ad, thr in configs:
            ns.shape(phases[0][0] * 1e6)
            events = run_node(ns.prefix("node"), bundle, args.frames, GW_ADDR, RELAY_PORT, limit, fps, work,
                              adaptive=ad, threshold=thr, during=change_link, deadline_ms=args.adaptive_deadline_ms)
            s = latency_summary(events)
            s["escalated_share"] = round(sum(1 for e in events if e["tier"] != "end") / max(1, len(events)), 3)
            node_log = (work / "node.log").read_text(errors="replace")
            switches = [line.split("operating point ", 1)[1] for line in node_log.splitlines() if "operating point " in line]
            s["switches_logged"] = len(switches)
            s["switches"] = switches[:20]  # "exit0 -> exit4 (end threshold ...): why"
            out["runs"][label] = s
            print(f"adaptive bench {label:<14} p50 {s['p50_ms']:8.2f} ms  p99 {s['p99_ms']:8.2f} ms  "
                  f"escalated {s['escalated_share']:.2f}  switches {s['switches_logged']}", flush=True)
    finally:
        gw.stop()
    return out


def _labels(frames: Path) -> list[str]:
    return sorted(p.name for p in Path(frames).iterdir() if p.is_dir())


def main(argv: list[str] | None = None) -> int:
    from tierlite.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m tierlite.tools.bench.partition")
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the bench")
    r.add_argument("--workdir", type=Path, required=True, help="checkpoint workdir (tierlite train/convert)")
    r.add_argument("--frames", type=Path, required=True, help="image folder <class>/*.jpg the node streams")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--mbits", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    r.add_argument("--frames-per-run", type=int, default=40)
    r.add_argument("--max-fps", type=float, default=20.0)
    r.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay the relay adds, each direction")
    r.add_argument("--repeats", type=int, default=50)
    r.add_argument("--limit", type=int, help="validation frames for the profile")
    r.add_argument("--adaptive", action="store_true", help="also run the changing-link comparison")
    r.add_argument("--adaptive-fast", type=float, default=100.0)
    r.add_argument("--adaptive-slow", type=float, default=0.05)
    r.add_argument("--adaptive-deadline-ms", type=float, default=1000.0)
    r.add_argument("--adaptive-fps", type=float, default=10.0)
    r.add_argument("--adaptive-target-ms", type=float, default=30.0)
    r.add_argument("--keep", action="store_true", help="keep bundles and logs")
    g = sub.add_parser("gateway")
    g.add_argument("--bundle", required=True)
    g.add_argument("--listen", required=True)
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--delay-ms", type=float, default=0.0)
    p = sub.add_parser("probe")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=30)
    args = parser.parse_args(argv)
    setup_logging("warning" if args.cmd != "run" else "info")
    if args.cmd == "gateway":
        return serve_gateway(args.bundle, args.listen, args.port, args.delay_ms)
    if args.cmd == "probe":
        print(json.dumps({"rtt_s": probe_rtt(args.host, args.port, args.count)}))
        return 0
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
