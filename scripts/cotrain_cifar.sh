#!/usr/bin/env bash
# One co-training arm on CIFAR-10 JPEG (docs/COTRAINING.md): split the training frames over N
# sites (Dirichlet ALPHA over classes, or IID), hold out CALIB frames for the cloud's calibration,
# run `tierlite federate server` + N `tierlite federate site` processes on loopback, export the
# aggregated model and evaluate the int8 bundle on the 10,000 test frames.
#   OUT=/work/runs/fed-noniid SITES=4 ALPHA=0.5 LIMIT=10000 ROUNDS=3 EPOCHS=1 MU=0 bash scripts/cotrain_cifar.sh
# LR: the sites' peak rate (default: the preset's); SCHEDULE cycle|const; SETS_EXTRA: extra --set overrides,
# e.g. SETS_EXTRA="batch_size=16"; SERVER_LR / SERVER_MOMENTUM: FedAvgM; STEPS: local steps per round
# (instead of EPOCHS); SECAGG=1: Flower's SecAgg+. The export recomputes BatchNorm statistics on the
# cloud's held-out frames (AVERAGED_BN=1: keep the sites' average).
# PUBLIC=N: also link the next N frames (after CALIB + LIMIT: no site's, calibration or test frame) to
# OUT/public, the cloud's own labelled data for a shared pretrained body; INIT_FROM=WORKDIR: start the
# federation from that checkpoint (`tierlite federate server --init-from`); SPLIT_ONLY=1: split, then stop.
# SEED: the federation's seed (the sites' batch order and augmentation; the split stays the same);
# NO_EVALUATE=1: no per-round evaluation at the sites (saves a ClientApp start per site and round).
set -euo pipefail
DATA=${DATA:-/work/shared/datasets/cifar10-jpeg}
OUT=${OUT:?set OUT}; SITES=${SITES:-4}; ALPHA=${ALPHA:-0.5}; LIMIT=${LIMIT:-10000}; CALIB=${CALIB:-1000}
ROUNDS=${ROUNDS:-3}; EPOCHS=${EPOCHS:-1}; MU=${MU:-0}; PERSONAL=${PERSONAL:-}; PRESET=${PRESET:-small}
PORT=${PORT:-9520}; LR=${LR:-}; SCHEDULE=${SCHEDULE:-cycle}; SERVER_LR=${SERVER_LR:-1}; SERVER_MOMENTUM=${SERVER_MOMENTUM:-0}
mkdir -p "$OUT"
python3 - "$DATA/train" "$OUT" "$SITES" "$ALPHA" "$LIMIT" "$CALIB" "${PUBLIC:-0}" <<'PY'
import sys, numpy as np
from pathlib import Path
from tierlite.data import list_image_folder
from tierlite.tools.federate import split_sites
src, out, sites, alpha, limit, calib = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
public = int(sys.argv[7])
paths, labels, classes = list_image_folder(src)
order = np.random.default_rng(123).permutation(len(paths))
cal = out / "calib"            # the cloud's held-out frames (never a site's)
for i in order[:calib]:
    d = cal / classes[labels[i]]; d.mkdir(parents=True, exist_ok=True)
    if not (d / paths[i].name).exists(): (d / paths[i].name).symlink_to(paths[i].resolve())
pool = out / "pool"            # the rest, split over the sites
for i in order[calib:calib + limit]:
    d = pool / classes[labels[i]]; d.mkdir(parents=True, exist_ok=True)
    if not (d / paths[i].name).exists(): (d / paths[i].name).symlink_to(paths[i].resolve())
for i in order[calib + limit:calib + limit + public]:  # the cloud's public frames, disjoint from all the above
    d = out / "public" / classes[labels[i]]; d.mkdir(parents=True, exist_ok=True)
    if not (d / paths[i].name).exists(): (d / paths[i].name).symlink_to(paths[i].resolve())
dirs = split_sites(pool, out / "sites", sites, None if alpha == "iid" else float(alpha), seed=0)
for d in dirs:
    print(d, {c.name: len(list(c.iterdir())) for c in sorted(d.iterdir())})
PY
[ -n "${SPLIT_ONLY:-}" ] && exit 0
SETS=()
[ -n "${INIT_FROM:-}" ] && SETS+=(--init-from "$INIT_FROM")
[ -n "$PERSONAL" ] && SETS+=(--personal "$PERSONAL")
[ -n "$LR" ] && SETS+=(--lr "$LR")
[ -n "${STEPS:-}" ] && SETS+=(--local-steps "$STEPS")
[ -n "${SECAGG:-}" ] && SETS+=(--secagg)
[ -n "${AVERAGED_BN:-}" ] && SETS+=(--averaged-bn)
[ -n "${NO_EVALUATE:-}" ] && SETS+=(--no-evaluate)
for kv in ${SETS_EXTRA:-}; do SETS+=(--set "$kv"); done
python3 -m tierlite federate server "$OUT/out" --sites "$SITES" --rounds "$ROUNDS" --local-epochs "$EPOCHS" \
    --lr-schedule "$SCHEDULE" --server-lr "$SERVER_LR" --server-momentum "$SERVER_MOMENTUM" --proximal-mu "$MU" --preset "$PRESET" --seed "${SEED:-0}" --set flip=true --calib-dir "$OUT/calib" --insecure \
    --port "$PORT" --export "${SETS[@]}" > "$OUT/server.log" 2>&1 &
SERVER=$!
sleep 20
PIDS=()
for i in $(seq 0 $((SITES - 1))); do
    python3 -m tierlite federate site "$OUT/sites/site$i" --superlink "127.0.0.1:$PORT" --name "site$i" \
        --workdir "$OUT/site$i" --port $((PORT + 10 + i)) --insecure > "$OUT/site$i.log" 2>&1 &
    PIDS+=($!)
done
wait "$SERVER"; RC=$?
kill "${PIDS[@]}" 2>/dev/null || true
python3 - "$OUT/out/bundle" "$DATA/test" <<'PY'
import sys, json
from tierlite.converters.pipeline import evaluate_bundle
r = evaluate_bundle(sys.argv[1], sys.argv[2], cache_dir=sys.argv[1] + "-cache")
print(json.dumps({k: r[k] for k in ("frames", "int8_exit_accuracy", "segment_bytes")}, indent=1))
json.dump(r, open(sys.argv[1] + "-test-evaluation.json", "w"), indent=1)
PY
exit $RC
