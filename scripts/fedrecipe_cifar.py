"""In-process FedAvg on CIFAR-10 site folders, to compare training recipes quickly (docs/COTRAINING.md,
"Closing the recipe gap"). Not the proof: no Flower, no processes, float test accuracy on a
subset. It runs the same code the sites run (converters.fedtrain.local_train) and the cloud's
math (tierlite.federated), round after round, in one process.

    python3 scripts/fedrecipe_cifar.py SITES_DIR --rounds 3 --epochs 1 --lr 0.1 --schedule cycle \
        [--central] [--server-momentum 0.9 --server-lr 1] [--set batch_size=16] [--test-limit 2000]

--central trains one model on the union of the sites' training splits for rounds x epochs epochs
(the centralised upper bound with the same loss, augmentation and schedule).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tierlite.converters import build_federated_model, exit_accuracy, load_folder_cached, load_splits
from tierlite.converters import local_train, model_weights, set_model_weights
from tierlite.converters.cli import parse_sets
from tierlite.federated import server_step, weighted_average


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sites_dir", type=Path, help="folder of site folders (site0, site1, ...)")
    p.add_argument("--test-dir", type=Path, default=Path("/work/shared/datasets/cifar10-jpeg/test"))
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--cache", type=Path, default=Path("/work/runs/fedrecipe-cache"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--schedule", choices=("const", "cycle"), default="cycle")
    p.add_argument("--weight-decay", type=float, help="default: the preset's")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--server-momentum", type=float, default=0.0)
    p.add_argument("--central", action="store_true")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--json", type=Path, help="append the result as one JSON line here")
    a = p.parse_args()
    overrides = {"flip": True, **parse_sets(a.set)}
    model, arch, tc = build_federated_model("small", 10, 0, **overrides)
    sites = []
    for d in sorted(x for x in a.sites_dir.iterdir() if x.is_dir()):
        sp = load_splits(d, arch.input_size, tc.val_fraction, 0, None, a.cache / d.name)
        classes = sorted(x.name for x in (a.test_dir).iterdir() if x.is_dir())
        index = np.array([classes.index(c) for c in sp.classes])
        sites.append((sp.train.images, index[sp.train.labels]))
    test = load_folder_cached(a.test_dir, arch.input_size, a.cache / "test", a.test_limit, 0)
    if a.central:
        sites = [(np.concatenate([s[0] for s in sites]), np.concatenate([s[1] for s in sites]))]
    current = model_weights(model)
    velocity = None
    t0 = time.process_time()
    history = []
    for rnd in range(1, a.rounds + 1):
        outs, ns = [], []
        for i, (x, y) in enumerate(sites):
            set_model_weights(model, current)
            res = local_train(model, x, y, tc, epochs=a.epochs, lr=a.lr, seed=1000 * i + rnd,
                              schedule=(rnd, a.rounds) if a.schedule == "cycle" else None,
                              weight_decay=a.weight_decay)
            outs.append(model_weights(model))
            ns.append(len(y))
        avg = weighted_average(outs, ns)
        current, velocity = server_step(current, avg, velocity, a.server_lr, a.server_momentum)
        set_model_weights(model, current)
        acc = exit_accuracy(model, test.images, test.labels)
        history.append(acc)
        print(f"round {rnd}: test float end/edge/cloud {'/'.join(f'{v:.3f}' for v in acc)} "
              f"(lr {res['lr'][0]:.3f}->{res['lr'][1]:.3f}, {time.process_time() - t0:.0f} CPU s)", flush=True)
    line = {"args": {k: str(v) for k, v in vars(a).items()}, "test_float": history[-1], "history": history,
            "cpu_s": round(time.process_time() - t0, 1), "sites": len(sites), "frames": int(sum(len(s[1]) for s in sites))}
    print(json.dumps(line))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
