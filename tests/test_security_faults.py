"""Issue 12 faults against real processes: the cloud worker's hard-example store corrupted on disk
while the worker runs (a real `tierlite cloud` process, a real Mosquitto, real escalations).
The broker frozen by SIGSTOP is in tests/test_runtime_sites.py (it reuses that module's two-site stack)."""
from __future__ import annotations

import os
import sqlite3
import urllib.request

import pytest

from runtime_support import Mosquitto, Proc, Watcher, free_port, wait_until, write_yaml

pytestmark = pytest.mark.timeout(180)
PREFIX = "tierlite"


def _escalations(bundle_dir, digits_dir, n: int) -> list[bytes]:
    """n real ESCALATE payloads: real frames through the end and edge segments, frame ids 1..n."""
    from tierlite import wire
    from tierlite.bundle import Bundle
    from tierlite.data import load_image_folder
    from tierlite.segment import Segment

    bundle = Bundle.load(bundle_dir)
    images = load_image_folder(digits_dir / "test", size=tuple(bundle.input_shape[1:3]), limit=n, seed=0).images
    end, edge = Segment(bundle, "end"), Segment(bundle, "edge")
    spec_in, spec_out = wire.boundary_spec(bundle, wire.Kind.FEATURE), wire.boundary_spec(bundle, wire.Kind.ESCALATE)
    out = []
    for i, img in enumerate(images):
        e = end.run(img[None])
        m = wire.decode_tensor_message(wire.encode_tensor_message(spec_in, i + 1, e.feature, [e.logits]), spec_in)
        o = edge.run(m.tensor)
        out.append(wire.encode_tensor_message(spec_out, i + 1, o.feature, [m.exit_logits[0], o.logits],
                                              end_feature=m.feature))
    return out


def _metric(port: int, line_start: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return values[0] if values else 0.0


def test_store_corrupted_under_a_running_cloud_worker(tmp_path, small_bundle_dir, digits_dir):
    """Overwrite the store's SQLite file while the worker runs. Before: SQLite (WAL, page cache) kept
    committing into the garbage file without an error, and every row was lost at the next start.
    Now: the next flush finds it, moves it aside with one log line, starts a fresh store, counts the
    rows that went with it (tierlite_store_events_total{event="lost"}), and the worker never stops
    answering."""
    from tierlite import wire

    payloads = _escalations(small_bundle_dir, digits_dir, 60)
    broker = Mosquitto(tmp_path / "broker").start()
    store, metrics_port = tmp_path / "hard.sqlite", free_port()
    cfg = write_yaml(tmp_path / "cloud.yaml", {
        "bundle": str(small_bundle_dir), "broker": {"port": broker.port}, "metrics_port": metrics_port,
        "store": {"path": str(store), "batch": 4, "flush_interval": 0.2}})
    proc = Proc(["cloud", "--config", str(cfg)], tmp_path / "cloud.log")
    answers = Watcher(broker.port, [f"{PREFIX}/+/answer"], "answers")
    status = Watcher(broker.port, [f"{PREFIX}/_cloud/+/status"], "status")
    sender = Watcher(broker.port, [], "sender")
    try:
        wait_until(lambda: any(b'"online"' in p for p in status.on(lambda t: True)) or not proc.running(), 60,
                   "the cloud worker online")

        def answered() -> set[int]:
            return {wire.decode_answer(p).frame_id for p in answers.on(lambda t: True)}

        for p in payloads[:30]:
            sender.client.publish(f"{PREFIX}/cam1/escalate", p, 1)
        wait_until(lambda: len(answered()) == 30, 30, "30 answers before the corruption")
        rows_before = wait_until(lambda: _metric(metrics_port, "tierlite_stored_examples_total") >= 30 and
                                 _metric(metrics_port, "tierlite_stored_examples_total"), 20, "30 rows stored")
        with open(store, "r+b") as f:  # a disk fault, or someone's stray write: the whole file
            f.write(os.urandom(store.stat().st_size))
        for p in payloads[30:]:
            sender.client.publish(f"{PREFIX}/cam1/escalate", p, 1)
        wait_until(lambda: len(answered()) == 60, 30, "every answer after the corruption")
        wait_until(lambda: "IS CORRUPT" in proc.log(), 20, "the store to notice")
        assert proc.running(), proc.log()[-3000:]
        lines = [line for line in proc.log().splitlines() if "IS CORRUPT" in line]
        assert len(lines) == 1 and "moved aside" in lines[0] and "rows lost" in lines[0], lines
        aside = list(tmp_path.glob("hard.sqlite.corrupt-*"))
        assert len(aside) == 1
        lost = wait_until(lambda: _metric(metrics_port, 'tierlite_store_events_total{event="lost"}'), 10,
                          "the loss counted")
        assert 0 < lost <= rows_before
        assert _metric(metrics_port, 'tierlite_store_events_total{event="recovered"}') == 1
        # the fresh store is real SQLite holding the rows that came after (the worker still writes it)
        wait_until(lambda: sqlite3.connect(f"file:{store}?mode=ro", uri=True).execute(
            "SELECT COUNT(*) FROM hard_examples").fetchone()[0] >= 60 - 30, 20, "the rows after the corruption")
        print(f"\nstore overwritten under a running worker: 60/60 answered, {lost:.0f} rows counted lost "
              f"(of {rows_before:.0f} stored before), moved aside to {aside[0].name}, fresh store in use")
    finally:
        for w in (answers, status, sender):
            w.stop()
        code = proc.stop()
        broker.stop()
    assert code == 0, proc.log()[-3000:]
    assert "Traceback" not in proc.log()
