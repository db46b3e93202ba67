"""Signed model updates, shared by every tier that hot-swaps a model (camera nodes, edge workers).

Pieces, in the order an update travels:

- Keys: Ed25519 (`cryptography`). The private key stays with the publisher (PEM, mode 0600);
  every node trusts one or more public keys (PEM files named in its config).
- Signature: over the canonical JSON of the bundle manifest without its "signature" entry. The
  manifest lists the sha256 of every file, so one signature covers the whole bundle; the signed
  manifest stays in the installed bundle, so a node can re-verify it at any time.
- Artifact (format "tierlite-update/1"): a tar.xz holding the signed manifest.json first, then
  only the files whose hash is not in the parent version (a delta). Files it leaves out are
  taken from the node's own kept versions by sha256. With no parent it holds every file.
- Delivery over MQTT: the artifact is cut into retained chunks on
  `<prefix>/update/<model>/v<version>/<index>` (a 52-byte binary header each, carrying the
  artifact's sha256 so chunks of different artifacts never mix), then a signed JSON announcement
  is published retained on `<prefix>/update/<model>`. A node that was offline gets both on
  reconnect. The announcement names a rollout share: nodes whose hash(node, salt) falls below it
  take the update (canary first, the rest later). Nodes report on
  `<prefix>/update/<model>/report/<node_id>`.
- Node side (UpdateManager): verify announcement signature -> collect chunks -> check artifact
  sha256 and size -> verify manifest signature, name, version newer than running and not
  rejected before (no downgrade, no replay), every file hash -> stage as a full bundle
  directory -> load it in a shadow interpreter and run it on recent frames (runs, finite, agrees
  with the current model on the frames the current model was sure of, escalates no more than a
  bound) -> hand it to the tier for an atomic swap between frames -> watch the next frames and
  roll back automatically to the kept previous version if errors or the escalation rate regress.

Errors that refuse an update are UpdateError: their message is the one log line a node writes.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import lzma
import os
import queue
import shutil
import stat
import struct
import tarfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from tierlite.bundle import MANIFEST, Bundle, validate_manifest
from tierlite.errors import BundleError, ConfigError, TierliteError
from tierlite.policy import decide

log = logging.getLogger("tierlite.update")

ARTIFACT_FORMAT = "tierlite-update/1"
PATCHES = "patches.json"  # artifact member: {file: {"base_sha256": ...}} for files shipped as XOR patches
PATCH_SUFFIX = ".xor"
SIG_ALG = "ed25519"
DEFAULT_CHUNK_BYTES = 64 * 1024  # well under the 128-256 KiB message caps of small MQTT stacks
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
MAX_UNCONFIRMED_STARTS = 1  # restarts tolerated while a new version is on probation
CHUNK_MAGIC = b"TLU1"
_CHUNK_HEADER = struct.Struct(">4sIII32s")  # magic, index, count, artifact bytes, artifact sha256


class UpdateError(TierliteError):
    """An update was refused; the message says why in one line."""


# -- keys ---------------------------------------------------------------------------------------
def generate_keypair(private_path: str | Path, public_path: str | Path | None = None,
                     force: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair: private key PEM (mode 0600, never group/world readable at any
    moment) and public key PEM (0644). Returns (private, public, key id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_suffix(".pub")
    for p in (private_path, public_path):
        if p.exists() and not force:
            raise ConfigError(f"{p} exists; pass --force to replace it (nodes trusting the old key will refuse new updates)")
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = private_path.with_name(private_path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by umask; also fixes a stale tmp file
        os.write(fd, pem)
    finally:
        os.close(fd)
    os.replace(tmp, private_path)
    pub = key.public_key()
    public_path.write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))
    os.chmod(public_path, 0o644)
    return private_path, public_path, key_id(pub)


def load_private_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read signing key {path}: {e.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"signing key {path} is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
                          f"run: chmod 600 {path}")
    password = os.environ.get("TIERLITE_KEY_PASSPHRASE")
    try:
        key = serialization.load_pem_private_key(data, password.encode() if password else None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a usable PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"cannot read public key {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def key_id(public_key) -> str:
    """Short fingerprint: first 16 hex digits of sha256 of the raw 32-byte public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -- signatures ---------------------------------------------------------------------------------
def canonical_json(doc: dict[str, Any]) -> bytes:
    """The signed bytes: sorted keys, no spaces, ASCII; the "signature" entry left out."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sign_document(doc: dict[str, Any], private_key) -> dict[str, Any]:
    """A copy of doc with an Ed25519 "signature" entry over canonical_json(doc)."""
    signed = {k: v for k, v in doc.items() if k != "signature"}
    signed["signature"] = {"alg": SIG_ALG, "key_id": key_id(private_key.public_key()),
                           "value": base64.b64encode(private_key.sign(canonical_json(signed))).decode()}
    return signed


def verify_document(doc: dict[str, Any], trusted_keys: Iterable, what: str) -> str:
    """Check doc's signature against the trusted public keys; returns the key id that signed it."""
    from cryptography.exceptions import InvalidSignature

    sig = doc.get("signature")
    if not sig:
        raise UpdateError(f"{what} is unsigned")
    if not isinstance(sig, dict) or sig.get("alg") != SIG_ALG or not isinstance(sig.get("value"), str):
        raise UpdateError(f"{what} has a malformed signature entry (want alg {SIG_ALG!r} and a base64 value)")
    try:
        value = base64.b64decode(sig["value"], validate=True)
        body = canonical_json(doc)
    except (ValueError, TypeError) as e:
        raise UpdateError(f"{what}: signature or body not encodable: {e}") from None
    keys = {key_id(k): k for k in trusted_keys}
    claimed = str(sig.get("key_id", ""))
    # Try the claimed key first, then all (the key id is a hint, not trusted).
    for kid in sorted(keys, key=lambda k: k != claimed):
        try:
            keys[kid].verify(value, body)
            return kid
        except InvalidSignature:
            continue
    if claimed not in keys:
        raise UpdateError(f"{what} is signed by key {claimed or '?'} which this node does not trust "
                          f"(trusted: {', '.join(sorted(keys)) or 'none'})")
    raise UpdateError(f"{what}: signature does not verify (tampered or wrongly signed)")


def sign_bundle(bundle_dir: str | Path, private_key) -> dict[str, Any]:
    """Sign a bundle directory's manifest in place (after checking its files); returns the manifest."""
    bundle = Bundle.load(bundle_dir)
    signed = sign_document(bundle.manifest, private_key)
    tmp = bundle.root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(signed, indent=2) + "\n")
    os.replace(tmp, bundle.root / MANIFEST)
    return signed


# -- artifact -----------------------------------------------------------------------------------
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
        hashes = {s["file"]: s["sha256"] for s in self.manifest["segments"]}
        hashes.update({e["file"]: e["sha256"] for e in self.manifest.get("files", [])})
        return hashes


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
            members.append((f + PATCH_SUFFIX, (np.frombuffer(new, np.uint8) ^ np.frombuffer(old, np.uint8)).tobytes()))
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


# -- chunking -----------------------------------------------------------------------------------
def chunk_artifact(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """Cut an artifact into MQTT payloads: header (magic, index, count, total, sha256) + data."""
    if chunk_bytes < 1:
        raise ConfigError("chunk size must be positive")
    digest = hashlib.sha256(data).digest()
    count = max(1, -(-len(data) // chunk_bytes))
    return [_CHUNK_HEADER.pack(CHUNK_MAGIC, i, count, len(data), digest) + data[i * chunk_bytes:(i + 1) * chunk_bytes]
            for i in range(count)]


class ChunkAssembler:
    """Collects the chunks of one artifact (identified by its sha256) in any order.

    add() returns the whole artifact once every chunk is in and its sha256 matches; chunks of
    another artifact, malformed or oversized ones raise UpdateError (the caller logs and drops).
    """

    def __init__(self, sha256: str, size: int, count: int, max_bytes: int = MAX_ARTIFACT_BYTES):
        if size > max_bytes:
            raise UpdateError(f"announced artifact is {size:,} bytes, over the {max_bytes:,}-byte limit")
        if not 1 <= count <= max(1, size):
            raise UpdateError(f"announced chunk count {count} is impossible for {size} bytes")
        self.sha256, self.size, self.count = sha256, size, count
        self.parts: dict[int, bytes] = {}

    def add(self, payload: bytes) -> bytes | None:
        if len(payload) < _CHUNK_HEADER.size:
            raise UpdateError(f"update chunk is {len(payload)} bytes, shorter than its header")
        magic, index, count, total, digest = _CHUNK_HEADER.unpack_from(payload)
        if magic != CHUNK_MAGIC:
            raise UpdateError("update chunk has a bad magic number")
        if digest.hex() != self.sha256:
            raise UpdateError(f"update chunk belongs to artifact {digest.hex()[:12]}..., "
                              f"expected {self.sha256[:12]}...")
        if count != self.count or total != self.size or index >= count:
            raise UpdateError(f"update chunk {index}/{count} ({total} B) disagrees with the announcement "
                              f"({self.count} chunks, {self.size} B)")
        self.parts[index] = bytes(payload[_CHUNK_HEADER.size:])
        if sum(len(p) for p in self.parts.values()) > self.size:
            self.parts.clear()
            raise UpdateError("update chunks add up to more than the announced size")
        if len(self.parts) < self.count:
            return None
        data = b"".join(self.parts[i] for i in range(self.count))
        self.parts.clear()
        if len(data) != self.size or hashlib.sha256(data).hexdigest() != self.sha256:
            raise UpdateError(f"reassembled artifact is {len(data):,} bytes with a different sha256 "
                              f"than announced ({self.size:,} B): truncated or corrupt")
        return data

    @property
    def missing(self) -> int:
        return self.count - len(self.parts)


# -- topics and announcement ----------------------------------------------------------------------
def update_topic(prefix: str, model: str) -> str:
    return f"{prefix}/update/{model}"


def chunk_topic(prefix: str, model: str, version: int, index: int | str) -> str:
    return f"{prefix}/update/{model}/v{version}/{index}"


def frames_topic(prefix: str, model: str, node_id: str = "+") -> str:
    return f"{prefix}/update/{model}/frames/{node_id}"


FRAME_MAGIC = b"TLF1"
MAX_FRAME_JPEG_BYTES = 1 << 20


def encode_frame_upload(jpeg: bytes, version: int) -> bytes:
    """An opted-in node's frame upload: b"TLF1" | u32 header length | {"version","ts"} JSON | JPEG."""
    header = json.dumps({"version": int(version), "ts": round(time.time(), 3)}).encode()
    return FRAME_MAGIC + struct.pack(">I", len(header)) + header + jpeg


def decode_frame_upload(payload: bytes) -> tuple[dict[str, Any], bytes]:
    if len(payload) < 8 or payload[:4] != FRAME_MAGIC:
        raise UpdateError("frame upload: bad magic")
    (n,) = struct.unpack_from(">I", payload, 4)
    if n > 4096 or 8 + n > len(payload):
        raise UpdateError("frame upload: bad header length")
    try:
        header = json.loads(payload[8:8 + n])
        int(header["version"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UpdateError("frame upload: header is not the expected JSON") from None
    jpeg = bytes(payload[8 + n:])
    if not 0 < len(jpeg) <= MAX_FRAME_JPEG_BYTES or not jpeg.startswith(b"\xff\xd8"):
        raise UpdateError(f"frame upload: not a JPEG of at most {MAX_FRAME_JPEG_BYTES} bytes")
    return header, jpeg


def report_topic(prefix: str, model: str, node_id: str = "+") -> str:
    return f"{prefix}/update/{model}/report/{node_id}"


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


def parse_announcement(payload: bytes, trusted_keys: Iterable, model: str) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UpdateError(f"update announcement is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != ARTIFACT_FORMAT:
        raise UpdateError(f"update announcement format is not {ARTIFACT_FORMAT!r}")
    what = f"update announcement {doc.get('model')} v{doc.get('version')}"
    verify_document(doc, trusted_keys, what)
    try:
        art, roll = doc["artifact"], doc["rollout"]
        ok = (doc["model"] == model and isinstance(doc["version"], int) and isinstance(art["sha256"], str)
              and isinstance(art["bytes"], int) and isinstance(art["chunks"], int)
              and 0.0 <= float(roll["share"]) <= 1.0)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise UpdateError(f"{what} is malformed or for another model (this node runs {model!r})")
    return doc


def in_rollout(node_id: str, rollout: dict[str, Any]) -> bool:
    """Named nodes always; otherwise a stable pseudo-random share of node ids (per salt)."""
    if node_id in rollout.get("nodes", []):
        return True
    share = float(rollout.get("share", 1.0))
    if share >= 1.0:
        return True
    h = hashlib.sha256(f"{rollout.get('salt', '')}:{node_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < share


def publish_update(mqtt, prefix: str, data: bytes, announcement: dict[str, Any],
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout: float = 30.0) -> None:
    """Publish the chunks (retained, QoS 1), then the announcement (retained), on a connected
    tierlite.mqtt.MqttClient, each acknowledged by the broker before the next."""
    model, version = announcement["model"], announcement["version"]
    deadline = time.monotonic() + timeout
    messages = [(chunk_topic(prefix, model, version, i), c) for i, c in enumerate(chunk_artifact(data, chunk_bytes))]
    messages.append((update_topic(prefix, model), json.dumps(announcement).encode()))
    for topic, payload in messages:
        if not mqtt.publish_and_wait(topic, payload, qos=1, retain=True, timeout=max(0.5, deadline - time.monotonic())):
            raise UpdateError(f"broker did not acknowledge {topic} within {timeout:.0f} s")


def clear_chunks(mqtt, prefix: str, model: str, version: int, count: int, timeout: float = 10.0) -> None:
    """Delete a version's retained chunks (an empty retained payload clears a topic)."""
    for i in range(count):
        mqtt.publish_and_wait(chunk_topic(prefix, model, version, i), b"", qos=1, retain=True, timeout=timeout)


# -- node side: versions on disk ------------------------------------------------------------------
class VersionStore:
    """<state_dir>/versions/v<N>/ holds installed bundles; state.json says which is current,
    which is the previous one kept for rollback, and which versions were rejected."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        self.state = self._read_state()

    def _read_state(self) -> dict[str, Any]:
        f = self.root / "state.json"
        empty = {"current": None, "previous": None, "rejected": [], "pending": None}
        if not f.exists():
            return empty
        try:
            state = json.loads(f.read_text())
            pending = state.get("pending")
            return {"current": state.get("current"), "previous": state.get("previous"),
                    "rejected": [int(v) for v in state.get("rejected", [])],
                    "pending": {"version": int(pending["version"]), "starts": int(pending["starts"]),
                                "baseline": float(pending.get("baseline", 1.0))} if pending else None}
        except (json.JSONDecodeError, ValueError, AttributeError, KeyError, TypeError) as e:
            log.warning("update state %s unreadable (%s); starting from the configured bundle", f, e)
            return empty

    def save(self) -> None:
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        os.replace(tmp, self.root / "state.json")  # atomic: a crash leaves the old or the new state

    def path(self, version: int) -> Path:
        return self.root / "versions" / f"v{version}"

    def has(self, version: int | None) -> bool:
        return version is not None and (self.path(version) / MANIFEST).is_file()

    def adopt(self, bundle: Bundle) -> Path:
        """Copy a bundle (e.g. the configured one) in as a kept version, if not there yet."""
        dest = self.path(bundle.version)
        if not self.has(bundle.version):
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for rel in list(bundle.file_hashes()) + [MANIFEST]:
                shutil.copy2(bundle.root / rel, tmp / rel)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        return dest

    def find_file(self, sha256: str) -> Path | None:
        for d in sorted((self.root / "versions").glob("v*"), reverse=True):
            try:
                manifest = json.loads((d / MANIFEST).read_text())
                hashes = {s["file"]: s["sha256"] for s in manifest["segments"]}
                hashes.update({e["file"]: e["sha256"] for e in manifest.get("files", [])})
            except (OSError, ValueError, KeyError, TypeError):
                continue
            for rel, h in hashes.items():
                if h == sha256 and (d / rel).is_file():
                    return d / rel
        return None

    def stage(self, art: Artifact) -> Bundle:
        """Write the artifact as a full bundle directory (delta files copied from kept versions by
        hash), verify every file, then move it into place atomically."""
        dest = self.path(art.version)
        tmp = dest.with_name(dest.name + ".staging")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for rel, digest in art.file_hashes().items():
                if rel in art.files:
                    (tmp / rel).write_bytes(art.files[rel])
                    continue
                if rel in art.patches:
                    (tmp / rel).write_bytes(self._apply_patch(art, rel, digest))
                    continue
                src = self.find_file(digest)
                if src is None:
                    raise UpdateError(f"update {art.name} v{art.version} is a delta that needs {rel} "
                                      f"(sha256 {digest[:12]}...), which this node does not have; "
                                      f"publish a full artifact (--full)")
                shutil.copyfile(src, tmp / rel)
            (tmp / MANIFEST).write_bytes(art.manifest_bytes)
            try:
                Bundle.load(tmp)  # re-verifies schema and every file hash on disk
            except BundleError as e:
                raise UpdateError(f"staged update v{art.version} does not verify: {e}") from None
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return Bundle.load(dest)

    def _apply_patch(self, art: Artifact, rel: str, digest: str) -> bytes:
        base_sha, xor = art.patches[rel]
        base = self.find_file(base_sha)
        what = f"update {art.name} v{art.version}: patch for {rel}"
        if base is None:
            raise UpdateError(f"{what} applies to a file (sha256 {base_sha[:12]}...) this node does not have; "
                              f"publish a full artifact (--full)")
        old = base.read_bytes()
        if len(old) != len(xor):
            raise UpdateError(f"{what} is {len(xor)} bytes, its base {len(old)}: truncated or corrupt")
        new = (np.frombuffer(old, np.uint8) ^ np.frombuffer(xor, np.uint8)).tobytes()
        if hashlib.sha256(new).hexdigest() != digest:
            raise UpdateError(f"{what} does not produce the signed hash: tampered or corrupt")
        return new

    def prune(self) -> None:
        keep = {self.state["current"], self.state["previous"]}
        for d in (self.root / "versions").iterdir():
            try:
                v = int(d.name.lstrip("v").split(".")[0])
            except ValueError:
                continue
            if v not in keep:
                shutil.rmtree(d, ignore_errors=True)


# -- node side: the manager -----------------------------------------------------------------------
@dataclass
class UpdateConfig:
    """The `update:` section of a device or edge config (tierlite.config builds and checks it).

        update:
          trusted_keys: keys/update.pub   # a public key, or a folder of *.pub (key rotation)
          state_dir: models/              # kept versions and state.json
    """
    trusted_keys: str
    state_dir: str
    enabled: bool = True
    recent_frames: int = 64  # recent inputs kept for the shadow check
    # Top-1 agreement on recent frames the current model was sure of. Not higher: under drift the
    # current model is often sure and wrong, and the update exists to disagree there; a broken
    # or mislabelled model agrees on ~1/classes of them.
    min_agreement: float = 0.5
    max_shadow_escalation_increase: float = 0.25  # candidate's escalation rate on recent frames vs current
    watch_frames: int = 100  # frames served by a new version before it is confirmed
    watch_seconds: float = 120.0  # ... or this long, whichever comes first
    max_escalation_increase: float = 0.15  # absolute, after the swap vs the frames before it
    max_error_rate: float = 0.05
    max_artifact_bytes: int = MAX_ARTIFACT_BYTES
    # Privacy opt-in: upload the JPEG of frames the end model escalated, so the cloud may retrain
    # the end exit from them (off: only boundary features ever leave the node).
    share_frames: bool = False
    max_frame_uploads_per_minute: int = 120

    _paths = ("trusted_keys", "state_dir")

    def check(self, where: str = "update") -> None:
        for name in ("min_agreement", "max_shadow_escalation_increase", "max_escalation_increase", "max_error_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{where}.{name}: a share in [0, 1], got {v!r}")
        for name in ("recent_frames", "watch_frames", "max_artifact_bytes", "max_frame_uploads_per_minute"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1")
        if self.watch_seconds <= 0:
            raise ConfigError(f"{where}.watch_seconds: must be > 0")
        if Path(self.state_dir).exists() and not Path(self.state_dir).is_dir():
            raise ConfigError(f"{where}.state_dir: {self.state_dir} is not a folder")
        self.public_keys(where)  # fail at start-up, not when the first update arrives

    def public_keys(self, where: str = "update") -> list:
        path = Path(self.trusted_keys)
        files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        if not files:
            raise ConfigError(f"{where}.trusted_keys: no *.pub file in {path}")
        return [load_public_key(f) for f in files]


@dataclass
class RetrainTriggerConfig:
    """The cloud worker's `retrain:` section: when to run `tierlite retrain` on its hard-example
    store, and whether to keep the frames opted-in nodes upload.

        retrain:
          replay: data/train            # the labelled training folder (clean accuracy, thresholds)
          every_examples: 500           # after this many new hard examples ...
          every_seconds: 86400          # ... or this long since the last run, whichever first
          args: [--publish, --key, keys/update.key, --canary, "0.25"]

    every_examples and every_seconds both null: only collect frames; run `tierlite retrain` yourself.
    """
    replay: str
    every_examples: int | None = 500
    every_seconds: float | None = None
    collect_frames: bool = True
    frames_path: str | None = None  # default: <store stem>.frames.sqlite beside the store
    args: list[str] = field(default_factory=list)  # more `tierlite retrain` options
    min_interval_seconds: float = 60.0  # never start two runs closer than this

    _paths = ("replay", "frames_path")

    def check(self, where: str = "retrain") -> None:
        if self.every_examples is not None and self.every_examples < 1:
            raise ConfigError(f"{where}.every_examples: must be >= 1")
        if self.every_seconds is not None and self.every_seconds <= 0:
            raise ConfigError(f"{where}.every_seconds: must be > 0")
        if not Path(self.replay).is_dir():
            raise ConfigError(f"{where}.replay: labelled training folder not found: {self.replay}")


SegmentFactory = Callable[[Bundle, str], Any]  # (bundle, tier) -> object with .run(x) -> SegmentOutput
SwapFn = Callable[[Bundle, dict[str, Any]], None]  # install bundle + its loaded segments between frames


def _default_factory(bundle: Bundle, tier: str):
    from tierlite.segment import Segment

    return Segment(bundle, tier)


@dataclass
class _Watch:
    version: int
    previous: int
    baseline_escalation: float
    started: float
    frames: int = 0
    escalated: int = 0
    errors: int = 0


class UpdateManager:
    """Receives, verifies, shadow-checks, swaps in and if needed rolls back model updates for
    the tiers one process runs (("end",) on a camera node, ("edge",) in an edge worker).

    The owner (device daemon, edge worker) wires it in with three calls and one callback:
      bundle = manager.startup(configured_bundle)   # the version to run (survives restarts)
      manager.attach(mqtt_client)                   # a tierlite.mqtt.MqttClient, once
      manager.observe(tier, x, logits, escalated)   # after every frame it serves
    and `swap(bundle, segments)`, which must install the new model between two frames (e.g.
    replace the one reference the frame loop reads at the start of each frame).
    """

    def __init__(self, policy: UpdateConfig, node_id: str, tiers: Iterable[str], swap: SwapFn,
                 prefix: str = "tierlite", segment_factory: SegmentFactory | None = None):
        self.policy, self.node_id, self.prefix = policy, node_id, prefix
        self.tiers = tuple(tiers)
        self._swap = swap
        self._factory = segment_factory or _default_factory
        self._keys = policy.public_keys()
        self.store = VersionStore(policy.state_dir)
        self.bundle: Bundle | None = None
        self._lock = threading.Lock()
        self._recent: dict[str, deque] = {t: deque(maxlen=policy.recent_frames) for t in self.tiers}
        self._history: deque = deque(maxlen=policy.watch_frames)  # escalated flags before a swap
        self._watch: _Watch | None = None
        self._assembly: tuple[dict[str, Any], ChunkAssembler] | None = None
        self._client = None
        self._tasks: queue.Queue = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._deferred: bytes | None = None
        self._attempt: int | None = None  # version of the (signed) update being applied
        self._upload_window = [time.monotonic(), 0]  # [window start, frames uploaded in it]
        self._refused: set[str] = set()  # artifact sha256s already refused by this process
        self.counters = {"refused": 0, "applied": 0, "rolled_back": 0, "confirmed": 0, "dropped_messages": 0}
        self.last_event: dict[str, Any] = {}

    # -- start-up ----------------------------------------------------------------------------
    def startup(self, configured: Bundle) -> Bundle:
        """The bundle this node should run: the newest kept version that loads, or the configured
        one if it is newer (an operator's manual install wins). Starts the worker thread."""
        st = self.store.state
        pending = st["pending"]
        if pending and pending["version"] == st["current"]:
            # Restarted while a new version was still on probation: once may be a power cut,
            # twice looks like the new version brings the process down.
            pending["starts"] += 1
            if pending["starts"] > MAX_UNCONFIRMED_STARTS:
                log.error("update: v%s was not confirmed across %d restarts; rolling back",
                          pending["version"], pending["starts"] - 1)
                self._reject(pending["version"])
                st["pending"] = None
        old_current, chosen = st["current"], None
        if old_current is not None and old_current > configured.version:
            for version in (old_current, st["previous"]):
                if version is None or version <= configured.version or not self.store.has(version):
                    continue
                try:
                    candidate = Bundle.load(self.store.path(version))
                    for tier in self.tiers:
                        self._factory(candidate, tier)
                except Exception as e:  # noqa: BLE001 - any load failure means: use an older version
                    log.error("update: kept v%s fails to load (%s); rolling back", version, e)
                    self._reject(version)
                    continue
                chosen = candidate
                if version != old_current:
                    st["previous"] = None
                break
        if chosen is None:  # the configured bundle: first start, or an operator installed a newer one
            chosen = configured
            self.store.adopt(configured)
            if (old_current is not None and old_current < configured.version and self.store.has(old_current)
                    and old_current not in st["rejected"]):
                st["previous"] = old_current
            elif st["previous"] is not None and (st["previous"] >= configured.version or not self.store.has(st["previous"])):
                st["previous"] = None
        st["current"] = chosen.version
        pending = st["pending"]
        if pending and (pending["version"] != chosen.version or st["previous"] is None):
            st["pending"] = pending = None
        if pending:  # resume the probation the restart interrupted
            self._watch = _Watch(chosen.version, st["previous"], pending["baseline"], time.monotonic())
        self.store.save()
        self.bundle = chosen
        log.info("update: running %s v%s (previous kept: %s)", chosen.name, chosen.version,
                 f"v{st['previous']}" if st["previous"] else "none")
        self._worker = threading.Thread(target=self._work, name="tierlite-update", daemon=True)
        self._worker.start()
        return chosen

    def close(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=5)

    # -- MQTT ----------------------------------------------------------------------------------
    @property
    def topic(self) -> str:
        return update_topic(self.prefix, self._model)

    @property
    def _model(self) -> str:
        if self.bundle is None:
            raise RuntimeError("UpdateManager.startup() must run first")
        return self.bundle.name

    def attach(self, mqtt) -> None:
        """Subscribe on a tierlite.mqtt.MqttClient (call once: its subscriptions survive reconnects,
        and the retained announcement reaches a node that comes back online at once)."""
        self._client = mqtt
        mqtt.subscribe(self.topic, self.on_message, qos=1)

    def on_message(self, topic: str, payload: bytes) -> None:
        """Network input: never raises. Cheap; heavy work goes to the worker thread."""
        try:
            if topic == self.topic:
                self._on_announcement(payload)
            elif topic.startswith(self.topic + "/v"):
                self._on_chunk(topic, payload)
        except UpdateError as e:
            self._refuse(str(e))
        except Exception:  # noqa: BLE001 - a daemon must not die on a bad message
            self.counters["dropped_messages"] += 1
            log.exception("update: dropped a message on %s", topic)

    def _on_announcement(self, payload: bytes) -> None:
        if not payload:
            return  # the retained announcement was cleared (rollout halted)
        if not self.policy.enabled:
            return
        doc = parse_announcement(payload, self._keys, self._model)
        version = doc["version"]
        if version == self.bundle.version:
            return  # the retained announcement of what this node runs (seen on every reconnect)
        if version < self.bundle.version:
            raise UpdateError(f"update {doc['model']} v{version} is older than the running v{self.bundle.version} "
                              f"(downgrade or replay)")
        if version in self.store.state["rejected"]:
            log.info("update: ignoring v%s, rolled back on this node before", version)
            return
        if not in_rollout(self.node_id, doc["rollout"]):
            log.info("update: v%s announced for %.0f %% of nodes; this node waits for a later stage",
                     version, 100 * doc["rollout"]["share"])
            return
        art = doc["artifact"]
        if art["sha256"] in self._refused:
            log.debug("update: v%s artifact %s was refused already", version, art["sha256"][:12])
            return
        with self._lock:
            if self._assembly is not None:
                if self._assembly[0]["artifact"]["sha256"] == art["sha256"]:
                    return  # re-announcement (e.g. wider share) of what is being collected
                self._drop_assembly()
            self._assembly = (doc, ChunkAssembler(art["sha256"], art["bytes"], art["chunks"],
                                                  self.policy.max_artifact_bytes))
        log.info("update: %s v%s announced (%s B in %d chunk(s)); collecting", doc["model"], version,
                 f"{art['bytes']:,}", art["chunks"])
        if self._client is not None:
            self._client.subscribe(chunk_topic(self.prefix, self._model, version, "+"), self.on_message, qos=1)

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # cleared retained chunk
        with self._lock:
            if self._assembly is None:
                return
            doc, asm = self._assembly
            if not topic.startswith(chunk_topic(self.prefix, self._model, doc["version"], "")):
                return
            try:
                data = asm.add(payload)
            except UpdateError:
                self._drop_assembly()
                raise
            if data is None:
                return
            self._drop_assembly()
        try:
            self._tasks.put_nowait(("artifact", data))
        except queue.Full:
            log.warning("update: worker busy; v%s will be retried on the next announcement", doc["version"])

    def _drop_assembly(self) -> None:  # caller holds the lock
        doc = self._assembly[0]
        self._assembly = None
        if self._client is not None:
            self._client.unsubscribe(chunk_topic(self.prefix, self._model, doc["version"], "+"))

    def submit(self, data: bytes) -> None:
        """Hand a whole artifact to the worker (the MQTT path does this after reassembly)."""
        self._tasks.put(("artifact", data), timeout=5)

    # -- frames --------------------------------------------------------------------------------
    def observe(self, tier: str, x: np.ndarray, logits: np.ndarray | None, escalated: bool, error: bool = False) -> None:
        """Called by the frame loop after each frame (cheap: a copy into a ring buffer)."""
        if escalated and tier == "end" and self.policy.share_frames and not error:
            self._share_frame(x)
        with self._lock:
            if logits is not None and not error and tier in self._recent:
                self._recent[tier].append((np.array(x, copy=True), np.asarray(logits, dtype=np.float32).copy()))
            w = self._watch
            if w is None:
                if not error:
                    self._history.append(bool(escalated))
                return
            w.frames += 1
            w.escalated += bool(escalated) and not error
            w.errors += bool(error)
            done = w.frames >= self.policy.watch_frames or time.monotonic() - w.started > self.policy.watch_seconds
        if done:
            self._enqueue_judge()

    def _share_frame(self, x: np.ndarray) -> None:
        """Opted-in nodes: upload an escalated frame as JPEG (rate-limited, QoS 0, best effort)."""
        now = time.monotonic()
        if now - self._upload_window[0] >= 60.0:
            self._upload_window = [now, 0]
        if self._client is None or self.bundle is None or self._upload_window[1] >= self.policy.max_frame_uploads_per_minute:
            return
        import cv2

        img = np.asarray(x).reshape(np.asarray(x).shape[-3:])
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if ok and self._client.publish(frames_topic(self.prefix, self._model, self.node_id),
                                       encode_frame_upload(jpg.tobytes(), self.bundle.version), 0):
            self._upload_window[1] += 1

    def _enqueue_judge(self) -> None:
        try:
            self._tasks.put_nowait(("judge", None))
        except queue.Full:
            pass

    # -- worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                kind, data = self._tasks.get(timeout=0.5)
            except queue.Empty:
                w = self._watch
                if w is not None and time.monotonic() - w.started > self.policy.watch_seconds:
                    self._enqueue_judge()
                continue
            try:
                if kind == "artifact" and self._watch is not None:
                    self._deferred = data  # applied once the running update's watch ends
                elif kind == "artifact":
                    self._apply(data)
                elif kind == "judge":
                    self._judge()
                    if self._deferred is not None and self._watch is None:
                        data, self._deferred = self._deferred, None
                        self._apply(data)
            except UpdateError as e:
                self._refuse(str(e), data, self._attempt)
            except Exception as e:  # noqa: BLE001 - keep serving frames whatever an update does
                self._refuse(f"update failed unexpectedly: {e!r}", data, self._attempt)
                log.debug("update failure", exc_info=True)
            finally:
                self._attempt = None
                self._tasks.task_done()

    def _apply(self, data: bytes) -> None:
        if self._watch is not None:
            raise UpdateError("an update is still being watched; the next one waits for its verdict")
        current = self.bundle
        art = vet_artifact(data, self._keys, current, self.store.state["rejected"], self.policy.max_artifact_bytes)
        self._attempt = art.version  # signed from here on: refusals can name the version
        log.info("update: v%s signature ok (%s B, ships %s); staging", art.version, f"{art.size:,}",
                 ", ".join([*sorted(art.files), *(f"{f} (patch)" for f in sorted(art.patches))]) or "manifest only")
        candidate = self.store.stage(art)
        _check_boundary(current, candidate)
        segments = {}
        for tier in self.tiers:
            try:
                segments[tier] = self._factory(candidate, tier)
            except Exception as e:  # noqa: BLE001 - any load failure refuses the update
                self._reject(candidate.version)
                raise UpdateError(f"update v{candidate.version}: {tier} segment fails to load in the shadow "
                                  f"interpreter: {e}") from None
            self._shadow_check(current, candidate, tier, segments[tier])
        with self._lock:
            baseline = float(np.mean(self._history)) if self._history else 0.0
        try:
            self._swap(candidate, segments)
        except Exception as e:  # noqa: BLE001
            self._reject(candidate.version)
            raise UpdateError(f"update v{candidate.version} failed to load into the running tier ({e}); "
                              f"still on v{current.version}") from None
        st = self.store.state
        st["previous"], st["current"] = current.version, candidate.version
        st["pending"] = {"version": candidate.version, "starts": 0, "baseline": baseline}
        self.store.save()
        with self._lock:
            self.bundle = candidate
            self._watch = _Watch(candidate.version, current.version, baseline, time.monotonic())
        self.counters["applied"] += 1
        self._event("applied", candidate.version, f"v{current.version} -> v{candidate.version}; watching "
                    f"{self.policy.watch_frames} frames (escalation baseline {baseline:.2f})")

    def _shadow_check(self, current: Bundle, candidate: Bundle, tier: str, seg) -> None:
        with self._lock:
            recent = list(self._recent.get(tier, ()))
        what = f"update v{candidate.version} shadow check ({tier})"
        if not recent:  # nothing served yet: at least prove it runs on a well-formed input
            spec = candidate.segment(tier).inputs[0]
            out = seg.run(np.zeros(spec.shape, dtype=np.dtype(spec.dtype)))
            if not np.all(np.isfinite(out.logits)):
                raise UpdateError(f"{what}: non-finite logits on a blank input")
            log.info("update: %s: no recent frames yet; model loads and runs", what)
            return
        old_thr = current.thresholds.get(tier)
        new_thr = candidate.thresholds.get(tier)
        agree, sure, esc_old, esc_new = 0, 0, 0, 0
        for x, old_logits in recent:
            try:
                new_logits = seg.run(x).logits
            except TierliteError as e:
                raise UpdateError(f"{what}: fails on a recent frame: {e}") from None
            if not np.all(np.isfinite(new_logits)):
                raise UpdateError(f"{what}: non-finite logits on a recent frame")
            old_conf, old_label, _, _ = decide(old_logits, old_thr)
            new_conf, new_label, _, _ = decide(new_logits, new_thr)
            esc_old += not old_conf
            esc_new += not new_conf
            if old_conf:
                sure += 1
                agree += old_label == new_label
        n = len(recent)
        agreement = agree / sure if sure else 1.0
        detail = (f"{n} frames: agreement {agreement:.2f} on {sure} the current model was sure of, "
                  f"escalation {esc_old / n:.2f} -> {esc_new / n:.2f}")
        if sure and agreement < self.policy.min_agreement:
            self._reject(candidate.version)
            raise UpdateError(f"{what} failed: agreement {agreement:.2f} < {self.policy.min_agreement} ({detail})")
        if (esc_new - esc_old) / n > self.policy.max_shadow_escalation_increase:
            self._reject(candidate.version)
            raise UpdateError(f"{what} failed: escalation rate up more than "
                              f"{self.policy.max_shadow_escalation_increase} ({detail})")
        log.info("update: %s passed (%s)", what, detail)

    def _judge(self) -> None:
        with self._lock:
            w = self._watch
            if w is None:
                return
            self._watch = None
            self._history.clear()
        if w.frames == 0:
            self._confirm(w, "no frames served during the watch")
            return
        esc = w.escalated / max(1, w.frames - w.errors)
        err = w.errors / w.frames
        detail = (f"{w.frames} frames: escalation {w.baseline_escalation:.2f} -> {esc:.2f}, "
                  f"error rate {err:.2f}")
        if err > self.policy.max_error_rate:
            self._rollback(w, f"error rate {err:.2f} > {self.policy.max_error_rate} ({detail})")
        elif esc > w.baseline_escalation + self.policy.max_escalation_increase:
            self._rollback(w, f"escalation rate regressed past +{self.policy.max_escalation_increase} ({detail})")
        else:
            self._confirm(w, detail)

    def _confirm(self, w: _Watch, detail: str) -> None:
        self.counters["confirmed"] += 1
        self.store.state["pending"] = None
        self.store.save()
        self.store.prune()
        self._event("confirmed", w.version, detail)

    def _rollback(self, w: _Watch, reason: str) -> None:
        previous = Bundle.load(self.store.path(w.previous))
        segments = {tier: self._factory(previous, tier) for tier in self.tiers}
        self._swap(previous, segments)
        self._reject(w.version)
        st = self.store.state
        st["current"], st["previous"], st["pending"] = previous.version, None, None
        self.store.save()
        with self._lock:
            self.bundle = previous
        self.counters["rolled_back"] += 1
        self._event("rolled_back", w.version, f"back to v{previous.version}: {reason}", logging.WARNING)

    def _reject(self, version: int) -> None:
        st = self.store.state
        if version not in st["rejected"]:
            st["rejected"].append(version)
        if st["current"] == version:
            st["current"] = st["previous"]
        self.store.save()

    def _refuse(self, reason: str, data: bytes | None = None, version: int | None = None) -> None:
        if data:  # do not fetch the same bad artifact again when its announcement is re-sent
            self._refused.add(hashlib.sha256(data).hexdigest())
        self.counters["refused"] += 1
        self._event("refused", version, reason, logging.WARNING)

    def _event(self, state: str, version: int | None, detail: str, level: int = logging.INFO) -> None:
        named = version is not None and state != "refused"  # a refusal's reason names the version
        line = f"update {state}" + (f" v{version}" if named else "") + f": {detail}"
        log.log(level, "%s", line)
        self.last_event = {"state": state, "version": version, "detail": detail, "ts": round(time.time(), 3)}
        if self._client is not None and self.bundle is not None:
            try:
                self._client.publish(report_topic(self.prefix, self._model, self.node_id),
                                     json.dumps({"node": self.node_id, **self.status()}).encode(), qos=1, retain=True)
            except Exception:  # noqa: BLE001 - a report is best effort
                log.debug("update report not sent", exc_info=True)

    # -- status --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """For the owner's status message: what runs, what is kept, the last update event."""
        st = self.store.state
        w = self._watch
        return {"model": self.bundle.name if self.bundle else None,
                "version": self.bundle.version if self.bundle else None,
                "previous": st["previous"], "rejected": list(st["rejected"]),
                "watching": None if w is None else {"version": w.version, "frames": w.frames},
                "last_event": self.last_event, "counters": dict(self.counters)}

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Tests and CLIs: wait until queued updates are processed (not the watch)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._tasks.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False


def _check_boundary(current: Bundle, candidate: Bundle) -> None:
    """An update must keep the boundary tensors (end->edge, edge->cloud) as they were: nodes still
    on the parent version, and tiers that were not updated, exchange features with this one."""
    if current.feature_encoding != candidate.feature_encoding:
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
