"""Issue 13: audit sampling and label-free drift detection.

Unit tests for the statistics (tierlite.drift), the wire's audit flag and the reference in the
manifest; one runtime test over real Mosquitto and real processes (tierlite.tools.stack): a node
streams fogged frames its end exit is sure about, audits a share of them, raises a drift alarm
(retained event, node status), and the cloud scores the audits (status: agreement + Wilson CI)."""
from __future__ import annotations

import json
import re
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from tierlite.drift import AgreementWindow, DriftMonitor, psi, reference_stats, wilson


def _frames(rng, n, shift=0.0, classes=10):
    feats = rng.normal(shift, 1.0, (n, 4, 4, 8)).astype(np.float32)
    logits = rng.normal(0, 1, (n, classes)).astype(np.float32)
    logits[np.arange(n), rng.integers(0, classes, n)] += 6.0  # confident, balanced classes
    return feats, logits


def test_wilson_interval():
    lo, hi = wilson(0, 0)
    assert (lo, hi) == (0.0, 1.0)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-3)


def test_agreement_window_slides():
    w = AgreementWindow(window=10)
    for _ in range(10):
        w.add(True)
    for _ in range(5):
        w.add(False)
    e = w.estimate()
    assert e["audits"] == 15 and e["window"] == 10 and e["agree"] == 5 and e["agreement"] == 0.5
    assert e["low"] < 0.5 < e["high"]


def test_teacher_statistics_flag_a_collapsed_teacher():
    rng = np.random.default_rng(2)
    ref = reference_stats(*_frames(rng, 400), window=50, bootstrap=200)
    healthy, collapsed = AgreementWindow(100, ref), AgreementWindow(100, ref)
    assert AgreementWindow(100).estimate()["teacher"] is None  # no reference, no teacher statistic
    for i in range(100):
        healthy.add(True, int(rng.integers(0, 10)))
        collapsed.add(True, 3 if i % 10 else 5)  # agrees with the node, on one class
    assert healthy.estimate()["teacher"]["suspect"] is False
    t = collapsed.estimate()["teacher"]
    assert t["suspect"] is True and t["frames"] == 100 and collapsed.estimate()["agreement"] == 1.0


def test_psi():
    assert psi([10, 10, 10], [10, 10, 10]) == pytest.approx(0.0)
    assert psi([30, 0, 0], [10, 10, 10]) > 1.0


def test_monitor_quiet_on_clean_alarms_on_shift():
    rng = np.random.default_rng(0)
    ref = reference_stats(*_frames(rng, 400), window=100, bootstrap=200)
    assert set(ref["thresholds"]) == {"feature", "entropy", "classes"}
    json.dumps(ref)  # goes into the manifest as it is
    mon = DriftMonitor(ref, step=10)
    feats, logits = _frames(rng, 3000)
    for f, lg in zip(feats, logits):
        mon.update(f[None], lg)
    assert mon.state.alarms == 0, mon.state.to_json()
    changed = []
    feats, logits = _frames(rng, 300, shift=0.5)
    for f, lg in zip(feats, logits):
        c = mon.update(f[None], lg)
        if c is not None:
            changed.append((mon.frames, c))
    assert changed and changed[0][1] is True
    assert changed[0][0] - 3000 <= 100, changed  # within one window of the shift
    assert "feature" in mon.state.triggered
    # back to clean: the alarm clears
    feats, logits = _frames(rng, 400)
    for f, lg in zip(feats, logits):
        mon.update(f[None], lg)
    assert not mon.state.alarm


def test_monitor_entropy_and_classes():
    rng = np.random.default_rng(1)
    ref = reference_stats(*_frames(rng, 400), window=100, bootstrap=200)
    mon = DriftMonitor(ref, step=10)
    feats, logits = _frames(rng, 200)
    logits[:] = rng.normal(0, 0.1, logits.shape)  # unsure frames
    logits[:, 3] += 3.0  # all one class, as a strong drift does
    for f, lg in zip(feats, logits):
        mon.update(f[None], lg)
    assert mon.state.alarm and {"classes", "entropy"} <= set(mon.state.triggered)


def test_bundle_without_reference_has_no_monitor():
    assert DriftMonitor.from_bundle({"name": "x"}) is None


def test_audit_flag_on_the_wire(small_bundle_dir):
    from tierlite.bundle import Bundle
    from tierlite.wire import FLAG_AUDIT, TENSOR_HEADER, Kind, boundary_spec, decode_tensor_message, encode_tensor_message

    b = Bundle.load(small_bundle_dir)
    spec = boundary_spec(b, Kind.FEATURE)
    q = np.zeros(spec.feature.shape, np.int8)
    lg = np.zeros(spec.n_classes, np.float32)
    plain = encode_tensor_message(spec, 7, q, [lg])
    audit = encode_tensor_message(spec, 7, q, [lg], audit=True)
    assert len(plain) == len(audit) and plain[5] == 0 and audit[5] == FLAG_AUDIT  # flags byte, bit 1
    assert TENSOR_HEADER.size == 36
    assert not decode_tensor_message(plain, spec).audit
    m = decode_tensor_message(audit, spec)
    assert m.audit and m.frame_id == 7
    esc = boundary_spec(b, Kind.ESCALATE)
    e = encode_tensor_message(esc, 7, np.zeros(esc.feature.shape, np.int8), [lg, lg], audit=True, end_feature=bytes(m.feature))
    assert decode_tensor_message(e, esc).audit


def _bundle_with_reference(small_bundle_dir: Path, digits_dir: Path, dest: Path) -> Path:
    from tierlite.converters.datasets import load_splits
    from tierlite.converters.pipeline import add_drift_reference

    shutil.copytree(small_bundle_dir, dest)
    val = load_splits(digits_dir / "train", 32, 0.2, 0, None, dest.parent / "cache").val  # the bundle's validation split
    add_drift_reference(dest, val.images)
    return dest


def test_reference_recorded_and_old_bundles_load(small_bundle_dir, digits_dir, tmp_path):
    from tierlite.bundle import Bundle

    b = Bundle.load(_bundle_with_reference(small_bundle_dir, digits_dir, tmp_path / "b"))
    ref = b.manifest["drift_reference"]
    assert ref["frames"] > 100 and len(ref["class_hist"]) == len(b.labels) and len(ref["entropy_hist"]) == 10
    assert DriftMonitor.from_bundle(b.manifest) is not None
    Bundle.load(small_bundle_dir)  # a bundle without one still loads


def test_audits_and_drift_alarm_over_mqtt(small_bundle_dir, digits_dir, tmp_path):
    """Real Mosquitto, `tierlite edge`, `tierlite cloud` and `tierlite device` processes."""
    import cv2

    from tierlite.data import load_image_folder
    from tierlite.tools.bench.corruptions import corrupt
    from tierlite.tools.stack import Stack, TierProcess, read_jsonl, wait_until, write_yaml

    from runtime_support import Watcher

    bundle = _bundle_with_reference(small_bundle_dir, digits_dir, tmp_path / "bundle")
    test = load_image_folder(digits_dir / "test", (32, 32))
    order = np.random.default_rng(0).permutation(len(test.labels))[:300]
    fogged = corrupt(test.images[order], "fog", 5, seed=1)
    frames = tmp_path / "frames"
    for i, img in enumerate(fogged):
        (frames / "x").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(frames / "x" / f"{i:05d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    # The cloud worker retrains on request, on a job minimum (60) above what a node can send before
    # its first alarm (at most 50 frames): the drift's run must wait for audits, then start.
    retrain = {"replay": str(digits_dir / "train"), "every_examples": None, "collect_frames": False,
               "min_interval_seconds": 0, "args": ["--min-examples", "60"]}
    with Stack(bundle, edge_workers=1, cloud_workers=1, log_level="info", cloud_extra={"retrain": retrain}) as stack:
        w = Watcher(stack.port, [f"{stack.prefix}/+/drift", f"{stack.prefix}/+/status", f"{stack.prefix}/_cloud/+/status"])
        try:
            results = tmp_path / "results.jsonl"
            cfg = write_yaml(tmp_path / "cam.yaml", {
                "node_id": "cam-a", "bundle": str(bundle), "prefix": stack.prefix,
                "broker": {"port": stack.port, "reconnect_min": 0.1, "reconnect_max": 1.0},
                "source": {"uri": str(frames), "fps": 200}, "results_file": str(results),
                "audit_rate": 0.2, "drift": {"alarm_audit_rate": 0.5}})
            node = TierProcess("cam-a", ["device", "--config", str(cfg)], tmp_path)
            assert node.expect_exit(120) == 0, node.tail(20)
            rs = read_jsonl(results)
            assert len(rs) == 300 and len({r["frame"] for r in rs}) == 300  # one result per frame
            assert not any(r["fallback"] for r in rs)  # audits never turned into waits
            status = [s for s in w.json_on("cam-a/status")][-1]
            assert status["audits"]["sent"] >= 30, status
            assert status["late_answers"] == 0  # nobody answered an audit
            assert status["drift"]["alarm"] and status["drift"]["alarms"] == 1, status["drift"]
            events = w.json_on("cam-a/drift")
            assert events and events[-1]["alarm"] and events[-1]["node"] == "cam-a"
            sent = status["audits"]["sent"]

            def cloud_saw_all():
                docs = [d for d in w.json_on("bench-cloud-0/status") if "cam-a" in d.get("audits", {})]
                return docs and docs[-1]["audits"]["cam-a"]["audits"] >= sent and docs[-1]
            doc = wait_until(cloud_saw_all, 20, "the cloud worker's status with every audit")
            a = doc["audits"]["cam-a"]
            assert a["low"] <= a["agreement"] <= a["high"]
            assert doc["drift"]["cam-a"]["alarm"] is True
            assert a["teacher"]["suspect"] is True  # under fog the teacher collapses too: reported, not assumed clean
            time.sleep(1.0)  # the store commits its last batch
            from tierlite.cloud.store import HardExampleStore

            with HardExampleStore.open_readonly(stack.dir / "hard-0.sqlite") as store:
                audits = store.count(node="cam-a", audit=True)
            assert audits == sent  # stored as audits, apart: retraining starts without escalations
            cloud = stack.procs["cloud-0"]
            wait_until(lambda: "retrain: starting run 1" in cloud.log(), 60, "the requested retraining run")
            log = cloud.log()
            waited = re.search(r"requested run waits for hard examples: (\d+) of 60 usable stored", log)
            assert waited and int(waited[1]) < 60, log[-3000:]
            assert log.index(waited[0]) < log.index("retrain: starting run 1 (node cam-a: drift alarm")
            assert "--min-examples 60" in log and "dropped" not in log
            doc = wait_until(lambda: [d for d in w.json_on("bench-cloud-0/status")
                                      if (d.get("retrain") or {}).get("runs") == 1], 20, "the cloud status after the run")
            assert doc[-1]["retrain"]["pending"] is None, doc[-1]["retrain"]
        finally:
            w.stop()


def _store_rows(store, n: int, bundle_name: str, end_feature: bool = True, end_size: int = 4) -> None:
    """n audited rows for `bundle_name`, committed; without an end feature the job cannot use them."""
    for i in range(n):
        store.add(node="cam-a", frame_id=store.written + i, bundle_name=bundle_name, bundle_version=1, sent_us=None,
                  feature=b"\x00" * 4, feature_shape=(1, 2, 2, 1), feature_scale=0.1, feature_zero_point=0,
                  logits={t: np.zeros(10, np.float32) for t in ("end", "edge", "cloud")}, label=0, confidence=1.0,
                  entropy=0.0, audit=True, **({"end_feature": b"\x00" * end_size, "end_feature_shape": (1, end_size),
                                               "end_feature_encoding": {"kind": "int8"}, "end_feature_scale": 0.1,
                                               "end_feature_zero_point": 0} if end_feature else {}))
    store.flush()


def test_drift_alarm_starts_a_retraining_run_without_escalations(small_bundle_dir, digits_dir, tmp_path):
    """Issue 13, step 3: a drift alarm or an agreement fall asks for a run with no new escalations
    at all; the run waits until the store holds the job's --min-examples (50) usable hard examples,
    so it is not spent on a store that is still too small (the live digits run: 16 stored)."""
    from tierlite.cloud.retrain import RetrainScheduler
    from tierlite.cloud.worker import CloudWorker
    from tierlite.config import CloudConfig, config_from_dict

    cfg = config_from_dict({"bundle": str(small_bundle_dir), "store": {"path": str(tmp_path / "hard.sqlite")},
                            "metrics_port": None,
                            "retrain": {"replay": str(digits_dir / "train"), "every_examples": None,
                                        "collect_frames": False, "min_interval_seconds": 0}}, CloudConfig)
    worker = CloudWorker(cfg)
    try:
        assert isinstance(worker.retrain, RetrainScheduler)
        started: list[str] = []
        worker.retrain._start = started.append  # the child process itself is tested in test_update_retrain
        worker.retrain.tick(0)
        assert started == []  # nothing new, no period: no run
        worker.on_drift("tierlite/cam-z/drift", json.dumps({"node": "cam-z", "alarm": True,
                                                           "triggered": ["feature"]}).encode())
        _store_rows(worker.store, 16, worker._model.bundle.name)  # what the live run had stored
        worker._housekeeping()  # the worker's own loop: the scheduler's tick, then its metrics
        assert started == []  # 16 of 50: a run now would stop at --min-examples and spend the request
        sample = worker.metrics.registry.get_sample_value
        assert sample("tierlite_retrain_pending") == 1.0 and sample("tierlite_retrain_running") == 0.0
        assert [sample("tierlite_retrain_pending_examples", {"count": c}) for c in ("have", "need")] == [16, 50]
        pending = worker._status_fields()["retrain"]["pending"]
        assert (pending["have"], pending["need"], pending["waiting_for"]) == (16, 50, "hard examples"), pending
        assert "cam-z" in pending["why"] and "drift" in pending["why"]
        _store_rows(worker.store, 34, worker._model.bundle.name)
        worker._housekeeping()
        assert len(started) == 1 and "cam-z" in started[0] and "drift" in started[0]
        assert sample("tierlite_retrain_pending") == 0.0
        assert worker._status_fields()["retrain"]["pending"] is None
        assert worker._status_fields()["drift"]["cam-z"]["alarm"] is True
        worker.on_drift("tierlite/cam-z/drift", json.dumps({"node": "cam-z", "alarm": True}).encode())
        worker.retrain.tick(worker.store.written)
        assert len(started) == 1  # the same alarm asks once
        # A teacher collapsed onto one class (suspect): the node disagreeing with it is no evidence
        # about the camera, so its agreement falling asks for nothing (issue 13 follow-up).
        for _ in range(40):
            worker._score_audit("cam-x", False, 3)
        est = worker._status_fields()["audits"]["cam-x"]
        assert est["high"] < cfg.audit_min_agreement and est["teacher"]["suspect"] is True, est
        worker.retrain.tick(worker.store.written)
        assert len(started) == 1, started
        for i in range(40):  # a teacher answering all classes: the node disagrees with it on every frame
            worker._score_audit("cam-y", False, i % 10)
        assert worker._status_fields()["audits"]["cam-y"]["teacher"]["suspect"] is False
        worker.retrain.tick(worker.store.written)  # the store holds 50 usable examples: it runs at once
        assert len(started) == 2 and "cam-y" in started[1] and "agreement" in started[1]
    finally:
        worker.store.close()


def test_a_requested_run_expires_and_one_that_stops_for_too_few_examples_is_put_back(
        small_bundle_dir, digits_dir, tmp_path, caplog):
    """The waiting request on a fake clock: it expires with one warning; a real `tierlite retrain`
    child that still stops for too few examples (rows without the node's end feature, which the
    scheduler's count cannot tell apart) puts it back, request_retries times at most."""
    import logging

    from tierlite.bundle import Bundle
    from tierlite.cloud.retrain import RetrainScheduler
    from tierlite.cloud.store import HardExampleStore
    from tierlite.config import CloudConfig, config_from_dict
    from tierlite.errors import ConfigError
    from tierlite.metrics import TierMetrics

    def config(args, **retrain):
        return config_from_dict({"bundle": str(bundle), "store": {"path": str(tmp_path / "hard.sqlite")},
                                 "metrics_port": None,
                                 "retrain": {"replay": str(digits_dir / "train"), "every_examples": None,
                                             "collect_frames": False, "min_interval_seconds": 0,
                                             "request_expiry_seconds": 100, "request_retries": 1,
                                             "args": args, **retrain}}, CloudConfig)

    bundle = tmp_path / "bundle"  # the run's candidate goes beside its parent: not in pytest's cache
    shutil.copytree(small_bundle_dir, bundle)
    b = Bundle.load(bundle)
    name, end_size = b.name, int(np.prod(b.segment("edge").inputs[0].shape[1:]))
    now = [0.0]
    store = HardExampleStore(tmp_path / "hard.sqlite")
    with pytest.raises(ConfigError, match="--min-examples must be a whole number"):
        RetrainScheduler(config(["--min-examples", "many"]), None, store)
    for bad in ({"request_retries": -1}, {"request_expiry_seconds": 0}, {"request_expiry": 10}):
        with pytest.raises(ConfigError, match="request_"):
            config([], **bad)
    sched = RetrainScheduler(config(["--min-examples", "5"]), None, store, clock=lambda: now[0])
    counts = []
    store_count = store.count
    store.count = lambda **kw: counts.append(kw) or store_count(**kw)
    try:
        with caplog.at_level(logging.INFO, "tierlite.cloud.retrain"):
            sched.request("node cam-a: drift alarm (feature)")
            _store_rows(store, 3, name, end_size=end_size)
            for _ in range(3):
                sched.tick(store.written)
            assert sched._proc is None and len(counts) == 1  # no new rows, no recount: no polling
            assert caplog.text.count("requested run waits for hard examples: 3 of 5 usable stored") == 1
            now[0] = 101.0
            sched.tick(store.written)
            assert "requested run dropped after 101 s: 3 of 5 usable hard examples stored" in caplog.text
            assert sched.status()["pending"] is None and sched.status()["expired_requests"] == 1
            # The next alarm; 2 rows the job cannot use make the scheduler's count 5.
            sched.request("node cam-a: drift alarm (feature)")
            _store_rows(store, 2, name, end_feature=False)
            sched.tick(store.written)
            assert sched._proc is not None and "starting run 1 (node cam-a: drift alarm" in caplog.text
            assert _wait_for(lambda: sched._proc.poll() is not None, 120)
            sched.tick(store.written)
            assert "only 3 stored hard examples and 0 usable frames" in caplog.text
            assert "request put back (1 of 1 retries): waits for 2 more hard examples" in caplog.text
            p = sched.status()["pending"]
            assert (p["have"], p["need"], p["retries"]) == (5, 7, 1), p
            _store_rows(store, 2, name, end_feature=False)  # still none the job can use
            sched.tick(store.written)
            assert sched._proc is not None and "starting run 2" in caplog.text
            assert _wait_for(lambda: sched._proc.poll() is not None, 120)
            sched.tick(store.written)
            assert "requested run dropped: 2 run(s) stopped for too few hard examples" in caplog.text
            assert sched.status()["pending"] is None and sched.status()["expired_requests"] == 2
            metrics = TierMetrics("cloud")
            for _ in range(2):  # reported twice: counted once
                metrics.retrain(sched.status())
            assert metrics.registry.get_sample_value("tierlite_retrain_expired_requests_total") == 2
    finally:
        sched.close()
        store.close()


def _wait_for(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_store_marks_audits_and_migrates_a_schema_1_file(tmp_path):
    """Audits are stored with a marker and counted apart; a store written before the marker
    (schema 1) still reads (every row an escalation) and is migrated when opened for writing."""
    from tierlite.cloud.store import SCHEMA_VERSION, HardExampleStore

    def add(store, i, audit):
        store.add(node="cam1", frame_id=i, bundle_name="b", bundle_version=1, sent_us=None, feature=b"\x00" * 4,
                  feature_shape=(1, 2, 2, 1), feature_scale=0.1, feature_zero_point=0,
                  logits={t: np.zeros(3, np.float32) for t in ("end", "edge", "cloud")}, label=0, confidence=1.0,
                  entropy=0.0, audit=audit)

    path = tmp_path / "hard.sqlite"
    with HardExampleStore(path, batch=100) as store:
        for i in range(5):
            add(store, i, audit=False)
    con = sqlite3.connect(path)  # the same file as a tierlite from before the marker wrote it
    con.executescript("ALTER TABLE hard_examples DROP COLUMN audit; UPDATE meta SET value = '1' "
                      "WHERE key = 'schema_version';")
    con.close()
    with HardExampleStore.open_readonly(path) as old:
        assert old.schema == 1 and old.count() == 5 and old.count(audit=True) == 0 and old.count(audit=False) == 5
        assert not any(ex.audit for ex in old.iter_examples())
    with HardExampleStore(path, batch=100) as store:
        assert store.schema == SCHEMA_VERSION  # migrated on open
        for i in range(5, 8):
            add(store, i, audit=True)
        store.flush()
        assert store.audits_written == 3 and store.written == 3
    with HardExampleStore.open_readonly(path) as new:
        assert new.schema == SCHEMA_VERSION == 2
        assert new.count(audit=True) == 3 and new.count(audit=False) == 5 and new.count() == 8
        assert [ex.frame_id for ex in new.iter_examples(audit=True)] == [5, 6, 7]
        assert new.read_arrays()["audits"].tolist() == [False] * 5 + [True] * 3


def test_a_budget_reject_is_reported_as_budget(small_bundle_dir, digits_dir, tmp_path):
    """Issue 12 leftover: an escalation the edge refuses because the node is over its budget is
    answered locally with the reason "budget", not the model-mismatch "rejected"."""
    import cv2

    from tierlite.data import load_image_folder
    from tierlite.tools.stack import Stack, TierProcess, read_jsonl, write_yaml

    test = load_image_folder(digits_dir / "test", (32, 32))
    frames = tmp_path / "frames" / "x"
    frames.mkdir(parents=True)
    for i, img in enumerate(test.images[:40]):
        cv2.imwrite(str(frames / f"{i:05d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    with Stack(small_bundle_dir, edge_workers=1, cloud_workers=1, edge_threshold=1.0,
               edge_extra={"node_budget": {"rate": 1.0, "burst": 5}}) as stack:
        results = tmp_path / "results.jsonl"
        cfg = write_yaml(tmp_path / "cam.yaml", {
            "node_id": "cam-b", "bundle": str(small_bundle_dir), "prefix": stack.prefix, "threshold": 0.0,
            "broker": {"port": stack.port, "reconnect_min": 0.1, "reconnect_max": 1.0},
            "source": {"uri": str(frames.parent), "fps": 100}, "results_file": str(results), "audit_rate": 0})
        node = TierProcess("cam-b", ["device", "--config", str(cfg)], tmp_path)
        assert node.expect_exit(60) == 0, node.tail(20)
    rs = read_jsonl(results)
    reasons = [r["reason"] for r in rs]
    assert len(rs) == 40 and "rejected" not in reasons
    # burst 5, then 1 per second: how many the edge answers depends on how fast the node really ran
    # (a busy machine streams slower than the configured 100 fps), so the bound follows the clock
    span = max(r["ts"] for r in rs) - min(r["ts"] for r in rs)
    assert 5 <= reasons.count(None) <= 5 + span * 1.0 + 2, (span, reasons)
    assert reasons.count("budget") >= 1, reasons


def test_selectors_of_either_statistic_set_load_and_pick():
    """Selectors fitted before the log / noise-floor statistics (5 weights, in bundles already
    shipped) still load and run; new ones use all of STATS and tell sensor noise on textured frames
    apart (with the legacy 5, CIFAR-10 noise 3 had 12.6 % of its frames picked at <= 1 % clean
    picks; docs/DRIFT.md)."""
    from tierlite.conditions import LEGACY_STATS, STATS, Selector, frame_stats

    rng = np.random.default_rng(5)
    # scenes of 4x4-pixel patches with edges of varied contrast, then the same with sensor noise
    # (sigma 12 grey levels): the legacy Laplacian mean moves with the edges as much as with the noise
    patches = np.kron(rng.standard_normal((600, 8, 8, 1)), np.ones((1, 4, 4, 1)))
    base = rng.uniform(40, 215, (600, 1, 1, 3)) + rng.uniform(5, 60, (600, 1, 1, 1)) * patches
    clean = np.clip(base, 0, 255).astype(np.uint8)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    new = Selector.fit(noisy[:300], clean[:300])
    assert len(new.w) == len(STATS) and new.to_json()["stats"] == list(STATS)
    assert new.picks(noisy[300:]).mean() > 0.9 and new.picks(clean[300:]).mean() < 0.03
    k = len(LEGACY_STATS)
    legacy_json = {"mean": new.mean[:k], "scale": new.scale[:k], "w": new.w[:k], "b": new.b, "stats": list(LEGACY_STATS)}
    legacy = Selector.from_json(legacy_json, "shipped bundle")
    assert legacy.picks(noisy).shape == (600,) and legacy.to_json()["stats"] == list(LEGACY_STATS)
    assert frame_stats(noisy[:2]).shape == (2, len(STATS)) and np.isfinite(frame_stats(noisy)).all()


def test_the_live_drift_bench_streams_frames_in_the_order_given(tmp_path):
    """`tierlite bench drift` (live) writes each node's frames for a real `tierlite device` to stream
    from a folder: the node's folder source must see them in the bench's (shuffled) order, not class
    by class, or the class histogram moves on clean data and the audits cover the last classes only."""
    import cv2

    from tierlite.config import SourceConfig
    from tierlite.device.sources import FrameSource
    from tierlite.tools.bench.drift import Fleet

    labels = np.random.default_rng(0).integers(0, 10, 40)
    # each frame's grey level names its position in the stream
    jpegs = [cv2.imencode(".png", np.full((8, 8, 3), 5 * i, np.uint8))[1].tobytes() for i in range(len(labels))]
    fleet = Fleet(tmp_path, tmp_path / "bundle", 1883, "tierlite", tmp_path / "key.pub", share_frames=False)
    folder = fleet.write_frames("cam-1", "round1", jpegs, labels)
    streamed = [int(f.image[0, 0, 0]) // 5 for f in FrameSource(SourceConfig(uri=str(folder)), (8, 8))]
    assert streamed == list(range(len(labels)))


def test_audits_reach_a_floor_share_of_frames_in_alarm_when_confident_frames_are_rare():
    """drift.alarm_audit_floor: under a drift that escalates nearly everything (fog 5 on CIFAR-10:
    1.2 % of frames confident) 25 % of the confident frames gave the cloud 6 audits in 2,000
    frames, under the 10 its teacher check needs; in alarm the node audits enough of them to make
    the floor share of all frames. Outside an alarm, and where confident frames are common, the
    rates are as before."""
    from tierlite.drift import AuditSampler

    rng = np.random.default_rng(0)

    def audits(confident_share: float, alarm: bool, floor: float, frames: int = 2000) -> int:
        sampler, n = AuditSampler(0.02, 0.25, floor), 0
        for confident in rng.random(frames) < confident_share:
            sampler.observe(confident)
            n += bool(confident and rng.random() < sampler.rate_now(alarm))
        return n

    assert audits(0.012, True, 0.0) < 10 <= audits(0.012, True, 0.02)  # fog 5: every confident frame
    assert audits(0.012, True, 0.02) <= 0.02 * 2000 + 10
    sampler = AuditSampler(0.02, 0.25, 0.02)
    for confident in [True] * 150 + [False] * 50:  # 75 % confident: the floor is far below 25 % of them
        sampler.observe(confident)
    assert sampler.rate_now(True) == 0.25 and sampler.rate_now(False) == 0.02
    for confident in [True] + [False] * 199:
        sampler.observe(confident)
    assert sampler.rate_now(True) == 1.0  # one confident frame in the window: all of them audited
    for _ in range(200):
        sampler.observe(False)
    assert sampler.rate_now(True) == 0.25  # none confident: nothing to audit, no division by zero
