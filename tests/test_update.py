"""Update artifacts, signatures, chunking and the node-side UpdateManager: pure logic.

Bundles here are real bundle directories (real manifest, real hashes) whose segment files are
random bytes; the UpdateManager tests give it a fake segment factory (the pure decision logic
is under test; tests/test_update_e2e.py runs real TFLite segments in real node processes).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from tierlite.bundle import Bundle, write_manifest
from tierlite.config import UpdateConfig
from tierlite.errors import ConfigError
from tierlite.segment import SegmentOutput
from tierlite.cloud.publish import build_artifact, make_announcement
from tierlite.cloud.signing import generate_keypair, load_private_key, sign_bundle, sign_document
from tierlite.update import (
    ChunkAssembler, UpdateError, UpdateManager, VersionStore, chunk_artifact, in_rollout, load_public_key,
    parse_announcement, read_artifact, verify_document, vet_artifact,
)

IN_SHAPE = [1, 4, 4, 3]
FEAT_SHAPE = [1, 2, 2, 4]


def make_bundle(root: Path, version: int, files: dict[str, bytes] | None = None, thresholds=None,
                feature_scale: float = 0.05, parent: int | None = None) -> Path:
    """A bundle directory with three segments; file contents default to version-independent bytes."""
    root.mkdir(parents=True, exist_ok=True)
    files = files or {}
    segs = []
    for tier, inp, outs in (("end", IN_SHAPE, ["feature", "logits"]), ("edge", FEAT_SHAPE, ["feature", "logits"]),
                            ("cloud", FEAT_SHAPE, ["logits"])):
        name = f"{tier}.tflite"
        (root / name).write_bytes(files.get(name, f"{tier}-weights-".encode() * 200))
        tensors = [{"name": "feature", "shape": FEAT_SHAPE, "dtype": "int8", "scale": feature_scale,
                    "zero_point": -3, "role": "feature", "index": 0},
                   {"name": "logits", "shape": [1, 3], "dtype": "int8", "scale": 0.1, "zero_point": 0,
                    "role": "logits", "index": 1}]
        segs.append({"tier": tier, "file": name, "exit_index": len(segs),
                     "inputs": [{"name": "in", "shape": inp, "dtype": "uint8" if tier == "end" else "int8",
                                 "scale": 1.0, "zero_point": 0}],
                     "outputs": [t for t in tensors if t["role"] in outs]})
    write_manifest(root, {"schema": 1, "name": "toy", "version": version, "parent_version": parent,
                          "labels": ["a", "b", "c"], "input": {"shape": IN_SHAPE, "dtype": "uint8"},
                          "feature_encoding": {"kind": "int8"}, "segments": segs,
                          "thresholds": thresholds or {"end": 0.5, "edge": 0.5}})
    return root


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    priv, pub, _ = generate_keypair(d / "update.key")
    other, other_pub, _ = generate_keypair(d / "other.key")
    return {"priv": load_private_key(priv), "pub": load_public_key(pub), "pub_path": pub,
            "other": load_private_key(other), "other_pub": load_public_key(other_pub)}


# -- keys and signatures --------------------------------------------------------------------------
def test_keygen_permissions_and_refuses_overwrite(tmp_path):
    priv, pub, kid = generate_keypair(tmp_path / "k" / "update.key")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert len(kid) == 16 and pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    with pytest.raises(ConfigError, match="exists; pass --force"):
        generate_keypair(priv)
    os.chmod(priv, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_private_key(priv)
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_public_key(priv.with_name("junk.pub").write_text("x") and priv.with_name("junk.pub"))


def test_signature_covers_every_field(keys):
    doc = sign_document({"name": "toy", "version": 3, "thresholds": {"end": 0.25}}, keys["priv"])
    assert verify_document(doc, [keys["pub"]], "doc") == doc["signature"]["key_id"]
    # key order and whitespace do not matter (canonical JSON) ...
    reordered = json.loads(json.dumps(dict(reversed(list(doc.items()))), indent=4))
    verify_document(reordered, [keys["pub"]], "doc")
    # ... any change of a value does
    tampered = json.loads(json.dumps(doc))
    tampered["thresholds"]["end"] = 0.9
    with pytest.raises(UpdateError, match="does not verify"):
        verify_document(tampered, [keys["pub"]], "doc")
    with pytest.raises(UpdateError, match="unsigned"):
        verify_document({k: v for k, v in doc.items() if k != "signature"}, [keys["pub"]], "doc")
    with pytest.raises(UpdateError, match="does not trust"):
        verify_document(sign_document(doc, keys["other"]), [keys["pub"]], "doc")
    # a forged key id does not help a wrong key
    forged = sign_document(doc, keys["other"])
    forged["signature"]["key_id"] = doc["signature"]["key_id"]
    with pytest.raises(UpdateError, match="does not verify"):
        verify_document(forged, [keys["pub"]], "doc")


# -- artifacts ----------------------------------------------------------------------------------
def test_delta_artifact_ships_only_changed_files(tmp_path, keys):
    v1 = make_bundle(tmp_path / "v1", 1)
    v2 = make_bundle(tmp_path / "v2", 2, files={"end.tflite": os.urandom(3000)}, thresholds={"end": 0.3, "edge": 0.5})
    data, rep = build_artifact(v2, parent=Bundle.load(v1), private_key=keys["priv"])
    assert rep.included == ["end.tflite"] and rep.referenced == ["cloud.tflite", "edge.tflite"]
    assert rep.parent_version == 1 and rep.artifact_bytes == len(data) < rep.bundle_bytes
    assert rep.sha256 == hashlib.sha256(data).hexdigest()
    art = read_artifact(data)
    assert art.version == 2 and set(art.files) == {"end.tflite"} and art.manifest["parent_version"] == 1
    full, rep_full = build_artifact(v2, parent=Bundle.load(v1), full=True, private_key=keys["priv"])
    assert rep_full.included == ["cloud.tflite", "edge.tflite", "end.tflite"] and len(full) > len(data)
    with pytest.raises(UpdateError, match="must be newer"):
        build_artifact(v1, parent=Bundle.load(v2), private_key=keys["priv"])


def test_same_size_change_ships_as_xor_patch_and_is_verified_when_applied(tmp_path, keys):
    v1 = Bundle.load(make_bundle(tmp_path / "v1", 1))
    end = bytearray((v1.root / "end.tflite").read_bytes())
    end[100:110] = os.urandom(10)  # a refitted head: a few bytes change in place
    v2 = make_bundle(tmp_path / "v2", 2, files={"end.tflite": bytes(end)})
    data, rep = build_artifact(v2, parent=v1, private_key=keys["priv"])
    assert rep.patched == ["end.tflite"] and rep.included == [] and rep.artifact_bytes < 1200
    store = VersionStore(tmp_path / "state")
    store.adopt(v1)
    staged = store.stage(read_artifact(data))
    assert (staged.root / "end.tflite").read_bytes() == bytes(end)

    def corrupt_patch(n, b):
        return b if not n.endswith(".xor") else b[:100] + bytes([b[100] ^ 0xFF]) + b[101:]
    store2 = VersionStore(tmp_path / "state2")
    store2.adopt(v1)
    with pytest.raises(UpdateError, match="does not produce the signed hash"):
        store2.stage(read_artifact(_retar(data, corrupt_patch)))
    with pytest.raises(UpdateError, match="truncated or corrupt"):
        store2.stage(read_artifact(_retar(data, lambda n, b: b[:-5] if n.endswith(".xor") else b)))


def test_artifact_is_deterministic_and_signed_bundle_round_trips(tmp_path, keys):
    v1 = make_bundle(tmp_path / "v1", 1)
    sign_bundle(v1, keys["priv"])
    a, _ = build_artifact(v1)
    b, _ = build_artifact(v1)
    assert a == b
    verify_document(Bundle.load(v1).manifest, [keys["pub"]], "installed manifest")


def _retar(data: bytes, edit) -> bytes:
    """Rebuild an artifact with edit(name, bytes) -> bytes applied to each member (a tamperer)."""
    import io
    import lzma
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for m in src.getmembers():
            content = edit(m.name, src.extractfile(m).read())
            m.size = len(content)
            dst.addfile(m, io.BytesIO(content))
    return lzma.compress(out.getvalue())


def test_vet_refuses_tampered_unsigned_wrong_key_truncated_and_old(tmp_path, keys):
    v1 = Bundle.load(make_bundle(tmp_path / "v1", 1))
    v2dir = make_bundle(tmp_path / "v2", 2, files={"end.tflite": os.urandom(3000)})
    good, _ = build_artifact(v2dir, parent=v1, private_key=keys["priv"])
    trusted = [keys["pub"]]
    assert vet_artifact(good, trusted, v1).version == 2

    flip_file = _retar(good, lambda n, b: b if n == "manifest.json" else bytes([b[0] ^ 1]) + b[1:])
    with pytest.raises(UpdateError, match="does not match its signed hash"):
        vet_artifact(flip_file, trusted, v1)

    def raise_threshold(n, b):
        if n != "manifest.json":
            return b
        m = json.loads(b)
        m["thresholds"]["end"] = 0.99
        return json.dumps(m).encode()
    with pytest.raises(UpdateError, match="signature does not verify"):
        vet_artifact(_retar(good, raise_threshold), trusted, v1)

    unsigned, _ = build_artifact(v2dir, parent=v1)
    with pytest.raises(UpdateError, match="unsigned"):
        vet_artifact(unsigned, trusted, v1)
    wrong, _ = build_artifact(v2dir, parent=v1, private_key=keys["other"])
    with pytest.raises(UpdateError, match="does not trust"):
        vet_artifact(wrong, trusted, v1)
    for cut in (len(good) // 2, len(good) - 1, 10):
        with pytest.raises(UpdateError, match="truncated|not a valid"):
            vet_artifact(good[:cut], trusted, v1)
    with pytest.raises(UpdateError, match="not newer than the running v2"):
        vet_artifact(good, trusted, Bundle.load(v2dir))
    with pytest.raises(UpdateError, match="rolled back on this node before"):
        vet_artifact(good, trusted, v1, rejected=[2])
    with pytest.raises(UpdateError, match="over the"):
        vet_artifact(good, trusted, v1, max_bytes=100)

    def add_member(n, b):
        return b
    import io
    import lzma
    import tarfile
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(good))) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        evil = tarfile.TarInfo("../evil.sh")
        evil.size = 2
        dst.addfile(evil, io.BytesIO(b"hi"))
    with pytest.raises(UpdateError, match="unsafe"):
        read_artifact(lzma.compress(out.getvalue()))


# -- chunking and announcements -------------------------------------------------------------------
def test_chunks_reassemble_in_any_order_and_reject_foreign_or_short():
    data = os.urandom(10_000)
    chunks = chunk_artifact(data, 3000)
    assert len(chunks) == 4
    sha = hashlib.sha256(data).hexdigest()
    asm = ChunkAssembler(sha, len(data), 4)
    for c in (chunks[2], chunks[0], chunks[3]):
        assert asm.add(c) is None
    assert asm.missing == 1
    assert asm.add(chunks[1]) == data
    other = chunk_artifact(os.urandom(10_000), 3000)
    with pytest.raises(UpdateError, match="belongs to artifact"):
        ChunkAssembler(sha, len(data), 4).add(other[0])
    short = ChunkAssembler(sha, len(data), 4)
    for c in chunks[:3]:
        short.add(c)
    with pytest.raises(UpdateError, match="truncated or corrupt"):
        short.add(chunks[3][:-100])
    with pytest.raises(UpdateError, match="shorter than its header"):
        ChunkAssembler(sha, len(data), 4).add(b"TLU1")
    with pytest.raises(UpdateError, match="over the"):
        ChunkAssembler(sha, 10 ** 9, 4, max_bytes=10 ** 6)


def test_announcement_is_signed_and_rollout_share_is_stable(tmp_path, keys):
    v1 = Bundle.load(make_bundle(tmp_path / "v1", 1))
    _, rep = build_artifact(make_bundle(tmp_path / "v2", 2, files={"end.tflite": b"x" * 50}), parent=v1,
                            private_key=keys["priv"])
    ann = make_announcement(rep, chunks=1, chunk_bytes=65536, private_key=keys["priv"], share=0.25,
                            nodes=["cam-special"])
    doc = parse_announcement(json.dumps(ann).encode(), [keys["pub"]], "toy")
    assert doc["version"] == 2 and doc["artifact"]["files"] == ["end.tflite"]
    with pytest.raises(UpdateError, match="for another model"):
        parse_announcement(json.dumps(ann).encode(), [keys["pub"]], "other-model")
    widened = dict(ann, rollout=dict(ann["rollout"], share=1.0))
    with pytest.raises(UpdateError, match="does not verify"):  # the share is signed too
        parse_announcement(json.dumps(widened).encode(), [keys["pub"]], "toy")
    nodes = [f"cam-{i}" for i in range(400)]
    picked = [n for n in nodes if in_rollout(n, doc["rollout"])]
    assert 0.15 < len(picked) / len(nodes) < 0.35
    assert picked == [n for n in nodes if in_rollout(n, doc["rollout"])]  # stable
    assert in_rollout("cam-special", doc["rollout"])
    assert all(in_rollout(n, dict(doc["rollout"], share=1.0)) for n in nodes)


def test_update_config_errors(tmp_path, keys):
    from tierlite.config import config_from_dict

    pub = str(keys["pub_path"])
    with pytest.raises(ConfigError, match="trusted_keys: required key missing"):
        config_from_dict({"state_dir": "s"}, UpdateConfig, "update", tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'watch_frames'"):
        config_from_dict({"state_dir": "s", "trusted_keys": pub, "watch_frame": 3}, UpdateConfig, "update", tmp_path)
    with pytest.raises(ConfigError, match="min_agreement: a share in"):
        config_from_dict({"state_dir": "s", "trusted_keys": pub, "min_agreement": 2}, UpdateConfig, "update", tmp_path)
    with pytest.raises(ConfigError, match="cannot read public key"):
        config_from_dict({"state_dir": "s", "trusted_keys": "nope.pub"}, UpdateConfig, "update", tmp_path)
    cfg = config_from_dict({"state_dir": "s", "trusted_keys": str(keys["pub_path"].parent)}, UpdateConfig,
                           "update", tmp_path)
    assert cfg.state_dir == str(tmp_path / "s") and len(cfg.public_keys()) == 2  # a folder: key rotation


def test_version_store_stages_delta_from_kept_files(tmp_path, keys):
    store = VersionStore(tmp_path / "state")
    v1 = Bundle.load(make_bundle(tmp_path / "v1", 1))
    store.adopt(v1)
    data, _ = build_artifact(make_bundle(tmp_path / "v2", 2, files={"end.tflite": b"new" * 99}), parent=v1,
                             private_key=keys["priv"])
    staged = store.stage(read_artifact(data))
    assert staged.root == store.path(2) and (staged.root / "end.tflite").read_bytes() == b"new" * 99
    assert (staged.root / "cloud.tflite").read_bytes() == (v1.root / "cloud.tflite").read_bytes()
    fresh = VersionStore(tmp_path / "fresh")  # a node without the parent cannot use a delta
    with pytest.raises(UpdateError, match="does not have; publish a full artifact"):
        fresh.stage(read_artifact(data))
    assert not any(p.name.endswith(".staging") for p in (tmp_path / "fresh" / "versions").iterdir())


# -- UpdateManager decision logic (fake segments) ------------------------------------------------
class FakeSegment:
    """Logits from the input: class = x.sum() % 3, confidence set by the file's first byte.

    A file starting with b"Z" answers a different class (disagrees); b"F" fails to load."""

    def __init__(self, bundle: Bundle, tier: str):
        head = bundle.segment_path(tier).read_bytes()[:1]
        if head == b"F":
            raise RuntimeError("flatbuffer corrupt")
        self.shift = 1 if head == b"Z" else 0

    def run(self, x):
        label = (int(np.asarray(x).sum()) + self.shift) % 3
        logits = np.full(3, -4.0, dtype=np.float32)
        logits[label] = 4.0
        return SegmentOutput(None, logits)


class Node:
    """An UpdateManager with a fake frame loop: serve() runs frames through the installed segment."""

    def __init__(self, tmp_path: Path, keys, **policy):
        self.v1 = Bundle.load(make_bundle(tmp_path / "v1", 1))
        self.swaps: list[int] = []
        self.policy = UpdateConfig(state_dir=str(tmp_path / "state"), trusted_keys=str(keys["pub_path"]),
                                   **{"watch_frames": 20, **policy})
        self.mgr = UpdateManager(self.policy, "cam-1", ["end"], self.swap, segment_factory=FakeSegment)
        self.running = self.mgr.startup(self.v1)
        self.seg = FakeSegment(self.running, "end")

    def swap(self, bundle, segments):
        self.running, self.seg = bundle, segments["end"]
        self.swaps.append(bundle.version)

    def serve(self, n: int, escalate: bool | None = None, seed: int = 0):
        rng = np.random.default_rng(seed)
        for _ in range(n):
            x = rng.integers(0, 255, IN_SHAPE, dtype=np.uint8)
            out = self.seg.run(x)
            conf = self.running.thresholds["end"] > 0.2 if escalate is None else not escalate
            self.mgr.observe("end", x, out.logits, escalated=not conf)


def _publish(tmp_path, keys, version, parent, first_byte=b"N", **kw):
    d = make_bundle(tmp_path / f"v{version}", version, files={"end.tflite": first_byte + os.urandom(500)}, **kw)
    return build_artifact(d, parent=parent, private_key=keys["priv"])[0]


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.01)
    return cond()


def test_manager_applies_confirms_and_survives_restart(tmp_path, keys):
    node = Node(tmp_path, keys)
    node.serve(30)
    node.mgr.submit(_publish(tmp_path, keys, 2, node.v1))
    assert node.mgr.wait_idle() and node.swaps == [2]
    assert node.mgr.status()["version"] == 2 and node.mgr.status()["watching"]["version"] == 2
    node.serve(25)
    assert _wait(lambda: node.mgr.last_event.get("state") == "confirmed")
    assert node.mgr.status()["previous"] == 1 and node.mgr.store.has(1)
    node.mgr.close()
    again = UpdateManager(node.policy, "cam-1", ["end"], node.swap, segment_factory=FakeSegment)
    assert again.startup(node.v1).version == 2  # the configured v1 does not undo an applied update
    again.close()


def test_manager_refuses_disagreeing_update_in_shadow_and_keeps_model(tmp_path, keys, caplog):
    node = Node(tmp_path, keys)
    node.serve(30)
    with caplog.at_level(logging.WARNING, "tierlite.update"):
        node.mgr.submit(_publish(tmp_path, keys, 2, node.v1, first_byte=b"Z"))
        assert node.mgr.wait_idle()
    assert node.swaps == [] and node.mgr.status()["version"] == 1
    assert "update refused: update v2 shadow check (end) failed: agreement 0.00" in caplog.text
    assert 2 in node.mgr.status()["rejected"]


def test_manager_refuses_update_that_fails_to_load(tmp_path, keys, caplog):
    node = Node(tmp_path, keys)
    with caplog.at_level(logging.WARNING, "tierlite.update"):
        node.mgr.submit(_publish(tmp_path, keys, 2, node.v1, first_byte=b"F"))
        assert node.mgr.wait_idle()
    assert node.swaps == [] and "fails to load in the shadow interpreter" in caplog.text


def test_manager_rolls_back_on_escalation_regression(tmp_path, keys, caplog):
    # The candidate's threshold makes every frame escalate; the shadow bound is opened so the
    # regression only shows once it serves, and the post-swap watch must catch it.
    node = Node(tmp_path, keys, max_shadow_escalation_increase=1.0)
    node.serve(30)
    with caplog.at_level(logging.WARNING, "tierlite.update"):
        node.mgr.submit(_publish(tmp_path, keys, 2, node.v1, thresholds={"end": 0.0, "edge": 0.5}))
        assert node.mgr.wait_idle() and node.swaps == [2]
        node.serve(25)
        assert _wait(lambda: node.mgr.last_event.get("state") == "rolled_back")
    assert node.swaps == [2, 1] and node.running.version == 1
    assert "update rolled_back v2: back to v1: escalation rate regressed" in caplog.text
    st = json.loads((tmp_path / "state" / "state.json").read_text())
    assert st["current"] == 1 and 2 in st["rejected"]
    node.mgr.submit(_publish(tmp_path, keys, 2, node.v1))  # the same version again: refused
    assert node.mgr.wait_idle() and node.swaps == [2, 1]


def test_manager_boundary_change_is_refused(tmp_path, keys, caplog):
    node = Node(tmp_path, keys)
    with caplog.at_level(logging.WARNING, "tierlite.update"):
        node.mgr.submit(_publish(tmp_path, keys, 2, node.v1, feature_scale=0.07))
        assert node.mgr.wait_idle()
    assert node.swaps == [] and "boundary tensors" in caplog.text


def test_manager_startup_rolls_back_when_current_fails_to_load(tmp_path, keys):
    node = Node(tmp_path, keys)
    node.mgr.submit(_publish(tmp_path, keys, 2, node.v1))
    assert node.mgr.wait_idle() and node.swaps == [2]
    node.mgr.close()
    (node.mgr.store.path(2) / "end.tflite").write_bytes(b"F" * 10)  # corrupt on disk after the swap
    again = UpdateManager(node.policy, "cam-1", ["end"], node.swap, segment_factory=FakeSegment)
    assert again.startup(node.v1).version == 1
    assert 2 in again.status()["rejected"]
    again.close()


def test_manager_restart_during_probation_resumes_then_rolls_back(tmp_path, keys):
    node = Node(tmp_path, keys)
    node.mgr.submit(_publish(tmp_path, keys, 2, node.v1))
    assert node.mgr.wait_idle() and node.swaps == [2]
    node.mgr.close()  # the process dies during the watch ...
    second = UpdateManager(node.policy, "cam-1", ["end"], node.swap, segment_factory=FakeSegment)
    assert second.startup(node.v1).version == 2  # ... once: v2 resumes its probation
    assert second.status()["watching"]["version"] == 2
    second.close()  # ... and again: v2 is taken to be what brings the process down
    third = UpdateManager(node.policy, "cam-1", ["end"], node.swap, segment_factory=FakeSegment)
    assert third.startup(node.v1).version == 1 and 2 in third.status()["rejected"]
    third.close()


# -- CLI --------------------------------------------------------------------------------------------
def test_keygen_and_publish_dry_run_cli(tmp_path, capsys):
    from tierlite.tools.cli import main

    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    assert "key id" in capsys.readouterr().out
    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 2  # no silent overwrite
    assert "pass --force" in capsys.readouterr().err
    v1 = make_bundle(tmp_path / "v1", 1)
    end = bytearray((v1 / "end.tflite").read_bytes())
    end[7] ^= 0xFF
    v2 = make_bundle(tmp_path / "v2", 2, files={"end.tflite": bytes(end)})
    code = main(["publish", "--bundle", str(v2), "--parent", str(v1), "--key", str(tmp_path / "keys" / "update.key"),
                 "--dry-run", "--json", str(tmp_path / "r.json"), "--artifact-out", str(tmp_path / "a.tlu")])
    assert code == 0
    assert "ships end.tflite (XOR patch)" in capsys.readouterr().out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["artifact"]["artifact_bytes"] == (tmp_path / "a.tlu").stat().st_size
    art = read_artifact((tmp_path / "a.tlu").read_bytes())
    verify_document(art.manifest, [load_public_key(tmp_path / "keys" / "update.pub")], "artifact")
    os.chmod(tmp_path / "keys" / "update.key", 0o644)
    assert main(["publish", "--bundle", str(v2), "--key", str(tmp_path / "keys" / "update.key"), "--dry-run"]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_cloud_worker_trigger_runs_the_job_when_enough_examples_arrived(tmp_path, keys, caplog):
    """The scheduler's trigger logic with a real child `tierlite retrain` (which fails fast here:
    the store is empty) and a stand-in for the worker's MQTT client (only subscribe() is used)."""
    from tierlite.cloud.retrain import RetrainScheduler
    from tierlite.cloud.store import HardExampleStore
    from tierlite.config import CloudConfig, config_from_dict

    class Subscriptions:
        topics: list[str] = []

        def subscribe(self, topic, handler, qos=0):
            self.topics.append(topic)

    bundle = make_bundle(tmp_path / "v1", 1)
    (tmp_path / "train" / "a").mkdir(parents=True)
    HardExampleStore(tmp_path / "hard.sqlite").close()
    cfg = config_from_dict({"bundle": str(bundle), "store": {"path": str(tmp_path / "hard.sqlite")}, "metrics_port": None,
                            "retrain": {"replay": str(tmp_path / "train"), "every_examples": 5,
                                        "min_interval_seconds": 0}}, CloudConfig, "cloud.yaml", tmp_path)
    mqtt = Subscriptions()
    sched = RetrainScheduler(cfg, mqtt)
    # it keeps opted-in nodes' frames, also those a site bridge sends up under its site
    assert mqtt.topics == ["tierlite/update/+/frames/+", "tierlite/+/update/+/frames/+"]
    sched.tick(0)
    sched.tick(4)
    assert sched._proc is None  # 4 new examples: not yet
    with caplog.at_level(logging.INFO, "tierlite.cloud.retrain"):
        sched.tick(5)
        assert sched._proc is not None and "starting run 1 (5 new hard examples)" in caplog.text
        assert _wait(lambda: sched._proc.poll() is not None, 60)
        sched.tick(5)
    assert "run 1 failed (exit 2)" in caplog.text and "only 0 stored hard examples" in caplog.text
    sched.close()
    state = json.loads((tmp_path / "hard.retrain.json").read_text())
    assert state["runs"] == 1 and state["parent"] == str(bundle.resolve())  # nothing published: same parent


def test_frame_uploads_are_validated_and_stored(tmp_path):
    import cv2

    from tierlite.cloud.frames import FrameCollector, FrameStore
    from tierlite.update import decode_frame_upload, encode_frame_upload

    ok, jpg = cv2.imencode(".jpg", np.full((32, 32, 3), 80, np.uint8))
    payload = encode_frame_upload(jpg.tobytes(), 3)
    header, body = decode_frame_upload(payload)
    assert header["version"] == 3 and body == jpg.tobytes()
    for bad in (b"", b"TLF1", payload[:12], b"XXXX" + payload[4:], payload[:-len(body)] + b"not a jpeg"):
        with pytest.raises(UpdateError):
            decode_frame_upload(bad)

    class Subscriptions:
        def subscribe(self, topic, handler, qos=0):
            self.topic = topic

    store = FrameStore(tmp_path / "frames.sqlite")
    collector = FrameCollector(store, Subscriptions(), "site1/cams")
    collector.on_upload("site1/cams/update/toy/frames/cam-7", payload)
    collector.on_upload("site1/cams/update/toy/frames/cam-7", b"garbage")  # dropped, counted, logged
    assert (collector.stored, collector.dropped) == (1, 1)
    (rec,) = list(store.iter_frames("toy"))
    assert (rec.node, rec.bundle_version) == ("cam-7", 3) and rec.image((32, 32)).shape == (32, 32, 3)
    store.close()


def test_bad_announcements_are_counted_each_but_logged_and_reported_throttled(tmp_path, keys, caplog):
    """Issue 12: anyone on the update topic can send garbage; a flood of it must not become a flood
    of warnings and retained reports on every node."""
    node = Node(tmp_path, keys)

    class Reports:  # stands in for the MqttClient: records what the manager publishes
        def __init__(self):
            self.published = []

        def subscribe(self, *a, **kw):
            pass

        def publish(self, topic, payload, **kw):
            self.published.append((topic, payload))
            return True

    client = Reports()
    node.mgr.attach(client)
    with caplog.at_level(logging.WARNING, "tierlite.update"):
        for i in range(200):
            node.mgr.on_message(node.mgr.topic, b'{"not": "signed", "n": %d}' % i)
    refusals = [r for r in caplog.records if "update refused" in r.getMessage()]
    assert node.mgr.counters["refused"] == 200  # every one counted
    assert len(refusals) == 1 and len(client.published) == 1, (len(refusals), len(client.published))
    assert node.mgr.last_event["state"] == "refused"  # the status still says what happened last
