"""The wire format (pure logic: specs built by hand) and its checks, the config loader's errors,
and the hard-example store's API."""
from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest

from tierlite import topics, wire
from tierlite.bundle import TensorInfo
from tierlite.errors import ConfigError, WireError

FEATURE = TensorInfo("f", (1, 4, 4, 8), "int8", 0.05, -3, "feature", 1)
END_LOGITS = TensorInfo("l0", (1, 10), "int8", 0.1, -12, "logits", 0)
EDGE_LOGITS = TensorInfo("l1", (1, 10), "int8", 0.08, 5, "logits", 0)
EDGE_FEATURE = TensorInfo("f2", (1, 2, 2, 16), "int8", 0.04, -128, "feature", 1)


def feature_spec(encoding=None) -> wire.BoundarySpec:
    return wire.BoundarySpec(wire.Kind.FEATURE, "digits", 3, encoding or {"kind": "int8"}, FEATURE,
                             dataclasses.replace(FEATURE, role="", index=0), (wire.LogitsCodec(END_LOGITS),))


def escalate_spec() -> wire.BoundarySpec:
    return wire.BoundarySpec(wire.Kind.ESCALATE, "digits", 3, {"kind": "int8"}, EDGE_FEATURE,
                             dataclasses.replace(EDGE_FEATURE, role="", index=0),
                             (wire.LogitsCodec(END_LOGITS), wire.LogitsCodec(EDGE_LOGITS)), FEATURE, {"kind": "int8"})


def quantized_logits(info: TensorInfo, rng) -> np.ndarray:
    q = rng.integers(-128, 128, 10)
    return ((q - info.zero_point) * info.scale).astype(np.float32)


def test_feature_round_trip_is_exact():
    rng = np.random.default_rng(0)
    spec = feature_spec()
    q = rng.integers(-128, 128, FEATURE.shape, dtype=np.int8)
    logits = quantized_logits(END_LOGITS, rng)
    payload = wire.encode_tensor_message(spec, 123456, q, [logits], sent_us=42)
    assert len(payload) == wire.TENSOR_HEADER.size + 8 + 10 + q.size  # header, dims, int8 logits, feature
    msg = wire.decode_tensor_message(payload, spec)
    assert (msg.kind, msg.frame_id, msg.sent_us, msg.shape) == (wire.Kind.FEATURE, 123456, 42, FEATURE.shape)
    assert np.array_equal(np.frombuffer(msg.feature, np.int8).reshape(FEATURE.shape), q)
    np.testing.assert_allclose(msg.exit_logits[0], logits, rtol=0, atol=1e-6)
    assert wire.peek_frame(payload) == (wire.Kind.FEATURE, 123456)


def test_binary_feature_is_bit_packed():
    from tierlite.wire import decode_feature

    enc = {"kind": "binary", "low": -128, "high": 127}
    spec = feature_spec(enc)
    rng = np.random.default_rng(1)
    q = np.where(rng.random(FEATURE.shape) > 0.5, 127, -128).astype(np.int8)
    payload = wire.encode_tensor_message(spec, 1, q, [quantized_logits(END_LOGITS, rng)])
    assert len(payload) == wire.TENSOR_HEADER.size + 8 + 10 + q.size // 8
    msg = wire.decode_tensor_message(payload, spec)
    assert np.array_equal(decode_feature(msg.feature, FEATURE.shape, enc), q)
    with pytest.raises(WireError, match="encoding"):  # an int8 tier refuses packed features
        wire.decode_tensor_message(payload, feature_spec())


def test_escalation_carries_earlier_exits_and_the_end_feature():
    rng = np.random.default_rng(2)
    spec = escalate_spec()
    q2 = rng.integers(-128, 128, EDGE_FEATURE.shape, dtype=np.int8)
    end_q = rng.integers(-128, 128, FEATURE.shape, dtype=np.int8)
    l0, l1 = quantized_logits(END_LOGITS, rng), quantized_logits(EDGE_LOGITS, rng)
    payload = wire.encode_tensor_message(spec, 9, q2, [l0, l1], end_feature=end_q.tobytes())
    msg = wire.decode_tensor_message(payload, spec)
    np.testing.assert_allclose(msg.exit_logits[0], l0, atol=1e-6)
    np.testing.assert_allclose(msg.exit_logits[1], l1, atol=1e-6)
    assert bytes(msg.end_feature) == end_q.tobytes() and bytes(msg.feature) == q2.tobytes()
    without = wire.decode_tensor_message(wire.encode_tensor_message(spec, 9, q2, [l0, l1]), spec)
    assert without.end_feature is None


@pytest.mark.parametrize("mutate, reason", [
    (lambda p: p[:10], "truncated"),
    (lambda p: p[:-1], "truncated"),
    (lambda p: p + b"\0", "oversized"),
    (lambda p: p + b"\0" * 4096, "oversized"),
    (lambda p: b"XX" + p[2:], "magic"),
    (lambda p: p[:2] + bytes([2]) + p[3:], "version"),
    (lambda p: p[:3] + bytes([wire.Kind.ESCALATE]) + p[4:], "kind"),
    (lambda p: p[:4] + bytes([1]) + p[5:], "encoding"),
])
def test_bad_messages_raise_wire_error_with_a_reason(mutate, reason):
    spec = feature_spec()
    good = wire.encode_tensor_message(spec, 5, np.zeros(FEATURE.shape, np.int8), [np.zeros(10, np.float32)])
    with pytest.raises(WireError) as e:
        wire.decode_tensor_message(mutate(good), spec)
    assert wire.reason_of(e.value) == reason


def test_a_tier_refuses_features_from_another_model():
    spec = feature_spec()
    zeros = np.zeros(FEATURE.shape, np.int8)
    other = wire.encode_tensor_message(dataclasses.replace(spec, bundle_name="cats"), 5, zeros, [np.zeros(10)])
    with pytest.raises(WireError, match="bundle") as e:
        wire.decode_tensor_message(other, spec)
    requant = dataclasses.replace(spec, feature=dataclasses.replace(FEATURE, scale=0.07))
    with pytest.raises(WireError, match="quantization"):
        wire.decode_tensor_message(wire.encode_tensor_message(requant, 5, zeros, [np.zeros(10)]), spec)
    reshaped = dataclasses.replace(spec, feature=dataclasses.replace(FEATURE, shape=(1, 8, 2, 8)))
    with pytest.raises(WireError, match="shape"):
        wire.decode_tensor_message(wire.encode_tensor_message(reshaped, 5, zeros, [np.zeros(10)]), spec)
    # the node is told at once (REJECT), so it answers locally instead of waiting for its deadline
    reject = wire.decode_answer(wire.encode_reject("edge", 5, e.value, "digits", 3))
    assert (reject.kind, reject.frame_id, reject.reason) == (wire.Kind.REJECT, 5, wire.RejectReason.BUNDLE)


def test_answers_round_trip_and_bad_answers_are_refused():
    raw = wire.encode_answer("cloud", 2**32 - 1, 7, 0.875, 0.25, "digits", 3)
    a = wire.decode_answer(raw)
    assert (a.kind, a.tier, a.frame_id, a.label, a.bundle_id, a.bundle_version) == (
        wire.Kind.ANSWER, "cloud", 2**32 - 1, 7, wire.bundle_id("digits"), 3)
    assert a.confidence == pytest.approx(0.875) and a.entropy == pytest.approx(0.25)
    for bad in (raw[:-1], raw + b"!", b"XX" + raw[2:], raw[:2] + b"\x07" + raw[3:],
                raw[:3] + bytes([wire.Kind.FEATURE]) + raw[4:], raw[:4] + b"\x09" + raw[5:]):
        with pytest.raises(WireError):
            wire.decode_answer(bad)


def test_topics_and_node_ids():
    assert topics.node_topic("site/a", "cam-1", "feature") == "site/a/cam-1/feature"
    assert topics.node_of("site/a/cam-1/feature", "site/a") == "cam-1"
    for bad in ("site/a/feature", "site/b/cam/feature", "site/a/x/y/feature", "site/a/_gateway/feature",
                "site/a/update/feature"):
        with pytest.raises(WireError):
            topics.node_of(bad, "site/a")
    assert not topics.valid_node_id("a" * 65) and not topics.valid_node_id("cam 1") and topics.valid_node_id("Cam_1.x-2")


def test_header_layout_is_stable():
    """Other tools (load generators, firmware) patch frame id and send time in place."""
    offset = struct.calcsize("<2sBBBBBBII")
    spec = feature_spec()
    p = bytearray(wire.encode_tensor_message(spec, 77, np.zeros(FEATURE.shape, np.int8), [np.zeros(10)], sent_us=99))
    assert struct.unpack_from("<IQ", p, offset) == (77, 99)
    struct.pack_into("<IQ", p, offset, 78, 100)
    msg = wire.decode_tensor_message(bytes(p), spec)
    assert (msg.frame_id, msg.sent_us) == (78, 100)


def test_boundary_specs_from_a_real_bundle(small_bundle_dir):
    from tierlite.bundle import Bundle

    b = Bundle.load(small_bundle_dir)
    up, cloud = wire.boundary_spec(b, wire.Kind.FEATURE), wire.boundary_spec(b, wire.Kind.ESCALATE)
    assert up.feature.shape == b.segment("edge").inputs[0].shape and up.input_info == b.segment("edge").inputs[0]
    assert cloud.input_info == b.segment("cloud").inputs[0] and len(cloud.exits) == 2
    assert (up.bundle_name, up.bundle_version) == (b.name, b.version)


# -- configs --------------------------------------------------------------------------------------
def test_config_errors_are_one_clear_line(tmp_path, small_bundle_dir):
    from tierlite.config import DeviceConfig, EdgeConfig, load_config

    def write(text: str):
        p = tmp_path / "node.yaml"
        p.write_text(text)
        return p

    base = f"node_id: cam1\nbundle: {small_bundle_dir}\nsource: {{uri: {tmp_path}}}\n"
    cfg = load_config(write(base + "broker: {host: auto, discovery_match: {bundle: x}}\n"), DeviceConfig)
    assert cfg.broker.auto and cfg.broker.discovery_match == {"bundle": "x"} and cfg.deadline_ms == 500.0
    cases = {
        "brokr: {}\n": "node.yaml: unknown key 'brokr' (did you mean 'broker'?)",
        "broker: {port: 70000}\n": "node.yaml.broker.port: must be 1..65535, got 70000",
        "broker: {port: '1883'}\n": "node.yaml.broker.port: expected an integer",
        "broker: {qos: {feature: 3}}\n": "node.yaml.broker.qos.feature: QoS is 0, 1 or 2",
        "broker: {tls: {ca_file: nope.pem}}\n": "node.yaml.broker.tls.ca_file: file not found",
        "broker: {protocol: 4}\n": "node.yaml.broker.protocol: must be one of",
        "threshold: 1.5\n": "node.yaml.threshold: a normalized-entropy threshold is in [0, 1]",
        "runtime: tensorrt\n": "node.yaml.runtime: unknown runtime 'tensorrt'",
        "home_assistant: yes please\n": "node.yaml.home_assistant: expected true or false",
    }
    for extra, message in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(write(base + extra), DeviceConfig)
        assert str(e.value).startswith(message), (extra, str(e.value))
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="node.yaml.bundle: not found"):
        load_config(write(base.replace(str(small_bundle_dir), "missing-bundle")), DeviceConfig)
    with pytest.raises(ConfigError, match="node_id: required key missing"):
        load_config(write(f"bundle: {small_bundle_dir}\nsource: {{uri: '0'}}\n"), DeviceConfig)
    with pytest.raises(ConfigError, match=r"node.yaml: not valid YAML \(line \d\)"):
        load_config(write("node_id: a\nbundle: [\n"), DeviceConfig)
    with pytest.raises(ConfigError, match="several workers need MQTT 5"):
        load_config(write(f"bundle: {small_bundle_dir}\nworkers: 2\nbroker: {{protocol: '3.1.1'}}\n"), EdgeConfig)
    with pytest.raises(ConfigError, match="mode 'bridge' needs a 'bridge' section"):
        load_config(write(f"bundle: {small_bundle_dir}\ncloud: {{mode: bridge}}\n"), EdgeConfig)


def test_relative_paths_are_relative_to_the_config_file(tmp_path, small_bundle_dir):
    import shutil

    from tierlite.config import CloudConfig, load_config

    shutil.copytree(small_bundle_dir, tmp_path / "conf" / "bundle")
    p = tmp_path / "conf" / "cloud.yaml"
    p.write_text("bundle: bundle\nstore: {path: hard.sqlite}\n")
    cfg = load_config(p, CloudConfig)
    assert cfg.bundle == str(tmp_path / "conf" / "bundle") and cfg.store.path == str(tmp_path / "conf" / "hard.sqlite")


# -- hard-example store ---------------------------------------------------------------------------
def test_hard_example_store_batches_and_reads_back_while_writing(tmp_path):
    from tierlite.cloud.store import HardExampleStore, StoreError

    path = tmp_path / "hard.sqlite"
    store = HardExampleStore(path, batch=4, flush_interval=60)
    rng = np.random.default_rng(3)
    feats = rng.integers(-128, 128, (6, 1, 2, 2, 16), dtype=np.int8)
    packed = np.packbits(rng.random((6, 128)) > 0.5, axis=1)
    for i in range(6):
        store.add(node=f"cam{i % 2}", frame_id=i, bundle_name="digits", bundle_version=1 + i // 3, sent_us=i,
                  feature=feats[i].tobytes(), feature_shape=(1, 2, 2, 16), feature_scale=0.04, feature_zero_point=-128,
                  logits={t: np.full(10, i, np.float32) for t in ("end", "edge", "cloud")}, label=i % 10,
                  confidence=0.5, entropy=0.4, end_feature=packed[i].tobytes(), end_feature_shape=(1, 4, 4, 8),
                  end_feature_encoding={"kind": "binary", "low": -1, "high": 1}, end_feature_scale=1.0,
                  end_feature_zero_point=0)
    reader = HardExampleStore.open_readonly(path)  # a second connection, as the retraining job has
    assert reader.count() == 4  # one full batch committed, two rows still buffered
    store.flush()
    assert reader.count() == 6 and reader.count(node="cam1") == 3 and reader.count(min_version=2) == 3
    rows = list(reader.iter_examples(bundle_name="digits", since_id=1, page=2))
    assert [r.frame_id for r in rows] == [1, 2, 3, 4, 5]
    assert np.array_equal(rows[0].feature_array(), feats[1])
    assert set(np.unique(rows[0].end_feature_array())) <= {-1, 1} and rows[0].end_feature_array().shape == (1, 4, 4, 8)
    arrays = reader.read_arrays(node="cam0")
    assert arrays["features"].shape == (3, 2, 2, 16) and arrays["cloud_logits"].shape == (3, 10)
    assert list(arrays["labels"]) == [0, 2, 4] and arrays["end_features"].shape == (3, 4, 4, 8)
    reader.close()
    store.close()
    with pytest.raises(StoreError, match="not found"):
        HardExampleStore.open_readonly(tmp_path / "none.sqlite")


def _local_deployment_files(node, tmp_path):
    """Swap the provisioned key/cert/password files (/etc/tierlite/...) for empty local ones."""
    if isinstance(node, dict):
        return {k: _local_deployment_files(v, tmp_path) for k, v in node.items()}
    if isinstance(node, str) and node.startswith("/etc/tierlite/"):
        local = tmp_path / "etc" / node.removeprefix("/etc/tierlite/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.touch()
        return str(local)
    return node


def test_example_configs_in_docs_are_valid(tmp_path, small_bundle_dir, monkeypatch):
    """docs/examples/*.yaml use every section; only the deployment paths are swapped for local ones."""
    import yaml

    from tierlite.config import CloudConfig, DeviceConfig, EdgeConfig, config_from_dict

    examples = __import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "examples"
    for name, cls in (("node.yaml", DeviceConfig), ("edge.yaml", EdgeConfig), ("cloud.yaml", CloudConfig)):
        data = _local_deployment_files(yaml.safe_load((examples / name).read_text()), tmp_path)
        for section in (data, data.get("broker") or {}):
            if section.get("password_env"):
                monkeypatch.setenv(section["password_env"], "example-secret")
        data["bundle"] = str(small_bundle_dir)
        for section, key in (("", "results_file"), ("mosquitto", "state_dir"), ("store", "path")):
            holder = data.get(section) if section else data
            if holder and key in holder:
                holder[key] = str(tmp_path / key)
        cfg = config_from_dict(data, cls, name, tmp_path)
        assert cfg.bundle == str(small_bundle_dir)


def test_uniform_feature_levels_are_bit_packed_and_batch_equals_single():
    """`uniform` encoding: 2**bits levels over [low, high], `bits` bits an element; the batch
    encoder/decoder agree byte for byte with the single-message ones; bad parameters refused."""
    from tierlite.bundle import FeatureEncoding
    from tierlite.errors import BundleError
    from tierlite.wire import decode_feature, encoded_size, uniform_levels

    enc = {"kind": "uniform", "low": -40, "high": 80, "bits": 4}
    levels = uniform_levels(FeatureEncoding.of(enc))
    assert len(levels) == 16 and levels[0] == -40 and levels[-1] == 80
    spec = feature_spec(enc)
    rng = np.random.default_rng(2)
    qs = rng.integers(-128, 128, size=(5, *FEATURE.shape)).astype(np.int8)
    logits = [quantized_logits(END_LOGITS, rng) for _ in qs]
    singles = [wire.encode_tensor_message(spec, i, q, [lg], sent_us=7) for i, (q, lg) in enumerate(zip(qs, logits))]
    assert len(singles[0]) == wire.TENSOR_HEADER.size + 8 + 10 + qs[0].size // 2
    batch = wire.encode_tensor_batch(spec, list(range(5)), qs, [np.stack([lg.reshape(-1) for lg in logits])], [7] * 5)
    assert batch == singles
    decoded, errors = wire.decode_tensor_batch(batch, spec)
    assert not errors
    for q, msg, got in zip(qs, singles, decoded.tensor):
        one = decode_feature(wire.decode_tensor_message(msg, spec).feature, FEATURE.shape, enc)
        np.testing.assert_array_equal(one.reshape(got.shape), got)
        # each element decodes to the level nearest its clipped value (within half a step)
        step = (80 - (-40)) / 15
        assert np.abs(one.astype(float) - np.clip(q, -40, 80)).max() <= step / 2 + 0.5
        assert set(np.unique(one)) <= set(levels.tolist())
    with pytest.raises(WireError, match="encoding"):  # an int8 tier refuses the packed levels
        wire.decode_tensor_message(singles[0], feature_spec())
    assert encoded_size((1, 8, 8, 8), {"kind": "uniform", "low": 0, "high": 9, "bits": 3}) == 192
    for bad in ({"kind": "uniform", "low": 0, "high": 9}, {"kind": "uniform", "low": 5, "high": 5, "bits": 4},
                {"kind": "uniform", "low": 0, "high": 9, "bits": 8}):
        with pytest.raises(BundleError, match="uniform"):
            FeatureEncoding.of(bad)
