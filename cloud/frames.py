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
from tierlite.ratelimit import KeyedBuckets, LogThrottle
from tierlite.update.frame_upload import decode_frame_upload

__all__ = ["FrameCollector", "FrameRecord", "FrameStore"]

log = logging.getLogger("tierlite.cloud.frames")

_CREATE = """
CREATE TABLE IF NOT EXISTS hard_frames (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, node TEXT NOT NULL,
    bundle_name TEXT NOT NULL, bundle_version INTEGER NOT NULL, jpeg BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS hard_frames_bundle ON hard_frames (bundle_name, ts);
CREATE INDEX IF NOT EXISTS hard_frames_node ON hard_frames (node, id);
"""
U32_MAX = (1 << 32) - 1


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
    """Bounded: at most `per_node_max_rows` frames per node and `max_bytes` of JPEG in all (oldest
    evicted first, counted in `evicted`); a corrupt file is moved aside and a fresh one started."""

    def __init__(self, path: str | Path, readonly: bool = False, *, per_node_max_rows: int | None = 5_000,
                 max_bytes: int | None = 1 << 30):
        from tierlite.cloud.store import _is_corrupt, move_aside

        self.path = Path(path)
        self._lock = threading.Lock()
        self.per_node_max_rows, self.max_bytes = per_node_max_rows, max_bytes
        self.evicted = 0
        self._node_rows: dict[str, int] = {}
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            else:
                try:
                    self._open_rw()
                except sqlite3.Error as e:
                    if not _is_corrupt(e):
                        raise
                    aside = move_aside(self.path)
                    log.error("FRAME STORE %s IS CORRUPT (%s): moved aside to %s, starting a fresh one",
                              self.path, e, aside)
                    self._open_rw()
                self._bytes = int(self._db.execute("SELECT COALESCE(SUM(LENGTH(jpeg)), 0) FROM hard_frames")
                                  .fetchone()[0])
        except sqlite3.Error as e:
            raise TierliteError(f"frame store {self.path}: {e}") from None

    def _open_rw(self) -> None:
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_CREATE)
            self._db.commit()
        except sqlite3.Error:
            self._db.close()
            raise

    def __enter__(self) -> "FrameStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, node: str, bundle_name: str, bundle_version: int, jpeg: bytes) -> None:
        """Store one frame (ValueError for out-of-range fields), then apply the bounds."""
        if not isinstance(bundle_version, int) or not 0 <= bundle_version <= U32_MAX:
            raise ValueError(f"bundle version {bundle_version!r:.40} out of range")
        if not 0 < len(node) <= 256 or not 0 < len(bundle_name) <= 256:
            raise ValueError("node or bundle name length out of range")
        with self._lock:
            try:
                self._db.execute("INSERT INTO hard_frames (ts, node, bundle_name, bundle_version, jpeg) "
                                 "VALUES (?,?,?,?,?)", (time.time(), node, bundle_name, bundle_version, jpeg))
                self._bytes += len(jpeg)
                n = self._node_rows.get(node)
                if n is None:
                    n = int(self._db.execute("SELECT COUNT(*) FROM hard_frames WHERE node = ?", (node,)).fetchone()[0])
                    if len(self._node_rows) > 100_000:
                        self._node_rows.clear()
                else:
                    n += 1
                evicted = 0
                if self.per_node_max_rows is not None and n > self.per_node_max_rows:
                    evicted += self._evict("WHERE node = ?", (node,), n - self.per_node_max_rows)
                    n = self.per_node_max_rows
                self._node_rows[node] = n
                if self.max_bytes is not None and self._bytes > self.max_bytes:
                    over = self._bytes - self.max_bytes
                    avg = max(1, self._bytes // max(1, self._db.execute("SELECT COUNT(*) FROM hard_frames")
                                                    .fetchone()[0]))
                    evicted += self._evict("", (), over // avg + 1)
                    self._node_rows.clear()  # recounted lazily
                self._db.commit()
                self.evicted += evicted
            except sqlite3.Error:
                self._db.rollback()
                raise

    def _evict(self, where: str, params: tuple, n: int) -> int:
        rows = self._db.execute(f"SELECT id, LENGTH(jpeg) FROM hard_frames {where} ORDER BY id LIMIT ?",
                                (*params, n)).fetchall()
        if rows:
            self._db.execute(f"DELETE FROM hard_frames WHERE id <= ? {where.replace('WHERE', 'AND')}",
                             (rows[-1][0], *params))
            self._bytes -= sum(r[1] for r in rows)
        return len(rows)

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

    def __init__(self, store: FrameStore, mqtt, prefix: str, per_node_rate: float = 1.0, per_node_burst: int = 20):
        self.store, self.prefix = store, prefix
        self.stored = self.dropped = self.limited = 0
        self._budget = KeyedBuckets(per_node_rate, per_node_burst)
        self._throttle = LogThrottle(10.0)
        mqtt.subscribe(topics.frame_uploads(prefix), self.on_upload, qos=0)
        mqtt.subscribe(topics.site_frame_uploads(prefix), self.on_upload, qos=0)  # site bridges

    def on_upload(self, topic: str, payload: bytes) -> None:
        try:
            model, sender = topics.update_sender(topic, self.prefix, "frames")
            node = sender.key  # <site>/<node>: node ids are unique per site only
            if not self._budget.allow(node):  # per node: uploads/s with a burst
                self.limited += 1
                self._throttle.log(log, logging.WARNING, "limited", "frame uploads over the per-node rate "
                                   "(%d refused so far; last from %s)", self.limited, node[:64])
                return
            header, jpeg = decode_frame_upload(payload)
            self.store.add(node, model, int(header["version"]), jpeg)
            self.stored += 1
        except (TierliteError, ValueError, OverflowError, TypeError, sqlite3.Error) as e:
            self.dropped += 1
            self._throttle.log(log, logging.WARNING, type(e).__name__, "dropped a frame upload on %s (%d so far): %s",
                               topic[:100], self.dropped, e)
