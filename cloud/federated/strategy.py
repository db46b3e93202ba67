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

`TierliteHierFAVG` adds a level (HierFAVG, client-edge-cloud): the sites' regions are averaged
every round and the cloud averages the regions every `cloud_every` rounds; each site is sent
its region's model in between (`_construct_messages`, the routing), the math is
`tierlite.federated.region_averages` / `cloud_average`.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from tierlite.federated import (ModelMismatch, Named, check_arrays, cloud_average, region_averages, server_step,
                                weighted_average)

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
            site = msg.content["site"] if "site" in msg.content else {}
            name = str(site.get("name", f"node-{node}"))
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
            entry["sites"].append({"site": name, "node": int(node), "region": str(site.get("region", name)),
                                   "examples": n,
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
        agg = self._aggregate(server_round, models, weights, entry)
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
        return (None if agg is None else to_record(agg)), MetricRecord(summary)

    # -- the math (tierlite.federated) -------------------------------------------------------
    def _aggregate(self, server_round: int, models: list[Named], weights: list[int], entry: dict) -> Named | None:
        """The new global model from this round's accepted models (None: unchanged this round)."""
        return self._cloud_step(weighted_average(models, weights))

    def _cloud_step(self, average: Named) -> Named:
        if self._current is None:
            return average
        new, self._velocity = server_step(self._current, average, self._velocity, self.server_lr,
                                          self.server_momentum)
        return new

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


class TierliteHierFAVG(TierliteFedAvg):
    """HierFAVG (client-edge-cloud): every round each region averages its sites' models (weighted
    by examples) and its sites start the next round from that; every `cloud_every` rounds, and in
    the last round, the cloud averages the regions (weighted by their examples), then the cloud's
    step (FedAvg or FedAvgM) as in TierliteFedAvg, and every region starts again from that global
    model. A site names its region (`tierlite federate site --region`; default: its own name). A
    site the cloud has not heard from, or whose region has no model since the last cloud round,
    is sent the global model. A region none of whose sites answered in a round keeps its last
    model, which counts in the next cloud round with its last examples."""

    def __init__(self, spec: dict[str, tuple[int, ...]], cloud_every: int, num_rounds: int, **kwargs) -> None:
        if cloud_every < 1:
            raise ValueError(f"cloud_every must be >= 1, got {cloud_every}")
        super().__init__(spec, **kwargs)
        self.cloud_every, self.num_rounds = int(cloud_every), int(num_rounds)
        self.region_of: dict[int, str] = {}  # Flower node id -> region, from the sites' replies
        self.regional: dict[str, tuple[Named, float]] = {}  # since the last cloud round
        self._regional_records: dict[str, ArrayRecord] = {}

    def is_cloud_round(self, server_round: int) -> bool:
        return server_round % self.cloud_every == 0 or server_round == self.num_rounds

    def _aggregate(self, server_round, models, weights, entry):
        for s in entry["sites"]:
            self.region_of[s["node"]] = s["region"]
        self.regional.update(region_averages(models, weights, [s["region"] for s in entry["sites"]]))
        entry["regions"] = {r: {"sites": sorted(s["site"] for s in entry["sites"] if s["region"] == r), "examples": n}
                            for r, (_, n) in sorted(self.regional.items())}
        entry["cloud"] = self.is_cloud_round(server_round)
        if not entry["cloud"]:
            self._regional_records = {r: to_record(m) for r, (m, _) in self.regional.items()}
            self.say(f"round {server_round}: regions " + ", ".join(
                f"{r} ({', '.join(v['sites']) or 'no site this round'}; {int(v['examples'])} frames)"
                for r, v in entry["regions"].items()) + f"; next cloud round {self._next_cloud(server_round)}")
            return None
        glob = cloud_average(self.regional)
        self.regional, self._regional_records = {}, {}
        self.say(f"round {server_round}: cloud average of {len(entry['regions'])} region(s)")
        return self._cloud_step(glob)

    def _next_cloud(self, server_round: int) -> int:
        return min(self.num_rounds, (server_round // self.cloud_every + 1) * self.cloud_every)

    def arrays_for(self, node_id: int, default: ArrayRecord) -> ArrayRecord:
        """What a site is sent: its region's model since the last cloud round, else `default` (global)."""
        return self._regional_records.get(self.region_of.get(node_id, ""), default)

    def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str) -> Iterable[Message]:
        """Training and evaluation alike: each site gets its region's model (arrays_for)."""
        messages = []
        for node_id in node_ids:
            arrays = self.arrays_for(node_id, record[self.arrayrecord_key])
            content = record if arrays is record[self.arrayrecord_key] else RecordDict(
                {self.arrayrecord_key: arrays, self.configrecord_key: record[self.configrecord_key]})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
        return messages


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
