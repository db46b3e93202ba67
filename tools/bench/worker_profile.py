"""Where a cloud worker's CPU goes per answer (issue 15): a real CloudWorker (its model, its
hard-example store, its MQTT client on a real Mosquitto) fed batches of real ESCALATE messages
in this process, process CPU time per message, against the cloud segment's invoke alone on the
same batches; plus the segment's multiply-accumulates per frame (from the model's ops), so the
model's share and the worker's overhead read side by side.

    python -m tierlite.tools.bench.worker_profile [--bundle DIR] [--data DIR] [--batch 32] [--messages 4096]
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def segment_macs(segment) -> int:
    """Multiply-accumulates of one frame through a LiteRT segment: conv, depthwise conv and fully
    connected ops (the rest is noise next to them), from the interpreter's op and tensor details."""
    interp = segment.runtime._interp  # LiteRT's Interpreter: the only runtime this profile needs
    shapes = {t["index"]: tuple(t["shape"]) for t in interp.get_tensor_details()}
    macs = 0
    for op in interp._get_ops_details():
        name, ins, outs = op["op_name"], op["inputs"], op["outputs"]
        if name == "CONV_2D":  # weights (out_c, kh, kw, in_c); output (1, h, w, out_c)
            _, h, w, _ = shapes[outs[0]]
            oc, kh, kw, ic = shapes[ins[1]]
            macs += h * w * oc * kh * kw * ic
        elif name == "DEPTHWISE_CONV_2D":  # weights (1, kh, kw, c)
            _, h, w, c = shapes[outs[0]]
            _, kh, kw, _ = shapes[ins[1]]
            macs += h * w * c * kh * kw
        elif name == "FULLY_CONNECTED":  # weights (out, in)
            o, i = shapes[ins[1]]
            macs += o * i
    return macs


def escalations(bundle, images: np.ndarray) -> list[bytes]:
    """Real ESCALATE messages: end and edge segments on real frames, as an edge worker sends them
    (with the node's feature forwarded, the default)."""
    from tierlite import wire
    from tierlite.segment import Segment

    end, edge = Segment(bundle, "end"), Segment(bundle, "edge")
    spec = wire.boundary_spec(bundle, wire.Kind.ESCALATE)
    out = []
    for i, img in enumerate(images):
        e = end.run(img[None])
        g = edge.run(e.feature)
        out.append(wire.encode_tensor_message(spec, i + 1, g.feature, [e.logits, g.logits], sent_us=wire.now_us(),
                                              end_feature=e.feature))
    return out


def profile_cloud_worker(bundle_dir: str | Path, images: np.ndarray, batch: int, messages: int,
                         store: bool = True) -> dict[str, Any]:
    from tierlite.bundle import Bundle
    from tierlite.cloud.worker import CloudWorker
    from tierlite.config import CloudConfig
    from tierlite.tools.stack import Broker

    bundle = Bundle.load(bundle_dir)
    payloads = escalations(bundle, images)
    items = [(f"tierlite/cam{i % 100:03d}/escalate", payloads[i % len(payloads)]) for i in range(batch)]
    rounds = max(1, messages // batch)
    with tempfile.TemporaryDirectory(prefix="tierlite-worker-profile-") as tmp:
        broker = Broker(Path(tmp) / "broker").start()
        try:
            cfg = CloudConfig.model_validate({
                "bundle": str(bundle_dir), "broker": {"host": "127.0.0.1", "port": broker.port},
                "metrics_port": None, "batch": {"max_size": batch},
                "store": {"enabled": store, "path": str(Path(tmp) / "hard.sqlite")}})
            worker = CloudWorker(cfg, bundle)
            worker.mqtt.start()
            worker.mqtt.wait_connected(10)
            seg = worker._model.segment
            spec = worker._model.spec_in
            x = worker._decode_batch(spec, [t for t, _ in items], [p for _, p in items]).tensor
            for _ in range(3):  # warm: interpreters, store tables, metrics label sets
                worker.on_escalate_batch(items)
                seg.run_batch(x)

            def cpu_per_message(fn) -> float:
                best = float("inf")
                for _ in range(3):  # min of 3: the least disturbed by the other jobs on the machine
                    c0 = time.process_time()
                    for _ in range(rounds):
                        fn()
                        if store:
                            worker.store.flush_if_due()
                    best = min(best, (time.process_time() - c0) / (rounds * batch))
                return 1e3 * best

            invoke_ms = cpu_per_message(lambda: seg.run_batch(x))
            worker_ms = cpu_per_message(lambda: worker.on_escalate_batch(items))
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(rounds):
                worker.on_escalate_batch(items)
            prof.disable()
            worker.mqtt.stop()
            if worker.store is not None:
                worker.store.close()
        finally:
            broker.stop()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
    return {"batch": batch, "messages": rounds * batch, "store": store, "macs_per_frame": segment_macs(seg),
            "invoke_cpu_ms_per_frame": invoke_ms, "worker_cpu_ms_per_message": worker_ms,
            "overhead_cpu_ms_per_message": worker_ms - invoke_ms, "profile": text.getvalue()}


def main(argv: list[str] | None = None) -> int:
    from tierlite.tools.bench.report import profile_frames, profile_parser

    p = profile_parser("tierlite.tools.bench.worker_profile", __doc__)
    p.add_argument("--batch", type=int, default=32, help="messages per batch (default 32, the workers' default max)")
    p.add_argument("--messages", type=int, default=4096, help="messages per timed pass (default 4096)")
    p.add_argument("--profile", action="store_true", help="also print the top functions by own time")
    args = p.parse_args(argv)
    images = profile_frames(args, 256)
    for store in (True, False):
        r = profile_cloud_worker(args.bundle, images, args.batch, args.messages, store)
        print(f"cloud worker, batch {r['batch']}, store {'on' if store else 'off'}, {r['messages']} messages: "
              f"{r['worker_cpu_ms_per_message']:.3f} CPU ms per answer; cloud segment invoke alone "
              f"{r['invoke_cpu_ms_per_frame']:.3f} ms per frame ({r['macs_per_frame'] / 1e6:.1f} M MACs); "
              f"overhead {r['overhead_cpu_ms_per_message']:.3f} ms", flush=True)
        if args.profile:
            print(r["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
