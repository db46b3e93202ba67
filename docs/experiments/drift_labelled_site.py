# The digits bench's held-out evaluation frames (same split as `tierlite bench drift --seed 0`), fogged
# at severity 5 with a seed of their own, written as an operator's labelled folder <class>/*.jpg.
import sys
from pathlib import Path
import cv2
import numpy as np
from tierlite.bundle import Bundle
from tierlite.data import load_image_folder
from tierlite.tools.bench.corruptions import corrupt

bundle, data, out = Bundle.load(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
frames = load_image_folder(data, tuple(bundle.input_shape[1:3]), limit=250 + 190, seed=0)
order = np.random.default_rng(0).permutation(len(frames.labels))
held = order[250:]
fogged = corrupt(frames.images[held], "fog", 5, seed=77)
for i, (img, y) in enumerate(zip(fogged, frames.labels[held])):
    d = out / bundle.labels[int(y)]
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{i:04d}.jpg").write_bytes(cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes())
print(f"wrote {len(held)} labelled fogged frames to {out}")
