"""Issue 12 as an attacker, against real processes and a real Mosquitto: a node flooding the edge
with valid features beside normal nodes (per-node escalation budget), a corrupt hard-example
store at cloud start-up."""
from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest

from runtime_support import Watcher, wait_until

pytestmark = pytest.mark.timeout(240)
PREFIX = "tierlite"


def _features(bundle_dir, digits_dir, n: int) -> list[bytes]:
    """n FEATURE payloads built from real test frames through the bundle's end segment
    (frame ids patched in at send time)."""
    from tierlite import wire
    from tierlite.bundle import Bundle
    from tierlite.data import decode_image, list_image_folder
    from tierlite.segment import Segment

    bundle = Bundle.load(bundle_dir)
    end = Segment(bundle, "end")
    spec = wire.boundary_spec(bundle, wire.Kind.FEATURE)
    paths, _, _ = list_image_folder(digits_dir / "test")
    size = tuple(bundle.input_shape[1:3])
    out = []
    for p in paths[:n]:
        r = end.run(decode_image(p, size)[None])
        out.append((spec, r.feature, r.logits))
    return out


def test_flooding_node_is_budgeted_and_normal_nodes_keep_their_latency(small_bundle_dir, digits_dir):
    from tierlite import topics, wire
    from tierlite.config import BrokerConfig
    from tierlite.mqtt import MqttClient
    from tierlite.tools.stack import Stack

    feats = _features(small_bundle_dir, digits_dir, 24)
    budget = {"rate": 10.0, "burst": 20}  # test-sized: normal nodes send 4 fps each
    with Stack(small_bundle_dir, edge_workers=1, cloud_workers=1, prefix=PREFIX, edge_threshold=0.5,
               edge_extra={"node_budget": budget}) as stack:
        sent: dict[tuple[str, int], float] = {}
        answers: dict[tuple[str, int], tuple[float, wire.Answer]] = {}
        lock = threading.Lock()

        def on_answer(topic: str, payload: bytes) -> None:
            t = time.perf_counter()
            node = topics.node_of(topic, PREFIX)
            a = wire.decode_answer(payload)
            with lock:
                answers.setdefault((node, a.frame_id), (t, a))

        sub = Watcher(stack.port, [], name="answers")
        sub.client.subscribe(f"{PREFIX}/+/answer", on_answer, 0)
        time.sleep(0.5)
        pub = MqttClient(BrokerConfig(host=stack.host, port=stack.port), "test-flood-pub")
        pub.start()
        assert pub.wait_connected(10)

        def send(node: str, fid: int) -> None:
            spec, feat, logits = feats[fid % len(feats)]
            payload = wire.encode_tensor_message(spec, fid, feat, [logits])
            with lock:
                sent[(node, fid)] = time.perf_counter()
            pub.publish(topics.node_topic(PREFIX, node, topics.FEATURE), payload, 0)

        normal = ["cam1", "cam2", "cam3"]
        stop = threading.Event()
        flood_sent = [0]

        def flood() -> None:  # ~400 valid features/s from one node: 40x its budget
            fid = 0
            while not stop.is_set():
                for _ in range(20):
                    send("flooder", fid)
                    fid += 1
                flood_sent[0] = fid
                time.sleep(0.05)

        # a baseline without the flood, then the same with it
        def run_normal(seconds: float, first_id: int) -> list[int]:
            ids, fid = [], first_id
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                for n in normal:
                    send(n, fid)
                ids.append(fid)
                fid += 1
                time.sleep(0.25)
            return ids

        base_ids = run_normal(3.0, 0)
        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        time.sleep(0.5)
        flood_ids = run_normal(6.0, 1000)
        stop.set()
        flooder.join(5)
        time.sleep(1.5)
        pub.stop()
        sub.stop()

        def latencies(ids: list[int]) -> tuple[np.ndarray, list]:
            lat, got = [], []
            with lock:
                for n in normal:
                    for fid in ids:
                        a = answers.get((n, fid))
                        if a is not None:
                            lat.append((a[0] - sent[(n, fid)]) * 1000)
                            got.append(a[1])
            return np.array(lat), got

        base_lat, _ = latencies(base_ids)
        lat, got = latencies(flood_ids)
        want = len(normal) * len(flood_ids)
        with lock:
            flood_answers = [a for (n, _), (_, a) in answers.items() if n == "flooder"]
        rejects = [a for a in flood_answers if a.kind == wire.Kind.REJECT]
        served = [a for a in flood_answers if a.kind == wire.Kind.ANSWER]
        print(f"normal p50 {np.median(base_lat):.1f} ms without flood, {np.median(lat):.1f} ms with "
              f"(p90 {np.percentile(lat, 90):.1f}); flooder sent {flood_sent[0]}, {len(served)} served, "
              f"{len(rejects)} budget REJECTs")
        # every normal frame answered by the edge or the cloud (no REJECT, none lost)
        assert len(got) == want, f"{want - len(got)} normal frames without an answer"
        assert all(a.kind == wire.Kind.ANSWER and a.tier in ("edge", "cloud") for a in got)
        assert np.median(lat) < max(100.0, 3 * np.median(base_lat)), (np.median(base_lat), np.median(lat))
        # the flooder: REJECT (reason budget) for nearly everything past its budget
        assert all(a.reason == wire.RejectReason.BUDGET for a in rejects)
        assert len(rejects) > 0.7 * flood_sent[0]
        assert len(served) <= budget["burst"] + budget["rate"] * 9 + 10
        log = stack.procs["edge"].log()
        assert log.count("over its escalation budget") <= 3, "refusal log lines are throttled"


def test_cloud_worker_starts_on_a_corrupt_store(tmp_path, small_bundle_dir):
    """A corrupt hard-example store used to stop the cloud worker (exit 2): it is moved aside, a
    fresh one started, loudly, and the worker answers."""
    from runtime_support import Mosquitto, Proc, write_yaml

    broker = Mosquitto(tmp_path / "broker").start()
    try:
        store = tmp_path / "hard.sqlite"
        store.write_bytes(b"\x00garbage, not SQLite" * 1000)
        cfg = write_yaml(tmp_path / "cloud.yaml", {
            "bundle": str(small_bundle_dir), "broker": {"port": broker.port}, "metrics_port": None,
            "store": {"path": str(store)}})
        proc = Proc(["cloud", "--config", str(cfg)], tmp_path / "cloud.log")
        try:
            w = Watcher(broker.port, [f"{PREFIX}/_cloud/+/status"])
            wait_until(lambda: any(b'"online"' in p for p in w.on(lambda t: True)) or not proc.running(), 60,
                       "the cloud worker online")
            assert proc.running(), proc.log()
            assert "IS CORRUPT" in proc.log()
            assert list(tmp_path.glob("hard.sqlite.corrupt-*"))
            w.stop()
        finally:
            proc.stop()
    finally:
        broker.stop()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_gateway_children_die_with_it_and_a_restart_works(small_bundle_dir):
    """SIGKILL the gateway: Mosquitto and the edge workers used to stay as orphans and the restart
    failed with "port already in use"."""
    from tierlite.tools.stack import Stack, TierProcess

    with Stack(small_bundle_dir, edge_workers=1, cloud_workers=0, prefix=PREFIX) as stack:
        pids = stack.pids()
        children = [pid for name, pid in pids.items() if name != "edge gateway"]
        assert len(children) == 2, pids  # mosquitto + one edge worker
        stack.procs["edge"].proc.kill()
        stack.procs["edge"].proc.wait(5)
        wait_until(lambda: all(_gone(p) for p in children), 10, "the gateway's children to exit")
        # the same config again, at once: same port, comes up, and tells systemd (Type=notify) when
        # its edge worker is online
        notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the sender's pid, as systemd sees it
        notify_sock.bind(str(stack.dir / "notify.sock"))
        notify_sock.settimeout(60)
        stack.procs["edge"] = TierProcess("edge-again", ["--log-level", "info", "edge", "--config",
                                                         str(stack.dir / "edge.yaml")], stack.dir,
                                          env={"NOTIFY_SOCKET": str(stack.dir / "notify.sock")})
        w = Watcher(_wait_port(stack), [f"{PREFIX}/_gateway/+/status"])
        wait_until(lambda: any(b'"online": true' in p for p in w.on(lambda t: True)) or not stack.procs["edge"].running(),
                   60, "the restarted gateway's worker online")
        assert stack.procs["edge"].running(), stack.procs["edge"].log()
        assert "already in use" not in stack.procs["edge"].log()
        # NotifyAccess=main: only the gateway's own READY counts, sent once its worker is online
        # (Mosquitto, built with systemd support, used to inherit the socket and say READY first)
        msg, ancillary, _, _ = notify_sock.recvmsg(64, socket.CMSG_SPACE(12))
        sender = struct.unpack("3i", ancillary[0][2][:12])[0]
        assert (msg, sender) == (b"READY=1", stack.procs["edge"].pid), stack.pids()
        notify_sock.close()
        w.stop()


def _wait_port(stack) -> int:
    from tierlite.edge.broker import port_open

    wait_until(lambda: port_open(stack.host, stack.port) or not stack.procs["edge"].running(), 30,
               "the restarted gateway's Mosquitto")
    assert stack.procs["edge"].running(), stack.procs["edge"].log()
    return stack.port


def test_cloud_workers_supervisor_restarts_a_dead_worker(tmp_path, small_bundle_dir):
    """`tierlite cloud --workers 1`: kill the worker, a new one answers (nothing restarted it before)."""
    import json
    import os
    import signal

    from runtime_support import Mosquitto, Proc, write_yaml

    broker = Mosquitto(tmp_path / "broker").start()
    try:
        cfg = write_yaml(tmp_path / "cloud.yaml", {
            "bundle": str(small_bundle_dir), "broker": {"port": broker.port, "reconnect_min": 0.1},
            "metrics_port": None, "store": {"path": str(tmp_path / "hard.sqlite")}})
        sup = Proc(["cloud", "--workers", "1", "--config", str(cfg)], tmp_path / "cloud.log")
        w = Watcher(broker.port, [f"{PREFIX}/_cloud/+/status"])
        try:
            def online_pid():
                docs = [json.loads(p) for p in w.on(lambda t: True) if p]
                return [d["pid"] for d in docs if d.get("state") == "online"]

            first = wait_until(lambda: online_pid() or not sup.running(), 60, "the cloud worker online")
            assert sup.running(), sup.log()
            os.kill(first[0], signal.SIGKILL)
            second = wait_until(lambda: [p for p in online_pid() if p != first[0]] or not sup.running(), 60,
                                "a restarted cloud worker online")
            assert sup.running() and second, sup.log()
            assert "exited with code -9: restarting" in sup.log()
        finally:
            w.stop()
            assert sup.stop() == 0
    finally:
        broker.stop()


def _escalations(bundle_dir, digits_dir, n: int) -> list[tuple]:
    """(spec, edge feature, [end logits, edge logits], end feature bytes) from real test frames."""
    from tierlite import wire
    from tierlite.bundle import Bundle
    from tierlite.data import decode_image, list_image_folder
    from tierlite.segment import Segment

    bundle = Bundle.load(bundle_dir)
    end, edge = Segment(bundle, "end"), Segment(bundle, "edge")
    spec = wire.boundary_spec(bundle, wire.Kind.ESCALATE)
    paths, _, _ = list_image_folder(digits_dir / "test")
    out = []
    for p in paths[:n]:
        e = end.run(decode_image(p, tuple(bundle.input_shape[1:3]))[None])
        g = edge.run(e.feature)
        out.append((spec, g.feature, [e.logits, g.logits], wire.encode_feature(e.feature, bundle.encoding)))
    return out


def test_disk_full_store_degrades_and_answers_continue(tmp_path, small_bundle_dir, digits_dir):
    """The cloud worker's files may not grow past 256 KiB (RLIMIT_FSIZE: writes fail as on a full
    disk): every escalation is still answered, the failed writes are counted and logged, the worker
    stays up and stops cleanly."""
    import resource
    import subprocess
    import sys

    from tierlite import topics, wire
    from tierlite.config import BrokerConfig
    from tierlite.mqtt import MqttClient
    from runtime_support import Mosquitto, write_yaml

    esc = _escalations(small_bundle_dir, digits_dir, 16)
    broker = Mosquitto(tmp_path / "broker").start()
    store = tmp_path / "hard.sqlite"
    cfg = write_yaml(tmp_path / "cloud.yaml", {
        "bundle": str(small_bundle_dir), "broker": {"port": broker.port}, "metrics_port": None,
        "store": {"path": str(store), "batch": 16, "flush_interval": 0.1, "max_pending": 200}})

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    log_path = tmp_path / "cloud.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tierlite", "cloud", "--config", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=limit)
    answers: dict[int, wire.Answer] = {}
    try:
        w = Watcher(broker.port, [f"{PREFIX}/_cloud/+/status"])
        wait_until(lambda: any(b'"online"' in p for p in w.on(lambda t: True)) or proc.poll() is not None, 60,
                   "the cloud worker online")
        assert proc.poll() is None, log_path.read_text()
        w.client.subscribe(f"{PREFIX}/+/answer", lambda t, p: answers.setdefault(wire.decode_answer(p).frame_id,
                                                                                 wire.decode_answer(p)), 0)
        time.sleep(0.3)
        pub = MqttClient(BrokerConfig(port=broker.port), "test-diskfull-pub")
        pub.start()
        assert pub.wait_connected(10)
        n = 1500  # ~3 KB a row: several times what the file may hold
        for fid in range(n):
            spec, feat, logits, end = esc[fid % len(esc)]
            pub.publish(topics.node_topic(PREFIX, "cam1", topics.ESCALATE),
                        wire.encode_tensor_message(spec, fid, feat, logits, end_feature=end), 0)
            if fid % 50 == 49:
                time.sleep(0.05)
        wait_until(lambda: len(answers) >= n or proc.poll() is not None, 60, "every escalation answered")
        pub.stop()
        w.stop()
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert all(a.kind == wire.Kind.ANSWER and a.tier == "cloud" for a in answers.values())
        text = log_path.read_text()
        assert "hard-example store write failed" in text, text[-3000:]
        assert store.stat().st_size <= 256 * 1024
    finally:
        proc.terminate()
        try:
            code = proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        broker.stop()
    assert code == 0, log_path.read_text()[-3000:]
