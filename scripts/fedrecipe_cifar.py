"""In-process FedAvg on CIFAR-10 site folders, to compare training recipes quickly (docs/COTRAINING.md,
"Closing the recipe gap"). Not the proof: no Flower, no processes, float test accuracy on a
subset. It runs the same code the sites run (converters.fedtrain.local_train) and the cloud's
math (tierlite.federated), round after round, in one process.

    python3 scripts/fedrecipe_cifar.py SITES_DIR --rounds 3 --epochs 1 --lr 0.1 --schedule cycle \
        [--central] [--server-momentum 0.9 --server-lr 1] [--set batch_size=16] [--test-limit 2000]
        [--seed S] [--fedbn] [--calib-dir DIR] [--init-from WORKDIR] [--only-site I] [--mu MU]

--seed S: the model's initialisation and every site's batch order / augmentation (seed 0 is what
the earlier runs used). --fedbn: each site keeps its BatchNorm layers (FedBN). Every run reports
the global model twice: with the averaged BatchNorm statistics ("test_float") and with statistics
recomputed on the cloud's held-out frames (--calib-dir, default SITES_DIR/../calib: "test_float_bn").

--init-from WORKDIR: start from a pretrained checkpoint (`tierlite train`/`convert --workdir`; the cloud's
public frames), as `tierlite federate server --init-from` does. --only-site I: local-only, site I alone
(its training split, the same schedule and samples per site as FedAvg). --mu: FedProx's proximal term.
--rounds 0: evaluate the initial (e.g. pretrained) model only.

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
from tierlite.converters import load_checkpoint, local_train, model_weights, recompute_batchnorm, set_model_weights
from tierlite.converters.cli import parse_sets
from tierlite.federated import is_batchnorm, server_step, weighted_average


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-steps", type=int, help="local steps per round instead of --epochs epochs")
    p.add_argument("--every-round", action="store_true", help="evaluate after every round (default: the last)")
    p.add_argument("--fedbn", action="store_true", help="sites keep their BatchNorm layers (FedBN)")
    p.add_argument("--calib-dir", type=Path, help="the cloud's held-out frames (default SITES_DIR/../calib)")
    p.add_argument("--init-from", type=Path, help="checkpoint workdir of a pretrained model (same architecture)")
    p.add_argument("--only-site", type=int, help="local-only: train site I alone")
    p.add_argument("--mu", type=float, default=0.0, help="FedProx proximal term")
    p.add_argument("--json", type=Path, help="append the result as one JSON line here")
    a = p.parse_args()
    overrides = {"flip": True, **parse_sets(a.set)}
    model, arch, tc = build_federated_model("small", 10, a.seed, **overrides)
    if a.init_from:
        pretrained, meta = load_checkpoint(a.init_from)
        set_model_weights(model, model_weights(pretrained), who=str(a.init_from))
    sites = []
    for d in sorted(x for x in a.sites_dir.iterdir() if x.is_dir()):
        sp = load_splits(d, arch.input_size, tc.val_fraction, 0, None, a.cache / d.name)
        classes = sorted(x.name for x in (a.test_dir).iterdir() if x.is_dir())
        index = np.array([classes.index(c) for c in sp.classes])
        sites.append((sp.train.images, index[sp.train.labels]))
    test = load_folder_cached(a.test_dir, arch.input_size, a.cache / "test", a.test_limit, 0)
    calib = load_folder_cached(a.calib_dir or a.sites_dir.parent / "calib", arch.input_size, a.cache / "calib")
    if a.only_site is not None:
        sites = [sites[a.only_site]]
    if a.central:
        sites = [(np.concatenate([s[0] for s in sites]), np.concatenate([s[1] for s in sites]))]
    current = model_weights(model)
    velocity = None
    kept_bn: list[dict] = [{} for _ in sites]  # FedBN: each site's own BatchNorm layers
    t0 = time.process_time()
    history = []
    for rnd in range(1, a.rounds + 1):
        outs, ns = [], []
        for i, (x, y) in enumerate(sites):
            set_model_weights(model, current)
            if kept_bn[i]:
                set_model_weights(model, kept_bn[i], partial=True)
            res = local_train(model, x, y, tc, epochs=a.epochs, lr=a.lr, seed=1000 * i + rnd + 100_000 * a.seed,
                              schedule=(rnd, a.rounds) if a.schedule == "cycle" else None,
                              weight_decay=a.weight_decay, steps=a.local_steps, proximal_mu=a.mu)
            outs.append(model_weights(model))
            if a.fedbn:
                kept_bn[i] = {k: v for k, v in outs[-1].items() if is_batchnorm(k)}
            ns.append(len(y))
        avg = weighted_average(outs, ns)
        current, velocity = server_step(current, avg, velocity, a.server_lr, a.server_momentum)
        set_model_weights(model, current)
        if rnd < a.rounds and not a.every_round:  # the test pass costs as much as a site's round here
            print(f"round {rnd} ({time.process_time() - t0:.0f} CPU s)", flush=True)
            continue
        acc = exit_accuracy(model, test.images, test.labels)
        history.append(acc)
        print(f"round {rnd}: test float end/edge/cloud {'/'.join(f'{v:.3f}' for v in acc)} "
              f"(lr {res['lr'][0]:.3f}->{res['lr'][1]:.3f}, {time.process_time() - t0:.0f} CPU s)", flush=True)
    if not history:  # --rounds 0: the initial model
        history.append(exit_accuracy(model, test.images, test.labels))
        print(f"initial model: test float end/edge/cloud {'/'.join(f'{v:.3f}' for v in history[-1])}", flush=True)
    recompute_batchnorm(model, calib.images)
    acc_bn = exit_accuracy(model, test.images, test.labels)
    print(f"final, BatchNorm statistics recomputed on {len(calib.labels)} held-out frames: "
          f"{'/'.join(f'{v:.3f}' for v in acc_bn)}", flush=True)
    line = {"args": {k: str(v) for k, v in vars(a).items()}, "test_float": history[-1], "test_float_bn": acc_bn,
            "history": history,
            "cpu_s": round(time.process_time() - t0, 1), "sites": len(sites), "frames": int(sum(len(s[1]) for s in sites))}
    print(json.dumps(line))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
