"""Offload baselines: every frame goes up as its JPEG and a server runs the whole model.

1. The cloud-only baseline's server, as Sedna-style offload systems do it: the cloud decodes the
   JPEG and runs tierlite's end -> edge -> cloud chain (the "cloud model" the accuracy figures use)
   and answers the node. Message: <prefix>/<node>/frame = 4-byte frame id (uint32 LE) + JPEG bytes.
   Answer: a tierlite.wire ANSWER on <prefix>/<node>/answer. Benchmark use only:
       python -m tierlite.tools.bench.offload --port P --bundle DIR
2. `tierlite bench offload`: a real model server as the peer (Ray Serve, `@serve.batch`; the
   optional `[bench]` extra) serving the same full model over HTTP, measured beside tierlite's
   escalation path in one run with the same open-loop load: latency p50/p99, bytes per frame on
   the wire, frames per CPU second. The Ray Serve process: `python -m tierlite.tools.bench.offload
   peer --bundle DIR --http-port P`.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import threading
import time
from typing import Any

FRAME_ID = "<I"
SUFFIX = "frame"


def offload_topic(prefix: str, node: str) -> str:
    return f"{prefix}/{node}/{SUFFIX}"


class OffloadWorker:
    def __init__(self, bundle_dir: str, port: int, prefix: str = "tierlite", runtime: str = "litert"):
        from tierlite.bundle import Bundle
        from tierlite.config import BrokerConfig
        from tierlite.mqtt import MqttClient
        from tierlite.segment import Segment

        self.bundle = Bundle.load(bundle_dir)
        self.size = tuple(self.bundle.input_shape[1:3])
        self.chain = [Segment(self.bundle, t, runtime=runtime) for t in ("end", "edge", "cloud")
                      if t in self.bundle.segments]
        self.prefix = prefix
        self.dropped = 0
        self.mqtt = MqttClient(BrokerConfig(host="127.0.0.1", port=port), f"tierlite-bench-offload-{os.getpid()}",
                               on_connect=self._ready)
        self.mqtt.subscribe(f"{prefix}/+/{SUFFIX}", self.on_frame)

    def _ready(self) -> None:
        self.mqtt.publish(f"{self.prefix}/_bench/offload/status", json.dumps({"pid": os.getpid()}), 1, retain=True)

    def on_frame(self, topic: str, payload: bytes) -> None:
        from tierlite.data import decode_image
        from tierlite.errors import TierliteError
        from tierlite.policy import decide
        from tierlite.topics import node_of, node_topic as make_topic
        from tierlite.wire import encode_answer

        try:
            node = node_of(topic, self.prefix)
            (frame_id,) = struct.unpack_from(FRAME_ID, payload)
            x = decode_image(bytes(payload[4:]), self.size)[None]
        except (TierliteError, struct.error):
            self.dropped += 1
            return
        for seg in self.chain:
            out = seg.run(x)
            x = out.feature
        _, label, conf, entropy = decide(out.logits, None)
        self.mqtt.publish(make_topic(self.prefix, node, "answer"),
                          encode_answer("cloud", frame_id, label, conf, entropy, self.bundle.name, self.bundle.version))


def main(argv: list[str] | None = None) -> int:
    from tierlite.service import run_until_signal, wait_for_stop

    p = argparse.ArgumentParser(prog="tierlite-bench-offload")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--prefix", default="tierlite")
    p.add_argument("--runtime", default="litert")
    args = p.parse_args(argv)
    worker = OffloadWorker(args.bundle, args.port, args.prefix, args.runtime)
    stop = threading.Event()

    def serve() -> int:
        worker.mqtt.start()
        wait_for_stop(stop)
        worker.mqtt.stop(timeout=0.5)
        return 0

    return run_until_signal(serve, stop.set)


# == the model-server peer: Ray Serve ============================================================
# Why Ray Serve and not BentoML: `@serve.batch` is the dynamic batching issue 15 compares against,
# and `ray[serve]` resolves beside tensorflow 2.21 and flwr 1.42 (protobuf 6 kept) in one install.
# docs/BENCHMARKS.md "Model-server peer" says more.
PEER_ROUTE = "/classify"
PEER_APP = "tierlite-peer"


class FullModel:
    """The bundle's whole model as the peer serves it: end -> edge -> cloud int8 segments run in
    sequence (tierlite.segment, batch dimension through `Segment.run_batch`), the cloud exit's
    label. Plain Python, so the same code runs inside the Ray replica and in tests."""

    def __init__(self, bundle_dir: str, runtime: str = "litert", max_batch_size: int = 16):
        from tierlite.bundle import Bundle
        from tierlite.segment import Segment

        self.bundle = Bundle.load(bundle_dir)
        self.size = tuple(self.bundle.input_shape[1:3])
        self.chain = [Segment(self.bundle, t, runtime=runtime, options={"threads": 1})
                      for t in ("end", "edge", "cloud") if t in self.bundle.segments]
        for seg in self.chain:  # every batch interpreter built and warm before the first request,
            seg.prepare_batches(max_batch_size)  # not inside a measured step (as tierlite's workers do)

    def classify(self, jpegs: list[bytes]) -> list[dict[str, Any]]:
        """One answer per JPEG, in order: {"label", "class", "confidence"}, or {"error"} for a
        frame that does not decode (the others in the batch are still answered)."""
        import numpy as np

        from tierlite.data import decode_image
        from tierlite.errors import DataError
        from tierlite.policy import decide

        out: list[dict[str, Any]] = [{} for _ in jpegs]
        images, where = [], []
        for i, data in enumerate(jpegs):
            try:
                images.append(decode_image(bytes(data), self.size))
                where.append(i)
            except DataError as e:
                out[i] = {"error": f"bad frame: {e}"}
        if images:
            x = np.stack(images)
            for seg in self.chain:
                result = seg.run_batch(x)
                x = result.feature
            for i, logits in zip(where, result.logits):
                _, label, confidence, _ = decide(logits, None)
                out[i] = {"label": label, "class": self.bundle.labels[label], "confidence": round(confidence, 4)}
        return out


def peer_app(bundle_dir: str, runtime: str, max_batch_size: int, batch_wait_s: float):
    """The Ray Serve application: one replica of FullModel behind Serve's HTTP proxy; requests
    are JPEG bodies, gathered by `@serve.batch` (up to max_batch_size or batch_wait_s)."""
    from ray import serve
    from starlette.responses import JSONResponse

    # Serve's default of 5 ongoing requests per replica would cap every batch at 5.
    @serve.deployment(num_replicas=1, max_ongoing_requests=max(4 * max_batch_size, 32),
                      ray_actor_options={"num_cpus": 1})
    class FullModelDeployment:
        def __init__(self):
            self.model = FullModel(bundle_dir, runtime, max_batch_size)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def classify(self, jpegs: list[bytes]) -> list[dict[str, Any]]:
            return self.model.classify(jpegs)

        async def __call__(self, request):
            answer = await self.classify(await request.body())
            return JSONResponse(answer, status_code=400 if "error" in answer else 200)

    return FullModelDeployment.bind()


def peer_main(argv: list[str]) -> int:
    """The peer process: a local Ray cluster (its processes are this one's descendants, so their
    CPU can be read), Serve's HTTP proxy on 127.0.0.1:<port>, the app; until SIGTERM."""
    from tierlite.service import run_until_signal, wait_for_stop

    p = argparse.ArgumentParser(prog="tierlite-bench-offload peer")
    p.add_argument("--bundle", required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--runtime", default="litert")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--cpus", type=int, default=2, help="CPUs Ray may schedule on")
    p.add_argument("--startup-priority-boost", type=int, default=15,
                   help="nice levels above normal while Ray starts (root only; 0: none)")
    p.add_argument("--start-attempts", type=int, default=4, help="tries at starting the local Ray cluster")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # loopback only: no usage report
    import ray
    from ray import serve

    # Ray's raylet aborts when its dashboard agent has not written its port within ~15 s, which a
    # busy 2-core machine misses (Python imports starved of CPU). Start the cluster at a raised
    # priority where allowed (root) and put every process back to normal before any measurement.
    raised = _set_priority(os.getpid(), -args.startup_priority_boost) if args.startup_priority_boost else False
    for attempt in range(1, args.start_attempts + 1):
        try:
            ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:  # Ray raises a bare Exception when its node does not come up in time
            # the tree before shutdown: agents whose raylet dies are re-parented and would be missed after
            started = {k: v for k, v in process_tree(os.getpid()).items() if v != os.getpid()}
            ray.shutdown()
            _reap({**started, **{k: v for k, v in process_tree(os.getpid()).items() if v != os.getpid()}})
            print(f"ray did not start (attempt {attempt}/{args.start_attempts}): {e}", flush=True)
            if attempt == args.start_attempts:
                return 1
    stop = threading.Event()

    def run() -> int:
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
            serve.run(peer_app(os.path.abspath(args.bundle), args.runtime, args.max_batch_size,
                               args.batch_wait_ms / 1e3), name=PEER_APP, route_prefix=PEER_ROUTE, blocking=False)
            if raised:  # back to normal; Ray's own niceness for its workers (+5) is left alone
                for pid in process_tree(os.getpid()).values():
                    if _get_priority(pid) == -args.startup_priority_boost:
                        _set_priority(pid, 0)
            print(f"peer ready on http://127.0.0.1:{args.http_port}{PEER_ROUTE}", flush=True)
            wait_for_stop(stop)
        finally:
            serve.shutdown()
            ray.shutdown()
        return 0

    return run_until_signal(run, stop.set)


def _set_priority(pid: int, nice: int) -> bool:
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
        return True
    except OSError:  # not root, or the process is gone
        return False


def _get_priority(pid: int) -> int | None:
    try:
        return os.getpriority(os.PRIO_PROCESS, pid)
    except OSError:
        return None


def process_tree(pid: int) -> dict[str, int]:
    """Name -> pid of `pid` and every descendant (from /proc), for CpuMeter: a Ray cluster is a
    dozen processes (GCS, raylet, agents, Serve controller, HTTP proxy, replica)."""
    from pathlib import Path

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out: dict[str, int] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # Ray's workers retitle themselves ("ray::ServeReplica:..."); its agents are python scripts.
        words = [a.decode(errors="replace") for a in argv if a]
        script = next((w for w in words[1:] if w.endswith(".py")), None)
        name = os.path.basename(script or (words[0].split()[0] if words else "?"))
        if p == pid:
            name = "peer driver"
        out[name if name not in out else f"{name} {p}"] = p
    return out


# -- open-loop HTTP load, on FleetLoad's schedule (tierlite.tools.bench.loadgen.OpenLoopSchedule) ---------
class HttpLoad:
    """N simulated camera nodes, each one keep-alive HTTP/1.1 connection (as each FleetLoad node
    holds one MQTT connection), frames assigned round-robin on an open-loop schedule that never
    waits for answers. HTTP/1.1 has one request in flight per connection, so a node whose last
    frame is unanswered queues the next: latency is answer time - *scheduled* send time, so that
    wait counts (no coordinated omission). Bytes are counted as written and read on the socket."""

    def __init__(self, host: str, port: int, jpegs: list[bytes], nodes: int = 100, route: str = PEER_ROUTE):
        if not jpegs:
            raise ValueError("no frames to send")
        self.host, self.port, self.nodes = host, port, max(1, nodes)
        self.last_open: dict[str, int] = {}  # where the last step's unanswered frames stood (see _step)
        self.requests = [(f"POST {route} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/jpeg\r\n"
                          f"Content-Length: {len(j)}\r\n\r\n").encode() + j for j in jpegs]

    def step(self, rate: float, duration: float, drain: float = 2.0, max_messages: int | None = None,
             cpu_pids: dict[str, int] | None = None):
        """(StepResult, wire bytes per answered frame {"request", "response"})."""
        import asyncio

        total = int(rate * duration)
        if max_messages is not None:
            total = min(total, max_messages)
        return asyncio.run(self._step(rate, total, drain, cpu_pids or {}))

    async def _step(self, rate: float, total: int, drain: float, cpu_pids: dict[str, int]):
        import asyncio
        import socket

        from tierlite.tools.bench.loadgen import OpenLoopSchedule, StepResult
        from tierlite.tools.bench.report import CpuMeter, latency_ms

        conns = []
        for _ in range(self.nodes):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns.append((reader, writer))
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in conns]
        lat: list[float] = []
        done_ns: list[int] = []
        tally = {"rejected": 0, "failures": 0, "up": 0, "down": 0, "in_flight": 0}

        async def node(i: int) -> None:
            reader, writer = conns[i]
            while (item := await queues[i].get()) is not None:
                k, due = item
                request = self.requests[k % len(self.requests)]
                try:
                    writer.write(request)
                    tally["in_flight"] += 1
                    await writer.drain()
                    status, nbytes = await _read_response(reader)
                except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    tally["failures"] += 1  # this node's connection is gone: its later frames are lost
                    return
                tally["in_flight"] -= 1
                now = time.monotonic_ns()
                tally["up"] += len(request)
                tally["down"] += nbytes
                if status == 200:
                    lat.append((now - due) / 1e9)
                    done_ns.append(now)
                else:
                    tally["rejected"] += 1

        tasks = [asyncio.create_task(node(i)) for i in range(len(conns))]
        meter = CpuMeter(cpu_pids)
        meter.start()
        schedule = OpenLoopSchedule(rate, total)
        while not schedule.done:
            wait = schedule.wait_s()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            for k, due in schedule.due():
                queues[k % len(queues)].put_nowait((k, due))
            await asyncio.sleep(0)
        send_end = time.monotonic_ns()
        for q in queues:
            q.put_nowait(None)
        _, pending = await asyncio.wait(tasks, timeout=drain)
        for t in pending:
            t.cancel()
        cpu = meter.stop()
        for _, writer in conns:
            writer.close()
        # Where the unanswered frames stood at the end of the drain: never written, written and
        # waiting for a response, or waiting in a node's queue behind one (so a step that counts
        # no answers says which side held them).
        self.last_open = {"written_unanswered": tally["in_flight"],
                          "queued_unsent": sum(q.qsize() - 1 for q in queues if q.qsize() > 0),
                          "connections_open_at_drain_end": len(pending)}
        answered = len(lat)
        window = max((send_end - schedule.t0) / 1e9, 1e-9)
        n_io = answered + tally["rejected"]
        result = StepResult(
            offered_per_s=rate, duration_s=window, sent=total, answered=answered,
            lost=total - answered - tally["rejected"], duplicated=0, rejected=tally["rejected"],
            send_failures=tally["failures"], achieved_per_s=sum(1 for t in done_ns if t <= send_end) / window,
            latency=latency_ms(lat), answered_by={"ray serve": answered}, behind_s=schedule.behind_s, cpu_percent=cpu)
        wire = {"request": tally["up"] / n_io if n_io else None, "response": tally["down"] / n_io if n_io else None}
        return result, wire


async def _read_response(reader) -> tuple[int, int]:
    """(status, bytes read) of one HTTP/1.1 response (Content-Length or chunked body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    nbytes = len(head)
    if not chunked:
        await reader.readexactly(length)
        return status, nbytes + length
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        nbytes += len(size_line) + size + 2
        await reader.readexactly(size + 2)
        if size == 0:
            return status, nbytes


# -- `tierlite bench offload` ------------------------------------------------------------------------
def configure_offload(p: argparse.ArgumentParser) -> None:
    from tierlite.tools.bench.report import DEFAULT_DATA
    from tierlite.tools.stack import reference_bundle

    p.add_argument("--bundle", default=reference_bundle(), required=reference_bundle() is None,
                   help="bundle both systems serve (default: models/cifar10 when present)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"image folder of the frames (default {DEFAULT_DATA})")
    p.add_argument("--frames", type=int, default=256,
                   help="frames sampled (stratified); the peer gets each one's JPEG, tierlite the escalations "
                        "its end segment makes of them (default 256)")
    p.add_argument("--nodes", type=int, default=100, help="simulated camera nodes, one connection each (default 100)")
    p.add_argument("--rates", default="50,100,200,400", help="offered messages/s per step (default 50,100,200,400)")
    p.add_argument("--step-seconds", type=float, default=5.0, help="length of each rate step (default 5)")
    p.add_argument("--max-messages", type=int, default=20000, help="cap on messages per step (default 20000)")
    p.add_argument("--drain-seconds", type=float, default=3.0, help="wait for late answers after a step (default 3)")
    p.add_argument("--max-batch-size", type=int, default=16, help="Ray Serve @serve.batch max_batch_size (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="Ray Serve @serve.batch batch_wait_timeout_s in ms (default 2)")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs the Ray cluster may schedule on (default 2)")
    p.add_argument("--peer-start-timeout", type=float, default=300.0,
                   help="seconds to wait for Ray Serve to answer its first frame (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results", help="output folder (results.json, offload.md)")
    p.add_argument("--quiet", action="store_true", help="no per-step lines")


def _rates(text: str) -> list[float]:
    from tierlite.errors import ConfigError

    try:
        rates = sorted(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--rates must be comma-separated numbers, got {text!r}") from None
    if not rates or rates[0] <= 0:
        raise ConfigError(f"--rates must be positive numbers, got {text!r}")
    return rates


def run_offload(args: argparse.Namespace) -> int:
    import importlib.util

    from tierlite.bundle import Bundle
    from tierlite.data import load_image_folder
    from tierlite.errors import ConfigError, TierliteError
    from tierlite.tools.bench.loadgen import real_escalations
    from tierlite.tools.bench.report import Report, say

    if importlib.util.find_spec("ray") is None:
        raise ConfigError("'tierlite bench offload' needs Ray Serve: pip install -e '.[bench]' (or 'ray[serve]')")
    rates = _rates(args.rates)
    if min(args.frames, args.nodes, args.max_messages, args.max_batch_size) < 1 or args.step_seconds <= 0:
        raise ConfigError("--frames, --nodes, --max-messages, --max-batch-size and --step-seconds must be positive")
    report = Report("offload", args.out, args)
    bundle = Bundle.load(args.bundle)
    frames = load_image_folder(args.data, size=tuple(bundle.input_shape[1:3]), limit=args.frames, seed=args.seed)
    jpegs = [p.read_bytes() for p in frames.paths]
    say(f"{len(jpegs)} frames; encoding the escalations the end segment makes of them ...")
    messages = real_escalations(bundle, frames.images)
    systems = [_run_tierlite(args, rates, messages, bundle)]
    failure = None
    try:
        systems.append(_run_peer(args, rates, jpegs))
    except TierliteError as e:  # keep tierlite's figures and say why the peer has none
        failure = e
        systems.append({"system": "Ray Serve peer (@serve.batch, full model per frame)", "kind": "peer",
                        "error": str(e), "steps": []})
    report.results.update(
        bundle=bundle.name, bundle_version=bundle.version, frames=len(jpegs), escalations=len(messages),
        nodes=args.nodes, step_seconds=args.step_seconds, jpeg_bytes_mean=sum(map(len, jpegs)) / len(jpegs),
        peer={"server": "Ray Serve", "ray_version": _ray_version(), "max_batch_size": args.max_batch_size,
              "batch_wait_ms": args.batch_wait_ms, "ray_cpus": args.ray_cpus,
              "model": "the bundle's end -> edge -> cloud int8 segments in sequence (tierlite.segment)"},
        systems=systems)
    _write_offload_report(report, systems, args)
    paths = report.write()
    say(f"wrote {paths['results']} and {paths['markdown']}")
    if failure is not None:
        raise failure
    return 0


def _ray_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:
        return None


def _run_tierlite(args, rates: list[float], messages: list[bytes], bundle) -> dict[str, Any]:
    """tierlite's escalation path: FEATURE messages -> `tierlite edge` (1 worker) -> `tierlite cloud`."""
    from tierlite.tools.bench.configs import mqtt_publish_bytes
    from tierlite.tools.bench.loadgen import FleetLoad
    from tierlite.tools.bench.report import say
    from tierlite.tools.stack import Stack
    from tierlite.topics import node_topic
    from tierlite.wire import encode_answer

    say("starting tierlite edge (1 worker) and tierlite cloud ...")
    node = "sim-0000"  # FleetLoad's node names; the topic length enters the MQTT byte count
    up = sum(mqtt_publish_bytes(node_topic("tierlite", node, "feature"), len(m), 0, b"\x00") for m in messages) / len(messages)
    answer = encode_answer("cloud", 1, 0, 1.0, 0.0, bundle.name, bundle.version)
    down = mqtt_publish_bytes(node_topic("tierlite", node, "answer"), len(answer), 0, b"\x00")
    steps = []
    with Stack(args.bundle, edge_workers=1, edge_extra={"node_budget": {"enabled": False}}) as stack:
        load = FleetLoad(stack.host, stack.port, messages, nodes=args.nodes, prefix=stack.prefix)
        load.start()
        try:
            load.step(min(rates[0], 100), 1.0, drain=args.drain_seconds)  # warm-up
            servers = stack.pids()
            for rate in rates:
                res = load.step(rate, args.step_seconds, drain=args.drain_seconds, max_messages=args.max_messages,
                                cpu_pids={**servers, "load generator": os.getpid()})
                steps.append(_step_row(res.to_json(), set(servers), up, down))
                _say_step("tierlite", steps[-1], args)
                if not _kept_up(steps[-1]):  # higher rates would only pile onto the backlog
                    break
        finally:
            load.stop()
    return {"system": "tierlite escalation path (edge worker + cloud worker + Mosquitto)", "kind": "tierlite",
            "message": "escalated frame: int8 FEATURE tensor on MQTT", "steps": steps}


def _run_peer(args, rates: list[float], jpegs: list[bytes]) -> dict[str, Any]:
    """Ray Serve in its own process tree: every frame's JPEG over HTTP."""
    import tempfile
    from pathlib import Path

    from tierlite.errors import TierliteError
    from tierlite.tools.bench.report import say
    from tierlite.tools.stack import TierProcess, free_port, wait_until

    log_dir = Path(tempfile.mkdtemp(prefix="tierlite-bench-peer-"))
    port = free_port()
    say(f"starting Ray Serve (logs in {log_dir}) ...")
    peer = TierProcess("peer", ["peer", "--bundle", str(args.bundle), "--http-port", str(port),
                                "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
                                "--cpus", str(args.ray_cpus)], log_dir, module="tierlite.tools.bench.offload")
    tree: dict[str, int] = {}
    steps = []
    try:
        def answers() -> bool:
            if not peer.running():
                raise TierliteError(f"bench: the Ray Serve peer exited with code {peer.proc.returncode}: "
                                    f"{peer.tail(5)} (log {peer.log_path})")
            return _http_ok(port, jpegs[0])

        wait_until(answers, args.peer_start_timeout, f"Ray Serve answering on port {port} (log {peer.log_path})",
                   interval=1.0)
        load = HttpLoad("127.0.0.1", port, jpegs, nodes=args.nodes)
        # warm-up: replica, proxy routes, batcher, every connection once
        warm, _ = load.step(min(rates[0], 100), max(1.0, args.nodes / min(rates[0], 100)), drain=args.drain_seconds)
        say(f"  Ray Serve warm-up: {warm.answered} of {warm.sent} answered ({load.last_open})")
        if warm.answered == 0:
            raise TierliteError(f"bench: Ray Serve answered none of {warm.sent} warm-up frames over {args.nodes} "
                                f"connections ({load.last_open}; log {peer.log_path})")
        tree = process_tree(peer.pid)
        for rate in rates:
            res, wire = load.step(rate, args.step_seconds, drain=args.drain_seconds, max_messages=args.max_messages,
                                  cpu_pids={**tree, "load generator": os.getpid()})
            steps.append({**_step_row(res.to_json(), set(tree), wire["request"], wire["response"]),
                          "unanswered_at_drain_end": load.last_open})
            _say_step("Ray Serve", steps[-1], args)
            if not _kept_up(steps[-1]):
                break
    finally:
        peer.stop(timeout=30)
        _reap(tree)
    return {"system": "Ray Serve peer (@serve.batch, full model per frame)", "kind": "peer",
            "message": "every frame: its JPEG in an HTTP/1.1 POST (keep-alive)", "processes": sorted(tree),
            "steps": steps}


def _http_ok(port: int, jpeg: bytes) -> bool:
    import http.client

    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", PEER_ROUTE, body=jpeg, headers={"Content-Type": "image/jpeg"})
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


def _reap(tree: dict[str, int]) -> None:
    """Ray processes the peer started that outlived its shutdown (SIGKILL after a stuck stop)."""
    import signal

    from tierlite.tools.bench.report import cpu_seconds

    for pid in tree.values():
        if cpu_seconds(pid) is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


KEEP_UP = 0.95  # as `tierlite bench fleet`: a step keeps up when it answers >= 95 % of the offered rate, losing nothing


def _kept_up(step: dict[str, Any]) -> bool:
    return step["achieved_per_s"] >= KEEP_UP * step["offered_per_s"] and step["lost"] == 0 and step["rejected"] == 0


def _step_row(step: dict[str, Any], servers: set[str], up: float | None, down: float | None) -> dict[str, Any]:
    """A step plus its costs: server CPU = every server process's CPU (the load generator apart),
    CPU ms per answered message and messages per CPU second (= per core at full use)."""
    cpu = step["cpu_percent"]
    server_pct = sum(v for k, v in cpu.items() if k in servers and v is not None)
    rate = step["achieved_per_s"]
    ms = server_pct * 10.0 / rate if rate > 0 else None
    return {**step, "server_cpu_percent": server_pct, "server_cpu_ms_per_message": ms,
            "messages_per_core_s": 1000.0 / ms if ms else None,
            "load_generator_cpu_percent": cpu.get("load generator"),
            "wire_bytes_up": up, "wire_bytes_down": down}


def _say_step(name: str, s: dict[str, Any], args) -> None:
    from tierlite.tools.bench.report import fmt_num, say

    if not args.quiet:
        say(f"  {name} offered {s['offered_per_s']:g}/s: achieved {s['achieved_per_s']:.0f}/s, p50 "
            f"{fmt_num(s['latency']['p50_ms'])} ms, p99 {fmt_num(s['latency']['p99_ms'])} ms, lost {s['lost']}, "
            f"server CPU {fmt_num(s['server_cpu_ms_per_message'])} ms/message")


OFFLOAD_COLUMNS = [
    ("system", "system", str), ("offered_per_s", "offered /s", None),
    ("achieved_per_s", "achieved /s", lambda x: f"{x:,.0f}"), ("p50", "p50 ms", None), ("p99", "p99 ms", None),
    ("n", "answers", None), ("lost", "lost", None), ("rejected", "rejected", None),
    ("wire_bytes_up", "B/message up", lambda x: "–" if x is None else f"{x:,.0f}"),
    ("wire_bytes_down", "B/answer down", lambda x: "–" if x is None else f"{x:,.0f}"),
    ("server_cpu_ms_per_message", "server CPU ms/message", None),
    ("messages_per_core_s", "messages/s per core", lambda x: "–" if x is None else f"{x:,.0f}"),
    ("load_generator_cpu_percent", "load gen CPU %", None),
]


def _write_offload_report(report, systems: list[dict[str, Any]], args) -> None:
    from tierlite.tools.bench.report import markdown_table

    short = {"tierlite": "tierlite (escalations)", "peer": "Ray Serve (every frame)"}
    rows = [{**s, "system": short[sys_["kind"]], "p50": s["latency"]["p50_ms"], "p99": s["latency"]["p99_ms"],
             "n": s["latency"]["n"]} for sys_ in systems for s in sys_["steps"]]
    res = report.results
    report.add_markdown(
        f"{res['frames']} frames of `{args.data}` (stratified sample, seed {args.seed}); the Ray Serve peer gets "
        f"every frame's JPEG (mean {res['jpeg_bytes_mean']:.0f} B) over HTTP, tierlite's edge and cloud workers get "
        f"the {res['escalations']} escalations the end segment makes of the same frames (the camera decides the "
        f"rest). {args.nodes} simulated nodes, one connection each, open-loop at each offered rate for "
        f"{args.step_seconds:g} s. Bytes are whole messages on the socket (MQTT PUBLISH / HTTP request and "
        "response), without TCP/IP headers. Server CPU: process CPU time of every server process (Mosquitto, "
        "edge gateway and worker, cloud worker / every process of the Ray cluster), the load generator apart; "
        "messages/s per core = 1000 / server CPU ms per message.\n")
    report.add_markdown(markdown_table(OFFLOAD_COLUMNS, rows))
    for sys_ in systems:
        if sys_.get("error"):
            report.add_markdown(f"{sys_['system']}: not measured: {sys_['error']}\n")
    print(markdown_table(OFFLOAD_COLUMNS, rows))


if __name__ == "__main__":
    sys.exit(peer_main(sys.argv[2:]) if sys.argv[1:2] == ["peer"] else main())
