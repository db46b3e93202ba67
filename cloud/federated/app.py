"""The ServerApp the cloud's SuperLink runs for a tierlite federation (`tierlite.cloud.federated.app:app`).

numpy + Flower only: the initial model (`initial.npz`, named float32 arrays) is written by
`tierlite federate server` before the run, which also exports the result afterwards (TensorFlow).
Everything it needs comes from the run config (the app's pyproject.toml, written by the CLI).
"""
from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from tierlite.cloud.federated.strategy import TierliteFedAvg, TierliteHierFAVG, from_record, to_record, write_json
from tierlite.federated import dumps, loads, spec_of

app = ServerApp()

# What the ServerApp passes on to every site each round (the rest of the run config stays here).
SITE_KEYS = ("preset", "arch-set", "classes", "local-epochs", "local-steps", "lr", "lr-schedule", "proximal-mu", "personal", "seed",
             "num-server-rounds")


def _say(line: str) -> None:
    from flwr.supercore import log
    log(INFO, "[tierlite] %s", line)


def _wait_for_sites(grid: Grid, want: int, timeout: float) -> int:
    t0 = time.monotonic()
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= want or time.monotonic() - t0 > timeout:
            return n
        time.sleep(1.0)


def open_run(grid: Grid, context: Context, kind: str = ""):
    """Common start of a federation's ServerApp (this one, secagg.py's): the initial model, the
    report writer, and the sites waited for. Returns (run config, out dir, initial weights,
    write(update), sites waited for)."""
    cfg = context.run_config
    out = Path(str(cfg["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    initial = loads((out / "initial.npz").read_bytes())
    report = {"config": {k: cfg[k] for k in cfg}, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "model": {"arrays": len(initial), "parameters": int(sum(v.size for v in initial.values()))}}

    def write(update: dict) -> None:
        report.update(update)
        write_json(out / "report.json", report)

    wait = int(cfg.get("wait-sites", cfg.get("min-sites", 1)))
    n = _wait_for_sites(grid, wait, float(cfg.get("wait-timeout", 600)))
    _say(f"{n} site(s) connected (waited for {wait}); {int(cfg['num-server-rounds'])} round(s){kind}")
    return cfg, out, initial, write, wait


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, out, initial, write, _ = open_run(grid, context)
    spec = spec_of(initial)
    options = dict(report=write, min_sites=int(cfg.get("min-sites", 1)), evaluate=bool(cfg.get("evaluate", True)),
                   say=_say, server_lr=float(cfg.get("server-lr", 1.0)),
                   server_momentum=float(cfg.get("server-momentum", 0.0)))
    cloud_every = int(cfg.get("cloud-every", 0))
    if cloud_every:  # hierarchical: regions every round, the cloud every `cloud-every` rounds
        strategy = TierliteHierFAVG(spec, cloud_every, int(cfg["num-server-rounds"]), **options)
    else:
        strategy = TierliteFedAvg(spec, **options)
    site_cfg = ConfigRecord({k: cfg[k] for k in SITE_KEYS if k in cfg})
    t0 = time.monotonic()
    result = strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=int(cfg["num-server-rounds"]),
                            timeout=float(cfg.get("round-timeout", 3600)), train_config=site_cfg,
                            evaluate_config=ConfigRecord(dict(site_cfg)))
    final = from_record(result.arrays) if result.arrays is not None else initial
    (out / "global.npz").write_bytes(dumps(final))
    write({"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "seconds": round(time.monotonic() - t0, 1), "global": "global.npz"})
    _say(f"global model written to {out / 'global.npz'} ({len(final)} arrays)")
