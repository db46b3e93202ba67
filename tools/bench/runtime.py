"""`tierlite bench runtime`: the camera path and the fleet load, measured through one open-loop
load generator (the one `tierlite bench fleet` uses), real Mosquitto and real processes on loopback.

  camera decision  end segment + exit decision per frame, back to back in this process (what
                   DeviceDaemon.process_frame times as decision_ms)
  node daemon      a real `tierlite device` process at a paced frame rate with end threshold 0 (every
                   frame goes up) against `tierlite edge` and `tierlite cloud` with edge threshold 0:
                   decision_ms inside the daemon's loop beside the back-to-back figure, and each
                   frame's round trip end->edge->cloud->result (>= 1,000 frames by default, so the
                   p99 stands on enough frames)
  fleet            the open-loop rate steps of `bench fleet` (tierlite.tools.bench.loadgen.FleetLoad):
                   batching off and on side by side, knee, lost/duplicated, CPU ms per escalation
One results.json (key "runtime") and runtime.md through the report module.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.tools.bench.fleet import add_fleet_results, configure_fleet, measure_fleet
from tierlite.tools.bench.report import Report, Target, latency_ms, markdown_table, say

T_CAMERA = Target("camera decision p50 (int8 end, decode-to-decision)", 0.2, False, " ms")
T_CAMERA_DAEMON = Target("camera decision p50 inside the node daemon", 0.2, False, " ms")
T_RTT_P99 = Target("escalation round trip p99 (end->edge->cloud->result)", 10.0, False, " ms")


def configure_runtime(p: argparse.ArgumentParser) -> None:
    configure_fleet(p)
    p.set_defaults(workers="1", rates="100,1000,2000,3000,4000,6000")
    p.add_argument("--decision-frames", type=int, default=2000, help="frames for the back-to-back camera decision")
    p.add_argument("--rtt-frames", type=int, default=1000, help="frames the node daemon sends up (default 1000)")
    p.add_argument("--rtt-fps", type=float, default=100.0, help="the node daemon's paced frame rate (default 100)")


def camera_decision(bundle, images: np.ndarray, n: int) -> dict[str, Any]:
    """End segment + exit decision per frame, back to back: exactly what DeviceDaemon.process_frame
    times as decision_ms (the frame already decoded, as the camera source hands it over)."""
    from tierlite.policy import decide
    from tierlite.segment import Segment

    seg = Segment(bundle, "end")
    thr = bundle.thresholds.get("end", 0.5)
    for img in images[:50]:  # warm-up
        decide(seg.run(img[None]).logits, thr)
    times = []
    for i in range(n):
        img = images[i % len(images)][None]
        t0 = time.perf_counter()
        decide(seg.run(img).logits, thr)
        times.append(time.perf_counter() - t0)
    return latency_ms(times)


def node_daemon(args, frames_dir: str) -> dict[str, Any]:
    """A real `tierlite device` process escalating every frame through edge and cloud."""
    from tierlite.errors import TierliteError
    from tierlite.tools.stack import Stack, TierProcess, read_jsonl, write_yaml

    with Stack(args.bundle, edge_threshold=0.0, edge_extra={"node_budget": {"enabled": False}}) as stack:
        results = stack.dir / "rtt.jsonl"
        cfg = write_yaml(stack.dir / "rtt-node.yaml", {
            "node_id": "rtt-node", "bundle": stack.bundle, "prefix": stack.prefix,
            "broker": {"host": stack.host, "port": stack.port},
            "source": {"uri": str(Path(frames_dir).resolve()), "fps": args.rtt_fps, "loop": True, "limit": args.rtt_frames},
            "threshold": 0.0, "deadline_ms": 1000, "wait_for_broker": 10, "results_file": str(results)})
        proc = TierProcess("rtt-node", ["--log-level", "warning", "device", "--config", str(cfg)], stack.dir)
        code = proc.wait(args.rtt_frames / args.rtt_fps + 60)
        rows = read_jsonl(results) if results.exists() else []
        if code != 0 or not rows:
            raise TierliteError(f"bench runtime: the node daemon exited with code {code} after {len(rows)} "
                                f"frames: {proc.tail(5)}")
    answered = [r for r in rows if r["tier"] == "cloud" and not r.get("fallback")]
    reasons: dict[str, int] = {}
    for r in rows:
        if r.get("fallback"):
            reasons[str(r.get("reason"))] = reasons.get(str(r.get("reason")), 0) + 1
    return {"frames": len(rows), "answered_by_cloud": len(answered),
            "fallbacks": sum(reasons.values()), "fallback_reasons": reasons, "fps": args.rtt_fps,
            "decision": latency_ms([r["decision_ms"] / 1e3 for r in rows if "decision_ms" in r]),
            "round_trip": latency_ms([r["latency_ms"] / 1e3 for r in answered])}


CAMERA_COLUMNS = [("what", "measured", str), ("n", "frames", None), ("p50_ms", "p50 ms", None),
                  ("p99_ms", "p99 ms", None), ("mean_ms", "mean ms", None)]
TARGET_COLUMNS = [("target", "target", str), ("goal", "goal", str), ("measured", "measured", None),
                  ("status", "status", str)]


def run_runtime(args: argparse.Namespace) -> int:
    from tierlite.bundle import Bundle
    from tierlite.data import load_image_folder
    from tierlite.errors import ConfigError

    if args.decision_frames < 10 or args.rtt_frames < 10 or args.rtt_fps <= 0:
        raise ConfigError("--decision-frames and --rtt-frames must be >= 10, --rtt-fps > 0")
    report = Report("runtime", args.out, args)
    bundle = Bundle.load(args.bundle)
    images = load_image_folder(args.data, tuple(bundle.input_shape[1:3]), limit=500, seed=args.seed).images
    say(f"camera decision, back to back ({args.decision_frames} frames) ...")
    camera = camera_decision(bundle, images, args.decision_frames)
    say(f"node daemon: {args.rtt_frames} frames at {args.rtt_fps:g} fps, every frame to the cloud ...")
    daemon = node_daemon(args, args.data)
    fleet_bundle, messages, runs = measure_fleet(args)
    targets = [T_CAMERA.check(camera["p50_ms"]), T_CAMERA_DAEMON.check(daemon["decision"]["p50_ms"]),
               T_RTT_P99.check(daemon["round_trip"]["p99_ms"])]
    report.results.update(camera_decision=camera, node_daemon=daemon, runtime_targets=targets)
    rows = [{"what": "camera decision, back to back", **camera},
            {"what": f"camera decision inside the node daemon at {args.rtt_fps:g} fps", **daemon["decision"]},
            {"what": "escalation round trip end->edge->cloud->result", **daemon["round_trip"]}]
    report.add_markdown(f"Camera path and node daemon ({daemon['frames']} frames, {daemon['fallbacks']} fallbacks):"
                        f"\n\n{markdown_table(CAMERA_COLUMNS, rows)}\n\n{markdown_table(TARGET_COLUMNS, targets)}\n")
    print(markdown_table(CAMERA_COLUMNS, rows))
    print()
    print(markdown_table(TARGET_COLUMNS, targets))
    print()
    add_fleet_results(report, args, fleet_bundle, messages, runs)
    paths = report.write()
    say(f"wrote {paths['results']} and {paths['markdown']}")
    return 0
