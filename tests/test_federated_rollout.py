"""A site's personalised bundle goes to that site's nodes only (docs/COTRAINING.md, "From federation
to fleet"; docs/UPDATES.md, "One site only"): real Mosquitto for the cloud broker as `tierlite
provision cloud` writes it (TLS, per-site ACL) and for two sites bridged to it, real `tierlite device`
nodes at both sites (a `cam1` at each), `tierlite publish --site` as a real process."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from runtime_support import Proc, Watcher, wait_until, write_yaml
from test_sites_security import SITES, identity, provisioned_cloud_broker, site_broker
from test_update_e2e import make_version

pytestmark = pytest.mark.timeout(420)
P = "tierlite"
NODES = {"north": ("cam1", "cam2"), "south": ("cam1",)}
FAST = {"reconnect_min": 0.1, "reconnect_max": 1.0}


def personalised(bundle, site: str):
    """What `tierlite federate export --weights W --site SITE` marks in the manifest."""
    from tierlite.bundle import MANIFEST, write_manifest

    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["training"] = {**manifest.get("training", {}), "personalised_for": site}
    write_manifest(bundle, manifest)
    return bundle


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, small_bundle_dir, digits_dir):
    from tierlite.cloud.signing import generate_keypair

    cloud = provisioned_cloud_broker(tmp_path_factory.mktemp("site-rollout"))
    work, fleet, broker = cloud["work"], cloud["fleet"], cloud["broker"]
    priv, pub, _ = generate_keypair(work / "keys" / "update.key")
    v1 = work / "v1"
    shutil.copytree(small_bundle_dir, v1)
    # v2: north's personalised heads (a mild refit); v3: north's again, with the end head's classes
    # rotated, so it fails the shadow check at north's canary
    v2 = personalised(make_version(v1, work / "v2", 2, lambda W, b: (W * 1.05, b)), "north")
    v3 = personalised(make_version(v1, work / "v3", 3, lambda W, b: (np.roll(W, 1, axis=1), np.roll(b, 1))), "north")
    v4 = make_version(v1, work / "v4", 4, lambda W, b: (W * 0.97, b))  # then a fleet-wide version
    frames = work / "frames"
    for p in sorted((digits_dir / "test").rglob("*.jpg"))[:40]:
        (frames / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, frames / p.parent.name / p.name)
    sites = {site: site_broker(cloud, site) for site in SITES}
    # everything each site's broker carries about updates (from the cloud: announcements, chunks)
    watchers = {site: Watcher(b.m.port, [f"{P}/update/#"], f"rollout-{site}") for site, b in sites.items()}
    nodes = {}
    for site, names in NODES.items():
        for name in names:
            cfg = write_yaml(work / f"{site}-{name}.yaml", {
                "node_id": name, "bundle": str(v1), "prefix": P, "threshold": 1.0,  # decides every frame itself
                "broker": {"port": sites[site].m.port, **FAST},
                "source": {"uri": str(frames), "fps": 10, "loop": True}, "deadline_ms": 2000,
                "update": {"trusted_keys": str(pub), "state_dir": str(work / f"{site}-{name}-models"),
                           "watch_frames": 10, "watch_seconds": 20}})
            nodes[(site, name)] = Proc(["device", "--config", str(cfg)], work / f"{site}-{name}.log")
    publish = ["publish", "--key", str(priv), "--broker-config",
               str(fleet.root / "publisher" / "publisher-security.yaml"), "--chunk-bytes", "4096", "--hold", "90"]
    yield {**cloud, "v1": v1, "v2": v2, "v3": v3, "v4": v4, "sites": sites, "watchers": watchers, "nodes": nodes,
           "publish": publish}
    for w in watchers.values():
        w.stop()
    for key, n in nodes.items():
        assert n.stop() == 0, f"{key}: {n.log()[-2000:]}"
        assert "Traceback" not in n.log(), n.log()[-3000:]
    for b in sites.values():
        b.stop()
    broker.stop()


def _events(w: Watcher, node: str, state: str, version: int) -> list[dict]:
    return [r for r in w.json_on(f"/report/{node}")
            if r["last_event"].get("state") == state and r["last_event"].get("version") == version]


def test_unknown_ambiguous_and_mismatched_sites_are_refused_in_one_line(fleet):
    work = fleet["work"]
    cases = {  # args -> what the one line must say
        ("--bundle", str(fleet["v2"]), "--site", "west"): "unknown site 'west'",
        ("--bundle", str(fleet["v2"]), "--site", "north,south"): "one site id",
        ("--bundle", str(fleet["v2"])): "personalised for site north: publish it with --site north",
        ("--bundle", str(fleet["v2"]), "--site", "south"): "personalised for site north, not for south",
    }
    for i, (args, said) in enumerate(cases.items()):
        p = Proc([*fleet["publish"], "--parent", str(fleet["v1"]), *args], work / f"refused-{i}.log")
        assert p.wait(120) == 2, p.log()
        lines = [l for l in p.log().splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], p.log()
    # without the cloud broker's folder there is no list of sites to check against
    p = Proc(["publish", "--key", fleet["publish"][2], "--broker", f"127.0.0.1:{fleet['fleet'].state['port']}",
              "--bundle", str(fleet["v2"]), "--parent", str(fleet["v1"]), "--site", "north"], work / "refused-nf.log")
    assert p.wait(120) == 2 and "--site needs the cloud broker's folder" in p.log(), p.log()


def test_a_site_update_reaches_that_sites_nodes_only_with_canary_and_rollback(fleet):
    from tierlite.bundle import Bundle

    work, w, model = fleet["work"], fleet["watchers"], Bundle.load(fleet["v1"]).name
    for (site, name), n in fleet["nodes"].items():
        wait_until(lambda n=n: "update: running" in n.log() or not n.running(), 90, f"{site}/{name} up")
        assert n.running(), n.log()[-2000:]
    time.sleep(2.0)  # the bridges subscribe on connect; a retained announcement would be taken in then
    # north's personalised v2, canary cam1 (named: the bare id, which south has too)
    p = Proc([*fleet["publish"], "--bundle", str(fleet["v2"]), "--parent", str(fleet["v1"]), "--site", "north",
              "--canary-nodes", "cam1", "--json", str(work / "v2.json")], work / "publish-v2.log")
    assert p.wait(240) == 0, p.log()
    result = json.loads((work / "v2.json").read_text())
    assert result["stage"] == "complete" and result["site"] == "north", result
    assert set(result["reports"]) == {"north/cam1"}, result["reports"]  # south's cam1 is no canary of north's
    for name in NODES["north"]:
        wait_until(lambda name=name: _events(w["north"], name, "confirmed", 2), 90, f"north/{name} confirms v2")
    # v3 (fails the shadow check at the canary): halted, north's retained announcement is v2 again
    p = Proc([*fleet["publish"], "--bundle", str(fleet["v3"]), "--parent", str(fleet["v2"]), "--site", "north",
              "--canary-nodes", "cam1", "--json", str(work / "v3.json")], work / "publish-v3.log")
    assert p.wait(240) == 1, p.log()
    result = json.loads((work / "v3.json").read_text())
    assert result["stage"] == "halted" and "north/cam1" in result["reason"], result
    assert _retained(fleet, model) == {f"{P}/north/update/{model}": 2}
    # cam2 was not in v3's canary: still on v2
    assert not _events(w["north"], "cam2", "applied", 3)
    # south: nothing of v2 or v3 reached its broker, its cam1 never heard of either
    crossing = [t for t, _ in w["south"].messages if "/report/" not in t and "/frames/" not in t]
    assert crossing == [], crossing  # 0 crossing
    south = fleet["nodes"][("south", "cam1")]
    assert "announced" not in south.log() and "update applied" not in south.log(), south.log()[-2000:]
    north_got = [t for t, _ in w["north"].messages if "/report/" not in t]
    assert f"{P}/update/{model}" in north_got and any(t.startswith(f"{P}/update/{model}/v2/") for t in north_got)
    # the bridge takes in what it sends up under its site: no report came back down as a copy
    reports = [p for t, p in w["north"].messages if "/report/" in t]
    assert len(reports) == len(set(reports)), "a report echoed back through the bridge"
    print(f"north's broker: {len(north_got)} update messages from the cloud; south's: {len(crossing)}")
    # a fleet-wide v4 reaches every node, and replaces north's own (older) announcement
    p = Proc([*fleet["publish"], "--bundle", str(fleet["v4"]), "--parent", str(fleet["v1"])], work / "publish-v4.log")
    assert p.wait(240) == 0, p.log()
    for (site, name) in fleet["nodes"]:
        wait_until(lambda site=site, name=name: _events(w[site], name, "applied", 4), 90, f"{site}/{name} takes v4")
    assert _retained(fleet, model) == {f"{P}/update/{model}": 4, f"{P}/north/update/{model}": 4}


def _retained(fleet, model: str) -> dict[str, int]:
    """The update announcements the cloud broker holds (topic -> version), read as the publisher."""
    from tierlite.mqtt import MqttClient

    retained: dict[str, dict | None] = {}
    probe = MqttClient(identity(fleet["fleet"], "publisher", "publisher"), f"probe-{time.monotonic_ns()}")
    for f in (f"{P}/+/update/{model}", f"{P}/update/{model}"):
        probe.subscribe(f, lambda t, b: retained.setdefault(t, json.loads(b) if b else None), 1)
    probe.start()
    assert probe.wait_connected(10)
    time.sleep(1.5)
    probe.stop()
    return {t: d["version"] for t, d in retained.items() if d}
