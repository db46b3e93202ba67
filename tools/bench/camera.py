"""Where the camera decision's time goes (issue 15): the int8 end segment + exit decision
(`decide`, exactly what DeviceDaemon.process_frame times as decision_ms), on the same frames, in
one process and one run, under the conditions each published figure was taken in:

  back to back        frame after frame, nothing in between (`tierlite bench runtime`'s figure)
  interleaved         the edge and cloud segments run between two frames (`tierlite bench accuracy`
                      before issue 15: every model on frame 1, then frame 2, ...)
  blocks              each model back to back over blocks of frames (`bench accuracy` now)
  paced               one frame per 1/fps, the thread asleep in between (a camera's frame loop)
  cache flushed       back to back, but 256 MB streamed through the caches before each frame (a
                      control: what a frame costs when its model's memory comes from DRAM)
  node daemon         DeviceDaemon.process_frame at the same pace on a real Mosquitto (its paho
                      and deadline threads running), decision_ms from its result events

Wall-clock per frame and the frame loop's thread CPU time, so a machine shared with other jobs
shows up as the gap between the two.

    python -m tierlite.tools.bench.camera [--bundle DIR] [--data DIR] [--frames 1000] [--fps 100]
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

FLUSH_BYTES = 256 << 20  # beyond any L3 of the machines we run on


def _timed(frames: np.ndarray, n: int, step: Callable[[np.ndarray], None],
           before: Callable[[], None] | None = None) -> dict[str, Any]:
    from tierlite.tools.bench.report import latency_ms

    wall, cpu = [], []
    for i in range(n):
        if before is not None:
            before()
        x = frames[i % len(frames)][None]
        c0, t0 = time.thread_time(), time.perf_counter()
        step(x)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return {**latency_ms(wall), "cpu_mean_ms": 1e3 * float(np.mean(cpu))}


def camera_profile(bundle_dir: str | Path, frames: np.ndarray, n: int = 1000, fps: float = 100.0,
                   daemon: bool = True) -> list[dict[str, Any]]:
    """One row per condition (see the module docstring), each on the same `n` frames."""
    from tierlite.bundle import Bundle
    from tierlite.policy import decide
    from tierlite.segment import Segment

    bundle = Bundle.load(bundle_dir)
    end = Segment(bundle, "end")
    later = [Segment(bundle, t) for t in ("edge", "cloud") if t in bundle.segments]
    threshold = bundle.thresholds.get("end")

    def decision(x: np.ndarray) -> None:
        decide(end.run(x).logits, threshold)

    def other_tiers(x: np.ndarray) -> None:
        for seg in later:
            out = seg.run(x)
            x = out.feature
            if x is None:
                break

    last: dict[str, np.ndarray] = {}

    def decision_keeping_feature(x: np.ndarray) -> None:
        out = end.run(x)
        decide(out.logits, threshold)
        last["feature"] = out.feature

    for img in frames[:50]:  # warm-up: weights packed, interpreters allocated
        decision(img[None])
    flush = np.zeros(FLUSH_BYTES, np.uint8)
    interval = 1.0 / fps
    rows = [{"condition": "back to back", **_timed(frames, n, decision)}]
    rows.append({"condition": "interleaved with the edge and cloud segments (bench accuracy before)",
                 **_timed(frames, n, decision_keeping_feature,
                          lambda: other_tiers(last["feature"]) if "feature" in last else None)})
    block = 64  # tierlite.tools.bench.trace.BLOCK_FRAMES: the end back to back over a block, then the others
    counter = {"i": 0}

    def every_block() -> None:
        if counter["i"] % block == 0 and "feature" in last:
            for _ in range(block):
                other_tiers(last["feature"])
        counter["i"] += 1

    rows.append({"condition": f"blocks of {block} frames per model (bench accuracy now)",
                 **_timed(frames, n, decision_keeping_feature, every_block)})
    rows.append({"condition": f"paced at {fps:g} frames/s (thread asleep between frames)",
                 **_timed(frames, n, decision, lambda: time.sleep(interval))})
    rows.append({"condition": "cache flushed before each frame (256 MB streamed)",
                 **_timed(frames, n, decision, lambda: flush.__iadd__(1))})
    if daemon:
        rows.append(_daemon_row(bundle_dir, frames, n, fps))
    return rows


def _daemon_row(bundle_dir: str | Path, frames: np.ndarray, n: int, fps: float) -> dict[str, Any]:
    """DeviceDaemon.process_frame paced at `fps` on a real Mosquitto, every frame escalated (no
    tier above answers, so each falls back at its deadline: the daemon's threads all run)."""
    from tierlite.config import DeviceConfig
    from tierlite.device.daemon import DeviceDaemon
    from tierlite.tools.bench.report import latency_ms
    from tierlite.tools.stack import Broker

    with tempfile.TemporaryDirectory(prefix="tierlite-camera-") as tmp:
        broker = Broker(Path(tmp)).start()
        try:
            cfg = DeviceConfig.model_validate({
                "node_id": "camera-profile", "bundle": str(bundle_dir), "source": {"uri": tmp},
                "broker": {"host": "127.0.0.1", "port": broker.port}, "threshold": 0.0, "deadline_ms": 50,
                "max_pending": 4 * int(fps), "audit_rate": 0.0, "drift": {"enabled": False}})
            node = DeviceDaemon(cfg)
            decisions: list[float] = []
            node.add_result_listener(lambda e: decisions.append(e["decision_ms"] / 1e3))
            node.start()
            node.mqtt.wait_connected(10)
            cpu = []
            warm = frames[:50]
            for img in warm:
                node.process_frame(img)
            for i in range(n):
                time.sleep(1.0 / fps)
                c0 = time.thread_time()
                node.process_frame(frames[i % len(frames)])
                cpu.append(time.thread_time() - c0)
            node.shutdown()
        finally:
            broker.stop()
    timed = decisions[len(warm):]  # the warm-up frames resolve first (deadline order)
    return {"condition": f"node daemon at {fps:g} frames/s (real Mosquitto, every frame sent up)",
            **latency_ms(timed), "cpu_mean_ms": None,
            "frame_cpu_mean_ms": 1e3 * float(np.mean(cpu)) if cpu else None}


def main(argv: list[str] | None = None) -> int:
    from tierlite.tools.bench.report import markdown_table, profile_frames, profile_parser

    p = profile_parser("tierlite.tools.bench.camera", __doc__)
    p.add_argument("--frames", type=int, default=1000, help="timed frames per condition (default 1000)")
    p.add_argument("--fps", type=float, default=100.0, help="pace of the paced and daemon conditions (default 100)")
    p.add_argument("--no-daemon", action="store_true", help="skip the node daemon condition (no Mosquitto needed)")
    args = p.parse_args(argv)
    images = profile_frames(args, 500)
    rows = camera_profile(args.bundle, images, args.frames, args.fps, daemon=not args.no_daemon)
    cols = [("condition", "condition", str), ("n", "frames", None), ("p50_ms", "p50 ms", None),
            ("p99_ms", "p99 ms", None), ("mean_ms", "mean ms", None), ("cpu_mean_ms", "thread CPU ms (mean)", None),
            ("frame_cpu_mean_ms", "daemon frame loop CPU ms per frame", None)]
    print(markdown_table(cols, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
