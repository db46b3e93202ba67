"""Partition planner (tierlite.partition), re-cut segments (tierlite.converters.partition) and the
node's link-following operating points (tierlite.linkstate). docs/PARTITIONING.md."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tierlite.errors import BundleError, ConfigError
from tierlite.linkstate import LinkFollower, bundle_operating_points
from tierlite.partition import (Candidate, Link, OperatingPoint, Power, Profile, Tiers, choose, predict, predict_all,
                                predict_all_two_cuts)


@pytest.fixture(scope="module")
def digits_unsplit(small_bundle_dir, digits_dir):
    """The digits model's unsplit int8 model and its splits (the session's digits frames: a cached
    checkpoint names the folder of the session that built it)."""
    from tierlite.converters.datasets import load_splits
    from tierlite.converters.partition import build_unsplit
    from tierlite.converters.pipeline import default_workdir
    from tierlite.converters.train import load_checkpoint

    joint, meta = load_checkpoint(default_workdir(small_bundle_dir))
    splits = load_splits(digits_dir / "train", meta["arch"]["input_size"], meta["train"]["val_fraction"], meta["seed"])
    return build_unsplit(joint, splits.train.images[:100]), splits, meta


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


def test_two_cuts_end_edge_cloud_pick_the_analytically_best_pair():
    # Server-only rows (the bound excludes the exit's 0.8). Device -> edge 1 Mbit/s (8 us/B), edge ->
    # cloud 10 Mbit/s (0.8 us/B); suffix times S are the profiling host's, the edge runs them x2.
    #            name  device ms  suffix ms  bytes
    rows = [("a", 1.0, 40.0, 4000), ("b", 4.0, 30.0, 500), ("c", 10.0, 20.0, 6000), ("d", 60.0, 4.0, 100)]
    prof = Profile("three", [Candidate(n, d / 1e3, s / 1e3, b, exit_on_device=False) for n, d, s, b in rows],
                   [OperatingPoint("loose", 0.5, 0.5, 0.8)], server_only_accuracy=0.9)
    # latency(c1, c2) = D(c1) + 8us*B(c1) + 2*(S(c1) - S(c2)) + 0.8us*B(c2) + S(c2), ms:
    #   b|c = 4 + 4 + 20 + 4.8 + 20 = 52.8;  b|d = 8 + 52 + 0.08 + 4 = 64.08;  b alone (edge answers) = 8 + 60 = 68
    #   a|b = 33 + 20 + 0.4 + 30 = 83.4;     c|d = 58 + 32 + 0.08 + 4 = 94.08;  d alone = 60.8 + 8 = 68.8
    slow_edge = Tiers(_serial(10), edge_slowdown=2.0)
    best = choose(predict_all_two_cuts(prof, _serial(1), slow_edge), "mean", min_accuracy=0.9)
    assert (best.candidate, best.cloud_cut, best.operating_point) == ("b", "c", "server-only")
    assert best.mean_s == pytest.approx(52.8e-3) and best.cuts == "b | c"
    # An edge as fast as the cloud answers itself: b alone = 8 + 30 = 38 < b|d 38.08 < b|c 42.8.
    best = choose(predict_all_two_cuts(prof, _serial(1), Tiers(_serial(10))), "mean", min_accuracy=0.9)
    assert (best.candidate, best.cloud_cut, best.mean_s) == ("b", None, pytest.approx(38e-3))
    # Only the pairs the runtime can run (a profile lists them) are planned.
    prof.notes["three_tier_pairs"] = [["b", "d"]]
    rows3 = predict_all_two_cuts(prof, _serial(1), slow_edge)
    assert {r.cloud_cut for r in rows3} == {None, "d"}
    assert (choose(rows3, "mean", 0.9).cuts, choose(rows3, "mean", 0.9).mean_s) == ("b | d", pytest.approx(64.08e-3))


def test_board_power_figures_are_documented_and_used_by_the_plan(tmp_path, capsys):
    from tierlite.boards import list_boards, parse_board
    from tierlite.converters.partition import configure_plan, run_plan

    boards = {b.name: b for b in list_boards()}
    assert all(b.power is not None and b.power.source and b.power.active_w > 0 for b in boards.values())
    assert boards["pi4"].power.active_w == 3.0 and boards["pi4"].power.basis == "datasheet"
    data = {"name": "x", "title": "x", "kind": "linux", "module": "m", "cpu": "c", "cores": 1,
            "memory": {"flash": 1 << 20, "ram": 1 << 20}, "budget": {"model": 1024, "arena": 1024},
            "runtime": {"plugin": "litert"}, "camera": {"sensor": "s", "interface": "i", "width": 1, "height": 1,
                                                       "format": "rgb888"},
            "network": {"mqtt": "self", "link": "wifi"}, "power": {"active_w": 2, "basis": "guess", "source": "me"}}
    with pytest.raises(ConfigError, match="power.basis: must be one of"):
        parse_board(data)
    # The energy objective with the board's watts; an MCU board plans with the TFLM device times.
    prof = _synthetic_profile()
    prof.candidates = [Candidate(**{**c.__dict__, "device_tflm_s": c.device_s * 50}) for c in prof.candidates]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof.to_json()))
    import argparse
    parser = argparse.ArgumentParser()
    configure_plan(parser)
    out = tmp_path / "plan.json"
    run_plan(parser.parse_args([str(path), "--bandwidth", "1e6", "--objective", "energy", "--board", "nrf52840-dk",
                                "--min-accuracy", "0.96", "--json", str(out)]))
    plan = json.loads(out.read_text())
    assert plan["device_runtime"] == "tflm" and plan["power_w"]["compute_w"] == boards["nrf52840-dk"].power.active_w
    chosen = plan["chosen"]
    c = next(c for c in prof.candidates if c.name == chosen["candidate"])
    w = boards["nrf52840-dk"].power.active_w  # no separate radio figure: the active one while sending
    assert chosen["device_energy_j"] == pytest.approx(w * c.device_tflm_s + w * Link(1e6).wire_bytes(c.cut_bytes) * 8 / 1e6)
    assert "datasheet" in capsys.readouterr().out


def test_shaped_link_lets_the_burst_through_and_counts_segment_headers():
    link = Link(1e6, 0.002, overhead_bytes=100, burst_bytes=1600)
    assert link.wire_bytes(3000) == 3100 + 3 * 66
    assert link.transfer_s(3000) == pytest.approx(0.002 + (3100 + 198 - 1600) * 8 / 1e6)
    assert link.transfer_s(100) == pytest.approx(0.002)  # under the burst: no serialisation


# The digits model's TFLite export (the module fixture) alone takes minutes on a loaded 2-core host.
@pytest.mark.timeout(1500)
def test_recut_segments_are_bit_exact_and_plan_exports_operating_points(small_bundle_dir, digits_unsplit, tmp_path):
    from tierlite.bundle import Bundle
    from tierlite.converters.partition import (FINAL_LOGITS, dequantized_outputs, check_bit_exact, exit_points,
                                               export_operating_points, recut, run_model)

    unsplit, splits, _ = digits_unsplit
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


@pytest.mark.timeout(1500)
def test_plan_exported_as_a_three_tier_bundle_answers_like_the_original(small_bundle_dir, digits_unsplit, digits_dir,
                                                                        tmp_path):
    """A two-cut plan re-cut from the digits model at block outputs (not its trained boundaries),
    written as a bundle that `tierlite inspect` reads, run through the real runtime (Mosquitto, an
    edge and a cloud worker, a camera node): every frame gets the unsplit model's label."""
    from tierlite.bundle import Bundle
    from tierlite.converters.inspect import describe
    from tierlite.converters.partition import (FINAL_LOGITS, export_chosen, recut_chain, run_model, runnable_pairs,
                                               tensor_bytes)
    from tierlite.data import decode_image, list_image_folder
    from tierlite.tools.stack import Stack, TierProcess, read_jsonl, write_yaml

    from runtime_support import offline_chain

    unsplit, splits, meta = digits_unsplit
    # Plan with the cut sizes of the real model: the device -> edge cut at a block output, the
    # edge -> cloud cut wherever the planner puts it among the pairs the runtime can run.
    pairs = runnable_pairs(unsplit)
    assert ["end_b1_out", "edge_b0_out"] in pairs and ["end_b1_out", "end_feature"] not in pairs
    with pytest.raises(ConfigError, match="edge exit needs blocks after end_feature"):
        recut_chain(unsplit, ["end_b1_out", "end_feature"])  # the edge's exit head reads a later block
    sizes = {n: tensor_bytes(unsplit, n) for n in unsplit.order if n not in ("end_stem_relu", "end_b0_out")}
    cands = [Candidate(n, 0.001 * (k + 1), 0.001 * (len(sizes) - k), b) for k, (n, b) in enumerate(sizes.items())]
    prof = Profile("digits", cands, [OperatingPoint("exit0", 0.2, 0.3, 0.9)], server_only_accuracy=0.95,
                   notes={"three_tier_pairs": pairs})
    rows = predict_all_two_cuts(prof, _serial(1), Tiers(_serial(100), edge_slowdown=4.0))
    best = choose(rows, "mean", min_accuracy=0.95, candidates={"end_b1_out"})
    assert best.cloud_cut is not None and best.operating_point == "server-only"
    bundle = export_chosen(unsplit, list(meta["classes"]), best, prof, tmp_path / "recut", splits.val.images[:32])
    info = describe(bundle)
    assert [s["tier"] for s in Bundle.load(bundle).manifest["segments"]] == ["end", "edge", "cloud"]
    manifest = Bundle.load(bundle).manifest  # hashes verified on load
    assert manifest["partition"]["cuts"] == ["end_b1_out", best.cloud_cut]
    assert manifest["partition"]["bit_exact"]["frames"] == 32
    assert manifest["partition"]["plan"]["chosen"]["cloud_cut"] == best.cloud_cut
    assert [s["tier"] for s in info["segments"]] == ["end", "edge", "cloud"]
    assert manifest["thresholds"] == {"end": -1.0, "edge": -1.0}

    paths, _, _ = list_image_folder(digits_dir / "test")
    paths = paths[::max(1, len(paths) // 30)][:30]
    frames = tmp_path / "frames"
    for p in paths:
        (frames / p.parent.name).mkdir(parents=True, exist_ok=True)
        (frames / p.parent.name / p.name).write_bytes(p.read_bytes())
    size = tuple(manifest["input"]["shape"][1:3])
    imgs = np.stack([decode_image(frames / p.parent.name / p.name, size) for p in paths])
    full = dict(zip(unsplit.names, run_model(unsplit.model, imgs)))[FINAL_LOGITS].argmax(1)
    with Stack(bundle, edge_workers=1, cloud_workers=1) as stack:
        results = tmp_path / "results.jsonl"
        cfg = write_yaml(tmp_path / "cam.yaml", {
            "node_id": "cam-r", "bundle": str(bundle), "prefix": stack.prefix, "broker": {"port": stack.port},
            "source": {"uri": str(frames), "fps": 50}, "results_file": str(results), "audit_rate": 0.0,
            "drift": {"enabled": False}, "deadline_ms": 20000})
        node = TierProcess("cam-r", ["device", "--config", str(cfg)], tmp_path)
        assert node.expect_exit(120) == 0, node.tail(20)
    got = {Path(r["source"]).name: r for r in read_jsonl(results)}
    assert len(got) == len(paths) and not any(r["fallback"] for r in got.values())
    assert all(r["tier"] == "cloud" for r in got.values())  # both thresholds send every frame on
    assert [got[p.name]["label"] for p in paths] == full.tolist()  # the unsplit model's labels, bit-exact chain
    # The shipped bundle (its own trained boundaries, quantised per segment) through its cloud exit.
    original = offline_chain(small_bundle_dir, [frames / p.parent.name / p.name for p in paths])["cloud"].argmax(1)
    agreement = float((original == full).mean())
    print(f"re-cut {best.cuts} vs the shipped bundle's cloud labels: {agreement:.3f} of {len(paths)} frames agree")
    assert agreement >= 0.9
