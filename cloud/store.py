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

Table `hard_examples` (one row per frame that reached the cloud: escalated, or audited):
  id INTEGER PK, ts REAL (unix s, cloud receive time), sent_us INTEGER (node send time),
  node TEXT, frame_id INTEGER, bundle_name TEXT, bundle_version INTEGER,
  feature BLOB, feature_shape TEXT (JSON), feature_scale REAL, feature_zero_point INTEGER,
  end_feature BLOB NULL, end_feature_shape TEXT NULL, end_feature_encoding TEXT NULL (JSON),
  end_feature_scale REAL NULL, end_feature_zero_point INTEGER NULL,
  end_logits BLOB, edge_logits BLOB, cloud_logits BLOB (float32 little-endian),
  label INTEGER, confidence REAL, entropy REAL,
  audit INTEGER (1: an audit, a confident frame the node answered itself and sent for scoring,
                 docs/DRIFT.md; 0: escalated because no lower tier was sure)

Schema 2 added `audit`. A schema-1 file is migrated when opened for writing (the column is added,
existing rows are escalations: audit 0) and read as it is when opened read-only.
"""
from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from tierlite.bundle import FeatureEncoding
from tierlite.errors import TierliteError
from tierlite.ratelimit import LogThrottle
from tierlite.wire import decode_feature

__all__ = ["COLUMNS", "HardExample", "HardExampleStore", "SCHEMA_VERSION", "STORE_EVENTS", "StoreError",
           "move_aside"]

log = logging.getLogger("tierlite.cloud.store")
_throttle = LogThrottle(10.0)
INT64_MAX = (1 << 63) - 1
U32_MAX = (1 << 32) - 1
# Counted store events (tierlite_store_events_total{event}): rows evicted by the size/age bounds,
# rows dropped while writes failed, rows refused by the range checks, sent times out of range
# (stored as NULL), flushes that failed (kept and retried), corrupt files moved aside, and the
# committed rows that went aside with a file found damaged while the store ran.
STORE_EVENTS = ("evicted", "dropped", "invalid", "clamped", "failed_flush", "recovered", "lost")
SQLITE_MAGIC = b"SQLite format 3\x00"

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: before the audit marker (every row an escalation)
COLUMNS = ("ts", "sent_us", "node", "frame_id", "bundle_name", "bundle_version",
           "feature", "feature_shape", "feature_scale", "feature_zero_point",
           "end_feature", "end_feature_shape", "end_feature_encoding", "end_feature_scale", "end_feature_zero_point",
           "end_logits", "edge_logits", "cloud_logits", "label", "confidence", "entropy", "audit")
_CREATE = f"""
CREATE TABLE IF NOT EXISTS hard_examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL, sent_us INTEGER, node TEXT NOT NULL, frame_id INTEGER NOT NULL,
    bundle_name TEXT NOT NULL, bundle_version INTEGER NOT NULL,
    feature BLOB NOT NULL, feature_shape TEXT NOT NULL, feature_scale REAL NOT NULL, feature_zero_point INTEGER NOT NULL,
    end_feature BLOB, end_feature_shape TEXT, end_feature_encoding TEXT, end_feature_scale REAL, end_feature_zero_point INTEGER,
    end_logits BLOB NOT NULL, edge_logits BLOB NOT NULL, cloud_logits BLOB NOT NULL,
    label INTEGER NOT NULL, confidence REAL NOT NULL, entropy REAL NOT NULL,
    audit INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS hard_examples_bundle ON hard_examples (bundle_name, bundle_version);
CREATE INDEX IF NOT EXISTS hard_examples_ts ON hard_examples (ts);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
"""
_MIGRATE_1_TO_2 = """
ALTER TABLE hard_examples ADD COLUMN audit INTEGER NOT NULL DEFAULT 0;
UPDATE meta SET value = '2' WHERE key = 'schema_version';
"""


class StoreError(TierliteError):
    """The store file cannot be opened or has an unknown schema."""


def _int_in(v, lo: int, hi: int) -> int | None:
    """int(v) when lo <= v <= hi, else None (SQLite integers are signed 64-bit)."""
    try:
        v = int(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return v if lo <= v <= hi else None


def _checked_int(v, lo: int, hi: int, what: str) -> int:
    out = _int_in(v, lo, hi)
    if out is None:
        raise ValueError(f"{what} {v!r} out of range [{lo}, {hi}]")
    return out


def _checked_float(v, what: str) -> float:
    out = float(v)
    if not math.isfinite(out):
        raise ValueError(f"{what} {v!r} is not finite")
    return out


def _is_corrupt(e: sqlite3.Error) -> bool:
    """A damaged file (not a database, malformed image), as opposed to a full disk or a lock."""
    return (isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError)) or \
        getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def move_aside(path: Path) -> Path:
    """Rename a damaged SQLite file (and its -wal/-shm) to <name>.corrupt-<UTC time>; returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    path.rename(aside)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.rename(aside.with_name(aside.name + suffix))
    return aside


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
    audit: bool = False  # a confident frame sent for scoring, not an escalation

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
            label=row["label"], confidence=row["confidence"], entropy=row["entropy"],
            audit=bool(row["audit"]) if "audit" in row.keys() else False)


class HardExampleStore:
    def __init__(self, path: str | Path, batch: int = 64, flush_interval: float = 0.5, readonly: bool = False, *,
                 max_rows: int | None = None, max_bytes: int | None = None, max_age_s: float | None = None,
                 max_pending: int = 10_000):
        self.path = Path(path)
        self.batch, self.flush_interval = batch, flush_interval
        self.readonly = readonly
        self.max_rows, self.max_bytes, self.max_age_s = max_rows, max_bytes, max_age_s
        self.max_pending = max(max_pending, batch)
        self._lock = threading.Lock()
        self._buffer: list[tuple] = []
        self._last_flush = time.monotonic()
        self._retry_at = 0.0  # after a failed flush: no new attempt before this (monotonic)
        self._failures = 0  # failed flushes in a row (backoff)
        self._age_checked = 0.0
        self.written = 0
        self.audits_written = 0  # of `written`, rows marked as audits
        self.events = dict.fromkeys(STORE_EVENTS, 0)
        self.moved_aside: list[Path] = []  # corrupt files this store moved aside
        try:
            if readonly:
                if not self.path.is_file():
                    raise StoreError(f"hard-example store not found: {self.path}")
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            else:
                try:
                    self._open_rw()
                except sqlite3.Error as e:
                    if not _is_corrupt(e):
                        raise
                    self._recover(e)
            self._db.row_factory = sqlite3.Row
            version = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            self.schema = int(version[0]) if version is not None and str(version[0]).isdigit() else None
            self._rows = int(self._db.execute("SELECT COUNT(*) FROM hard_examples").fetchone()[0])
        except sqlite3.Error as e:
            raise StoreError(f"hard-example store {self.path}: {e}") from None
        if self.schema not in READABLE_SCHEMAS:
            raise StoreError(f"hard-example store {self.path}: schema {version and version[0]}, "
                             f"this tierlite reads {', '.join(map(str, READABLE_SCHEMAS))}")

    @classmethod
    def from_config(cls, cfg) -> "HardExampleStore":
        """From a CloudConfig's `store:` section (tierlite.config.StoreConfig)."""
        return cls(cfg.path, cfg.batch, cfg.flush_interval, max_rows=cfg.max_rows, max_bytes=cfg.max_bytes,
                   max_age_s=cfg.max_age_days * 86400.0 if cfg.max_age_days else None, max_pending=cfg.max_pending)

    @classmethod
    def open_readonly(cls, path: str | Path) -> "HardExampleStore":
        return cls(path, readonly=True)

    def _open_rw(self) -> None:
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across app crashes
            self._db.executescript(_CREATE)
            self._db.commit()
            if self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1":
                self._db.executescript(_MIGRATE_1_TO_2)  # its own transaction: all or nothing
                self._db.commit()
                log.info("hard-example store %s: schema 1 -> 2 (audit marker; existing rows are escalations)",
                         self.path)
            check = self._db.execute("PRAGMA quick_check(1)").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check and check[0]}")
        except sqlite3.Error:
            self._db.close()
            raise
        st = self.path.stat()
        self._file_id = (st.st_dev, st.st_ino)

    def _file_problem(self) -> str | None:
        """What is wrong with the file under a running store, or None. SQLite (WAL, page cache) would
        go on committing into a file overwritten, truncated or replaced behind its back and lose every
        row at the next start: one stat and a 16-byte read per flush find it while the worker runs."""
        try:
            st = self.path.stat()
            with open(self.path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except FileNotFoundError:
            return "the file is gone"
        except OSError as e:
            return f"cannot read it ({e.strerror})"
        if (st.st_dev, st.st_ino) != self._file_id:
            return "the file was replaced"
        if head != SQLITE_MAGIC:
            return "its header is not SQLite's (overwritten or truncated)"
        return None

    def _recover(self, err: sqlite3.Error | str, lost: int = 0) -> None:
        """A corrupt file: move it aside (kept for forensics) and start a fresh one, loudly. `lost`:
        committed rows that were in it (counted; the buffered ones go to the fresh store)."""
        try:
            self._db.close()
        except sqlite3.Error:
            pass
        aside = move_aside(self.path) if self.path.exists() else None
        if aside is not None:
            self.moved_aside.append(aside)
        self.events["recovered"] += 1
        self.events["lost"] += lost
        log.error("HARD-EXAMPLE STORE %s IS CORRUPT (%s): %s, starting a fresh store%s", self.path, err,
                  f"moved aside to {aside}" if aside else "nothing to move aside",
                  f"; {lost} stored rows lost with it" if lost else "")
        self._open_rw()
        self._db.row_factory = sqlite3.Row
        self._rows = 0

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
            end_feature_zero_point: int | None = None, audit: bool = False) -> None:
        """Buffer one row (`audit`: a confident frame the node sent for scoring, docs/DRIFT.md). Never raises on bad values: every header field is range-checked (a send
        time outside SQLite's signed 64 bits is stored as NULL and counted as `clamped`; anything
        else out of range drops the row, counted as `invalid`)."""
        try:
            sent = None if sent_us is None else _int_in(sent_us, 0, INT64_MAX)
            if sent is None and sent_us is not None:
                self.events["clamped"] += 1
            if not isinstance(node, str) or not 0 < len(node) <= 256:
                raise ValueError(f"node id {node!r:.80}")
            has_end = end_feature is not None
            row = (time.time(), sent, node, _checked_int(frame_id, 0, U32_MAX, "frame_id"), str(bundle_name)[:256],
                   _checked_int(bundle_version, 0, U32_MAX, "bundle_version"),
                   bytes(feature), json.dumps([_checked_int(d, 0, 1 << 16, "dim") for d in feature_shape]),
                   _checked_float(feature_scale, "feature_scale"),
                   _checked_int(feature_zero_point, -(1 << 31), (1 << 31) - 1, "feature_zero_point"),
                   bytes(end_feature) if has_end else None,
                   json.dumps([_checked_int(d, 0, 1 << 16, "dim") for d in end_feature_shape]) if has_end else None,
                   json.dumps(FeatureEncoding.of(end_feature_encoding).to_manifest()) if has_end else None,
                   _checked_float(end_feature_scale, "end_feature_scale") if has_end else None,
                   _checked_int(end_feature_zero_point, -(1 << 31), (1 << 31) - 1, "end_feature_zero_point")
                   if has_end else None,
                   *(np.asarray(logits[t], dtype="<f4").tobytes() for t in ("end", "edge", "cloud")),
                   _checked_int(label, 0, INT64_MAX, "label"), _checked_float(confidence, "confidence"),
                   _checked_float(entropy, "entropy"), int(bool(audit)))
        except (TypeError, ValueError, OverflowError, KeyError, TierliteError) as e:
            self.events["invalid"] += 1
            _throttle.log(log, logging.WARNING, "invalid", "hard-example store: row refused (%d so far): %s",
                          self.events["invalid"], e)
            return
        with self._lock:
            self._buffer.append(row)
            full = len(self._buffer) >= self.batch and time.monotonic() >= self._retry_at
        if full:
            self.flush()

    @property
    def pending(self) -> int:
        """Rows buffered and not yet committed (held while writes fail, up to max_pending)."""
        return len(self._buffer)

    def _insert(self, rows: list[tuple]) -> int:
        sql = f"INSERT INTO hard_examples ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        try:
            self._db.executemany(sql, rows)
        except (OverflowError, ValueError, TypeError, sqlite3.InterfaceError, sqlite3.IntegrityError):
            # one bad row must not cost the batch: insert one by one and drop only the bad ones
            self._db.rollback()
            n = 0
            for row in rows:
                try:
                    self._db.execute(sql, row)
                    n += 1
                except (OverflowError, ValueError, TypeError, sqlite3.InterfaceError, sqlite3.IntegrityError):
                    self.events["invalid"] += 1
            self._db.commit()
            return n
        self._db.commit()
        return len(rows)

    def _write_failed(self, rows: list[tuple], e: sqlite3.Error) -> None:
        """Keep the batch (in front of what arrived since), bounded by max_pending; retry later."""
        try:
            self._db.rollback()
        except sqlite3.Error:
            pass
        self.events["failed_flush"] += 1
        self._failures += 1
        self._buffer = rows + self._buffer
        over = len(self._buffer) - self.max_pending
        if over > 0:
            del self._buffer[:over]
            self.events["dropped"] += over
        self._retry_at = time.monotonic() + min(30.0, self.flush_interval * 2 ** min(self._failures, 10))
        _throttle.log(log, logging.ERROR, "write", "hard-example store write failed (%d failed flushes, %d rows "
                      "pending, %d dropped): %s", self.events["failed_flush"], len(self._buffer),
                      self.events["dropped"], e)
        if _is_corrupt(e):
            try:
                self._recover(e, lost=self._rows)
            except (sqlite3.Error, OSError) as e2:
                log.error("hard-example store %s: could not start a fresh store: %s", self.path, e2)

    def _audits_since(self, n: int) -> int:
        """Audit rows among the last n inserted (when some rows of a batch were refused)."""
        return int(self._db.execute("SELECT COALESCE(SUM(audit), 0) FROM (SELECT audit FROM hard_examples "
                                    "ORDER BY id DESC LIMIT ?)", (n,)).fetchone()[0])

    def _delete_oldest(self, n: int) -> int:
        return self._db.execute("DELETE FROM hard_examples WHERE id IN "
                                "(SELECT id FROM hard_examples ORDER BY id LIMIT ?)", (max(0, n),)).rowcount

    def used_bytes(self) -> int:
        """Bytes of the pages in use (the file keeps freed pages for reuse)."""
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def _evict(self) -> int:
        """Apply the age, row and byte bounds, oldest rows first (called under the lock after a flush)."""
        evicted = 0
        now = time.time()
        if self.max_age_s is not None and now - self._age_checked >= 10.0:
            self._age_checked = now
            evicted += self._db.execute("DELETE FROM hard_examples WHERE ts < ?", (now - self.max_age_s,)).rowcount
        rows = self._rows - evicted
        if self.max_rows is not None and rows > self.max_rows:
            evicted += self._delete_oldest(rows - self.max_rows + self.max_rows // 100)  # 1 % headroom
        rows = self._rows - evicted
        if self.max_bytes is not None and rows > 0:
            used = self.used_bytes()
            if used > self.max_bytes:
                share = 1.0 - self.max_bytes / used
                evicted += self._delete_oldest(int(math.ceil(rows * share)) + rows // 100 + 1)
        if evicted:
            self._db.commit()
            self._rows -= evicted
            self.events["evicted"] += evicted
            _throttle.log(log, logging.INFO, "evict", "hard-example store: evicted %d oldest rows (%d in all), "
                          "%d rows kept", evicted, self.events["evicted"], self._rows)
        return evicted

    def flush(self) -> int:
        """Commit the buffer; returns the rows written. Never raises on a write failure (disk full,
        I/O error, corrupt file): the batch is kept, counted, and retried with a backoff."""
        with self._lock:
            rows, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
            if not rows:
                return 0
            problem = self._file_problem()
            if problem is not None:
                try:
                    self._recover(problem, lost=self._rows)
                except (sqlite3.Error, OSError) as e:
                    self._write_failed(rows, sqlite3.OperationalError(f"{problem}; no fresh store: {e}"))
                    return 0
            try:
                n = self._insert(rows)
            except sqlite3.Error as e:
                self._write_failed(rows, e)
                return 0
            self._failures, self._retry_at = 0, 0.0
            self.written += n
            self.audits_written += sum(r[-1] for r in rows) if n == len(rows) else self._audits_since(n)
            self._rows += n
            try:
                self._evict()
            except sqlite3.Error as e:
                try:
                    self._db.rollback()
                except sqlite3.Error:
                    pass
                _throttle.log(log, logging.ERROR, "evict", "hard-example store: eviction failed: %s", e)
            return n

    def flush_if_due(self) -> int:
        now = time.monotonic()
        if self._buffer and now - self._last_flush >= self.flush_interval and now >= self._retry_at:
            return self.flush()
        return 0

    def close(self) -> None:
        if not self.readonly:
            self._retry_at = 0.0
            self.flush()
            if self._buffer:
                log.error("hard-example store %s: %d rows could not be written at close", self.path,
                          len(self._buffer))
        self._db.close()

    # -- read ------------------------------------------------------------------------------------
    def _where(self, bundle_name: str | None, bundle_version: int | None, min_version: int | None,
               since_id: int, node: str | None, audit: bool | None = None) -> tuple[str, list]:
        clauses, params = ["id > ?"], [since_id]
        for clause, value in (("bundle_name = ?", bundle_name), ("bundle_version = ?", bundle_version),
                              ("bundle_version >= ?", min_version), ("node = ?", node)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if audit is not None:
            if self.schema == 1:  # a read-only schema-1 file: every row is an escalation
                clauses.append("0" if audit else "1")
            else:
                clauses.append("audit = ?")
                params.append(int(bool(audit)))
        return " AND ".join(clauses), params

    def count(self, bundle_name: str | None = None, bundle_version: int | None = None,
              min_version: int | None = None, since_id: int = 0, node: str | None = None,
              audit: bool | None = None) -> int:
        """Rows matching the filters; audit=True counts audits only, False escalations only."""
        where, params = self._where(bundle_name, bundle_version, min_version, since_id, node, audit)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM hard_examples WHERE {where}", params).fetchone()[0])

    def iter_examples(self, bundle_name: str | None = None, bundle_version: int | None = None,
                      min_version: int | None = None, since_id: int = 0, node: str | None = None,
                      limit: int | None = None, page: int = 512, audit: bool | None = None) -> Iterator[HardExample]:
        """Rows in id order (oldest first), fetched a page at a time."""
        where, params = self._where(bundle_name, bundle_version, min_version, since_id, node, audit)
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
        confidences, nodes, bundle_versions, audits (bool)."""
        rows = list(self.iter_examples(**filters))
        out: dict[str, np.ndarray] = {
            "ids": np.array([r.id for r in rows], dtype=np.int64),
            "labels": np.array([r.label for r in rows], dtype=np.int64),
            "confidences": np.array([r.confidence for r in rows], dtype=np.float32),
            "nodes": np.array([r.node for r in rows], dtype=object),
            "bundle_versions": np.array([r.bundle_version for r in rows], dtype=np.int64),
            "audits": np.array([r.audit for r in rows], dtype=bool),
        }
        if rows:
            out["features"] = np.concatenate([r.feature_array() for r in rows])
            for t in ("end", "edge", "cloud"):
                out[f"{t}_logits"] = np.stack([r.logits[t] for r in rows])
            if all(r.end_feature is not None for r in rows):
                out["end_features"] = np.concatenate([r.end_feature_array() for r in rows])
        return out
