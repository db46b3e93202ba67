"""Packing and publishing an update (cloud only): `build_artifact` (a signed bundle as a delta
tar.xz against the version the fleet runs), `make_announcement`, `publish_update` (chunks, then
the announcement, retained) and `clear_chunks`. The staged rollout is tierlite.cloud.rollout."""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from tierlite import topics
from tierlite.bundle import MANIFEST, Bundle
from tierlite.cloud.signing import sign_document
from tierlite.errors import ConfigError, UpdateError
from tierlite.update.artifacts import ARTIFACT_FORMAT, PATCH_SUFFIX, PATCHES, xor_bytes
from tierlite.update.delivery import DEFAULT_CHUNK_BYTES, chunk_artifact

__all__ = ["ArtifactReport", "build_artifact", "clear_chunks", "make_announcement", "publish_update"]


@dataclass
class ArtifactReport:
    name: str
    version: int
    parent_version: int | None
    included: list[str]  # files shipped whole
    patched: list[str]  # files shipped as an XOR patch against the parent's file of the same name
    referenced: list[str]  # files taken from the parent by hash
    bundle_bytes: int  # every file of the new bundle, uncompressed
    shipped_bytes: int  # files shipped, uncompressed (+ manifest)
    artifact_bytes: int  # what goes over the wire, compressed
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        what = "full" if not (self.referenced or self.patched) else f"delta vs v{self.parent_version}"
        ships = [*self.included, *(f"{f} (XOR patch)" for f in self.patched)]
        return (f"{self.name} v{self.version} ({what}): ships {', '.join(ships) or 'manifest only'}; "
                f"{self.artifact_bytes:,} B on the wire per node (bundle {self.bundle_bytes:,} B, "
                f"{self.bundle_bytes / max(self.artifact_bytes, 1):.1f}x smaller)")



def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # deterministic: no mtime, owner or mode from the build host
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))



def build_artifact(bundle_dir: str | Path, parent: Bundle | None = None, full: bool = False,
                   private_key=None) -> tuple[bytes, ArtifactReport]:
    """Pack a (signed) bundle as an update artifact: a delta against `parent` unless full.

    With private_key the manifest is signed here (parent_version set from parent first);
    otherwise the bundle's manifest must already carry a signature (or ships unsigned, which
    every node refuses: useful only for tests).
    """
    bundle = Bundle.load(bundle_dir)
    manifest = dict(bundle.manifest)
    if parent is not None:
        if parent.name != bundle.name:
            raise UpdateError(f"parent bundle is model {parent.name!r}, update is {bundle.name!r}")
        if bundle.version <= parent.version:
            raise UpdateError(f"update version {bundle.version} must be newer than parent version {parent.version}")
        manifest["parent_version"] = parent.version
    if private_key is not None:
        manifest = sign_document(manifest, private_key)
    hashes = bundle.file_hashes()
    parent_hashes = set(parent.file_hashes().values()) if parent is not None and not full else set()
    changed = sorted(f for f, h in hashes.items() if h not in parent_hashes)
    referenced = sorted(f for f in hashes if f not in changed)
    # A changed file the parent has under the same name and size (e.g. a segment whose exit head
    # was refitted in place) ships as new XOR old: mostly zero bytes, which xz shrinks to almost nothing.
    patches: dict[str, dict[str, str]] = {}
    members: list[tuple[str, bytes]] = []
    for f in changed:
        new = (bundle.root / f).read_bytes()
        old_file = parent.root / f if parent is not None and not full else None
        if old_file is not None and f in parent.file_hashes() and old_file.stat().st_size == len(new):
            old = old_file.read_bytes()
            patches[f] = {"base_sha256": parent.file_hashes()[f]}
            members.append((f + PATCH_SUFFIX, xor_bytes(new, old)))
        else:
            members.append((f, new))
    manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _tar_add(tar, MANIFEST, manifest_bytes)
        if patches:
            _tar_add(tar, PATCHES, json.dumps(patches, sort_keys=True).encode())
        for name, content in members:
            _tar_add(tar, name, content)
    data = lzma.compress(raw.getvalue(), preset=6)
    bundle_bytes = sum((bundle.root / f).stat().st_size for f in hashes)
    shipped = len(manifest_bytes) + sum(len(c) for _, c in members)
    included = sorted(f for f in changed if f not in patches)
    report = ArtifactReport(bundle.name, bundle.version, manifest.get("parent_version"), included, sorted(patches),
                            referenced, bundle_bytes, shipped, len(data), hashlib.sha256(data).hexdigest())
    return data, report



def make_announcement(report: ArtifactReport, chunks: int, chunk_bytes: int, private_key,
                      share: float = 1.0, salt: str = "", nodes: Iterable[str] = ()) -> dict[str, Any]:
    """The signed, retained message that tells nodes an update exists and who should take it."""
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"rollout share must be in [0, 1], got {share}")
    doc = {"format": ARTIFACT_FORMAT, "model": report.name, "version": report.version,
           "parent_version": report.parent_version,
           "artifact": {"sha256": report.sha256, "bytes": report.artifact_bytes, "chunks": chunks,
                        "chunk_bytes": chunk_bytes, "files": report.included},
           "rollout": {"share": float(share), "salt": salt or f"v{report.version}", "nodes": sorted(nodes)},
           "published": round(time.time(), 3)}
    return sign_document(doc, private_key)



def publish_update(mqtt, prefix: str, data: bytes, announcement: dict[str, Any],
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout: float = 30.0) -> None:
    """Publish the chunks (retained, QoS 1), then the announcement (retained), on a connected
    tierlite.mqtt.MqttClient, each acknowledged by the broker before the next."""
    model, version = announcement["model"], announcement["version"]
    deadline = time.monotonic() + timeout
    messages = [(topics.update_chunk(prefix, model, version, i), c)
                for i, c in enumerate(chunk_artifact(data, chunk_bytes))]
    messages.append((topics.update_announcement(prefix, model), json.dumps(announcement).encode()))
    for topic, payload in messages:
        if not mqtt.publish_and_wait(topic, payload, qos=1, retain=True, timeout=max(0.5, deadline - time.monotonic())):
            raise UpdateError(f"broker did not acknowledge {topic} within {timeout:.0f} s")



def clear_chunks(mqtt, prefix: str, model: str, version: int, count: int, timeout: float = 10.0) -> None:
    """Delete a version's retained chunks (an empty retained payload clears a topic)."""
    for i in range(count):
        mqtt.publish_and_wait(topics.update_chunk(prefix, model, version, i), b"", qos=1, retain=True, timeout=timeout)
