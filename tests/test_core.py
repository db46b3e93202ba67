"""Core logic: exit policy, boundary-feature codecs, manifest validation, runtime plugin choice."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from tierlite.bundle import validate_manifest
from tierlite.errors import BundleError, ConfigError, RuntimeUnavailable, WireError
from tierlite.policy import chain_decisions, decide, normalized_entropy, softmax
from tierlite.runtimes import open_runtime
from tierlite.wire import decode_feature, encode_feature, encoded_size


def test_normalized_entropy_bounds():
    assert normalized_entropy(np.eye(10)[3]) == pytest.approx(0.0, abs=1e-9)
    assert normalized_entropy(np.full(10, 0.1)) == pytest.approx(1.0)
    assert 0.0 < normalized_entropy(softmax(np.array([2.0, 1.0, 0.0]))) < 1.0


def test_decide_threshold_and_last_tier():
    sure, unsure = np.array([12.0, 0, 0, 0]), np.array([0.1, 0, 0.05, 0])
    assert decide(sure, 0.2)[:2] == (True, 0)
    assert decide(unsure, 0.2)[0] is False
    assert decide(unsure, None)[0] is True  # the cloud always answers


def test_chain_decisions_picks_first_confident_tier():
    end = np.array([[9.0, 0, 0], [0.1, 0, 0.1], [0.1, 0.1, 0]])
    edge = np.array([[0, 9.0, 0], [0, 0, 9.0], [0.2, 0.1, 0]])
    cloud = np.array([[0, 0, 9.0], [9.0, 0, 0], [0, 9.0, 0]])
    tier, labels = chain_decisions([end, edge, cloud], [0.3, 0.3])
    assert tier.tolist() == [0, 1, 2]
    assert labels.tolist() == [0, 2, 1]


@pytest.mark.parametrize("shape", [(1, 4, 4, 16), (1, 3, 3, 5)])
def test_binary_feature_roundtrip_is_one_bit_per_element(shape):
    enc = {"kind": "binary", "low": -128, "high": 127}
    rng = np.random.default_rng(0)
    q = np.where(rng.random(shape) > 0.5, 127, -128).astype(np.int8)
    payload = encode_feature(q, enc)
    assert len(payload) == encoded_size(shape, enc) == (int(np.prod(shape)) + 7) // 8
    np.testing.assert_array_equal(decode_feature(payload, shape, enc), q)


def test_int8_feature_roundtrip_and_size_check():
    enc = {"kind": "int8"}
    q = np.arange(-64, 64, dtype=np.int8).reshape(1, 2, 4, 16)
    payload = encode_feature(q, enc)
    np.testing.assert_array_equal(decode_feature(payload, q.shape, enc), q)
    with pytest.raises(WireError, match="needs 128"):
        decode_feature(payload[:-1], q.shape, enc)


def _manifest(**changes):
    m = {"schema": 1, "name": "m", "version": 1, "labels": ["a", "b"],
         "input": {"shape": [1, 8, 8, 3], "dtype": "uint8"}, "feature_encoding": {"kind": "int8"},
         "segments": [{"tier": "end", "file": "end.tflite", "sha256": "0" * 64,
                       "inputs": [{"name": "x", "shape": [1, 8, 8, 3], "dtype": "uint8"}],
                       "outputs": [{"name": "y", "shape": [1, 2], "dtype": "int8", "role": "logits"}]}]}
    m.update(changes)
    return m


@pytest.mark.parametrize("changes, message", [
    ({"schema": 9}, "unsupported schema 9"),
    ({"version": "1"}, "'version' missing or not a int"),
    ({"feature_encoding": {"kind": "float"}}, "feature_encoding.kind"),
    ({"segments": []}, "needs at least an 'end' segment"),
])
def test_manifest_validation_errors_are_one_clear_line(changes, message):
    with pytest.raises(BundleError, match=message) as err:
        validate_manifest(_manifest(**changes))
    assert "\n" not in str(err.value)


def test_manifest_rejects_path_escape():
    m = _manifest()
    m["segments"][0]["file"] = "../../etc/passwd"
    with pytest.raises(BundleError, match="plain relative name"):
        validate_manifest(m)
    assert set(validate_manifest(_manifest())) == {"end"}




def test_unknown_runtime_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown runtime 'onnx'"):
        open_runtime(tmp_path / "x.tflite", "onnx")


def test_missing_model_file_is_reported_by_every_plugin(tmp_path):
    with pytest.raises(RuntimeUnavailable):
        open_runtime(tmp_path / "absent.tflite", "litert", fallback=True)


def test_fallback_from_an_absent_delegate_is_logged_once(small_bundle_dir, caplog):
    # libedgetpu is not installed here: asking for the Edge TPU must land on LiteRT, with one warning.
    model = small_bundle_dir / "end.tflite"
    if not model.exists():
        model = next(small_bundle_dir.glob("*.tflite"))
    with caplog.at_level(logging.WARNING, logger="tierlite.runtime"):
        rt = open_runtime(model, "edgetpu", fallback=True)
        open_runtime(model, "edgetpu", fallback=True)
    assert rt.key == "litert"
    assert sum("fell back to litert" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeUnavailable, match="libedgetpu"):
        open_runtime(model, "edgetpu", fallback=False)
