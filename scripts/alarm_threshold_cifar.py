"""What `drift.alarm_threshold_scale` buys and costs under a drift (issue 13, docs/DRIFT.md): the
int8 chain of a bundle over the test frames, clean and corrupted (tierlite.tools.bench.corruptions),
decided with the end threshold scaled by each factor (edge threshold unchanged): system and
end-exit accuracy, the tiers' shares, the camera -> edge bytes per frame and the edge's load.

    python scripts/alarm_threshold_cifar.py models/cifar10 ../shared/datasets/cifar10-jpeg/test \
        --conditions clean,fog:3,blur:3,noise:3,low_light:3,contrast:3 --out /work/runs/alarm-scale
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("test_dir", type=Path)
    p.add_argument("--conditions", default="clean,fog:3,blur:3,noise:3,low_light:3,contrast:3")
    p.add_argument("--scales", default="1,0.75,0.5,0.25,0")
    p.add_argument("--limit", type=int, help="at most this many test frames (stratified order kept)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    from tierlite.bundle import Bundle, FeatureEncoding
    from tierlite.converters.calibrate import evaluate
    from tierlite.converters.pipeline import run_chain
    from tierlite.data import load_image_folder
    from tierlite.tools.bench.corruptions import corrupt
    from tierlite.wire import encoded_size

    b = Bundle.load(args.bundle)
    data = load_image_folder(args.test_dir, tuple(b.input_shape[1:3]), limit=args.limit)
    fbytes = (encoded_size(b.segment("end").output("feature").shape, b.encoding),
              encoded_size(b.segment("edge").output("feature").shape, FeatureEncoding.INT8))
    scales = [float(s) for s in args.scales.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for cond in args.conditions.split(","):
        t0 = time.monotonic()
        images = data.images if cond == "clean" else corrupt(data.images, *_family(cond), seed=0)
        logits = run_chain(args.bundle, images)
        for scale in scales:
            thresholds = {"end": b.thresholds["end"] * scale, "edge": b.thresholds["edge"]}
            op = evaluate(logits, data.labels, thresholds, fbytes)
            rows.append({"condition": cond, "scale": scale, "end_threshold": thresholds["end"],
                         "system_accuracy": op.accuracy, "end_exit_accuracy": float((logits[0].argmax(1) == data.labels).mean()),
                         "cloud_only_accuracy": op.cloud_only_accuracy, "fractions": op.fractions,
                         "camera_uplink_bytes": op.camera_uplink_bytes, "edge_uplink_bytes": op.edge_uplink_bytes,
                         "frames": len(data.labels)})
            r = rows[-1]
            print(f"{cond:12s} x{scale:<5g} system {r['system_accuracy'] * 100:6.2f} %  end/edge/cloud "
                  f"{op.fractions['end'] * 100:5.1f}/{op.fractions['edge'] * 100:5.1f}/{op.fractions['cloud'] * 100:5.1f} %  "
                  f"up {op.camera_uplink_bytes:6.1f} B/frame", flush=True)
        print(f"{cond}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        (args.out / "alarm-threshold-scale.json").write_text(json.dumps(
            {"bundle": str(args.bundle), "thresholds": b.thresholds, "rows": rows}, indent=1) + "\n")
    return 0


def _family(cond: str) -> tuple[str, int]:
    family, _, severity = cond.partition(":")
    return family, int(severity or 3)


if __name__ == "__main__":
    sys.exit(main())
