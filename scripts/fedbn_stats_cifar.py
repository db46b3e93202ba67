"""Float test accuracy of Flower runs' aggregated models (OUT/global.npz of scripts/cotrain_cifar.sh runs)
with the sites' averaged BatchNorm statistics and with statistics recomputed on the run's held-out
calibration frames (docs/COTRAINING.md, "BatchNorm statistics of the aggregate").

    TF_CPP_MIN_LOG_LEVEL=2 python3 scripts/fedbn_stats_cifar.py RUN_DIR [RUN_DIR ...]
"""
import json, sys, time
from pathlib import Path
from tierlite.converters import build_federated_model, exit_accuracy, load_folder_cached, recompute_batchnorm, set_model_weights
from tierlite.federated import loads
t0 = time.process_time()
for run in sys.argv[1:]:
    out = Path(run) / "out"
    meta = json.loads((out / "model.json").read_text())
    model, arch, tc = build_federated_model(meta["preset"], len(meta["classes"]), meta["seed"], **meta["overrides"])
    set_model_weights(model, loads((out / "global.npz").read_bytes()))
    test = load_folder_cached("/work/shared/datasets/cifar10-jpeg/test", arch.input_size, "/work/runs/fedrecipe-cache/test", 10000, 0)
    calib = load_folder_cached(Path(run) / "calib", arch.input_size, "/work/runs/fedrecipe-cache/calib")
    a = exit_accuracy(model, test.images, test.labels)
    recompute_batchnorm(model, calib.images)
    b = exit_accuracy(model, test.images, test.labels)
    print(json.dumps({"run": run, "averaged_bn": a, "recomputed_bn": b, "cpu_s": round(time.process_time() - t0, 1)}), flush=True)
