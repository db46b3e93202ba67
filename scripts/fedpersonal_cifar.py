"""Personalised exit heads against the global model, int8, on each site's own class mix
(docs/COTRAINING.md, "Personalised heads on CIFAR-10"). For a finished personalised arm of
scripts/cotrain_cifar.sh (PERSONAL=...):

    python3 scripts/fedpersonal_cifar.py ARM_DIR [--test-dir DATA/test] [--against BUNDLE ...]

Each site's personalised model is FedPer's: the federation's body (OUT/global.npz) with the heads
the site kept (site<i>/personal.npz). It is exported like the global model (int8, calibrated on the
cloud's held-out folder) to ARM_DIR/out/bundle-site<i>, and both bundles' int8 chains run on the
10,000 test frames. A site's accuracy is the per-class test accuracy weighted by the site's class
mix (its frame counts per class): what that site's cameras would see. --against BUNDLE (repeatable):
other models on the same site mixes, e.g. a plain FedAvg arm's global bundle or the pretrained body's.
A site bundle already exported (ARM_DIR/out/bundle-site<i>/manifest.json) is reused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tierlite.cloud.federated.server import export_global
from tierlite.converters import load_folder_cached
from tierlite.converters.pipeline import run_chain
from tierlite.federated import dumps, loads

TIERS = ("end", "edge", "cloud")


def per_class_accuracy(logits: list[np.ndarray], labels: np.ndarray, classes: int) -> np.ndarray:
    """(exits, classes) top-1 accuracy of each exit on each class."""
    return np.array([[float((l[labels == c].argmax(1) == c).mean()) for c in range(classes)] for l in logits])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arm", type=Path, help="OUT of scripts/cotrain_cifar.sh (out/, sites/, site<i>/, calib/)")
    p.add_argument("--test-dir", type=Path, default=Path("/work/shared/datasets/cifar10-jpeg/test"))
    p.add_argument("--against", type=Path, action="append", default=[], help="another bundle to weigh per site")
    a = p.parse_args()
    out = a.arm / "out"
    meta = json.loads((out / "model.json").read_text())
    classes = meta["classes"]
    personal_tiers = json.loads((out / "report.json").read_text())["config"].get("personal", "")
    if not personal_tiers:
        raise SystemExit(f"{a.arm}: not a personalised arm (no `personal` in its run config)")
    test = load_folder_cached(a.test_dir, 32, out / "cache")
    glob = loads((out / "global.npz").read_bytes())
    acc_global = per_class_accuracy(run_chain(out / "bundle", test.images), test.labels, len(classes))
    acc_other = {str(b): per_class_accuracy(run_chain(b, test.images), test.labels, len(classes)) for b in a.against}
    rows = []
    for site in sorted(d for d in (a.arm / "sites").iterdir() if d.is_dir()):
        counts = np.array([len(list((site / c).iterdir())) if (site / c).is_dir() else 0 for c in classes], float)
        mix = counts / counts.sum()
        heads = loads((a.arm / site.name / "personal.npz").read_bytes())
        weights_file = out / f"personal-{site.name}.npz"
        weights_file.write_bytes(dumps({**glob, **heads}))
        bundle = out / f"bundle-{site.name}"
        if not (bundle / "manifest.json").is_file():
            bundle = export_global(out, a.arm / "calib", bundle, weights_file=weights_file, name=f"federated-{site.name}")
        acc_own = per_class_accuracy(run_chain(bundle, test.images), test.labels, len(classes))
        row = {"site": site.name, "frames": int(counts.sum()),
               "global": dict(zip(TIERS, (acc_global @ mix).round(4).tolist())),
               "personal": dict(zip(TIERS, (acc_own @ mix).round(4).tolist())),
               "personal_on_uniform_test": dict(zip(TIERS, acc_own.mean(1).round(4).tolist())),
               "against": {b: dict(zip(TIERS, (acc @ mix).round(4).tolist())) for b, acc in acc_other.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "personal-evaluation.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
