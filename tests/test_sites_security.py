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


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    work = tmp_path_factory.mktemp("cloud-fleet")
    fleet = CloudFleet(work / "fleet")
    fleet.init(P, ["127.0.0.1"], free_port(), ["cloud"], list(SITES))
    broker = Mosquitto(work / "broker", fleet.state["port"])
    broker.settings = {k: v for k, v in fleet.mosquitto_settings().items() if k in ("acl_file", "tls")}
    broker.start()
    yield {"work": work, "fleet": fleet, "broker": broker}
    broker.stop()


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
                 f"acl_file {fleet.acl_path.resolve()}"):
        assert line in conf.splitlines()
    assert "password_file" not in conf and not fleet.passwd_path.exists()
    bridge = yaml.safe_load((fleet.root / "sites" / "north" / "bridge-security.yaml").read_text())["cloud"]["bridge"]
    assert bridge["site"] == "north" and "password" not in bridge and bridge["tls"]["cert_file"] == "bridge.crt"
    assert yaml.safe_load((fleet.broker_dir / "cloud-broker.yaml").read_text())["mosquitto"] == \
        fleet.mosquitto_settings(absolute=False)


def test_each_site_touches_only_its_own_topics(cloud):
    fleet = cloud["fleet"]
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
    # revoked: south's bridge (still connected, certificate still CA-signed) may do nothing
    fleet.revoke("south")
    reload_broker(cloud["broker"].pid)
    time.sleep(SETTLE)
    south.client.publish(f"{P}/south/cam1/escalate", b"after revoke", 1)
    worker.client.publish(f"{P}/south/cam1/answer", b"after revoke", 1)
    north.client.publish(f"{P}/north/cam2/escalate", b"control", 1)
    wait_until(lambda: len(worker.messages) == 2, 10, "the control escalation")
    time.sleep(SETTLE)
    assert worker.messages[-1] == (f"{P}/north/cam2/escalate", b"control")
    assert south.messages == [(f"{P}/south/cam1/answer", b"for south")]
    for w in (worker, north, south):
        w.stop()
