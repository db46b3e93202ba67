"""The cloud side of site bridges, provisioned (`tierlite provision cloud`): a real Mosquitto with the
generated certificate-only config and ACL. A site's bridge has no password anywhere; each site may
write only its own escalations and read only its own answers; a revoked site may do nothing.
tests/test_runtime_sites.py runs real gateways and cloud workers on this provisioned cloud broker."""
from __future__ import annotations

import time

import pytest
import yaml

from runtime_support import Mosquitto, Watcher, free_port, wait_until
from tierlite.config import BrokerConfig, config_from_dict
from tierlite.edge.provision import CloudFleet, reload_broker
from tierlite.mqtt import MqttClient

pytestmark = pytest.mark.timeout(120)
P = "tierlite"
SITES = ("north", "south")
SETTLE = 0.8  # seconds after a positive control arrived, for anything denied that was sent before it


def provisioned_cloud_broker(work) -> dict:
    """`tierlite provision cloud` for SITES in `work`, and its Mosquitto started with the generated
    certificate-only settings and ACL. The caller stops ["broker"]."""
    fleet = CloudFleet(work / "fleet")
    fleet.init(P, ["127.0.0.1"], free_port(), ["cloud"], list(SITES))
    broker = Mosquitto(work / "broker", fleet.state["port"])
    broker.settings = {k: v for k, v in fleet.mosquitto_settings().items() if k in ("acl_file", "tls")}
    broker.start()
    return {"work": work, "fleet": fleet, "broker": broker}


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    cloud = provisioned_cloud_broker(tmp_path_factory.mktemp("cloud-fleet"))
    yield cloud
    cloud["broker"].stop()


def identity(fleet: CloudFleet, folder: str, stem: str) -> BrokerConfig:
    """The BrokerConfig a provisioned certificate identity connects with."""
    return config_from_dict({"host": "127.0.0.1", "port": fleet.state["port"],
                             "tls": {"ca_file": "ca.crt", "cert_file": f"{stem}.crt", "key_file": f"{stem}.key"}},
                            BrokerConfig, base=fleet.root / folder)


def peer(fleet: CloudFleet, folder: str, stem: str, filters=()) -> Watcher:
    return Watcher(fleet.state["port"], list(filters), folder.replace("/", "-"), identity(fleet, folder, stem))


def test_generated_files_hold_no_password(cloud):
    fleet = cloud["fleet"]
    conf = (fleet.broker_dir / "mosquitto.conf").read_text()
    for line in ("allow_anonymous false", "require_certificate true", "use_identity_as_username true",
                 f"acl_file {fleet.acl_path.resolve()}", f"crlfile {fleet.crl_path.resolve()}"):
        assert line in conf.splitlines()
    assert "password_file" not in conf and not fleet.passwd_path.exists()
    bridge = yaml.safe_load((fleet.root / "sites" / "north" / "bridge-security.yaml").read_text())["cloud"]["bridge"]
    assert bridge["site"] == "north" and "password" not in bridge and bridge["tls"]["cert_file"] == "bridge.crt"
    assert yaml.safe_load((fleet.broker_dir / "cloud-broker.yaml").read_text())["mosquitto"] == \
        fleet.mosquitto_settings(absolute=False)


def test_update_sender_reads_plain_and_site_report_and_frame_topics():
    from tierlite import topics
    from tierlite.errors import WireError

    assert topics.update_sender(f"{P}/update/digits/report/cam1", P, "report") == ("digits", (None, "cam1"))
    model, sender = topics.update_sender(f"{P}/north/update/digits/frames/cam1", P, "frames")
    assert model == "digits" and sender.key == "north/cam1"
    assert topics.site_update_reports(P, "digits").matches(f"{P}/north/update/digits/report/cam1")
    for bad, kind in ((f"{P}/north/update/digits/frames/cam1", "report"), (f"{P}/a/b/update/d/report/cam1", "report"),
                      ("other/update/d/report/cam1", "report"), (f"{P}/update/d/report/_edge", "report"),
                      (f"{P}/_x/update/d/frames/cam1", "frames"), (f"{P}/update/d/frames", "frames")):
        with pytest.raises(WireError):
            topics.update_sender(bad, P, kind)


def site_broker(cloud, site: str):
    """A site's gateway Mosquitto (loopback, anonymous: the demo) bridged to the cloud broker with the
    generated bridge config of that site's bridge-security.yaml."""
    from tierlite.config import BridgeConfig, MosquittoConfig
    from tierlite.edge.broker import MosquittoProcess, mosquitto_config

    folder = cloud["fleet"].root / "sites" / site
    link = yaml.safe_load((folder / "bridge-security.yaml").read_text())["cloud"]["bridge"]
    bridge = config_from_dict({**link, "reconnect_max": 2}, BridgeConfig, base=folder)
    m = MosquittoConfig(port=free_port())
    proc = MosquittoProcess(m, cloud["work"] / f"site-{site}", mosquitto_config(m, bridge, P, "edge"))
    proc.start()
    return proc


def test_reports_and_frame_uploads_are_keyed_by_site(cloud, digits_dir):
    """cam1 at north and cam1 at south, each behind its own real site bridge: the canary gate and the
    frame store see two nodes, north/cam1 and south/cam1; a site cannot report for another site's
    node, nor under the bare (siteless) topic."""
    import json

    from tierlite.cloud.frames import FrameCollector, FrameStore
    from tierlite.cloud.rollout import _Reports, _watch_canary
    from tierlite.update.frame_upload import encode_frame_upload

    fleet = cloud["fleet"]
    assert "south" not in fleet.state["revoked"]  # runs before the revocation test below
    jpeg = next((digits_dir / "test").rglob("*.jpg")).read_bytes()
    publisher = MqttClient(identity(fleet, "publisher", "publisher"), "publisher")
    worker = MqttClient(identity(fleet, "cloud/cloud", "cloud"), "cloud-frames")
    reports = _Reports(publisher, P, "digits")
    store = FrameStore(cloud["work"] / "frames.sqlite")
    collector = FrameCollector(store, worker, P, per_node_rate=100.0)
    brokers = {site: site_broker(cloud, site) for site in SITES}
    cams = {}
    try:
        for c in (publisher, worker):
            c.start()
            assert c.wait_connected(10)
        states = {"north": "confirmed", "south": "rolled_back"}
        for site, b in brokers.items():
            cams[site] = MqttClient(BrokerConfig(port=b.m.port), f"cam1-{site}")
            cams[site].start()
            assert cams[site].wait_connected(10)

        def send() -> None:  # until the bridges are up (QoS 1 is not queued before the bridge connects)
            for site, cam in cams.items():
                body = {"node": "cam1", "last_event": {"state": states[site], "version": 2, "detail": site}}
                cam.publish(f"{P}/update/digits/report/cam1", json.dumps(body).encode(), 1, retain=True)
                cam.publish(f"{P}/update/digits/frames/cam1", encode_frame_upload(jpeg, 1), 0)
            time.sleep(0.3)
            return len(reports.reports) == 2 and collector.stored >= 2

        wait_until(send, 30, "both sites' reports and frames at the cloud")
        assert {k: r["last_event"]["state"] for k, r in reports.reports.items()} == \
            {"north/cam1": "confirmed", "south/cam1": "rolled_back"}
        ok, reason = _watch_canary(reports, 2, 0.3)  # north's "confirmed" does not hide south's rollback
        assert not ok and "south/cam1" in reason
        nodes = {r.node for r in store.iter_frames("digits")}
        assert nodes == {"north/cam1", "south/cam1"}
        # north's bridge identity speaks for south's cam1, and for a bare node: refused by the ACL
        north = peer(fleet, "sites/north", "bridge")
        before = dict(reports.reports)
        forged = json.dumps({"node": "cam1", "last_event": {"state": "confirmed", "version": 2}}).encode()
        north.client.publish(f"{P}/south/update/digits/report/cam1", forged, 1)
        north.client.publish(f"{P}/update/digits/report/cam1", forged, 1)
        own = json.dumps({"node": "cam9", "last_event": {"state": "confirmed", "version": 2}}).encode()
        north.client.publish(f"{P}/north/update/digits/report/cam9", own, 1)  # control: its own site's node
        wait_until(lambda: "north/cam9" in reports.reports, 10, "north's own report")
        time.sleep(SETTLE)
        assert reports.reports.keys() == {*before, "north/cam9"}
        assert reports.reports["south/cam1"] == before["south/cam1"]
        north.stop()
    finally:
        for cam in cams.values():  # clear the retained reports
            cam.publish_and_wait(f"{P}/update/digits/report/cam1", b"", 1, retain=True)
        for c in (*cams.values(), publisher, worker):
            c.stop()
        for b in brokers.values():
            b.stop()
        store.close()


def test_each_site_touches_only_its_own_topics(cloud):
    fleet = cloud["fleet"]
    stolen = cloud["work"] / "stolen-south"  # south's bridge files, as a thief would keep them
    stolen.mkdir()
    for name in ("bridge.crt", "bridge.key", "ca.crt"):
        (stolen / name).write_bytes((fleet.root / "sites" / "south" / name).read_bytes())
    c = MqttClient(BrokerConfig(port=fleet.state["port"], tls={"ca_file": str(fleet.ca_cert_path)}), "no-cert")
    c.start()
    assert not c.wait_connected(3), "a client without a certificate got in"
    c.stop()
    worker = peer(fleet, "cloud/cloud", "cloud", [f"{P}/+/+/escalate"])
    north = peer(fleet, "sites/north", "bridge", [f"{P}/+/+/answer"])
    south = peer(fleet, "sites/south", "bridge", [f"{P}/+/+/answer"])
    # north speaks for south's nodes (denied), then for its own (the positive control)
    north.client.publish(f"{P}/south/cam1/escalate", b"forged", 1)
    north.client.publish(f"{P}/north/cam1/escalate", b"north", 1)
    wait_until(lambda: worker.on(lambda t: True), 10, "north's escalation at the cloud worker")
    # the cloud worker answers both sites: each bridge gets its own site's answer only
    worker.client.publish(f"{P}/south/cam1/answer", b"for south", 1)
    worker.client.publish(f"{P}/north/cam1/answer", b"for north", 1)
    wait_until(lambda: north.on(lambda t: True) and south.on(lambda t: True), 10, "the answers")
    time.sleep(SETTLE)
    assert worker.messages == [(f"{P}/north/cam1/escalate", b"north")]
    assert north.messages == [(f"{P}/north/cam1/answer", b"for north")]
    assert south.messages == [(f"{P}/south/cam1/answer", b"for south")]
    # revoked: south's bridge (still connected: Mosquitto checks the CRL at the TLS handshake only) may do nothing
    fleet.revoke("south")
    assert fleet.state["crl_serials"] == [fleet.state["identities"]["_bridge-south"]["serial"]]
    reload_broker(cloud["broker"].pid)
    time.sleep(SETTLE)
    south.client.publish(f"{P}/south/cam1/escalate", b"after revoke", 1)
    worker.client.publish(f"{P}/south/cam1/answer", b"after revoke", 1)
    north.client.publish(f"{P}/north/cam2/escalate", b"control", 1)
    wait_until(lambda: len(worker.messages) == 2, 10, "the control escalation")
    time.sleep(SETTLE)
    assert worker.messages[-1] == (f"{P}/north/cam2/escalate", b"control")
    assert south.messages == [(f"{P}/south/cam1/answer", b"for south")]
    # and its certificate is refused at the next TLS handshake (the CRL); north's still connects
    again = MqttClient(config_from_dict({"host": "127.0.0.1", "port": fleet.state["port"], "tls": {
        "ca_file": "ca.crt", "cert_file": "bridge.crt", "key_file": "bridge.key"}}, BrokerConfig, base=stolen), "south-again")
    again.start()
    assert not again.wait_connected(3), "the revoked site's certificate got in"
    again.stop()
    peer(fleet, "sites/north", "bridge").stop()
    for w in (worker, north, south):
        w.stop()
