"""Issue 12, items 5/7: bounded stores (range checks, failed flushes keep their batch, size/age
limits with counted eviction, disk full, corrupt files), bounded frame uploads, rate limiting and
log throttling helpers."""
from __future__ import annotations

import logging
import sqlite3
import time

import numpy as np
import pytest

from test_update import keys  # noqa: F401  (fixture: an update signing key pair)


def _row(i: int, **over) -> dict:
    row = dict(node=f"cam{i % 2}", frame_id=i, bundle_name="digits", bundle_version=1, sent_us=1_700_000_000_000_000 + i,
               feature=bytes(64), feature_shape=(1, 2, 2, 16), feature_scale=0.04, feature_zero_point=-128,
               logits={t: np.full(10, 0.1, np.float32) for t in ("end", "edge", "cloud")}, label=i % 10,
               confidence=0.5, entropy=0.4)
    row.update(over)
    return row


def test_store_range_checks_every_field_and_never_drops_a_batch(tmp_path, caplog):
    """The attack: one escalation with a send time >= 2^63 (a u64 on the wire) used to raise
    OverflowError in SQLite and lose the whole batch around it."""
    from tierlite.cloud.store import HardExampleStore

    store = HardExampleStore(tmp_path / "hard.sqlite", batch=8, flush_interval=60)
    for i in range(20):
        store.add(**_row(i, sent_us=(1 << 64) - 1 if i % 5 == 0 else 1_700_000_000_000_000 + i))
    store.add(**_row(100, frame_id=1 << 40))  # beyond u32: refused, alone
    store.add(**_row(101, confidence=float("nan")))
    store.add(**_row(102, node="x" * 1000))
    store.add(**_row(103, bundle_version=-1))
    store.flush()
    assert store.count() == 20 and store.written == 20
    assert store.events["clamped"] == 4 and store.events["invalid"] == 4
    rows = list(store.iter_examples())
    assert [r.sent_us is None for r in rows] == [i % 5 == 0 for i in range(20)]
    # even a row that slips past the checks costs only itself, not its batch
    store.add(**_row(200))
    store._buffer.append(tuple(1 << 70 if k == 1 else v for k, v in enumerate(store._buffer[0])))
    store.add(**_row(201))
    assert store.flush() == 2 and store.count() == 22 and store.events["invalid"] == 5
    store.close()


def test_store_failed_flush_keeps_its_batch_bounded_and_retries(tmp_path):
    from tierlite.cloud.store import HardExampleStore

    store = HardExampleStore(tmp_path / "hard.sqlite", batch=4, flush_interval=0.01, max_pending=10)
    real = store._db

    class Full:  # every write fails as on a full disk (SQLITE_FULL is an OperationalError)
        def __getattr__(self, name):
            return getattr(real, name)

        def executemany(self, *a):
            raise sqlite3.OperationalError("database or disk is full")

    store._db = Full()
    for i in range(30):
        store.add(**_row(i))  # never raises: answers go on
        store._retry_at = 0.0
    assert store.pending == 10 and store.events["dropped"] == 20 and store.events["failed_flush"] >= 5
    store._db = real  # space again: the kept rows (the newest 10) reach the file
    store._retry_at = 0.0
    time.sleep(0.02)
    assert store.flush_if_due() == 10
    assert store.count() == 10 and [r.frame_id for r in store.iter_examples()] == list(range(20, 30))
    store.close()


def test_store_real_disk_full_degrades(tmp_path):
    """A real SQLITE_FULL (max_page_count caps the file as a full disk would)."""
    from tierlite.cloud.store import HardExampleStore

    store = HardExampleStore(tmp_path / "hard.sqlite", batch=16, flush_interval=60, max_rows=None,
                             max_bytes=None, max_pending=100)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 3}")
    for i in range(400):
        store.add(**_row(i, feature=bytes(4000)))
        store._retry_at = 0.0
    assert store.events["failed_flush"] > 0 and store.pending <= 100 and store.events["dropped"] > 0
    store.close()


def test_store_evicts_oldest_by_rows_bytes_and_age(tmp_path):
    from tierlite.cloud.store import HardExampleStore

    store = HardExampleStore(tmp_path / "rows.sqlite", batch=10, flush_interval=60, max_rows=100)
    for i in range(250):
        store.add(**_row(i))
    store.flush()
    assert 95 <= store.count() <= 100 and store.events["evicted"] >= 150
    assert min(r.frame_id for r in store.iter_examples()) > 100  # the oldest went first
    store.close()

    store = HardExampleStore(tmp_path / "bytes.sqlite", batch=10, flush_interval=60, max_rows=None,
                             max_bytes=400_000)
    for i in range(300):
        store.add(**_row(i, feature=bytes(4000)))
    store.flush()
    assert store.used_bytes() <= 400_000 + 50_000 and store.events["evicted"] > 100
    store.close()

    store = HardExampleStore(tmp_path / "age.sqlite", batch=5, flush_interval=60, max_age_s=3600)
    for i in range(5):
        store.add(**_row(i))
    store.flush()
    store._db.execute("UPDATE hard_examples SET ts = ts - 7200 WHERE frame_id < 3")
    store._db.commit()
    store._age_checked = 0.0
    for i in range(5, 10):
        store.add(**_row(i))
    store.flush()
    assert store.count() == 7 and store.events["evicted"] == 3
    store.close()


def test_corrupt_store_is_moved_aside_and_a_fresh_one_started(tmp_path, caplog):
    from tierlite.cloud.store import HardExampleStore

    path = tmp_path / "hard.sqlite"
    path.write_bytes(b"this is no SQLite file" * 500)
    with caplog.at_level(logging.ERROR, logger="tierlite.cloud.store"):
        store = HardExampleStore(path, batch=1)
    assert "CORRUPT" in caplog.text and store.events["recovered"] == 1
    aside = store.moved_aside[0]
    assert aside.exists() and aside.read_bytes().startswith(b"this is no SQLite")
    store.add(**_row(1))
    assert store.count() == 1
    store.close()

    # a valid header with damaged pages inside
    good = tmp_path / "good.sqlite"
    store = HardExampleStore(good, batch=50)
    for i in range(200):
        store.add(**_row(i, feature=bytes(2000)))
    store.close()
    sqlite3.connect(good).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    data = bytearray(good.read_bytes())
    data[8192:8192 + 20000] = bytes(range(256)) * 78 + bytes(20000 - 256 * 78)
    good.write_bytes(bytes(data))
    store = HardExampleStore(good, batch=1)
    assert store.events["recovered"] == 1 and store.count() == 0
    store.close()


def test_frame_store_bounded_per_node_and_in_bytes(tmp_path):
    from tierlite.cloud.frames import FrameCollector, FrameStore
    from tierlite.update.frame_upload import encode_frame_upload

    class FakeMqtt:
        def subscribe(self, *a, **k):
            pass

    store = FrameStore(tmp_path / "frames.sqlite", per_node_max_rows=30, max_bytes=200_000)
    col = FrameCollector(store, FakeMqtt(), "tl", per_node_rate=1000.0, per_node_burst=1000)
    jpeg = b"\xff\xd8" + bytes(998)
    for i in range(100):
        col.on_upload("tl/update/digits/frames/flood", encode_frame_upload(jpeg, 1))
    for i in range(10):
        col.on_upload("tl/update/digits/frames/calm", encode_frame_upload(jpeg, 1))
    assert store.count() == 40 and col.stored == 110 and store.evicted == 70
    # out-of-range header fields are refused, not raised
    bad = b"TLF1" + len(b'{"version": 18446744073709551616}').to_bytes(4, "big") + b'{"version": 18446744073709551616}' + jpeg
    col.on_upload("tl/update/digits/frames/calm", bad)
    assert col.dropped == 1
    # byte bound
    for i in range(30):
        for n in range(10):
            col.on_upload(f"tl/update/digits/frames/n{n}", encode_frame_upload(b"\xff\xd8" + bytes(4000), 1))
    assert store._bytes <= 200_000 and store.evicted > 70
    store.close()

    # the per-node rate: a burst, then about `rate` per second
    store = FrameStore(tmp_path / "frames2.sqlite")
    col = FrameCollector(store, FakeMqtt(), "tl", per_node_rate=1.0, per_node_burst=5)
    for i in range(50):
        col.on_upload("tl/update/digits/frames/flood", encode_frame_upload(jpeg, 1))
    col.on_upload("tl/update/digits/frames/calm", encode_frame_upload(jpeg, 1))
    assert col.stored == 6 and col.limited == 45
    store.close()


def test_keyed_buckets_and_log_throttle():
    from tierlite.ratelimit import KeyedBuckets, LogThrottle

    now = [0.0]
    b = KeyedBuckets(rate=10, burst=5, max_keys=3, clock=lambda: now[0])
    assert sum(b.allow("a") for _ in range(20)) == 5
    now[0] += 0.5
    assert sum(b.allow("a") for _ in range(20)) == 5
    for k in "bcde":
        b.allow(k)
    assert len(b) == 3

    records = []

    class H(logging.Handler):
        def emit(self, r):
            records.append(r.getMessage())

    lg = logging.getLogger("test.throttle")
    lg.addHandler(H())
    lg.setLevel(logging.INFO)
    t = LogThrottle(interval=10, clock=lambda: now[0])
    for i in range(1000):
        t.log(lg, logging.WARNING, "bad", "refused %d", i)
    t.log(lg, logging.WARNING, "other", "other %d", 0)
    now[0] += 11
    t.log(lg, logging.WARNING, "bad", "refused %d", 1000)
    assert records == ["refused 0", "other 0", "refused 1000 (999 more like this in the last 10 s)"]


def test_metrics_node_labels_are_bounded():
    """10,000 invented node ids used to grow /metrics to 2 MB: only provisioned (or the first N)
    nodes get a label, the rest count under "other"."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import generate_latest

    from tierlite.metrics import TierMetrics

    m = TierMetrics("edge")
    m.configure_labels(["cam1", "cam2"])
    for i in range(10_000):
        m.frame(f"evil{i}", "answered", 100, 0.001, 0.01)
        m.budget_reject(f"evil{i}")
    m.frame("cam1", "answered", 100, 0.001, 0.01)
    text = generate_latest(m.registry).decode()
    assert len(text) < 20_000
    assert 'node="other"' in text and 'node="cam1"' in text and "evil" not in text
    assert 'tierlite_frames_total{node="other",outcome="answered",tier="edge"} 10000.0' in text

    m = TierMetrics("cloud")
    m.configure_labels(None, max_nodes=5)
    for i in range(1000):
        m.frame(f"n{i % 50}", "answered", 10, 0.001, None)
    text = generate_latest(m.registry).decode()
    assert sum(f'node="n{i}"' in text for i in range(50)) == 5 and 'node="other"' in text


def test_bundle_archive_extraction_is_bounded_and_cleaned_up(tmp_path, monkeypatch):
    import io
    import tarfile
    import tempfile

    from tierlite.bundle import Bundle, _extract_archive
    from tierlite.errors import BundleError

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def archive(name: str, members: dict[str, int]) -> str:
        p = tmp_path / name
        with tarfile.open(p, "w:gz") as tar:
            for m, size in members.items():
                info = tarfile.TarInfo(m)
                info.size = size
                tar.addfile(info, io.BytesIO(bytes(size)))
        return p

    big = archive("big.tar.gz", {"manifest.json": 10, "a.tflite": 50_000})
    with pytest.raises(BundleError, match="more than"):
        _extract_archive(big, max_bytes=10_000)
    many = archive("many.tar.gz", {f"f{i}": 1 for i in range(1001)})
    with pytest.raises(BundleError, match="files"):
        _extract_archive(many)
    not_a_bundle = archive("nob.tar.gz", {"x.bin": 100})
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.load(not_a_bundle)
    assert list(scratch.iterdir()) == [], "nothing left in the temp dir"


def test_back_to_back_updates_keep_the_pre_swap_baseline(tmp_path, keys):  # noqa: F811
    """Two honest updates in a row: the second used to be judged against an empty escalation
    history (baseline 0) and rolled back. It is judged against the rate of the model it replaces."""
    from test_update import Node, _publish, _wait

    node = Node(tmp_path, keys)
    node.serve(30, escalate=True)  # a model that escalates everything: baseline 1.0
    node.mgr.submit(_publish(tmp_path, keys, 2, node.v1))
    assert node.mgr.wait_idle() and node.swaps == [2]
    node.serve(25, escalate=True)
    assert _wait(lambda: node.mgr.last_event.get("state") == "confirmed")
    node.mgr.submit(_publish(tmp_path, keys, 3, node.running))  # at once: no frames since the verdict
    assert node.mgr.wait_idle() and node.swaps == [2, 3]
    node.serve(25, escalate=True)
    assert _wait(lambda: node.mgr.last_event.get("state") in ("confirmed", "rolled_back"))
    assert node.mgr.last_event["state"] == "confirmed", node.mgr.last_event
    assert node.swaps == [2, 3] and node.running.version == 3
    node.mgr.close()


def test_cloud_workers_child_configs(tmp_path):
    from tierlite.cloud.supervisor import child_config
    from tierlite.config import CloudConfig, config_from_dict

    (tmp_path / "b").mkdir()
    cfg = config_from_dict({"bundle": str(tmp_path / "b"), "store": {"path": str(tmp_path / "hard.sqlite")},
                            "metrics_port": 9500}, CloudConfig, "cloud.yaml", tmp_path)
    assert child_config(cfg, 0, 1) is cfg
    c0, c2 = child_config(cfg, 0, 3), child_config(cfg, 2, 3)
    assert (c0.worker_id, c0.store.path, c0.metrics_port) == ("cloud-0", str(tmp_path / "hard.sqlite"), 9500)
    assert (c2.worker_id, c2.store.path, c2.metrics_port, c2.retrain) == ("cloud-2", str(tmp_path / "hard-2.sqlite"),
                                                                          9502, None)
