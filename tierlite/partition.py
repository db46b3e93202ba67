"""Partition planner (Neurosurgeon / Edgent style): where to cut the network and how eagerly the
camera's exit answers, predicted from measured profiles and a link model. Pure Python + numpy.

The model of one frame, for a cut `c` (a tensor of the network) and an operating point `o` (the
camera's exit threshold):

    device:   prefix compute up to the cut, plus the camera's exit head if it sits before the cut
    exits:    a share f(o) of frames is answered on the device (only if the cut keeps an exit there)
    the rest: uplink (bytes(c) + per-message overhead) * 8 / bandwidth + RTT + server suffix compute

so a frame's latency is a two-point mixture; p50/p99 are the mixture's quantiles. Uplink bytes and
device energy (compute watts x device time + radio watts x airtime) are means per frame. The
accuracy of an operating point does not depend on the cut: re-cut segments are bit-exact in int8
(tierlite.converters.partition checks it), so only the exit threshold moves accuracy.

    table = predict_all(profile, link, power)          # every (cut, operating point)
    best = choose(table, objective="p50", min_accuracy=0.95)
    table3 = predict_all_two_cuts(profile, link, Tiers(cloud_link))   # end | edge | cloud: both cuts at once

Profiles are JSON (`tierlite profile` writes them); `Profile.from_json` validates them with one
clear line per problem.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tierlite.errors import ConfigError

__all__ = ["Candidate", "Link", "OBJECTIVES", "OperatingPoint", "Power", "Prediction", "Profile", "Tiers",
           "choose", "format_table", "mixture_quantile", "predict", "predict_all", "predict_two_cuts",
           "predict_all_two_cuts"]

OBJECTIVES = ("p50", "p99", "mean", "energy", "uplink")
# MQTT 5 PUBLISH fixed header + topic + tierlite wire header + TCP/IP headers: what one escalation
# costs on top of its tensor (measured by the bench as bytes on the link; a default, overridable).
DEFAULT_OVERHEAD_BYTES = 120


@dataclass(frozen=True)
class Link:
    """The uplink the node's escalations cross. A shaped link (a token bucket, as `tc tbf` or many
    access networks police) lets its first `burst_bytes` through at line rate; a serial link has
    burst 0. Every TCP segment of `mss` payload bytes carries `header_bytes` more on the wire."""

    bandwidth_bps: float  # uplink, bits per second
    rtt_s: float = 0.0  # round trip of a tiny message through the messaging path (node -> broker -> node)
    overhead_bytes: int = DEFAULT_OVERHEAD_BYTES  # per escalated message (MQTT + tierlite wire headers)
    burst_bytes: int = 0
    mss: int = 1448  # TCP payload per segment (Ethernet MTU 1500, timestamps on)
    header_bytes: int = 66  # Ethernet + IP + TCP (with timestamps) per segment

    def __post_init__(self):
        if not self.bandwidth_bps > 0 or min(self.rtt_s, self.overhead_bytes, self.burst_bytes) < 0 or self.mss < 1:
            raise ConfigError(f"link needs bandwidth > 0, mss >= 1 and non-negative rtt/overheads, got {self}")

    def wire_bytes(self, payload_bytes: float) -> float:
        message = payload_bytes + self.overhead_bytes
        return message + math.ceil(message / self.mss) * self.header_bytes

    def transfer_s(self, payload_bytes: float) -> float:
        """Time from the node sending `payload_bytes` to its answer arriving, server time excluded."""
        shaped = max(0.0, self.wire_bytes(payload_bytes) - self.burst_bytes)
        return self.rtt_s + shaped * 8.0 / self.bandwidth_bps


@dataclass(frozen=True)
class Power:
    """Device power while computing and while its radio sends; watts. A board YAML's `power:`
    section gives documented figures (tierlite.boards, `tierlite plan --board`); the defaults are a
    relative scale, not a measurement."""

    compute_w: float = 1.0
    radio_w: float = 1.0


@dataclass(frozen=True)
class Tiers:
    """The edge -> cloud hop of a three-tier plan (end | edge | cloud). The profile's server times
    are the profiling host's; `edge_slowdown` / `cloud_slowdown` scale them for each tier."""

    cloud_link: Link  # the edge gateway's uplink to the cloud
    edge_slowdown: float = 1.0
    cloud_slowdown: float = 1.0

    def __post_init__(self):
        if not (self.edge_slowdown > 0 and self.cloud_slowdown > 0):
            raise ConfigError(f"tier slowdowns must be > 0, got {self}")


@dataclass(frozen=True)
class Candidate:
    """One place to cut: the tensor `name`, measured compute before/after it, its int8 size."""

    name: str
    device_s: float  # device time for the prefix (frame -> cut tensor), exit head included if `exit_on_device`
    server_s: float  # server time for the suffix (cut tensor -> final answer)
    cut_bytes: int  # bytes of the tensor on the wire (int8: one per element; binary: one bit)
    exit_on_device: bool = True  # the camera's exit is computed before the cut
    trained: bool = False  # a trained bottleneck (the bundle's own boundary), not a re-cut block output
    device_tflm_s: float | None = None  # the prefix on TFLite Micro's reference kernels (MCU boards)

    def __post_init__(self):
        if self.device_s < 0 or self.server_s < 0 or self.cut_bytes < 0:
            raise ConfigError(f"candidate {self.name!r}: times and bytes must be >= 0")


@dataclass(frozen=True)
class OperatingPoint:
    """The camera exit's threshold, the share of frames it answers and the system's accuracy
    (camera answer where it exits, final answer otherwise), measured on held-out frames."""

    name: str
    end_threshold: float
    device_fraction: float
    accuracy: float

    def __post_init__(self):
        if not (0.0 <= self.device_fraction <= 1.0 and 0.0 <= self.accuracy <= 1.0):
            raise ConfigError(f"operating point {self.name!r}: fraction and accuracy must be in [0, 1]")


@dataclass
class Profile:
    model: str
    candidates: list[Candidate]
    operating_points: list[OperatingPoint]
    server_only_accuracy: float | None = None  # no camera exit: every frame gets the final answer
    notes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "candidates": [asdict(c) for c in self.candidates],
                "operating_points": [asdict(o) for o in self.operating_points],
                "server_only_accuracy": self.server_only_accuracy, "notes": self.notes}

    @classmethod
    def from_json(cls, d: Any, where: str = "profile") -> "Profile":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: a profile is a JSON object")
        try:
            cands = [Candidate(**c) for c in d["candidates"]]
            ops = [OperatingPoint(**o) for o in d["operating_points"]]
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: bad or missing field ({e})") from None
        if not cands or not ops:
            raise ConfigError(f"{where}: needs at least one candidate and one operating point")
        acc = d.get("server_only_accuracy")
        return cls(str(d.get("model", "?")), cands, ops, None if acc is None else float(acc), dict(d.get("notes", {})))


@dataclass(frozen=True)
class Prediction:
    candidate: str
    operating_point: str
    end_threshold: float | None  # None: no camera exit at this cut (every frame goes up)
    device_fraction: float
    accuracy: float | None
    p50_s: float
    p99_s: float
    mean_s: float
    uplink_bytes: float  # mean per frame
    device_energy_j: float  # mean per frame
    trained: bool
    cloud_cut: str | None = None  # three tiers: the edge -> cloud boundary (None: the edge answers)

    @property
    def cuts(self) -> str:
        return self.candidate if self.cloud_cut is None else f"{self.candidate} | {self.cloud_cut}"

    def metric(self, objective: str) -> float:
        return {"p50": self.p50_s, "p99": self.p99_s, "mean": self.mean_s,
                "energy": self.device_energy_j, "uplink": self.uplink_bytes}[objective]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def mixture_quantile(values: list[float], weights: list[float], q: float) -> float:
    """The q-quantile of a discrete distribution (lower quantile: the smallest v with CDF >= q)."""
    pairs = sorted((v, w) for v, w in zip(values, weights) if w > 0)
    total = sum(w for _, w in pairs)
    acc = 0.0
    for v, w in pairs:
        acc += w / total
        if acc >= q - 1e-12:
            return v
    return pairs[-1][0]


def predict(c: Candidate, op: OperatingPoint | None, link: Link, power: Power,
            server_only_accuracy: float | None = None) -> Prediction:
    """Predicted figures of cut `c` at operating point `op` (None, or a cut without a camera exit:
    every frame goes up and gets the final answer)."""
    local = op.device_fraction if (op is not None and c.exit_on_device) else 0.0
    up_s = link.transfer_s(c.cut_bytes) + c.server_s
    values, weights = [c.device_s, c.device_s + up_s], [local, 1.0 - local]
    airtime = link.wire_bytes(c.cut_bytes) * 8.0 / link.bandwidth_bps
    on_device = op is not None and c.exit_on_device
    return Prediction(
        candidate=c.name, operating_point=op.name if on_device else "server-only",
        end_threshold=op.end_threshold if on_device else None, device_fraction=local,
        accuracy=op.accuracy if on_device else server_only_accuracy,
        p50_s=mixture_quantile(values, weights, 0.50), p99_s=mixture_quantile(values, weights, 0.99),
        mean_s=sum(v * w for v, w in zip(values, weights)),
        uplink_bytes=(1.0 - local) * link.wire_bytes(c.cut_bytes),
        device_energy_j=power.compute_w * c.device_s + power.radio_w * (1.0 - local) * airtime,
        trained=c.trained)


def predict_all(profile: Profile, link: Link, power: Power = Power()) -> list[Prediction]:
    """Every candidate escalating every frame ("server-only"), and, where the cut keeps the camera
    exit on the device, at every operating point."""
    rows = []
    for c in profile.candidates:
        rows.append(predict(c, None, link, power, profile.server_only_accuracy))
        if c.exit_on_device:
            rows += [predict(c, op, link, power) for op in profile.operating_points]
    return rows


def predict_two_cuts(c1: Candidate, c2: Candidate | None, op: OperatingPoint | None, link: Link, tiers: Tiers,
                     power: Power, server_only_accuracy: float | None = None) -> Prediction:
    """Cut twice (Neurosurgeon over three tiers): the device runs frame -> c1, the edge c1 -> c2,
    the cloud c2 -> final logits; `c2` None: the edge runs the rest itself. The edge's compute is
    the difference of the two measured tails (the profile times each suffix from its cut), scaled
    by `tiers.edge_slowdown`. The edge's own exit is not planned: every frame that leaves the
    camera reaches c2's tier (the exported bundle sets the edge threshold so)."""
    edge_s = c1.server_s - (c2.server_s if c2 is not None else 0.0)
    if edge_s < 0:  # two separately timed suffixes: a deeper one can come out a hair slower
        edge_s = 0.0
    server = Candidate(c1.name, c1.device_s, edge_s * tiers.edge_slowdown, c1.cut_bytes, c1.exit_on_device,
                       c1.trained)
    row = predict(server, op, link, power, server_only_accuracy)
    if c2 is None:
        return row
    beyond = tiers.cloud_link.transfer_s(c2.cut_bytes) + c2.server_s * tiers.cloud_slowdown
    local = row.device_fraction
    up = c1.device_s + link.transfer_s(c1.cut_bytes) + server.server_s + beyond
    values, weights = [c1.device_s, up], [local, 1.0 - local]
    return replace(row, p50_s=mixture_quantile(values, weights, 0.50), p99_s=mixture_quantile(values, weights, 0.99),
                   mean_s=sum(v * w for v, w in zip(values, weights)), cloud_cut=c2.name)


def predict_all_two_cuts(profile: Profile, link: Link, tiers: Tiers, power: Power = Power()) -> list[Prediction]:
    """Every pair c1 before c2 of the profile's candidates (in network order; only the pairs in
    `notes["three_tier_pairs"]` where the profile lists those the runtime can run), and every c1
    with the edge answering, each server-only and at every operating point where c1 keeps the exit."""
    rows = []
    cands = profile.candidates
    listed = profile.notes.get("three_tier_pairs")
    runnable = None if listed is None else {tuple(p) for p in listed}
    for i, c1 in enumerate(cands):
        for c2 in [*cands[i + 1:], None]:
            if c2 is not None and runnable is not None and (c1.name, c2.name) not in runnable:
                continue
            ops = [None] + (list(profile.operating_points) if c1.exit_on_device else [])
            rows += [predict_two_cuts(c1, c2, op, link, tiers, power, profile.server_only_accuracy) for op in ops]
    return rows


def choose(rows: list[Prediction], objective: str = "p50", min_accuracy: float | None = None,
           candidates: set[str] | None = None) -> Prediction:
    """The row minimising `objective` among those meeting the accuracy bound (ties: fewer uplink
    bytes, then the shallower cut's order as given). `candidates` restricts the cuts considered."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    ok = [r for r in rows if (candidates is None or r.candidate in candidates)
          and (min_accuracy is None or (r.accuracy is not None and r.accuracy >= min_accuracy))]
    if not ok:
        raise ConfigError(f"no candidate meets accuracy >= {min_accuracy}")
    return min(ok, key=lambda r: (round(r.metric(objective), 12), r.uplink_bytes))


def format_table(rows: list[Prediction], best: Prediction | None = None) -> str:
    width = max([26] + [len(r.cuts) + 2 for r in rows])
    head = (f"{'cut':<{width}} {'op':<12} {'thr':>6} {'local':>6} {'acc':>7} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'mean ms':>8} {'up B/fr':>8} {'mJ/fr':>7}")
    lines = [head, "-" * len(head)]
    chosen = None if best is None else (best.candidate, best.cloud_cut, best.operating_point)
    for r in rows:
        mark = " <- chosen" if (r.candidate, r.cloud_cut, r.operating_point) == chosen else ""
        thr = "-" if r.end_threshold is None else f"{r.end_threshold:.3f}"
        acc = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
        name = r.cuts + (" *" if r.trained else "")
        lines.append(f"{name:<{width}} {r.operating_point:<12} {thr:>6} {r.device_fraction:>6.2f} {acc:>7} "
                     f"{r.p50_s * 1e3:>8.2f} {r.p99_s * 1e3:>8.2f} {r.mean_s * 1e3:>8.2f} "
                     f"{r.uplink_bytes:>8.0f} {r.device_energy_j * 1e3:>7.3f}{mark}")
    lines.append("(* = the device cut is a trained bottleneck; others are block outputs re-cut without retraining;"
                 " 'a | b': device | edge at a, edge | cloud at b)")
    return "\n".join(lines)
