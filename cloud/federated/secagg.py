"""The ServerApp of a federation with secure aggregation (`tierlite federate server --secagg`):
Flower's SecAgg+ (`SecAggPlusWorkflow`, Bell et al. 2020) in place of plain FedAvg.

Each site masks its weights (Flower's `secaggplus_mod` on the site, `tierlite.edge.federated:
secagg_app`) with pairwise masks that cancel in the sum; the cloud only unmasks the sum of the
round's sites, weighted by their example counts, so it never sees one site's model. What it costs:
the weights are clipped to +-`secagg-clip` and quantised to `secagg-quantization` levels before
masking (the aggregate differs from plain FedAvg's by about one quantisation step, see
docs/COTRAINING.md), four round trips per round instead of one, and no per-site check of the
reply's names and shapes on the cloud (the cloud sees no site's arrays; each site still refuses
federation weights that do not fit its model).

The workflow is Flower's legacy one (FitIns/FitRes over a `LegacyContext`), so the strategy here
is a legacy `FedAvg` whose `aggregate_fit` receives the already unmasked average and applies the
cloud's step (`server_step`) and the report; the plain path (app.py) keeps the Message-API
strategy.
"""
from __future__ import annotations

import time

import numpy as np
from flwr.app import Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig
from flwr.server.compat import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from tierlite.cloud.federated.app import SITE_KEYS, _say, open_run
from tierlite.federated import check_arrays, dumps, server_step, spec_of

app = ServerApp()


class SecAggFedAvg(LegacyFedAvg):
    """FedAvg for SecAgg+: every site of the round, the unmasked weighted average in, the cloud's
    step and a per-round report out."""

    def __init__(self, initial: dict[str, np.ndarray], site_config: dict, min_sites: int, wait_sites: int,
                 server_lr: float, server_momentum: float, report) -> None:
        self.names = list(initial)
        self.spec = spec_of(initial)
        self.current = dict(initial)
        self.velocity = None
        self.server_lr, self.server_momentum = server_lr, server_momentum
        self.report = report
        self.rounds: list[dict] = []
        self._t0 = time.monotonic()
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_sites,
                         min_evaluate_clients=0, min_available_clients=wait_sites, accept_failures=True,
                         initial_parameters=ndarrays_to_parameters([initial[k] for k in self.names]),
                         on_fit_config_fn=lambda rnd: {**site_config, "server-round": int(rnd)})

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            _say(f"round {server_round}: no site answered ({len(failures)} failure(s)); model unchanged")
            return None, {}
        # SecAgg+ gives every result the same parameters: the unmasked weighted average
        average = dict(zip(self.names, parameters_to_ndarrays(results[0][1].parameters)))
        check_arrays(self.spec, average, "SecAgg+ aggregate")
        self.current, self.velocity = server_step(self.current, average, self.velocity, self.server_lr,
                                                  self.server_momentum)
        # as the plain report (strategy.py); bytes: the raw model each way (the protocol's own
        # traffic, masks and key shares included, is in each site's traffic.jsonl)
        sites = [{"site": str(r.metrics.get("site", proxy.node_id)), "node": int(proxy.node_id),
                  "examples": int(r.num_examples), "bytes_up": int(r.metrics.get("bytes-up", 0)),
                  "bytes_down": int(r.metrics.get("bytes-down", 0)),
                  **{k: float(v) for k, v in r.metrics.items()
                     if k not in ("site", "num-examples", "bytes-up", "bytes-down")}} for proxy, r in results]
        examples = int(sum(r.num_examples for _, r in results))
        entry = {"round": int(server_round), "clients": len(results), "failures": len(failures),
                 "refused": [str(f) for f in failures], "secagg": True, "sites": sites,
                 "bytes_down_per_site": max((s["bytes_down"] for s in sites), default=0),
                 "train_seconds": round(time.monotonic() - self._t0, 1),
                 "aggregate": {"examples": examples, **{
                     f"val-acc-{t}": float(sum(s.get(f"val-acc-{t}", 0.0) * s["examples"] for s in sites)
                                           / max(examples, 1)) for t in ("end", "edge", "cloud")}}}
        self._t0 = time.monotonic()
        self.rounds.append(entry)
        self.report({"rounds": self.rounds})
        acc = "/".join(f"{entry['aggregate'][f'val-acc-{t}']:.3f}" for t in ("end", "edge", "cloud"))
        _say(f"round {server_round}: {len(results)} site(s), {examples} frames, secure aggregation (SecAgg+), "
             f"sites' val acc end/edge/cloud {acc}, {len(failures)} failure(s)")
        return ndarrays_to_parameters([self.current[k] for k in self.names]), {}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, out, initial, write, wait = open_run(grid, context, " with secure aggregation (SecAgg+)")
    rounds = int(cfg["num-server-rounds"])
    strategy = SecAggFedAvg(initial, {k: cfg[k] for k in SITE_KEYS if k in cfg}, int(cfg.get("min-sites", 1)),
                            wait, float(cfg.get("server-lr", 1.0)), float(cfg.get("server-momentum", 0.0)), write)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
    sites = max(wait, 2)
    # every site shares its keys with every other (SecAgg+ with a full graph); by default the sum
    # can be unmasked while at least two thirds of them (and at least 2) are still there
    threshold = int(cfg.get("secagg-threshold", 0)) or max(2, -(-2 * sites // 3))
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=sites, reconstruction_threshold=min(threshold, sites),
        max_weight=float(cfg.get("secagg-max-weight", 10000.0)), clipping_range=float(cfg.get("secagg-clip", 8.0)),
        quantization_range=int(cfg.get("secagg-quantization", 4194304)),
        timeout=float(cfg.get("round-timeout", 3600))))
    t0 = time.monotonic()
    workflow(grid, legacy)
    (out / "global.npz").write_bytes(dumps(strategy.current))
    write({"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.monotonic() - t0, 1),
           "global": "global.npz"})
    _say(f"global model written to {out / 'global.npz'} ({len(strategy.current)} arrays)")
