"""The co-inference runtime end to end: a real Mosquitto on a free loopback port, and the device,
edge and cloud tiers as real processes (`python -m tierlite ...`) fed with real JPEG frames.

One broker and one int8 stack (2 edge workers + 1 cloud worker) are shared by the tests that
do not disturb them; the test that kills a worker runs last on that stack."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from runtime_support import (Mosquitto, Proc, Watcher, check_against_offline, free_port, read_jsonl,
                             select_frames, wait_until, write_yaml)

pytestmark = pytest.mark.timeout(240)
PREFIX = "tierlite"
FAST_RECONNECT = {"reconnect_min": 0.1, "reconnect_max": 1.0}


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Mosquitto(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def frames(tmp_path_factory, digits_dir, small_bundle_dir):
    """~12 test frames per tier and the thresholds that put them there (offline chain)."""
    dest = tmp_path_factory.mktemp("frames")
    thresholds, expected = select_frames(digits_dir / "test", dest, small_bundle_dir)
    assert {t for t, _ in expected.values()} == {0, 1, 2}, "the bundle must send frames to every tier"
    return dest, thresholds, expected


def start_stack(workdir: Path, bundle: Path, port: int, prefix: str, thresholds, workers: int = 2,
                edge_extra: dict | None = None):
    """Cloud worker + edge gateway (existing broker) as processes; returns (cloud, edge, metrics ports)."""
    m_edge, m_cloud = free_port(), free_port()
    broker = {"port": port, **FAST_RECONNECT}
    cloud_cfg = write_yaml(workdir / "cloud.yaml", {
        "bundle": str(bundle), "prefix": prefix, "broker": broker, "metrics_port": m_cloud,
        "share_group": f"{prefix}-cloud", "store": {"path": str(workdir / "hard.sqlite"), "flush_interval": 0.1}})
    edge_cfg = write_yaml(workdir / "edge.yaml", {
        "bundle": str(bundle), "prefix": prefix, "broker": broker, "mosquitto": {"managed": False},
        "discovery": {"advertise": False}, "workers": workers, "threshold": thresholds[1],
        "share_group": f"{prefix}-edge", "metrics_port": m_edge, **(edge_extra or {})})
    cloud = Proc(["cloud", "--config", str(cloud_cfg)], workdir / "cloud.log")
    edge = Proc(["edge", "--config", str(edge_cfg)], workdir / "edge.log")
    return cloud, edge, m_edge, m_cloud


def wait_stack_ready(port: int, prefix: str, workers: int, timeout: float = 30.0) -> Watcher:
    w = Watcher(port, [f"{prefix}/_gateway/+/worker/+", f"{prefix}/_cloud/+/status", f"{prefix}/_gateway/+/status"])

    def ready():
        online = {}
        for t, p in w.messages:
            if "/worker/" in t or "/_cloud/" in t:
                online[t] = json.loads(p).get("state") == "online"
        return sum(online.values()) >= workers + 1

    wait_until(ready, timeout, f"{workers} edge worker(s) and a cloud worker online")
    return w


def device_config(path: Path, bundle: Path, port: int | str, frames: Path, threshold: float, prefix: str = PREFIX,
                  node: str = "cam1", **extra) -> Path:
    broker = {"host": "auto", **extra.pop("broker", {})} if port == "auto" else {"port": port, **FAST_RECONNECT}
    return write_yaml(path, {
        "node_id": node, "bundle": str(bundle), "prefix": prefix, "broker": broker,
        "source": {"uri": str(frames), "fps": 100, **extra.pop("source", {})}, "threshold": threshold,
        "deadline_ms": 3000, "wait_for_broker": 10, "results_file": str(path.with_suffix(".jsonl")), **extra})


def metric(values: dict[str, float], name: str, **labels) -> float:
    return sum(v for k, v in values.items() if k.split("{")[0] == name
               and all(f'{lk}="{lv}"' in k for lk, lv in labels.items()))


@pytest.fixture(scope="module")
def int8_stack(tmp_path_factory, broker, small_bundle_dir, frames):
    work = tmp_path_factory.mktemp("stack")
    cloud, edge, m_edge, m_cloud = start_stack(work, small_bundle_dir, broker.port, PREFIX, frames[1])
    watcher = wait_stack_ready(broker.port, PREFIX, 2)
    yield {"dir": work, "cloud": cloud, "edge": edge, "metrics_edge": m_edge, "metrics_cloud": m_cloud,
           "watcher": watcher}
    watcher.stop()
    assert edge.stop() == 0, edge.log()[-2000:]
    assert cloud.stop() == 0, cloud.log()[-2000:]
    assert "Traceback" not in edge.log() + cloud.log()


def test_frames_end_at_the_right_tier_with_offline_labels(tmp_path, int8_stack, broker, small_bundle_dir, frames):
    frame_dir, thresholds, expected = frames
    # Audits on (confident frames also reach the cloud): the store marks them apart. Every confident
    # frame: at 0.2 the ~12 of them gave no audit at all in 7 % of runs (the node's draw is unseeded).
    cfg = device_config(tmp_path / "node.yaml", small_bundle_dir, broker.port, frame_dir, thresholds[0],
                        audit_rate=1.0)
    watcher = Watcher(broker.port, [f"{PREFIX}/cam1/result", f"{PREFIX}/cam1/status"], "results")
    device = Proc(["device", "--config", str(cfg)], tmp_path / "device.log")
    assert device.wait(60) == 0, device.log()[-3000:]
    results = read_jsonl(tmp_path / "node.jsonl")
    check_against_offline(results, expected)
    # the same events on MQTT, as JSON a Home Assistant / Node-RED user reads
    wait_until(lambda: len(watcher.json_on("/result")) == len(expected), 5, "results on MQTT")
    on_mqtt = {(r["frame"], r["tier"], r["label"]) for r in watcher.json_on("/result")}
    assert on_mqtt == {(r["frame"], r["tier"], r["label"]) for r in results}
    status = watcher.json_on("/status")
    assert status[0]["state"] == "online" and status[-1]["state"] == "offline"
    assert status[-1]["frames"] == len(expected)
    watcher.stop()
    # bytes on the wire: escalated frames carry the header + int8 feature + end logits
    escalated = [r for r in results if r["tier"] != "end"]
    assert all(r["bytes_up"] > 0 for r in escalated) and all(r["bytes_up"] == 0 for r in results if r["tier"] == "end")
    # the cloud kept every frame that reached it, with all tiers' outputs
    from tierlite.cloud.store import HardExampleStore

    n_cloud = sum(r["tier"] == "cloud" for r in results)
    store_path = int8_stack["dir"] / "hard.sqlite"
    n_audits = status[-1]["audits"]["sent"]
    assert n_audits > 0
    wait_until(lambda: HardExampleStore.open_readonly(store_path).count(node="cam1") >= n_cloud + n_audits, 5,
               "hard examples and audits stored")
    with HardExampleStore.open_readonly(store_path) as store:
        rows = list(store.iter_examples(node="cam1", audit=False))
        arrays = store.read_arrays(node="cam1", audit=False)
        assert store.count(node="cam1", audit=True) == n_audits
        assert all(ex.audit for ex in store.iter_examples(node="cam1", audit=True))
    assert len(rows) == n_cloud and not arrays["audits"].any()
    cloud_labels = sorted(r["label"] for r in results if r["tier"] == "cloud")
    assert sorted(int(x.label) for x in rows) == cloud_labels
    assert arrays["features"].shape[0] == n_cloud and arrays["end_features"].shape[0] == n_cloud
    assert arrays["end_logits"].shape == arrays["cloud_logits"].shape == (n_cloud, 10)


def test_bad_feature_messages_are_dropped_and_counted(tmp_path, int8_stack, broker, small_bundle_dir, frames):
    from tierlite import wire
    from tierlite.bundle import Bundle
    from tierlite.data import decode_image
    from tierlite.metrics import scrape
    from tierlite.segment import Segment

    bundle = Bundle.load(small_bundle_dir)
    spec = wire.boundary_spec(bundle, wire.Kind.FEATURE)
    src = next(iter(frames[2]))
    out = Segment(bundle, "end").run(decode_image(Path(src), tuple(bundle.input_shape[1:3]))[None])
    good = wire.encode_tensor_message(spec, 7, out.feature, [out.logits])
    wrong_version = bytearray(good)
    wrong_version[2] = 99
    other_model = wire.encode_tensor_message(dataclasses.replace(spec, bundle_name="someone-elses-model"),
                                             8, out.feature, [out.logits])
    bad = {"truncated": [good[:20], good[:-3]], "oversized": [good + b"\0" * 64], "version": [bytes(wrong_version)],
           "bundle": [other_model], "magic": [b"GARBAGE" * 10]}
    url = f"http://127.0.0.1:{int8_stack['metrics_edge']}/metrics"
    before = scrape(url)
    watcher = Watcher(broker.port, [f"{PREFIX}/evil/answer"], "evil")
    for payloads in bad.values():
        for p in payloads:
            watcher.client.publish(f"{PREFIX}/evil/feature", p)
    watcher.client.publish(f"{PREFIX}/evil/escalate", good[:10])  # garbage to the cloud as well
    watcher.client.publish(f"{PREFIX}/evil/feature", good)  # then a good one: the workers still answer

    def counted():
        now = scrape(url)
        return all(metric(now, "tierlite_rejected_messages_total", reason=r) - metric(
            before, "tierlite_rejected_messages_total", reason=r) == len(p) for r, p in bad.items())

    wait_until(counted, 10, "rejected messages counted per reason")
    answers = [wire.decode_answer(p) for p in wait_until(lambda: len(watcher.on(lambda t: True)) >= 2 and
                                                           watcher.on(lambda t: True), 10, "answers")]
    assert {(a.kind, a.frame_id) for a in answers} == {(wire.Kind.REJECT, 8), (wire.Kind.ANSWER, 7)}
    reject = next(a for a in answers if a.kind == wire.Kind.REJECT)
    assert reject.reason == wire.RejectReason.BUNDLE
    cloud_url = f"http://127.0.0.1:{int8_stack['metrics_cloud']}/metrics"
    wait_until(lambda: metric(scrape(cloud_url), "tierlite_rejected_messages_total", reason="truncated") >= 1, 10,
             "the cloud counts its bad message")
    watcher.stop()
    assert int8_stack["edge"].proc.poll() is None and int8_stack["cloud"].proc.poll() is None
    assert "dropped feature on tierlite/evil/feature" in int8_stack["edge"].log()


def test_edge_worker_killed_mid_run_every_frame_gets_one_result(tmp_path, int8_stack, broker, small_bundle_dir, frames):
    frame_dir, thresholds, _ = frames
    n = 240
    cfg = device_config(tmp_path / "node.yaml", small_bundle_dir, broker.port, frame_dir, 0.0, node="cam2",
                        source={"loop": True, "limit": n, "fps": 120}, deadline_ms=800)
    gw = int8_stack["watcher"]

    def workers():
        status = [json.loads(p) for t, p in gw.messages if t.endswith("_gateway/edge/status")]
        return status[-1]["workers"] if status else None

    pids = [w["pid"] for w in wait_until(workers, 5, "gateway status")]
    device = Proc(["device", "--config", str(cfg)], tmp_path / "device.log")
    wait_until(lambda: len(read_jsonl(tmp_path / "node.jsonl")) >= 60, 30, "the device to get going")
    os.kill(pids[0], signal.SIGKILL)
    assert device.wait(60) == 0, device.log()[-3000:]
    results = read_jsonl(tmp_path / "node.jsonl")
    frames_seen = sorted(r["frame"] for r in results)
    assert frames_seen == list(range(n)), "no frame without exactly one result"
    assert {r["tier"] for r in results if not r["fallback"]} >= {"edge", "cloud"}
    assert all(r["reason"] == "deadline" for r in results if r["fallback"])
    # the gateway restarts the dead worker
    wait_until(lambda: (w := workers()) and w[0]["pid"] != pids[0] and w[0]["online"], 20, "worker restarted")
    assert "edge worker 0" in int8_stack["edge"].log() and "exited with code -9" in int8_stack["edge"].log()


def _bundle_end_to_end(tmp_path, broker, bundle_dir, digits_dir, prefix):
    """Frames the offline chain sends to each tier, through Mosquitto + cloud, edge and device
    processes; every result checked against the offline chain. Returns the node's results."""
    frame_dir = tmp_path / "frames"
    thresholds, expected = select_frames(digits_dir / "test", frame_dir, bundle_dir, per_tier=8)
    cloud, edge, _, _ = start_stack(tmp_path, bundle_dir, broker.port, prefix, thresholds, workers=1)
    try:
        wait_stack_ready(broker.port, prefix, 1).stop()
        cfg = device_config(tmp_path / "node.yaml", bundle_dir, broker.port, frame_dir, thresholds[0], prefix)
        device = Proc(["device", "--config", str(cfg)], tmp_path / "device.log")
        assert device.wait(60) == 0, device.log()[-3000:]
    finally:
        assert edge.stop() == 0 and cloud.stop() == 0
    results = read_jsonl(tmp_path / "node.jsonl")
    check_against_offline(results, expected)
    return results


def test_binary_features_end_to_end(tmp_path, broker, binary_bundle_dir, digits_dir):
    from tierlite.bundle import Bundle
    from tierlite.wire import encoded_size

    bundle = Bundle.load(binary_bundle_dir)
    assert bundle.feature_encoding["kind"] == "binary"
    results = _bundle_end_to_end(tmp_path, broker, binary_bundle_dir, digits_dir, "tlbin")
    feature = bundle.segment("end").output("feature")
    packed = encoded_size(feature.shape, bundle.feature_encoding)
    assert packed * 8 >= int(np.prod(feature.shape)) > packed * 7
    sizes = {r["bytes_up"] for r in results if r["tier"] != "end"}
    assert len(sizes) == 1 and packed < sizes.pop() < packed + 100  # bit-packed feature + small header


def test_four_bit_features_and_mirror_tta_end_to_end(tmp_path, broker, small_bundle_dir, digits_dir):
    """`tierlite calibrate --feature-bits 4 --end-tta hflip --write` on the int8 bundle: the node
    sends half the feature bytes, the edge decodes the levels, the node decides on the mirror average,
    and every frame ends where and as the offline chain (Segment + wire codec) says."""
    import shutil

    from tierlite.bundle import Bundle
    from tierlite.tools.cli import main
    from tierlite.wire import encoded_size

    bundle_dir = tmp_path / "b4"
    shutil.copytree(small_bundle_dir, bundle_dir)
    assert main(["calibrate", str(bundle_dir), "--images", str(digits_dir / "train"), "--validation-split", "0.2",
                 "--feature-bits", "4", "--end-tta", "hflip", "--write", "--report", str(tmp_path / "cal")]) == 0
    bundle = Bundle.load(bundle_dir)
    enc = bundle.encoding
    assert (enc.kind, enc.bits) == ("uniform", 4) and -128 <= enc.low < enc.high <= 127
    assert bundle.segment("end").test_time_augmentation == "hflip"
    results = _bundle_end_to_end(tmp_path, broker, bundle_dir, digits_dir, "tl4b")
    feature = bundle.segment("end").output("feature")
    assert encoded_size(feature.shape, enc) == int(np.prod(feature.shape)) // 2
    int8_sizes = {r["bytes_up"] - int(np.prod(feature.shape)) // 2 for r in results if r["tier"] != "end"}
    assert len(int8_sizes) == 1 and 0 < int8_sizes.pop() < 100  # half the int8 feature + the same small header


def test_node_without_broker_classifies_locally_then_reconnects(tmp_path, small_bundle_dir, frames):
    frame_dir, thresholds, _ = frames
    port = free_port()
    cfg = device_config(tmp_path / "node.yaml", small_bundle_dir, port, frame_dir, thresholds[0],
                        source={"loop": True, "limit": 240, "fps": 40}, deadline_ms=1000, wait_for_broker=0)
    cloud, edge, _, _ = start_stack(tmp_path, small_bundle_dir, port, PREFIX, thresholds, workers=1)
    device = Proc(["device", "--config", str(cfg)], tmp_path / "device.log")
    results = tmp_path / "node.jsonl"
    try:
        wait_until(lambda: len(read_jsonl(results)) >= 40, 30, "local results with no broker")
        early = read_jsonl(results)
        assert all(r["tier"] == "end" for r in early)
        assert any(r["reason"] == "offline" for r in early), "unsure frames fell back while offline"
        b = Mosquitto(tmp_path / "late-broker", port).start()
        try:
            wait_until(lambda: any(r["tier"] != "end" for r in read_jsonl(results)), 30,
                     "escalations answered once the broker is up")
            assert device.wait(60) == 0
        finally:
            assert edge.stop() == 0 and cloud.stop() == 0
            b.stop()
    finally:
        if device.proc.poll() is None:
            device.stop()
    final = read_jsonl(results)
    assert sorted(r["frame"] for r in final) == list(range(240))
    log = device.log()
    assert "cannot reach broker" in log and "connected to 127.0.0.1" in log and "Traceback" not in log
