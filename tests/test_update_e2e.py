"""Signed model updates end to end: a real Mosquitto on a free loopback port, the edge gateway and
cloud worker as real processes, camera nodes as real `tierlite device` processes serving real JPEG
frames, and updates published the way `tierlite publish` does (tierlite.cloud.rollout).

Shown here: a good update is applied by a running node between frames (every frame still gets
exactly one result) and by the edge workers; tampered, unsigned, wrongly signed, truncated and
older updates are refused with a clear log line while the node keeps its model; an update that
fails its shadow check is refused by the canary and the rollout is halted; a node that was
offline picks the update up from the retained announcement when it connects.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime_support import Mosquitto, Proc, Watcher, read_jsonl, wait_until, write_yaml

pytestmark = pytest.mark.timeout(240)
PREFIX = "tierlite"
FAST = {"reconnect_min": 0.1, "reconnect_max": 1.0}
CHUNK = 512  # small chunks, so every update travels in several pieces


def make_version(parent: Path, dest: Path, version: int, head_change) -> Path:
    """A copy of the bundle as version `version` whose end and edge exit heads are head_change(W, b)."""
    from tierlite.bundle import MANIFEST, Bundle, write_manifest
    from tierlite.cloud.retrain import Head

    shutil.copytree(parent, dest)
    bundle = Bundle.load(dest)
    for tier in ("end", "edge"):
        head = Head(bundle.segment_path(tier).read_bytes(), tier)
        bundle.segment_path(tier).write_bytes(head.patched(*head_change(head.W, head.b)))
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest.pop("signature", None)
    manifest.update(version=version, parent_version=1)
    write_manifest(dest, manifest)
    return dest


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_bundle_dir, digits_dir):
    from tierlite.cloud.signing import generate_keypair, load_private_key

    work = tmp_path_factory.mktemp("update-e2e")
    priv, pub, _ = generate_keypair(work / "keys" / "update.key")
    other, _, _ = generate_keypair(work / "keys-other" / "other.key")
    v1 = work / "v1"
    shutil.copytree(small_bundle_dir, v1)
    # v2: a mild refit (what a retraining round produces); v3: the class columns of the end head
    # rotated, so it disagrees with v1 on every frame (it must fail the shadow check).
    v2 = make_version(v1, work / "v2", 2, lambda W, b: (W * 1.05, b))
    v3 = make_version(v1, work / "v3", 3, lambda W, b: (np.roll(W, 1, axis=1), np.roll(b, 1)))
    broker = Mosquitto(work / "broker").start()
    frames = work / "frames"
    for i, p in enumerate(sorted((digits_dir / "test").rglob("*.jpg"))[:80]):
        (frames / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, frames / p.parent.name / p.name)
    update = {"trusted_keys": str(pub), "watch_frames": 30, "watch_seconds": 20}
    broker_cfg = {"port": broker.port, **FAST}
    cloud = Proc(["cloud", "--config", str(write_yaml(work / "cloud.yaml", {
        "bundle": str(v1), "prefix": PREFIX, "broker": broker_cfg, "metrics_port": None,
        "store": {"path": str(work / "hard.sqlite"), "flush_interval": 0.1},
        # keep frames from opted-in nodes; retraining is run by hand here (no trigger)
        "retrain": {"replay": str(digits_dir / "train"), "every_examples": None, "every_seconds": None}}))],
        work / "cloud.log")
    edge = Proc(["edge", "--config", str(write_yaml(work / "edge.yaml", {
        "bundle": str(v1), "prefix": PREFIX, "broker": broker_cfg, "mosquitto": {"managed": False},
        "discovery": {"advertise": False}, "workers": 1, "metrics_port": None,
        "update": {**update, "state_dir": str(work / "edge-models")}}))], work / "edge.log")
    watcher = Watcher(broker.port, [f"{PREFIX}/_gateway/+/worker/+", f"{PREFIX}/_cloud/+/status",
                                    f"{PREFIX}/update/+/report/+"], "update-e2e")
    wait_until(lambda: len({t for t, p in watcher.messages if "/worker/" in t or "/_cloud/" in t
                          if json.loads(p).get("state") == "online"}) >= 2, 60, "edge worker and cloud worker online")
    yield {"work": work, "key": load_private_key(priv), "other": load_private_key(other), "v1": v1, "v2": v2,
           "v3": v3, "broker": broker, "frames": frames, "update": update, "watcher": watcher,
           "cloud": cloud, "edge": edge}
    watcher.stop()
    assert edge.stop() == 0, edge.log()[-2000:]
    assert cloud.stop() == 0, cloud.log()[-2000:]
    assert "Traceback" not in edge.log() + cloud.log()
    broker.stop()


def start_node(w, name: str, limit: int, fps: float, share_frames: bool = False, **extra) -> tuple[Proc, Path]:
    cfg = write_yaml(w["work"] / f"{name}.yaml", {**extra,
        "node_id": name, "bundle": str(w["v1"]), "prefix": PREFIX, "broker": {"port": w["broker"].port, **FAST},
        "source": {"uri": str(w["frames"]), "fps": fps, "loop": True, "limit": limit}, "deadline_ms": 2000,
        "results_file": str(w["work"] / f"{name}.jsonl"),
        "update": {**w["update"], "state_dir": str(w["work"] / f"{name}-models"), "share_frames": share_frames}})
    return Proc(["device", "--config", str(cfg)], w["work"] / f"{name}.log"), w["work"] / f"{name}.jsonl"


def publisher(w):
    from tierlite.cloud.rollout import connect

    return connect(f"127.0.0.1:{w['broker'].port}")


def announce(mqtt, w, data: bytes, rep, key, chunks: list[bytes] | None = None, unsigned: bool = False) -> None:
    """Publish an artifact's chunks and announcement as given (a test may hand in bad ones)."""
    from tierlite.cloud.publish import make_announcement
    from tierlite.topics import update_announcement as update_topic, update_chunk as chunk_topic
    from tierlite.update import chunk_artifact

    chunks = chunks if chunks is not None else chunk_artifact(data, CHUNK)
    ann = make_announcement(rep, len(chunks), CHUNK, key)
    if unsigned:
        ann.pop("signature")
    for i, c in enumerate(chunks):
        assert mqtt.publish_and_wait(chunk_topic(PREFIX, rep.name, rep.version, i), c, 1, True)
    assert mqtt.publish_and_wait(update_topic(PREFIX, rep.name), json.dumps(ann).encode(), 1, True)


def reports(w, node: str) -> list[dict]:
    return [json.loads(p) for t, p in w["watcher"].messages if t.endswith(f"/report/{node}")]


def wait_event(w, node: str, state: str, count: int = 1, timeout: float = 30.0) -> dict:
    def found():
        hits = [r for r in reports(w, node) if r["last_event"].get("state") == state]
        return hits[-1] if len(hits) >= count else None
    return wait_until(found, timeout, f"{node} to report '{state}' #{count}")


def test_updates_over_mqtt_with_real_nodes(world):
    from tierlite.bundle import Bundle
    from tierlite.cloud.rollout import rollout
    from tierlite.cloud.publish import build_artifact
    from tierlite.topics import update_announcement as update_topic
    from tierlite.update import chunk_artifact

    w = world
    v1 = Bundle.load(w["v1"])
    late, late_results = start_node(w, "cam-b", limit=20, fps=50)  # cam-b runs a little, then goes offline
    assert late.wait(60) == 0, late.log()[-3000:]
    # cam-a escalates every frame (threshold 0), so its v2 features meet the v1 edge during the canary
    # cam-a also opted in to uploading the frames it escalates (the privacy policy's "raw")
    node, results_file = start_node(w, "cam-a", limit=1500, fps=50, share_frames=True, threshold=0.0)
    wait_until(lambda: len(read_jsonl(results_file)) >= 40, 60, "cam-a serving frames")
    mqtt = publisher(w)
    try:
        # -- bad updates: each refused with a clear line, the node keeps v1 ---------------------
        def bad_bundle(version):
            return make_version(w["v1"], w["work"] / f"bad{version}", version, lambda W, b: (W * 1.05, b))

        data, rep = build_artifact(bad_bundle(5), parent=v1, private_key=w["key"])
        tampered = _flip_byte_in_member(data, "end.tflite")
        announce(mqtt, w, tampered, dataclasses.replace(rep, sha256=_sha(tampered), artifact_bytes=len(tampered)),
                 w["key"])
        wait_event(w, "cam-a", "refused", 1)
        data, rep = build_artifact(bad_bundle(6), parent=v1)  # no key: unsigned
        announce(mqtt, w, data, rep, w["key"], unsigned=True)
        wait_event(w, "cam-a", "refused", 2)
        data, rep = build_artifact(bad_bundle(7), parent=v1, private_key=w["other"])
        announce(mqtt, w, data, rep, w["other"])
        wait_event(w, "cam-a", "refused", 3)
        data, rep = build_artifact(bad_bundle(8), parent=v1, private_key=w["key"])
        chunks = chunk_artifact(data, CHUNK)
        announce(mqtt, w, data, rep, w["key"], chunks=chunks[:-1] + [chunks[-1][:-7]])
        wait_event(w, "cam-a", "refused", 4)
        log = node.log()
        for line in ("tampered or corrupt", "is unsigned", "which this node does not trust", "truncated or corrupt"):
            assert line in log, f"no '{line}' in the node's log:\n{log[-3000:]}"
        assert all(r["version"] == 1 for r in reports(w, "cam-a"))
        assert mqtt.publish_and_wait(update_topic(PREFIX, v1.name), b"", 1, True)  # clear before the real one

        # -- a good update, staged: cam-a is the canary, the rest follow once it confirms ------------
        result = rollout(mqtt, w["v2"], w["key"], prefix=PREFIX, parent=v1, canary=0.01, canary_nodes=["cam-a"],
                         hold_s=60, chunk_bytes=CHUNK)
        assert result.stage == "complete", result.reason
        assert result.artifact.patched == ["edge.tflite", "end.tflite"]  # only the refitted heads travel
        assert result.artifact.artifact_bytes < result.artifact.bundle_bytes / 5
        wait_until(lambda: any(json.loads(p).get("model_version") == 2 for t, p in w["watcher"].messages
                             if "/worker/" in t), 30, "the edge worker to run v2")

        # -- a candidate that disagrees with the running model: the canary refuses, rollout halts -----
        halted = rollout(mqtt, w["v3"], w["key"], prefix=PREFIX, parent=Bundle.load(w["v2"]), canary=0.01,
                         canary_nodes=["cam-a"], hold_s=60, chunk_bytes=CHUNK)
        assert halted.stage == "halted" and "shadow check" in halted.reason, halted.reason
        assert "update v3 shadow check (end) failed: agreement" in node.log()

        # -- an older (replayed) update is refused ------------------------------------------------
        data, rep = build_artifact(w["v1"], private_key=w["key"])
        announce(mqtt, w, data, rep, w["key"])
        wait_until(lambda: "v1 is older than the running v2 (downgrade or replay)" in node.log(), 20,
                 "the node to refuse the older update")
        # put the good announcement back (the replayed v1 replaced it on the broker)
        data, rep = build_artifact(w["v2"], parent=v1, private_key=w["key"])
        announce(mqtt, w, data, rep, w["key"])

        # -- cam-b was offline through all of this: it gets v2 from the retained announcement ------
        late, late_results = start_node(w, "cam-b", limit=120, fps=50)
        assert late.wait(60) == 0, late.log()[-3000:]
        assert "update applied v2" in late.log(), late.log()[-3000:]
        versions = [r["model_version"] for r in read_jsonl(late_results)]
        assert versions[:20] == [1] * 20 and versions[-1] == 2 and len(versions) == 140
    finally:
        mqtt.stop()

    assert node.stop() == 0, node.log()[-3000:]
    results = read_jsonl(results_file)
    frames = [r["frame"] for r in results]
    assert frames == list(range(len(results))), "every frame got exactly one result, in order"
    versions = [r["model_version"] for r in results]
    assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2  # swapped between frames
    assert not [r for r in results if r["fallback"]], "v2 nodes and v1 tiers interoperate, every frame answered"
    assert {r["tier"] for r in results if r["model_version"] == 2} & {"edge", "cloud"}  # escalations answered
    assert "Traceback" not in node.log()
    state = json.loads((w["work"] / "cam-a-models" / "state.json").read_text())
    assert state["current"] == 2 and state["previous"] == 1 and 3 in state["rejected"]
    assert (w["work"] / "cam-a-models" / "versions" / "v1" / "manifest.json").is_file()  # kept for rollback
    # the cloud worker kept the frames cam-a uploaded, and none from cam-b (which did not opt in)
    from tierlite.cloud.frames import FrameStore

    with FrameStore(w["work"] / "hard.frames.sqlite", readonly=True) as frames_store:
        uploaded = list(frames_store.iter_frames(Bundle.load(w["v1"]).name))
    assert uploaded and {f.node for f in uploaded} == {"cam-a"}
    assert uploaded[0].image((32, 32)).shape == (32, 32, 3)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _flip_byte_in_member(data: bytes, suffix: str) -> bytes:
    """Re-pack an artifact with one byte of the member ending in `suffix` flipped (a tamperer)."""
    import io
    import lzma
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for m in src.getmembers():
            content = src.extractfile(m).read()
            if m.name.startswith(suffix):
                content = content[:50] + bytes([content[50] ^ 1]) + content[51:]
            dst.addfile(m, io.BytesIO(content))
    return lzma.compress(out.getvalue())
