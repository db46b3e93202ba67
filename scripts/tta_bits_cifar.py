"""The explorations behind `tierlite calibrate --end-tta` and `--feature-bits` (models/cifar10/MODEL_CARD.md):

    python scripts/tta_bits_cifar.py models/cifar10 ../shared/datasets/cifar10-jpeg/train ../shared/datasets/cifar10-jpeg/test

1. flip test-time augmentation per exit on the int8 chain: the mirrored frame through every tier,
   and the mirrored boundary feature at the edge / cloud alone (what the deeper tiers could do);
2. the end feature re-quantized to 5/4/3 bits, per tensor or per channel, over the
   0 / 0.1 / 0.5 percentile-clipped range of 1,000 validation frames: edge and cloud exit top-1.
"""
import argparse

import numpy as np

from tierlite.bundle import Bundle
from tierlite.converters.datasets import load_splits
from tierlite.data import load_image_folder, stratified_sample
from tierlite.policy import mirror, mirror_average
from tierlite.segment import Segment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("train_dir", help="the training folder (its 0.1 validation split, seed 0, gives the bit ranges)")
    p.add_argument("test_dir")
    args = p.parse_args()
    b = Bundle.load(args.bundle)
    end, edge, cloud = (Segment(b, t) for t in ("end", "edge", "cloud"))
    test = load_image_folder(args.test_dir)
    x, y = test.images, test.labels
    acc = lambda logits: round(100 * float((logits.argmax(1) == y).mean()), 2)  # noqa: E731

    e, e_m = end.run_batch(x), end.run_batch(mirror(x))
    d, d_m = edge.run_batch(e.feature), edge.run_batch(e_m.feature)
    c, c_m = cloud.run_batch(d.feature), cloud.run_batch(d_m.feature)
    d_f = edge.run_batch(np.ascontiguousarray(e.feature[:, :, ::-1]))  # mirrored boundary feature
    c_f = cloud.run_batch(np.ascontiguousarray(d.feature[:, :, ::-1]))
    print("exit: plain | mirrored frame through every tier, averaged | mirrored feature alone, averaged")
    print(f"end   {acc(e.logits)} | {acc(mirror_average(e.logits, e_m.logits))}")
    print(f"edge  {acc(d.logits)} | {acc(mirror_average(d.logits, d_m.logits))} | {acc(d_f.logits)}, "
          f"{acc(mirror_average(d.logits, d_f.logits))}")
    print(f"cloud {acc(c.logits)} | {acc(mirror_average(c.logits, c_m.logits))} | {acc(c_f.logits)}, "
          f"{acc(mirror_average(c.logits, c_f.logits))}")

    val = load_splits(args.train_dir, 32, 0.1, 0).val
    cal = val.images[stratified_sample(val.labels, 1000, seed=0)]
    ref = end.run_batch(cal).feature.astype(np.int32)
    q8 = e.feature.astype(np.int32)
    print("bits range clip%: edge / cloud exit top-1 (int8:", acc(d.logits), "/", acc(c.logits), ")")
    for bits in (5, 4, 3):
        top = 2 ** bits - 1
        for mode, axis in (("tensor", None), ("channel", (0, 1, 2))):
            for pct in (0.0, 0.1, 0.5):
                lo, hi = np.percentile(ref, pct, axis=axis), np.percentile(ref, 100 - pct, axis=axis)
                step = (hi - lo) / top
                r = np.clip(np.round(np.clip(np.round((q8 - lo) / step), 0, top) * step + lo), -128, 127)
                dq = edge.run_batch(r.astype(np.int8))
                print(f"{bits} {mode:7s} {pct}: {acc(dq.logits)} / {acc(cloud.run_batch(dq.feature).logits)}")


if __name__ == "__main__":
    main()
