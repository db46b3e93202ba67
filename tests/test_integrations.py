"""Where users already look (issue 17): Home Assistant discovery, node Prometheus metrics and the
Grafana/alert examples, the Node-RED flow, systemd readiness, and the config defects a new user hit.

Home Assistant itself is not installed here: homeassistant 2024.3.3 (the last for Python 3.11) pins
cryptography==42.0.5, requests==2.31.0, urllib3<2, PyYAML==6.0.1 and its MQTT integration
paho-mqtt==1.6.1, all older than this project's (paho-mqtt 2.2). The payloads are checked against
the MQTT discovery keys HA documents for each platform, and their templates rendered with Jinja2
(HA's template engine) against the state messages the node sends."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tierlite.config import DeviceConfig, EdgeConfig, config_from_dict
from tierlite.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"

# https://www.home-assistant.io/integrations/{sensor,binary_sensor}.mqtt/ (configuration variables)
HA_COMMON = {"availability_topic", "availability_template", "payload_available", "payload_not_available",
             "availability", "availability_mode", "device", "enabled_by_default", "encoding", "entity_category",
             "expire_after", "force_update", "icon", "json_attributes_template", "json_attributes_topic", "name",
             "object_id", "origin", "qos", "state_topic", "unique_id", "value_template", "device_class"}
HA_KEYS = {
    "sensor": HA_COMMON | {"last_reset_value_template", "state_class", "suggested_display_precision",
                           "unit_of_measurement"},
    "binary_sensor": HA_COMMON | {"off_delay", "payload_off", "payload_on"},
}
HA_DEVICE_KEYS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "name",
                  "suggested_area", "sw_version", "via_device"}
HA_ENTITY_CATEGORIES = {"config", "diagnostic"}
HA_STATE_CLASSES = {"measurement", "total", "total_increasing"}


def check_discovery(topic: str, body: dict, prefix: str = "homeassistant") -> str:
    """One discovery message as HA's MQTT integration validates it; returns the platform."""
    m = re.fullmatch(rf"{re.escape(prefix)}/(sensor|binary_sensor)/[a-zA-Z0-9_-]+/[a-zA-Z0-9_-]+/config", topic)
    assert m, f"not a discovery topic: {topic}"
    platform = m.group(1)
    assert set(body) <= HA_KEYS[platform], f"{topic}: keys HA does not know: {set(body) - HA_KEYS[platform]}"
    assert {"state_topic", "unique_id", "name", "device"} <= set(body)
    assert set(body["device"]) <= HA_DEVICE_KEYS and body["device"]["identifiers"]
    assert body.get("entity_category", "diagnostic") in HA_ENTITY_CATEGORIES
    assert body.get("state_class", "total") in HA_STATE_CLASSES
    assert isinstance(body.get("expire_after", 1), int) and body.get("expire_after", 1) > 0  # HA: positive int seconds
    if "off_delay" in body:  # HA: positive int seconds
        assert isinstance(body["off_delay"], (int, float)) and body["off_delay"] > 0
    if platform == "binary_sensor":
        assert {body["payload_on"], body["payload_off"]} == {"ON", "OFF"}
    assert "+" not in body["state_topic"] and "#" not in body["state_topic"]
    return platform


def render(template: str, message: dict) -> str:
    import jinja2

    return jinja2.Environment().from_string(template).render(value_json=message).strip()


def test_home_assistant_entities_fit_the_schema_and_change_only_with_the_decision():
    from tierlite.homeassistant import HomeAssistantOptions, StateThrottle, node_discovery, service_discovery

    labels = ["person", "cat", 'dog "big"', "cat"]  # a quote and a duplicate name: templates go by index
    options = HomeAssistantOptions(discovery_prefix="ha-site1", min_interval=1.0, heartbeat=10.0, off_delay=15.0)
    configs = node_discovery("tierlite", "cam.1", labels, "digits", 3, options)
    platforms = [check_discovery(t, b, "ha-site1") for t, b in configs]
    assert {b["off_delay"] for t, b in configs if "/binary_sensor/" in t} == {options.off_delay}
    assert platforms.count("binary_sensor") == 4 and platforms.count("sensor") == 4 + 4  # class/tier/latency/model
    assert len({b["unique_id"] for _, b in configs}) == len(configs) == len({str(t) for t, _ in configs})
    assert {b["device"]["identifiers"][0] for _, b in configs} == {"tierlite_cam_1"}
    assert {b["availability_topic"] for _, b in configs} == {"tierlite/cam.1/status"}
    assert {b["expire_after"] for _, b in configs} == {options.expire_after}  # 2 missed heartbeats
    by_key = {str(t).split("/")[-2]: b for t, b in configs}
    assert by_key["tier"]["entity_category"] == by_key["latency"]["entity_category"] == "diagnostic"
    assert "entity_category" not in by_key["class"]  # the primary entity
    only = node_discovery("tierlite", "cam1", labels, "digits", 3, HomeAssistantOptions(classes=("person",)))
    assert len(only) == 4 + 2
    imagenet = node_discovery("tierlite", "cam1", [f"c{i}" for i in range(1000)], "big", 1)
    assert len(imagenet) == 4  # 2000 per-class entities only when asked for by name
    for t, b in service_discovery("gateway", "edge", "tierlite/_gateway/edge/status", options):
        check_discovery(t, b, "ha-site1")
        assert render(b["value_template"], {"state": "online", "model": "digits", "model_version": 2}) in ("ON", "digits v2")

    # 30 fps for 60 s: person, a 2-frame cat blip at 10 s, then dog from 30 s on.
    now = [0.0]
    throttle = StateThrottle(labels, options, clock=lambda: now[0])
    sent = []
    for i in range(1800):
        now[0] = i / 30
        label = 2 if now[0] >= 30 else (1 if i in (300, 301) else 0)
        msg = throttle.observe({"label": label, "tier": "end", "latency_ms": 2.0, "model": "digits", "model_version": 3})
        if msg is not None:
            sent.append((now[0], msg))
    # a message per decision change (person->cat->person->dog) plus the 10 s heartbeats, not 1800
    assert 6 <= len(sent) <= 12, [t for t, _ in sent]
    assert sum(throttle.counts) == 1800 and throttle.counts[1] == 2
    seen = {key: by_key[f"seen_{key}"] for key in ("person", "cat")}
    states = [(t, render(seen["person"]["value_template"], m), render(seen["cat"]["value_template"], m)) for t, m in sent]
    cat_on = [t for t, _, cat in states if cat == "ON"]
    assert cat_on and 10 <= min(cat_on) and max(cat_on) < 12, states  # the 2-frame blip shows, briefly
    assert states[-1][1:] == ("OFF", "OFF")  # once dog is decided, person and cat go off
    last = sent[-1][1]
    assert render(by_key["class"]["value_template"], last) == 'dog "big"'
    assert render(by_key["count_cat"]["value_template"], last) == "2"
    assert float(render(by_key["latency"]["value_template"], last)) == 2.0


def test_node_publishes_discovery_throttled_state_and_metrics(request, tmp_path, digits_dir):
    from runtime_support import Mosquitto, Watcher

    from tierlite.device.daemon import DeviceDaemon
    from tierlite.metrics import scrape
    from tierlite.tools.stack import reference_bundle

    # The shipped CIFAR-10 bundle takes 32x32 RGB like the digits frames; what it decides on them
    # does not matter here, and it spares training one. Without it, the small digits bundle.
    bundle = reference_bundle() or request.getfixturevalue("small_bundle_dir")

    broker = Mosquitto(tmp_path / "broker").start()
    try:
        watcher = Watcher(broker.port, ["homeassistant/#", "tierlite/+/ha_state"])
        cfg = config_from_dict({
            "node_id": "cam1", "bundle": str(bundle),
            "source": {"uri": str(digits_dir / "test" / "3"), "loop": True, "limit": 300},
            "broker": {"port": broker.port}, "home_assistant": {"min_interval": 0.2, "heartbeat": 1.0, "off_delay": 2},
            "metrics_port": 0, "threshold": 0.0, "deadline_ms": 50}, DeviceConfig, "node.yaml", tmp_path)
        daemon = DeviceDaemon(cfg)
        t0 = time.monotonic()
        daemon.run()  # threshold 0: every frame is sent up; no edge listens, so each falls back at its deadline
        frames, elapsed = daemon.stats.frames, time.monotonic() - t0
        configs = [(t, json.loads(p)) for t, p in list(watcher.messages) if t.startswith("homeassistant/")]
        states = watcher.json_on("/ha_state")
        metrics = scrape(f"http://127.0.0.1:{daemon.metrics_port}/metrics")
        watcher.stop()
    finally:
        broker.stop()
    labels = daemon.bundle.labels
    assert len(configs) == 4 + 2 * len(labels)
    for topic, body in configs:
        check_discovery(topic, body)
    # at most one state message per min_interval (0.2 s), whatever the frame rate: not one per frame
    assert frames == 300 and 1 <= len(states) <= elapsed / 0.2 + 2 and len(states) < frames / 3
    assert sum(states[-1]["counts"]) <= frames
    assert metrics['tierlite_node_frames_total{node="cam1",tier="end"}'] == frames
    assert metrics['tierlite_node_escalations_total{node="cam1"}'] == frames
    assert sum(v for k, v in metrics.items() if k.startswith("tierlite_node_fallbacks_total")) == frames
    assert metrics['tierlite_node_decision_seconds_count{node="cam1"}'] == frames
    assert metrics[f'tierlite_node_model_version{{model="{daemon.bundle.name}",node="cam1"}}'] == daemon.bundle.version


def test_dashboard_and_alert_rules_name_only_metrics_the_code_exposes():
    import yaml

    from tierlite.metrics import NodeMetrics, TierMetrics, metric_names

    known = metric_names(NodeMetrics("n", lambda: True, lambda: {"rolled_back": 0}).registry)
    known |= metric_names(TierMetrics("edge").registry)
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    rules = yaml.safe_load((EXAMPLES / "prometheus-alerts.yml").read_text())
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}
    assert {"TierliteNodeOffline", "TierliteFallbackRateHigh", "TierliteEscalationRateJump",
            "TierliteUpdateRolledBack"} <= set(alerts)
    named = {name for e in exprs + list(alerts.values()) for name in re.findall(r"\btierlite_\w+", e)}
    assert len(named) >= 10 and named <= known, f"not exposed by the code: {sorted(named - known)}"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_red_flow_counts_results_per_class(tmp_path):
    flow = json.loads((EXAMPLES / "node-red-flow.json").read_text())
    by_type = {n["type"]: n for n in flow}
    assert by_type["mqtt in"]["topic"] == "tierlite/+/result" and by_type["mqtt in"]["datatype"] == "json"
    assert by_type["mqtt in"]["wires"] == [[by_type["function"]["id"]]]
    # the function node's body, run by Node.js with the flow/context/node objects Node-RED gives it
    harness = tmp_path / "run.js"
    harness.write_text("""
const store = () => { const d = {}; return {get: k => d[k], set: (k, v) => { d[k] = v; }}; };
const flow = store(), context = store(); let status = null;
const node = {status: s => { status = s; }};
const f = new Function('msg', 'flow', 'context', 'node', %s);
const events = [['cam1', 'cat'], ['cam1', 'cat'], ['cam1', 'dog'], ['cam2', 'cat'], [null, 'x']];
let out = null;
for (const [n, l] of events) { const r = f({payload: n ? {node: n, label_name: l, label: 0} : 'junk'}, flow, context, node); if (r) out = r; }
console.log(JSON.stringify({counts: flow.get('tierlite_counts'), status, out}));
""" % json.dumps(by_type["function"]["func"]))
    run = subprocess.run(["node", str(harness)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["counts"] == {"cam1": {"cat": 2, "dog": 1}, "cam2": {"cat": 1}}
    assert result["status"]["text"] == "cam2: cat 1" and result["out"]["payload"] == result["counts"]


def test_config_defects_bridge_tls_port_and_every_error_once(tmp_path):
    (tmp_path / "b").mkdir()
    base = {"bundle": "b"}
    with pytest.raises(ConfigError) as e:  # accepted silently before: the bridge then hangs in the TLS handshake
        config_from_dict({**base, "cloud": {"mode": "bridge", "bridge": {"host": "cloud.example", "port": 8883}}},
                         EdgeConfig, "edge.yaml", tmp_path)
    assert str(e.value).startswith("edge.yaml.cloud.bridge.port: port 8883 is MQTT over TLS: add a 'tls' section")
    ok = config_from_dict({**base, "cloud": {"mode": "bridge", "bridge": {"host": "c", "port": 8883, "tls": {}}}},
                          EdgeConfig, "edge.yaml", tmp_path)
    assert ok.cloud.bridge.tls is not None
    # Before: a field error hid the checks that involve several keys (only the first problem showed).
    with pytest.raises(ConfigError) as e:
        config_from_dict({**base, "workers": 2, "broker": {"port": 0, "protocol": "3.1.1", "reconnect_min": 5,
                                                           "reconnect_max": 1, "password": "p", "password_env": "PATH",
                                                           "tls": {"cert_file": "b"}},
                          "cloud": {"mode": "bridge"}}, EdgeConfig, "edge.yaml", tmp_path)
    assert str(e.value).splitlines() == [
        "edge.yaml.broker.port: must be 1..65535, got 0",
        "edge.yaml.broker.tls.cert_file: file not found: " + str(tmp_path / "b"),
        "edge.yaml.broker.tls: cert_file and key_file go together",
        "edge.yaml.broker: need reconnect_min <= reconnect_max, got 5.0 > 1.0",
        "edge.yaml.broker: give password or password_env, not both",
        "edge.yaml.cloud: mode 'bridge' needs a 'bridge' section (host, port, ...)",
        "edge.yaml.workers: several workers need MQTT 5 shared subscriptions (broker.protocol: '5')",
    ]
    node = {"node_id": "n", "bundle": "b", "source": {"uri": "b"}}
    assert not config_from_dict(node, DeviceConfig, "node.yaml", tmp_path).home_assistant.enabled
    assert config_from_dict({**node, "home_assistant": True}, DeviceConfig, "node.yaml", tmp_path).home_assistant.enabled
    with pytest.raises(ConfigError) as e:
        config_from_dict({**node, "home_assistant": {"heartbeat": 30, "off_delay": 5, "discovery_prefix": "a/#"}},
                         DeviceConfig, "node.yaml", tmp_path)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("node.yaml.home_assistant.discovery_prefix: topic prefix 'a/#'")
    assert lines[1].startswith("node.yaml.home_assistant.off_delay: must exceed heartbeat (30 s)")


def test_sd_notify_ready_and_watchdog_only_while_frames_advance(tmp_path, monkeypatch):
    from tierlite.systemd import Watchdog, notify

    assert notify("READY=1") is False or os.environ.get("NOTIFY_SOCKET")  # outside systemd: a no-op
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")  # WatchdogSec=0.2: a ping every 0.1 s
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert notify("READY=1") and server.recv(64) == b"READY=1"
        progress = {"moving": True}
        dog = Watchdog(lambda: progress["moving"]).start()
        assert dog.interval == pytest.approx(0.1)
        assert server.recv(64) == b"WATCHDOG=1"
        progress["moving"] = False  # a wedged frame loop: the pings stop, systemd restarts us
        time.sleep(0.15)
        server.settimeout(0.05)
        while True:  # drain pings sent before the flag flipped
            try:
                server.recv(64)
            except socket.timeout:
                break
        server.settimeout(0.35)
        with pytest.raises(socket.timeout):
            server.recv(64)
        dog.stop()


def test_calibration_plot_on_small_data_keeps_one_label_per_point_and_the_trade_off():
    import numpy as np

    from tierlite.converters import calibrate

    rng = np.random.default_rng(0)
    labels = np.arange(40) % 4
    # A small validation split the end exit gets entirely right: every max-drop budget picks the
    # same thresholds (all frames on the camera, 0 B/frame): before, 8 labels on one spot, 1 dot.
    exits = []
    for margin in (2.0, 4.0, 6.0):
        logits = rng.normal(0, 0.3, (40, 4))
        logits[np.arange(40), labels] += margin * rng.uniform(0.3, 1.5, 40)
        exits.append(logits.astype(np.float32))
    points, table = calibrate.sweep(exits, labels, (96, 48), grid=41)
    assert len({(p.camera_fraction, p.camera_uplink_bytes) for p in points}) == 1 and points[0].camera_uplink_bytes == 0
    fig = calibrate.figure(points, table, "small")
    try:
        for ax in fig.axes[:2]:  # the two plots (then the colourbar)
            spots = [t.xy for t in ax.texts]
            assert len(spots) == len(set(spots)) == 1 and "/" in ax.texts[0].get_text()  # "-0/0.25/.../10pt"
        xs = {float(x) for c in fig.axes[1].collections for x, _ in c.get_offsets()}
        assert len(xs) > 5 and max(xs) > 0  # the bytes axis shows the pairs it chose from
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_system_mosquitto_takes_the_printed_bridge_as_a_conf_d_drop_in(tmp_path):
    from runtime_support import Mosquitto, Watcher

    from tierlite.edge.broker import find_mosquitto
    from tierlite.tools.cli import main
    from tierlite.tools.stack import free_port, wait_until, write_yaml

    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    cloud = Mosquitto(tmp_path / "cloud").start()
    (tmp_path / "b").mkdir()
    edge_yaml = write_yaml(tmp_path / "edge.yaml", {"bundle": "b", "mosquitto": {"managed": False},
                                                    "cloud": {"mode": "bridge", "bridge": {"host": "127.0.0.1", "port": cloud.port}}})
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    out = subprocess.run([sys.executable, "-m", "tierlite", "edge", "--config", str(edge_yaml),
                          "--print-mosquitto-config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "listener" not in out.stdout and "connection tierlite-edge" in out.stdout  # the bridge only
    (conf_d / "tierlite.conf").write_text(out.stdout)
    port = free_port()  # the "system" broker: its own main config, the drop-in included
    (tmp_path / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                                             f"include_dir {conf_d}\n")
    system = subprocess.Popen([find_mosquitto(), "-c", str(tmp_path / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        watcher = Watcher(port, ["tierlite/_gateway/edge/bridge"])
        wait_until(lambda: b"1" in watcher.on(lambda t: True), 20, "the bridge to come up")
        watcher.stop()
    finally:
        system.terminate()
        system.wait(10)
        cloud.stop()
    assert main(["edge", "--config", str(write_yaml(tmp_path / "local.yaml", {"bundle": "b", "mosquitto": {"managed": False}})),
                 "--print-mosquitto-config"]) == 2  # nothing to install: one clear line


def test_cli_quiets_tensorflow_cpp_logs_before_any_command_imports_it(tmp_path):
    # Before: `tierlite train`/`demo` imported TensorFlow with its C++ INFO/WARNING chatter on
    # (SavedModel loader, MLIR passes: ~12 lines per exported segment) and it landed in train.log.
    code = ("import os, sys\nfrom tierlite.tools.cli import main\n"
            "rc = main(['train', sys.argv[1], '--workdir', sys.argv[1]])\n"
            "print(rc, os.environ.get('TF_CPP_MIN_LOG_LEVEL'), 'tensorflow' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.stdout.split() == ["2", "2", "False"], run.stdout + run.stderr  # bad folder: exit 2, TF not loaded yet
    explicit = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True,
                              env={**env, "TF_CPP_MIN_LOG_LEVEL": "0"}, timeout=120)
    assert explicit.stdout.split()[1] == "0"  # a user who asks for them still gets them
