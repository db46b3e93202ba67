"""The hard-example store: every frame that reached the cloud tier, in SQLite (WAL mode, batched
commits), for the retraining job.

Write side (the cloud worker): add() buffers rows and commits every `batch` rows or
`flush_interval` seconds (flush_if_due(), called from the worker's housekeeping loop).

Read side (retraining, any process, also while the worker writes; WAL readers never block it):

    from tierlite.cloud.store import HardExampleStore
    with HardExampleStore.open_readonly("hard_examples.sqlite") as store:
        store.count(bundle_name="digits-small")
        for ex in store.iter_examples(bundle_name="digits-small", min_version=1):
            ex.feature_array()        # edge->cloud feature, int8 (1, H, W, C)
            ex.end_feature_array()    # node->edge feature as int8 (binary decoded), or None
            ex.logits["end"], ex.logits["edge"], ex.logits["cloud"]   # float32 (classes,)
            ex.label, ex.confidence   # the cloud's answer
        arrays = store.read_arrays(bundle_name="digits-small")   # the same, stacked numpy arrays

Table `hard_examples` (one row per escalated frame):
  id INTEGER PK, ts REAL (unix s, cloud receive time), sent_us INTEGER (node send time),
  node TEXT, frame_id INTEGER, bundle_name TEXT, bundle_version INTEGER,
  feature BLOB, feature_shape TEXT (JSON), feature_scale REAL, feature_zero_point INTEGER,
  end_feature BLOB NULL, end_feature_shape TEXT NULL, end_feature_encoding TEXT NULL (JSON),
  end_feature_scale REAL NULL, end_feature_zero_point INTEGER NULL,
  end_logits BLOB, edge_logits BLOB, cloud_logits BLOB (float32 little-endian),
  label INTEGER, confidence REAL, entropy REAL
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from tierlite.bundle import FeatureEncoding
from tierlite.errors import TierliteError
from tierlite.wire import decode_feature

__all__ = ["COLUMNS", "HardExample", "HardExampleStore", "SCHEMA_VERSION", "StoreError"]

SCHEMA_VERSION = 1
COLUMNS = ("ts", "sent_us", "node", "frame_id", "bundle_name", "bundle_version",
           "feature", "feature_shape", "feature_scale", "feature_zero_point",
           "end_feature", "end_feature_shape", "end_feature_encoding", "end_feature_scale", "end_feature_zero_point",
           "end_logits", "edge_logits", "cloud_logits", "label", "confidence", "entropy")
_CREATE = f"""
CREATE TABLE IF NOT EXISTS hard_examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL, sent_us INTEGER, node TEXT NOT NULL, frame_id INTEGER NOT NULL,
    bundle_name TEXT NOT NULL, bundle_version INTEGER NOT NULL,
    feature BLOB NOT NULL, feature_shape TEXT NOT NULL, feature_scale REAL NOT NULL, feature_zero_point INTEGER NOT NULL,
    end_feature BLOB, end_feature_shape TEXT, end_feature_encoding TEXT, end_feature_scale REAL, end_feature_zero_point INTEGER,
    end_logits BLOB NOT NULL, edge_logits BLOB NOT NULL, cloud_logits BLOB NOT NULL,
    label INTEGER NOT NULL, confidence REAL NOT NULL, entropy REAL NOT NULL);
CREATE INDEX IF NOT EXISTS hard_examples_bundle ON hard_examples (bundle_name, bundle_version);
CREATE INDEX IF NOT EXISTS hard_examples_ts ON hard_examples (ts);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
"""


class StoreError(TierliteError):
    """The store file cannot be opened or has an unknown schema."""


@dataclass
class HardExample:
    id: int
    ts: float
    sent_us: int | None
    node: str
    frame_id: int
    bundle_name: str
    bundle_version: int
    feature: bytes
    feature_shape: tuple[int, ...]
    feature_scale: float
    feature_zero_point: int
    end_feature: bytes | None
    end_feature_shape: tuple[int, ...] | None
    end_feature_encoding: FeatureEncoding | None
    end_feature_scale: float | None
    end_feature_zero_point: int | None
    logits: dict[str, np.ndarray]  # "end", "edge", "cloud" -> float32 (classes,)
    label: int
    confidence: float
    entropy: float

    def feature_array(self) -> np.ndarray:
        """The cloud segment's input as the node's chain produced it (int8)."""
        return decode_feature(self.feature, self.feature_shape, FeatureEncoding.INT8)

    def end_feature_array(self) -> np.ndarray | None:
        """The end segment's feature (int8; bit-packed binary decoded to its two int8 levels)."""
        if self.end_feature is None:
            return None
        return decode_feature(self.end_feature, self.end_feature_shape, self.end_feature_encoding)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "HardExample":
        end_shape = tuple(json.loads(row["end_feature_shape"])) if row["end_feature_shape"] else None
        return cls(
            id=row["id"], ts=row["ts"], sent_us=row["sent_us"], node=row["node"], frame_id=row["frame_id"],
            bundle_name=row["bundle_name"], bundle_version=row["bundle_version"], feature=bytes(row["feature"]),
            feature_shape=tuple(json.loads(row["feature_shape"])), feature_scale=row["feature_scale"],
            feature_zero_point=row["feature_zero_point"],
            end_feature=bytes(row["end_feature"]) if row["end_feature"] is not None else None,
            end_feature_shape=end_shape,
            end_feature_encoding=(FeatureEncoding.from_manifest(json.loads(row["end_feature_encoding"]))
                                  if row["end_feature_encoding"] else None),
            end_feature_scale=row["end_feature_scale"], end_feature_zero_point=row["end_feature_zero_point"],
            logits={t: np.frombuffer(row[f"{t}_logits"], dtype="<f4").astype(np.float32) for t in ("end", "edge", "cloud")},
            label=row["label"], confidence=row["confidence"], entropy=row["entropy"])


class HardExampleStore:
    def __init__(self, path: str | Path, batch: int = 64, flush_interval: float = 0.5, readonly: bool = False):
        self.path = Path(path)
        self.batch, self.flush_interval = batch, flush_interval
        self.readonly = readonly
        self._lock = threading.Lock()
        self._buffer: list[tuple] = []
        self._last_flush = time.monotonic()
        self.written = 0
        try:
            if readonly:
                if not self.path.is_file():
                    raise StoreError(f"hard-example store not found: {self.path}")
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            else:
                self._db = sqlite3.connect(str(self.path), check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
                self._db.executescript(_CREATE)
                self._db.commit()
            self._db.row_factory = sqlite3.Row
            version = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"hard-example store {self.path}: {e}") from None
        if version is None or int(version[0]) != SCHEMA_VERSION:
            raise StoreError(f"hard-example store {self.path}: schema {version and version[0]}, "
                             f"this tierlite reads {SCHEMA_VERSION}")

    @classmethod
    def open_readonly(cls, path: str | Path) -> "HardExampleStore":
        return cls(path, readonly=True)

    def __enter__(self) -> "HardExampleStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- write -----------------------------------------------------------------------------------
    def add(self, *, node: str, frame_id: int, bundle_name: str, bundle_version: int, sent_us: int | None,
            feature: bytes, feature_shape: tuple[int, ...], feature_scale: float, feature_zero_point: int,
            logits: dict[str, np.ndarray], label: int, confidence: float, entropy: float,
            end_feature: bytes | None = None, end_feature_shape: tuple[int, ...] | None = None,
            end_feature_encoding: FeatureEncoding | dict | None = None, end_feature_scale: float | None = None,
            end_feature_zero_point: int | None = None) -> None:
        row = (time.time(), sent_us, node, frame_id, bundle_name, bundle_version,
               bytes(feature), json.dumps(list(feature_shape)), float(feature_scale), int(feature_zero_point),
               bytes(end_feature) if end_feature is not None else None,
               json.dumps(list(end_feature_shape)) if end_feature is not None else None,
               json.dumps(FeatureEncoding.of(end_feature_encoding).to_manifest()) if end_feature is not None else None,
               end_feature_scale if end_feature is not None else None,
               end_feature_zero_point if end_feature is not None else None,
               *(np.asarray(logits[t], dtype="<f4").tobytes() for t in ("end", "edge", "cloud")),
               int(label), float(confidence), float(entropy))
        with self._lock:
            self._buffer.append(row)
            full = len(self._buffer) >= self.batch
        if full:
            self.flush()

    def flush(self) -> int:
        with self._lock:
            rows, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
            if not rows:
                return 0
            self._db.executemany(f"INSERT INTO hard_examples ({', '.join(COLUMNS)}) "
                                 f"VALUES ({', '.join('?' * len(COLUMNS))})", rows)
            self._db.commit()
            self.written += len(rows)
            return len(rows)

    def flush_if_due(self) -> int:
        if self._buffer and time.monotonic() - self._last_flush >= self.flush_interval:
            return self.flush()
        return 0

    def close(self) -> None:
        if not self.readonly:
            self.flush()
        self._db.close()

    # -- read ------------------------------------------------------------------------------------
    @staticmethod
    def _where(bundle_name: str | None, bundle_version: int | None, min_version: int | None,
               since_id: int, node: str | None) -> tuple[str, list]:
        clauses, params = ["id > ?"], [since_id]
        for clause, value in (("bundle_name = ?", bundle_name), ("bundle_version = ?", bundle_version),
                              ("bundle_version >= ?", min_version), ("node = ?", node)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        return " AND ".join(clauses), params

    def count(self, bundle_name: str | None = None, bundle_version: int | None = None,
              min_version: int | None = None, since_id: int = 0, node: str | None = None) -> int:
        where, params = self._where(bundle_name, bundle_version, min_version, since_id, node)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM hard_examples WHERE {where}", params).fetchone()[0])

    def iter_examples(self, bundle_name: str | None = None, bundle_version: int | None = None,
                      min_version: int | None = None, since_id: int = 0, node: str | None = None,
                      limit: int | None = None, page: int = 512) -> Iterator[HardExample]:
        """Rows in id order (oldest first), fetched a page at a time."""
        where, params = self._where(bundle_name, bundle_version, min_version, since_id, node)
        last, left = since_id, limit
        while left is None or left > 0:
            n = page if left is None else min(page, left)
            with self._lock:
                rows = self._db.execute(f"SELECT * FROM hard_examples WHERE {where} "
                                        "ORDER BY id LIMIT ?", [last, *params[1:], n]).fetchall()
            if not rows:
                return
            for r in rows:
                yield HardExample.from_row(r)
            last = rows[-1]["id"]
            if left is not None:
                left -= len(rows)

    def read_arrays(self, **filters) -> dict[str, np.ndarray]:
        """Everything matching `filters` (as iter_examples) stacked: ids, features (N,...) int8,
        end_features (N,...) int8 when every row has one, {end,edge,cloud}_logits (N, C), labels,
        confidences, nodes, bundle_versions."""
        rows = list(self.iter_examples(**filters))
        out: dict[str, np.ndarray] = {
            "ids": np.array([r.id for r in rows], dtype=np.int64),
            "labels": np.array([r.label for r in rows], dtype=np.int64),
            "confidences": np.array([r.confidence for r in rows], dtype=np.float32),
            "nodes": np.array([r.node for r in rows], dtype=object),
            "bundle_versions": np.array([r.bundle_version for r in rows], dtype=np.int64),
        }
        if rows:
            out["features"] = np.concatenate([r.feature_array() for r in rows])
            for t in ("end", "edge", "cloud"):
                out[f"{t}_logits"] = np.stack([r.logits[t] for r in rows])
            if all(r.end_feature is not None for r in rows):
                out["end_features"] = np.concatenate([r.end_feature_array() for r in rows])
        return out
