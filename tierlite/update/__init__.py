"""Signed model updates, node side: what every tier that hot-swaps a model (camera nodes, edge
workers) needs to take one. An update travels: announcement -> chunks -> artifact -> staged
version -> shadow check -> swap -> watch -> confirm or roll back.

  signing       trusted keys, signature checks          artifacts     reading and vetting artifacts
  delivery      chunks, announcements, rollout share    frame_upload  opted-in frames' codec
  versions      the versions kept on disk               manager       UpdateManager, the whole cycle

Publishing (keys, packing, announcing, rollout) is the cloud's: tierlite.cloud.signing,
.publish, .rollout. docs/UPDATES.md and docs/protocol.md have the details.
"""
from tierlite.errors import UpdateError
from tierlite.update.artifacts import ARTIFACT_FORMAT, Artifact, check_boundary, read_artifact, vet_artifact
from tierlite.update.delivery import (
    DEFAULT_CHUNK_BYTES, ChunkAssembler, chunk_artifact, in_rollout, parse_announcement,
)
from tierlite.update.frame_upload import decode_frame_upload, encode_frame_upload
from tierlite.update.manager import UpdateManager
from tierlite.update.signing import canonical_json, key_id, load_public_key, verify_document
from tierlite.update.versions import VersionStore

__all__ = [
    "ARTIFACT_FORMAT", "Artifact", "ChunkAssembler", "DEFAULT_CHUNK_BYTES", "UpdateError", "UpdateManager",
    "VersionStore", "canonical_json", "check_boundary", "chunk_artifact", "decode_frame_upload",
    "encode_frame_upload", "in_rollout", "key_id", "load_public_key", "parse_announcement", "read_artifact",
    "verify_document", "vet_artifact",
]
