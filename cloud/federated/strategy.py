"""tierlite's Flower strategy: FedAvg orchestration (Flower's `Strategy.start`: sample, send,
receive, per round) with tierlite's checks and math (`tierlite.federated`) and a per-round report.

- every reply is checked against the federation's model (names and shapes); a site whose model
  differs is refused with one line and the round goes on without it;
- a site that fails or does not answer in time is a failure of that round, not of the run
  (accept_failures): the round aggregates whoever answered, if at least one did;
- aggregation: example-weighted average (FedAvg) of every named array, then the cloud's step
  (`server_step`: with server_lr 1 and server_momentum 0 the average itself; otherwise FedAvgM,
  BatchNorm statistics still averaged); FedProx only changes the sites' local loss (the
  `proximal-mu` sent in the round's config);
- personalised exit heads: the sites keep theirs (`personal` in the config); the average of the
  heads is kept as the global model's, for new sites and for the global bundle;
- bytes: the serialised weights each way, per site and round (what Flower's ArrayRecord carries).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from tierlite.federated import ModelMismatch, check_arrays, server_step, weighted_average

log = logging.getLogger("tierlite.cloud.federated")
EXITS = ("end", "edge", "cloud")


def to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def one_line(error) -> str:
    """A site's refusal is one line already (codes 1001/1002); a crash's traceback ends with its cause."""
    lines = [l for l in (error.reason or "").strip().splitlines() if l.strip()]
    if not lines:
        return f"error code {error.code}"
    return lines[0] if error.code in (1001, 1002) else lines[-1].strip()


def record_bytes(record: ArrayRecord) -> int:
    return int(sum(len(v.data) for v in record.values()))


class TierliteFedAvg(FedAvg):
    """FedAvg with model checks, refusals in one line, and a JSON report per round."""

    def __init__(self, spec: dict[str, tuple[int, ...]], report: Callable[[dict], None] | None = None,
                 min_sites: int = 1, evaluate: bool = True, say: Callable[[str], None] = print,
                 server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=1.0 if evaluate else 0.0,
                         min_train_nodes=min_sites, min_evaluate_nodes=min_sites if evaluate else 0,
                         min_available_nodes=min_sites)
        self.spec = {k: tuple(v) for k, v in spec.items()}
        self.rounds: list[dict] = []
        self.report = report
        self.say = say
        self._down_bytes = 0
        self._t_round = time.monotonic()
        self.server_lr, self.server_momentum = float(server_lr), float(server_momentum)
        self._current: dict[str, np.ndarray] | None = None  # the model this round started from
        self._velocity: dict[str, np.ndarray] | None = None  # FedAvgM's server momentum

    # -- orchestration hooks (Flower calls these from Strategy.start) --------------------------
    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        self._t_round = time.monotonic()
        self._down_bytes = record_bytes(arrays)
        self._current = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        entry = {"round": server_round, "sites": [], "refused": [], "bytes_down_per_site": self._down_bytes}
        models, weights = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                line = f"round {server_round}: site (node {node}) failed or refused: {one_line(msg.error)}"
                entry["refused"].append(line)
                self.say(line)
                continue
            name = str(msg.content["site"]["name"]) if "site" in msg.content else f"node-{node}"
            try:
                arrays = from_record(msg.content["arrays"])
                check_arrays(self.spec, arrays, who=f"site {name} (node {node}) refused")
                metrics = dict(msg.content["metrics"])
                n = int(metrics["num-examples"])
            except ModelMismatch as e:
                line = f"round {server_round}: {e}"
                entry["refused"].append(line)
                self.say(line)
                continue
            except (KeyError, ValueError) as e:
                line = f"round {server_round}: site {name} (node {node}) refused: malformed reply ({e!r})"
                entry["refused"].append(line)
                self.say(line)
                continue
            models.append(arrays)
            weights.append(n)
            entry["sites"].append({"site": name, "node": int(node), "examples": n,
                                   "bytes_up": record_bytes(msg.content["arrays"]),
                                   "bytes_down": int(metrics.get("bytes-down", self._down_bytes)),
                                   **{k: float(v) for k, v in metrics.items()
                                      if k not in ("num-examples", "bytes-down", "bytes-up")}})
        entry["clients"] = len(models)
        entry["train_seconds"] = round(time.monotonic() - self._t_round, 1)
        self.rounds.append(entry)
        if not models:
            self.say(f"round {server_round}: no site answered; the global model is unchanged")
            self._emit()
            return None, None
        agg = weighted_average(models, weights)
        if self._current is not None:
            agg, self._velocity = server_step(self._current, agg, self._velocity, self.server_lr, self.server_momentum)
        total = float(sum(weights))
        summary = {"clients": len(models), "examples": int(total)}
        for key in ("loss", *(f"val-acc-{t}" for t in EXITS)):
            vals = [s.get(key) for s in entry["sites"]]
            if all(v is not None for v in vals):
                summary[key] = float(sum(v * w for v, w in zip(vals, weights)) / total)
        entry["aggregate"] = summary
        self.say(f"round {server_round}: {len(models)} site(s), {int(total)} frames, loss {summary.get('loss', 0):.3f}, "
                 f"val acc end/edge/cloud "
                 + "/".join(f"{summary.get(f'val-acc-{t}', 0):.3f}" for t in EXITS)
                 + f", bytes per site down {self._down_bytes:,} up "
                 + ", ".join(f"{s['site']} {s['bytes_up']:,}" for s in entry["sites"])
                 + (f", refused {len(entry['refused'])}" if entry["refused"] else ""))
        self._emit()
        return to_record(agg), MetricRecord(summary)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        sites, refused = [], []
        for msg in replies:
            if msg.has_error():
                refused.append(f"node {msg.metadata.src_node_id}: {one_line(msg.error)}")
                continue
            name = str(msg.content["site"]["name"]) if "site" in msg.content else "?"
            sites.append({"site": name, **{k: float(v) for k, v in dict(msg.content["metrics"]).items()}})
        entry = next((r for r in self.rounds if r["round"] == server_round), None)
        if entry is not None:
            entry["evaluate"] = {"sites": sites, "refused": refused}
        for s in sites:
            line = f"round {server_round}: site {s['site']} global model on its own val split end/edge/cloud " + \
                   "/".join(f"{s.get(f'global-acc-{t}', 0):.3f}" for t in EXITS)
            if "personal-acc-cloud" in s:
                line += ", with its own heads " + "/".join(f"{s[f'personal-acc-{t}']:.3f}" for t in EXITS)
            self.say(line)
        self._emit()
        if not sites:
            return None
        total = sum(s["num-examples"] for s in sites)
        keys = [k for k in sites[0] if k.endswith(tuple(EXITS)) and "acc" in k]
        return MetricRecord({k: float(sum(s[k] * s["num-examples"] for s in sites) / total) for k in keys
                             if all(k in s for s in sites)})

    def _emit(self) -> None:
        if self.report:
            self.report({"rounds": self.rounds})


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
