"""Partition planner (tierlite.partition), re-cut segments (tierlite.converters.partition) and the
node's link-following operating points (tierlite.linkstate). docs/PARTITIONING.md."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tierlite.errors import BundleError, ConfigError
from tierlite.linkstate import LinkFollower, bundle_operating_points
from tierlite.partition import Candidate, Link, OperatingPoint, Power, Profile, choose, predict, predict_all


def _synthetic_profile() -> Profile:
    # Device 4x slower than the server; each cut's bytes fall with depth, then rise again.
    #            name      device ms  server ms  bytes
    rows = [("input", 0.0, 8.0, 3072), ("b0", 4.0, 7.0, 8192), ("b1", 8.0, 6.0, 1024),
            ("bottleneck", 9.0, 5.75, 256), ("b2", 16.0, 4.0, 2048), ("all", 32.0, 0.0, 40)]
    cands = [Candidate(n, d / 1e3, s / 1e3, b, exit_on_device=i >= 2, trained=n == "bottleneck")
             for i, (n, d, s, b) in enumerate(rows)]
    ops = [OperatingPoint("strict", 0.1, 0.2, 0.95), OperatingPoint("loose", 0.6, 0.8, 0.90)]
    return Profile("synthetic", cands, ops, server_only_accuracy=0.96)


def _serial(mbit: float, rtt_ms: float = 0.0) -> Link:
    return Link(mbit * 1e6, rtt_ms / 1e3, overhead_bytes=0, header_bytes=0)


def test_planner_picks_the_analytically_best_cut_and_operating_point():
    prof = _synthetic_profile()
    power = Power()
    # Server-only accuracy bound (no camera exit may answer): latency = device + bytes*8/bw + server.
    # (ms; every cut also has a server-only row, escalating every frame)
    #  1 Mbit/s: input 8+24.6=32.6, b1 8+8.2+6=22.2, bottleneck 9+2.05+5.75=16.8, all 32.3 -> bottleneck
    #  1 Gbit/s: input 8.02, bottleneck 14.75, all 32 -> input (send the frame, the server is faster)
    best = choose(predict_all(prof, _serial(1), power), "mean", min_accuracy=0.96)
    assert (best.candidate, best.operating_point) == ("bottleneck", "server-only")
    assert best.mean_s == pytest.approx((9.0 + 256 * 8 / 1e6 * 1e3 + 5.75) / 1e3)
    assert choose(predict_all(prof, _serial(1000), power), "mean", 0.96).candidate == "input"
    # A looser bound admits the camera exit: 80 % of frames answered at device time (p50 = 9 ms at
    # the bottleneck, 8 ms at b1, the earliest cut with an exit).
    best = choose(predict_all(prof, _serial(1), power), "p50", min_accuracy=0.9)
    assert (best.candidate, best.operating_point, best.p50_s) == ("b1", "loose", pytest.approx(0.008))
    # p99 is the escalated frames' latency: 20 % go up, so the strict point's p99 = 16.8 ms.
    row = predict(prof.candidates[3], prof.operating_points[0], _serial(1), power)
    assert row.p99_s == pytest.approx((9.0 + 2.048 + 5.75) / 1e3) and row.uplink_bytes == pytest.approx(0.8 * 256)
    # Energy: compute watts x device time + radio watts x airtime of the escalated share.
    row = predict(prof.candidates[0], None, _serial(1), Power(compute_w=2.0, radio_w=0.5))
    assert row.device_energy_j == pytest.approx(0.5 * 3072 * 8 / 1e6)
    with pytest.raises(ConfigError, match="no candidate meets"):
        choose(predict_all(prof, _serial(1), power), min_accuracy=0.99)
    with pytest.raises(ConfigError, match="bad or missing field"):
        Profile.from_json({"candidates": [{"name": "x"}], "operating_points": []})


def test_shaped_link_lets_the_burst_through_and_counts_segment_headers():
    link = Link(1e6, 0.002, overhead_bytes=100, burst_bytes=1600)
    assert link.wire_bytes(3000) == 3100 + 3 * 66
    assert link.transfer_s(3000) == pytest.approx(0.002 + (3100 + 198 - 1600) * 8 / 1e6)
    assert link.transfer_s(100) == pytest.approx(0.002)  # under the burst: no serialisation


def test_recut_segments_are_bit_exact_and_plan_exports_operating_points(small_bundle_dir, digits_dir, tmp_path):
    from tierlite.bundle import Bundle
    from tierlite.converters.datasets import load_splits
    from tierlite.converters.partition import (FINAL_LOGITS, dequantized_outputs, build_unsplit, check_bit_exact,
                                               exit_points, export_operating_points, recut, run_model)
    from tierlite.converters.pipeline import default_workdir
    from tierlite.converters.train import load_checkpoint

    work = default_workdir(small_bundle_dir)
    joint, meta = load_checkpoint(work)
    # The session's digits frames (a cached checkpoint names the folder of the session that built it).
    splits = load_splits(digits_dir / "train", meta["arch"]["input_size"], meta["train"]["val_fraction"], meta["seed"])
    unsplit = build_unsplit(joint, splits.train.images[:100])
    frames = splits.val.images[:40]
    assert "end_feature" in unsplit.trained and {"end_stem_relu", "end_b0_out"} <= set(unsplit.order)
    on_device = {}
    for name in unsplit.order:
        cut = recut(unsplit, name)
        checked = check_bit_exact(unsplit, cut, frames)
        assert checked[FINAL_LOGITS] == 40 * 10 and checked[name] == 40 * cut.cut_bytes
        on_device[name] = cut.exit_on_device
    # The camera exit reads the last end block: a cut before it leaves no exit on the device.
    assert on_device["end_b0_out"] is False and on_device["end_feature"] is True
    # A mismatch is caught: the tail fed a perturbed cut tensor no longer matches.
    cut = recut(unsplit, "end_feature")
    head = run_model(cut.head, frames)[0]
    tail = run_model(cut.tail, np.clip(head.astype(np.int16) + 1, -128, 127).astype(np.int8))[0]
    full = dict(zip(unsplit.names, run_model(unsplit.model, frames)))[FINAL_LOGITS]
    assert not np.array_equal(tail, full)
    with pytest.raises(ConfigError, match="unknown cut"):
        recut(unsplit, "nonexistent")

    # Operating points from the unsplit model's exits, written into a copy of the bundle.
    end_l, final_l = dequantized_outputs(unsplit.model, unsplit.names, splits.val.images, ["end_logits", FINAL_LOGITS])
    points, server_only = exit_points(end_l, final_l, splits.val.labels, count=5)
    assert [p["device_fraction"] for p in points] == sorted(p["device_fraction"] for p in points)
    assert points[-1]["device_fraction"] == 1.0 and 0.5 < server_only <= 1.0
    bundle = shutil.copytree(small_bundle_dir, tmp_path / "bundle")
    prof = Profile("digits", [Candidate("end_feature", 0.001, 0.001, 512)], [OperatingPoint(**p) for p in points])
    export_operating_points(bundle, prof)
    b = Bundle.load(bundle)
    assert [p["thresholds"]["end"] for p in b.operating_points] == [p["end_threshold"] for p in points]
    assert [p.end_threshold for p in bundle_operating_points(b.manifest)] == sorted(
        {round(p["end_threshold"], 9): p["end_threshold"] for p in points}.values())
    bad = json.loads((bundle / "manifest.json").read_text())
    bad["operating_points"] = [{"name": "x", "thresholds": {"end": 2}}]
    (bundle / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="operating_points\\[0\\]"):
        Bundle.load(bundle, verify=False)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_operating_point_follows_an_injected_rtt_change():
    from tierlite.linkstate import OperatingPointRef

    points = [OperatingPointRef(f"op{i}", t) for i, t in enumerate((0.1, 0.3, 0.5))]
    clock = _Clock()
    f = LinkFollower(points, target_ms=50, relax_ratio=0.5, window=10, min_dwell_s=1.0, backlog_high=8,
                     start_threshold=0.11, clock=clock)
    clock.t = 10.0  # long after start: the first step is not held back by the dwell time
    assert f.point.name == "op0"

    def answers(rtt_ms: float, n: int = 10, dt: float = 0.05):
        for _ in range(n):
            clock.t += dt
            f.observe_answer(rtt_ms / 1e3)

    answers(10)  # fast link: stays on the most accurate point
    assert f.point.name == "op0" and f.switches == {"to_local": 0, "to_accurate": 0}
    answers(120)  # the RTT jumps: one step toward local per full window
    assert f.point.name == "op1"
    answers(120)  # a second window within the dwell time: no second step yet
    assert f.point.name == "op1"
    clock.t += 1.0
    answers(120)
    assert f.point.name == "op2" and f.switches["to_local"] == 2
    answers(40)  # between relax (25 ms) and target (50 ms): hysteresis holds the point
    clock.t += 5.0
    answers(40)
    assert f.point.name == "op2"
    answers(5)  # fast again: steps back, one per dwell
    clock.t += 5.0
    answers(5)
    assert f.point.name == "op0" and f.switches == {"to_local": 2, "to_accurate": 2}
    clock.t += 5.0
    f.observe_backlog(9)  # an overloaded gateway also moves it, as does a missed deadline
    assert f.point.name == "op1"
    clock.t += 5.0
    f.observe_deadline()
    assert f.point.name == "op2"
    status = f.status()
    assert status["switches"] == {"to_local": 4, "to_accurate": 2} and "deadline" in status["last_switches"][-1]["why"]
