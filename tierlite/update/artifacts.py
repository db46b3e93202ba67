"""Update artifacts, node side: unpack one in memory (`read_artifact`), check everything a node
checks before staging it (`vet_artifact`: structure, hashes, signature, model, version) and that
it keeps the boundary tensors (`check_boundary`). Format: docs/protocol.md (Model updates)."""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from tierlite.bundle import MANIFEST, Bundle, manifest_file_hashes, validate_manifest
from tierlite.config import MAX_ARTIFACT_BYTES
from tierlite.errors import BundleError, UpdateError
from tierlite.update.signing import verify_document

__all__ = [
    "ARTIFACT_FORMAT", "Artifact", "PATCHES", "PATCH_SUFFIX", "check_boundary", "read_artifact",
    "vet_artifact", "xor_bytes",
]

ARTIFACT_FORMAT = "tierlite-update/1"
PATCHES = "patches.json"  # artifact member: {file: {"base_sha256": ...}} for files shipped as XOR patches
PATCH_SUFFIX = ".xor"


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """a XOR b, same length: how a changed file ships against its base, and how it is rebuilt."""
    return (np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).tobytes()


@dataclass
class Artifact:
    manifest: dict[str, Any]
    manifest_bytes: bytes  # exactly as signed and shipped (installed verbatim)
    files: dict[str, bytes]  # the files it carries whole (a delta carries only changed ones)
    sha256: str
    size: int
    patches: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # file -> (base sha256, XOR with base)

    @property
    def name(self) -> str:
        return str(self.manifest.get("name"))

    @property
    def version(self) -> int:
        return int(self.manifest.get("version", 0))

    def file_hashes(self) -> dict[str, str]:
        return manifest_file_hashes(self.manifest)



def read_artifact(data: bytes, max_bytes: int = MAX_ARTIFACT_BYTES) -> Artifact:
    """Unpack an artifact in memory and check its structure and the hash of every file it carries.

    Does not check the signature (verify_document) nor whether the node may install it.
    """
    if len(data) > max_bytes:
        raise UpdateError(f"artifact is {len(data):,} bytes, over the {max_bytes:,}-byte limit")
    digest = hashlib.sha256(data).hexdigest()
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        plain = dec.decompress(data, max_length=max_bytes + 1)  # bounded: no decompression bomb
    except lzma.LZMAError as e:
        raise UpdateError(f"artifact is not a valid {ARTIFACT_FORMAT} (xz) stream: {e}") from None
    if len(plain) > max_bytes:
        raise UpdateError(f"artifact expands past the {max_bytes:,}-byte limit")
    if not dec.eof:
        raise UpdateError("artifact is truncated (xz stream ends early)")
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tar:
            for member in tar.getmembers():
                name = member.name
                if not member.isfile() or name.startswith("/") or ".." in Path(name).parts or "/" in name:
                    raise UpdateError(f"artifact holds an unsafe or non-file member {name!r}")
                if name in files:
                    raise UpdateError(f"artifact holds {name!r} twice")
                f = tar.extractfile(member)
                files[name] = f.read() if f is not None else b""
                if len(files[name]) != member.size:
                    raise UpdateError(f"artifact is truncated (member {name!r} short)")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UpdateError(f"artifact is truncated or not a tar archive: {e}") from None
    manifest_bytes = files.pop(MANIFEST, None)
    if manifest_bytes is None:
        raise UpdateError("artifact has no manifest.json")
    try:
        manifest = json.loads(manifest_bytes)
        validate_manifest(manifest, "update manifest")
        patch_index = json.loads(files.pop(PATCHES, b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UpdateError(f"artifact manifest or patch index is not valid JSON: {e}") from None
    except BundleError as e:
        raise UpdateError(str(e)) from None
    art = Artifact(manifest, manifest_bytes, {}, digest, len(data))
    hashes = art.file_hashes()
    for name, content in files.items():
        if name.endswith(PATCH_SUFFIX) and name[:-len(PATCH_SUFFIX)] in hashes:
            target = name[:-len(PATCH_SUFFIX)]
            base = patch_index.get(target, {}).get("base_sha256") if isinstance(patch_index, dict) else None
            if not isinstance(base, str):
                raise UpdateError(f"artifact carries patch {name!r} without a base in {PATCHES}")
            art.patches[target] = (base, content)  # checked against the signed hash once applied
            continue
        if name not in hashes:
            raise UpdateError(f"artifact carries {name!r}, which its manifest does not list")
        actual = hashlib.sha256(content).hexdigest()
        if actual != hashes[name]:
            raise UpdateError(f"artifact file {name!r} does not match its signed hash "
                              f"(manifest {hashes[name][:12]}..., file {actual[:12]}...): tampered or corrupt")
        art.files[name] = content
    return art



def vet_artifact(data: bytes, trusted_keys: Iterable, running: Bundle, rejected: Iterable[int] = (),
                 max_bytes: int = MAX_ARTIFACT_BYTES) -> Artifact:
    """Everything a node checks before staging: structure, hashes, signature, model, version."""
    art = read_artifact(data, max_bytes)
    what = f"update {art.name} v{art.version}"
    verify_document(art.manifest, trusted_keys, what)
    if art.name != running.name:
        raise UpdateError(f"{what} is for model {art.name!r}; this node runs {running.name!r}")
    if art.version <= running.version:
        raise UpdateError(f"{what} is not newer than the running v{running.version} (downgrade or replay)")
    if art.version in set(rejected):
        raise UpdateError(f"{what} was rolled back on this node before; not applying it again")
    return art



def check_boundary(current: Bundle, candidate: Bundle) -> None:
    """An update must keep the boundary tensors (end->edge, edge->cloud) as they were: nodes still
    on the parent version, and tiers that were not updated, exchange features with this one."""
    if current.encoding != candidate.encoding:
        raise UpdateError(f"update v{candidate.version} changes the feature encoding "
                          f"({current.feature_encoding} -> {candidate.feature_encoding}); refusing")
    for tier, seg in current.segments.items():
        new = candidate.segments.get(tier)
        if new is None:
            raise UpdateError(f"update v{candidate.version} drops the {tier!r} segment")
        old_io = [(t.shape, t.dtype, round(t.scale, 9), t.zero_point) for t in seg.inputs] + \
                 [(o.shape, o.dtype, round(o.scale, 9), o.zero_point) for o in seg.outputs if o.role == "feature"]
        new_io = [(t.shape, t.dtype, round(t.scale, 9), t.zero_point) for t in new.inputs] + \
                 [(o.shape, o.dtype, round(o.scale, 9), o.zero_point) for o in new.outputs if o.role == "feature"]
        if old_io != new_io:
            raise UpdateError(f"update v{candidate.version} changes the {tier} segment's boundary tensors "
                              f"({old_io} -> {new_io}); nodes on v{current.version} could not talk to it")
