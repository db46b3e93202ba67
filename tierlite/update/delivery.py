"""Update delivery over MQTT: an artifact cut into retained chunks (`chunk_artifact`) and put back
together on the node (`ChunkAssembler`), the signed announcement a node reads
(`parse_announcement`) and the rollout share that says whether it takes it (`in_rollout`).
Topics: tierlite.topics; layout: docs/protocol.md (Model updates)."""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Iterable

from tierlite.config import MAX_ARTIFACT_BYTES
from tierlite.errors import ConfigError, UpdateError
from tierlite.update.artifacts import ARTIFACT_FORMAT
from tierlite.update.signing import verify_document

__all__ = ["CHUNK_MAGIC", "ChunkAssembler", "DEFAULT_CHUNK_BYTES", "ReassemblyError", "chunk_artifact", "in_rollout", "parse_announcement"]

DEFAULT_CHUNK_BYTES = 64 * 1024  # well under the 128-256 KiB message caps of small MQTT stacks
CHUNK_MAGIC = b"TLU1"
_CHUNK_HEADER = struct.Struct(">4sIII32s")  # magic, index, count, artifact bytes, artifact sha256


def chunk_artifact(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """Cut an artifact into MQTT payloads: header (magic, index, count, total, sha256) + data."""
    if chunk_bytes < 1:
        raise ConfigError("chunk size must be positive")
    digest = hashlib.sha256(data).digest()
    count = max(1, -(-len(data) // chunk_bytes))
    return [_CHUNK_HEADER.pack(CHUNK_MAGIC, i, count, len(data), digest) + data[i * chunk_bytes:(i + 1) * chunk_bytes]
            for i in range(count)]



class ReassemblyError(UpdateError):
    """Every chunk arrived but together they are not the announced artifact (truncated or corrupt)."""


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
            raise ReassemblyError(f"reassembled artifact is {len(data):,} bytes with a different sha256 "
                              f"than announced ({self.size:,} B): truncated or corrupt")
        return data

    @property
    def missing(self) -> int:
        return self.count - len(self.parts)



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
