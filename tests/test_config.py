"""Config loading: every problem reported at once, with its YAML path, bad value and a did-you-mean.
The configs only check that the bundle exists, so an empty folder stands in for one here."""
from __future__ import annotations

import pytest

from tierlite.config import BrokerConfig, DeviceConfig, EdgeConfig, load_config
from tierlite.errors import ConfigError


@pytest.fixture
def write(tmp_path):
    (tmp_path / "bundle").mkdir()

    def write(text: str, name: str = "edge.yaml"):
        p = tmp_path / name
        p.write_text("bundle: bundle\n" + text)
        return p
    return write


def test_several_errors_are_reported_at_once_with_their_paths(write):
    with pytest.raises(ConfigError) as e:
        load_config(write("mosquitto: {port: 70000, prot: 1}\nthreshold: 1.5\nworkrs: 2\n"
                          "broker: {qos: {feature: 3}, keepalive: '30'}\ncloud: {mode: bridge}\n"), EdgeConfig)
    lines = str(e.value).splitlines()
    assert lines == [
        "edge.yaml.broker.keepalive: expected an integer, got '30'",
        "edge.yaml.broker.qos.feature: QoS is 0, 1 or 2, got 3",
        "edge.yaml.mosquitto.port: must be 1..65535, got 70000",
        "edge.yaml.mosquitto: unknown key 'prot' (did you mean 'port'?)",
        "edge.yaml.cloud: mode 'bridge' needs a 'bridge' section (host, port, ...)",
        "edge.yaml.threshold: a normalized-entropy threshold is in [0, 1], got 1.5",
        "edge.yaml: unknown key 'workrs' (did you mean 'workers'?)",
    ]


def test_unknown_keys_get_the_nearest_valid_key_or_the_list(write):
    with pytest.raises(ConfigError) as e:
        load_config(write("broker: {tls: {ca_fil: x.pem}, discovery_timout: 2}\nzzz: 1\n"), EdgeConfig)
    lines = str(e.value).splitlines()
    assert lines[0] == "edge.yaml.broker.tls: unknown key 'ca_fil' (did you mean 'ca_file'?)"
    assert lines[1] == "edge.yaml.broker: unknown key 'discovery_timout' (did you mean 'discovery_timeout'?)"
    assert lines[2].startswith("edge.yaml: unknown key 'zzz' (known: bundle, prefix, gateway_id, broker, ")


def test_yaml_numbers_are_text_where_text_is_due_and_sections_checks_run(write, tmp_path):
    cfg = load_config(write("node_id: 7\nsource: {uri: 0}\nbroker: {protocol: 5, password: 1234}\n", "node.yaml"),
                      DeviceConfig)
    assert (cfg.node_id, cfg.source.uri, cfg.broker.protocol, cfg.broker.password) == ("7", "0", "5", "1234")
    assert cfg.bundle == str(tmp_path / "bundle")
    with pytest.raises(ConfigError) as e:
        load_config(write("broker: {reconnect_min: 20, password: a, password_env: PATH}\nworkers: 1.0\n"), EdgeConfig)
    assert str(e.value).splitlines() == [
        "edge.yaml.broker: need reconnect_min <= reconnect_max, got 20.0 > 10.0",
        "edge.yaml.broker: give password or password_env, not both",
        "edge.yaml.workers: expected an integer, got 1.0",
    ]
    with pytest.raises(Exception, match="frozen"):
        cfg.broker.qos.feature = 2  # sections nobody overrides at run time are frozen
    assert BrokerConfig(port=1884).port == 1884  # direct construction still works, defaults and checks included
