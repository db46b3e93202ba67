"""The frame-upload codec: what an opted-in node (`update.share_frames`) sends with an escalated
frame for retraining, b"TLF1" | u32 header length | {"version", "ts"} JSON | JPEG."""
from __future__ import annotations

import json
import struct
import time
from typing import Any

from tierlite.errors import UpdateError

__all__ = ["FRAME_MAGIC", "MAX_FRAME_JPEG_BYTES", "decode_frame_upload", "encode_frame_upload"]

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
