"""Frames that opted-in nodes upload for retraining, and where the cloud keeps them.

A node with `update.share_frames: true` publishes the JPEG of each frame its end model escalated
(rate-limited) to `<prefix>/update/<model>/frames/<node>`, QoS 0:

    b"TLF1" | u32 big-endian header length | header JSON {"version", "ts"} | JPEG bytes

The cloud worker's FrameCollector (when its config has a `retrain:` section with frames on)
stores them in their own SQLite file beside the hard-example store; the retraining job reads
them only for nodes its privacy policy lists as `raw`. Nodes that did not opt in never send a
frame, so nothing but boundary features leaves them.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from tierlite import topics
from tierlite.data import decode_image
from tierlite.errors import TierliteError
from tierlite.update.frame_upload import decode_frame_upload

__all__ = ["FrameCollector", "FrameRecord", "FrameStore"]

log = logging.getLogger("tierlite.cloud.frames")

_CREATE = """
CREATE TABLE IF NOT EXISTS hard_frames (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, node TEXT NOT NULL,
    bundle_name TEXT NOT NULL, bundle_version INTEGER NOT NULL, jpeg BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS hard_frames_bundle ON hard_frames (bundle_name, ts);
"""


@dataclass
class FrameRecord:
    id: int
    ts: float
    node: str
    bundle_name: str
    bundle_version: int
    jpeg: bytes

    def image(self, size: tuple[int, int]) -> np.ndarray:
        return decode_image(self.jpeg, tuple(size))


class FrameStore:
    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            else:
                self._db = sqlite3.connect(str(self.path), check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(_CREATE)
                self._db.commit()
        except sqlite3.Error as e:
            raise TierliteError(f"frame store {self.path}: {e}") from None

    def __enter__(self) -> "FrameStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, node: str, bundle_name: str, bundle_version: int, jpeg: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT INTO hard_frames (ts, node, bundle_name, bundle_version, jpeg) VALUES (?,?,?,?,?)",
                             (time.time(), node, bundle_name, int(bundle_version), jpeg))
            self._db.commit()

    def count(self, bundle_name: str | None = None) -> int:
        with self._lock:
            if bundle_name is None:
                return int(self._db.execute("SELECT COUNT(*) FROM hard_frames").fetchone()[0])
            return int(self._db.execute("SELECT COUNT(*) FROM hard_frames WHERE bundle_name = ?",
                                        (bundle_name,)).fetchone()[0])

    def iter_frames(self, bundle_name: str, since: float | None = None) -> Iterator[FrameRecord]:
        with self._lock:
            rows = self._db.execute("SELECT id, ts, node, bundle_name, bundle_version, jpeg FROM hard_frames "
                                    "WHERE bundle_name = ? AND ts >= ? ORDER BY id",
                                    (bundle_name, since or 0.0)).fetchall()
        for r in rows:
            yield FrameRecord(r[0], r[1], r[2], r[3], r[4], bytes(r[5]))

    def close(self) -> None:
        self._db.close()


class FrameCollector:
    """Subscribes to every node's frame uploads for the cloud's models and stores them."""

    def __init__(self, store: FrameStore, mqtt, prefix: str):
        self.store, self.prefix = store, prefix
        self.stored = self.dropped = 0
        mqtt.subscribe(topics.frame_uploads(prefix), self.on_upload, qos=0)

    def on_upload(self, topic: str, payload: bytes) -> None:
        try:
            model, node = topics.frame_upload_source(topic)
            header, jpeg = decode_frame_upload(payload)
            self.store.add(node, model, int(header["version"]), jpeg)
            self.stored += 1
        except (TierliteError, ValueError, sqlite3.Error) as e:
            self.dropped += 1
            if self.dropped <= 5 or self.dropped % 1000 == 0:
                log.warning("dropped a frame upload on %s (%d so far): %s", topic, self.dropped, e)
