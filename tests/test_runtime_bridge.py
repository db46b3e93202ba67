"""Edge gateway with its own supervised Mosquitto, bridged to a separate cloud Mosquitto (two real
brokers, two ports), advertised by zeroconf on loopback; a node configured with `broker: auto`."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tierlite.errors import TierliteError

from runtime_support import (Mosquitto, Proc, Watcher, check_against_offline, free_port, read_jsonl, select_frames,
                             wait_until, write_yaml)

pytestmark = pytest.mark.timeout(240)
PREFIX = "tierlite"
LOOPBACK = ["127.0.0.1"]


@pytest.fixture(scope="module")
def site(tmp_path_factory, small_bundle_dir, digits_dir):
    work = tmp_path_factory.mktemp("site")
    thresholds, expected = select_frames(digits_dir / "test", work / "frames", small_bundle_dir, per_tier=8)
    cloud_broker = Mosquitto(work / "cloud-broker").start()
    edge_port = free_port()
    gateway_id = f"gw{os.getpid()}"  # other test sessions on this host may advertise gateways too
    cloud_cfg = write_yaml(work / "cloud.yaml", {
        "bundle": str(small_bundle_dir), "broker": {"port": cloud_broker.port}, "metrics_port": None,
        "store": {"path": str(work / "hard.sqlite")}})
    edge_cfg = write_yaml(work / "edge.yaml", {
        "bundle": str(small_bundle_dir), "gateway_id": gateway_id, "threshold": thresholds[1], "workers": 1,
        "mosquitto": {"port": edge_port, "state_dir": str(work / "edge-state")},
        "discovery": {"interfaces": LOOPBACK, "name": f"tierlite-test-{gateway_id}"},
        "cloud": {"mode": "bridge", "bridge": {"host": "127.0.0.1", "port": cloud_broker.port}},
        "metrics_port": None})
    cloud = Proc(["cloud", "--config", str(cloud_cfg)], work / "cloud.log")
    edge = Proc(["edge", "--config", str(edge_cfg)], work / "edge.log")
    wait_until(lambda: "gateway ready" in edge.log(), 30, "the gateway")
    wait_until(lambda: "zeroconf: advertising" in edge.log(), 10, "the advertisement")
    yield {"work": work, "thresholds": thresholds, "expected": expected, "cloud_broker": cloud_broker,
           "edge_port": edge_port, "gateway_id": gateway_id, "edge_cfg": edge_cfg, "edge": edge, "cloud": cloud}
    assert edge.stop() == 0, edge.log()[-2000:]
    assert cloud.stop() == 0, cloud.log()[-2000:]
    cloud_broker.stop()
    assert "Traceback" not in edge.log() + cloud.log()


def test_discovery_node_with_auto_broker_finds_the_gateway(site, small_bundle_dir):
    from tierlite.bundle import Bundle
    from tierlite.mqtt import discover_broker

    found = discover_broker(5.0, LOOPBACK, {"gateway": site["gateway_id"]})
    bundle = Bundle.load(small_bundle_dir)
    assert found is not None and (found.host, found.port) == ("127.0.0.1", site["edge_port"])
    assert found.properties["bundle"] == bundle.name and found.properties["version"] == str(bundle.version)

    work = site["work"]
    cfg = write_yaml(work / "auto.yaml", {
        "node_id": "autocam", "bundle": str(small_bundle_dir), "threshold": site["thresholds"][0],
        "broker": {"host": "auto", "discovery_interfaces": LOOPBACK, "discovery_match": {"gateway": site["gateway_id"]}},
        "source": {"uri": str(work / "frames"), "fps": 100}, "deadline_ms": 3000, "wait_for_broker": 20,
        "results_file": str(work / "auto.jsonl")})
    watcher = Watcher(site["edge_port"], [f"{PREFIX}/autocam/status"], "auto")
    device = Proc(["device", "--config", str(cfg)], work / "auto.log")
    assert device.wait(60) == 0, device.log()[-3000:]
    assert f"discovered gateway tierlite-test-{site['gateway_id']}" in device.log()
    # escalated frames crossed the bridge to the cloud broker and came back
    check_against_offline(read_jsonl(work / "auto.jsonl"), site["expected"])
    states = [s["state"] for s in watcher.json_on("/status")]
    assert states[0] == "online" and states[-1] == "offline"
    watcher.stop()


def test_two_brokers_bridge_carries_escalations_and_answers(site, small_bundle_dir):
    work, cloud_port, edge_port = site["work"], site["cloud_broker"].port, site["edge_port"]
    at_cloud = Watcher(cloud_port, [f"{PREFIX}/+/escalate", f"{PREFIX}/update/#"], "cloud-side")
    at_edge = Watcher(edge_port, [f"{PREFIX}/+/answer", f"{PREFIX}/update/#"], "edge-side")
    cfg = write_yaml(work / "bridged.yaml", {
        "node_id": "bridgecam", "bundle": str(small_bundle_dir), "threshold": site["thresholds"][0],
        "broker": {"port": edge_port}, "source": {"uri": str(work / "frames"), "fps": 100}, "deadline_ms": 3000,
        "results_file": str(work / "bridged.jsonl"),
        "audit_rate": 0})  # audits reach the cloud too: this test counts the escalations alone
    device = Proc(["device", "--config", str(cfg)], work / "bridged.log")
    assert device.wait(60) == 0, device.log()[-3000:]
    results = read_jsonl(work / "bridged.jsonl")
    check_against_offline(results, site["expected"])
    n_cloud = sum(r["tier"] == "cloud" for r in results)
    assert n_cloud == sum(t == 2 for t, _ in site["expected"].values()) > 0
    # every cloud-tier frame was seen on the cloud broker exactly once, and its answer on the edge broker
    def escalations():
        return at_cloud.on(lambda t: t.endswith("/bridgecam/escalate"))

    try:
        wait_until(lambda: len(escalations()) == n_cloud, 20, "escalations")
    except TierliteError:  # say what the watcher had
        seen = escalations()
        pytest.fail(f"{len(seen)} escalations ({len(set(seen))} distinct) on the cloud broker "
                    f"for {n_cloud} cloud-tier frames")
    from tierlite import wire

    answers = [wire.decode_answer(p) for p in at_edge.on(lambda t: t.endswith("/bridgecam/answer"))]
    assert sum(a.tier == "cloud" for a in answers) == n_cloud
    # model updates come in, update reports go out; neither echoes back across the bridge
    at_cloud.client.publish(f"{PREFIX}/update/digits", b"announcement", 1)
    at_edge.client.publish(f"{PREFIX}/update/digits/report/bridgecam", b"report", 1)
    time.sleep(1.0)
    assert at_edge.on(lambda t: t == f"{PREFIX}/update/digits") == [b"announcement"]
    assert at_cloud.on(lambda t: t.endswith("/report/bridgecam")) == [b"report"]
    assert at_cloud.on(lambda t: t == f"{PREFIX}/update/digits") == [b"announcement"]
    at_cloud.stop()
    at_edge.stop()
    # the generated config is what `tierlite edge --print-mosquitto-config` shows a user
    conf = subprocess.run([sys.executable, "-m", "tierlite", "edge", "--config", str(site["edge_cfg"]),
                           "--print-mosquitto-config"], capture_output=True, text=True, timeout=30)
    assert conf.returncode == 0
    assert f"address 127.0.0.1:{cloud_port}" in conf.stdout and f"topic {PREFIX}/+/escalate out 0" in conf.stdout
    assert (work / "edge-state" / "mosquitto.conf").read_text() == conf.stdout
