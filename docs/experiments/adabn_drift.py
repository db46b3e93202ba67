"""Experiment (not part of the package): how much of the low-light drift does re-estimating the
BatchNorm statistics on unlabelled drifted frames undo, compared with distillation?

Float checkpoint, 4,000 CIFAR-10 test frames (shuffled): statistics re-estimated on the first
2,000 (100 % drifted, or half drifted and half clean), accuracy on the other 2,000.

    python docs/experiments/adabn_drift.py --checkpoint /work/runs/cut16e2 \
        --data ../shared/datasets/cifar10-jpeg/test
"""
import argparse

import keras
import numpy as np

from tierlite.tools.bench.drift import low_light
from tierlite.converters.train import load_checkpoint
from tierlite.data import load_image_folder

p = argparse.ArgumentParser()
p.add_argument("--checkpoint", required=True)
p.add_argument("--data", required=True)
p.add_argument("--frames", type=int, default=4000)
p.add_argument("--gain", type=float, default=0.5)
p.add_argument("--noise", type=float, default=8.0)
args = p.parse_args()

joint, _ = load_checkpoint(args.checkpoint)
test = load_image_folder(args.data, (32, 32), limit=args.frames, seed=0)
perm = np.random.default_rng(0).permutation(len(test.labels))
x, y = test.images[perm], test.labels[perm]
drifted, _ = low_light(x, args.gain, args.noise, seed=1)
half = len(y) // 2
held = slice(half, None)


def accuracy(images):
    outs = joint.predict(images.astype(np.float32), batch_size=256, verbose=0)
    return " / ".join(f"{(o[held].argmax(1) == y[held]).mean() * 100:.1f}" for o in outs)


print(f"exits end / edge / cloud, {len(y) - half} held-out frames")
print(f"trained statistics:            drifted {accuracy(drifted)}   clean {accuracy(x)}")
bns = [layer for layer in joint._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
trained = [bn.get_weights() for bn in bns]
for share in (1.0, 0.5):
    for bn, w in zip(bns, trained):
        bn.set_weights(w)
        bn.momentum = 0.0  # the moving statistics become those of the one batch below
    n = int(half * share)
    joint(np.concatenate([drifted[:n], x[n:half]]).astype(np.float32), training=True)
    print(f"statistics from {share:4.0%} drifted:  drifted {accuracy(drifted)}   clean {accuracy(x)}")
