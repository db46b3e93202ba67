"""`tierlite bench fleet`: a fleet load test on loopback.

N simulated camera nodes (tierlite.tools.bench.loadgen.FleetLoad: one MQTT connection each) replay real
escalations - FEATURE messages made by the real end segment from real frames - at stepped offered
rates against the real runtime: `tierlite edge` (managed Mosquitto, 1 then 2 edge worker processes
on a shared subscription) and one `tierlite cloud` worker, all separate processes. Per step:
achieved escalations/s, latency p50/p99 (send -> answer back at the node), lost / duplicated /
rejected answers, CPU per process (/proc). The knee is the first offered rate whose p99 passes
--knee-ms in two attempts in a row (the box may be shared); stepping stops there. Every step is bounded in time and in count.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from tierlite.tools.bench.report import DEFAULT_DATA, Progress, Report, Target, fmt_num, markdown_table, say
from tierlite.tools.stack import Stack, reference_bundle
from tierlite.errors import ConfigError

DEFAULT_RATES = "100,250,500,750,1000,1250,1500,2000,2500,3000,4000,6000,8000,12000"

T_PER_WORKER = Target("sustained escalations/s, one edge worker", 3000.0, True, "/s")
T_CLOUD_PER_CORE = Target("escalations/s per cloud worker core", 3000.0, True, "/s")
T_SCALING = Target("speed-up with two edge workers", 1.8, True, "x")
T_ESCALATION_P99 = Target("escalation p99 at the lowest offered rate", 10.0, False, " ms")


def configure_fleet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default=reference_bundle(), required=reference_bundle() is None,
                   help="bundle the nodes, edge workers and cloud worker run (default: models/cifar10 when present)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"image folder the escalations are made from (default {DEFAULT_DATA})")
    p.add_argument("--frames", type=int, default=256, help="distinct real escalations replayed (default 256)")
    p.add_argument("--nodes", type=int, default=100, help="simulated camera nodes (default 100)")
    p.add_argument("--workers", default="1,2", help="edge worker counts to test, in order (default 1,2)")
    p.add_argument("--batch", default="1,32", help="worker batch.max_size values to test side by side, in order; "
                                                   "1 = batching off (default 1,32)")
    p.add_argument("--rates", default=DEFAULT_RATES, help=f"offered escalations/s per step (default {DEFAULT_RATES})")
    p.add_argument("--step-seconds", type=float, default=5.0, help="length of each rate step (default 5)")
    p.add_argument("--max-messages", type=int, default=60000, help="cap on escalations per step (default 60000)")
    p.add_argument("--min-messages", type=int, default=1000,
                   help="escalations per step at least (a step at a low rate lasts longer), so every p99 "
                        "stands on enough frames (default 1000)")
    p.add_argument("--knee-ms", type=float, default=50.0, help="p99 that marks the knee; stepping stops past it (default 50)")
    p.add_argument("--drain-seconds", type=float, default=3.0, help="wait for late answers after a step (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results", help="output folder (results.json, fleet.md, PNGs)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ConfigError(f"{what} must be positive numbers, got {text!r}")
    return vals


def run_fleet(args: argparse.Namespace) -> int:
    report = Report("fleet", args.out, args)
    bundle, messages, runs = measure_fleet(args)
    add_fleet_results(report, args, bundle, messages, runs)
    paths = report.write()
    say(f"wrote {paths['results']} and {paths['markdown']}")
    return 0


def measure_fleet(args: argparse.Namespace) -> tuple[Any, list[bytes], list[dict[str, Any]]]:
    """The open-loop rate steps for every (batch size, edge worker count) of args: (bundle, the
    replayed FEATURE messages, one summary per run). Shared by `bench fleet` and `bench runtime`."""
    from tierlite.tools.bench.loadgen import FleetLoad, load_messages

    rates = sorted(_ints(args.rates, "--rates"))
    worker_counts = _ints(args.workers, "--workers")
    batch_sizes = _ints(getattr(args, "batch", "1"), "--batch")
    if args.nodes < 1 or args.frames < 1 or args.step_seconds <= 0 or args.max_messages < 1:
        raise ConfigError("--nodes, --frames, --step-seconds and --max-messages must be positive")
    say(f"encoding {args.frames} real escalations with the end segment ...")
    bundle, messages = load_messages(args.bundle, args.data, args.frames, args.seed)
    runs: list[dict[str, Any]] = []
    for batch, workers in [(b, w) for b in batch_sizes for w in worker_counts]:
        label = f"{workers} edge worker(s), batch {'off' if batch == 1 else f'<= {batch}'}"
        say(f"starting tierlite edge ({label}) and tierlite cloud ...")
        with Stack(args.bundle, edge_workers=workers,  # capacity, not the per-node budget: 100 nodes up to 120/s each
                   edge_extra={"node_budget": {"enabled": False}, "batch": {"max_size": batch}},
                   cloud_extra={"batch": {"max_size": batch}}) as stack:
            load = FleetLoad(stack.host, stack.port, messages, nodes=args.nodes, prefix=stack.prefix)
            load.start()
            try:
                load.step(min(rates[0], 200), 1.0, drain=args.drain_seconds)  # warm-up: caches, connections
                steps = _rate_steps(load, stack, rates, args, label)
            finally:
                load.stop()
        runs.append({**summarize(workers, steps, args.knee_ms), "batch_max_size": batch})
    return bundle, messages, runs


def _rate_steps(load, stack, rates: list[int], args, label: str) -> list[dict[str, Any]]:
    steps = []
    bar = Progress(len(rates), f"{label}: rate steps", every_s=0, enabled=not args.quiet)
    knee_seen = False
    for rate in rates:
        pids = {**stack.pids(), "load generator": os.getpid()}
        seconds = step_seconds(rate, args)
        res = load.step(rate, seconds, drain=args.drain_seconds, max_messages=args.max_messages, cpu_pids=pids)
        first_p99 = res.latency["p99_ms"]
        if not knee_seen and first_p99 is not None and first_p99 > args.knee_ms:
            # Past the knee, or a burst of load from outside the benchmark? Run the step
            # again; the knee is where both attempts pass the limit.
            res = load.step(rate, seconds, drain=args.drain_seconds, max_messages=args.max_messages, cpu_pids=pids)
        step = {**res.to_json(), "first_attempt_p99_ms": first_p99}
        steps.append(step)
        bar.update()
        if not args.quiet:
            say(f"  offered {rate}/s: achieved {res.achieved_per_s:.0f}/s, p50 "
                f"{fmt_num(res.latency['p50_ms'])} ms, p99 {fmt_num(res.latency['p99_ms'])} ms, "
                f"lost {res.lost}, dup {res.duplicated}")
        knee_seen = knee_seen or _past_knee(step, args.knee_ms)
        if not kept_up(step):  # saturated: the next, higher rates would only pile up backlog
            break
    bar.close()
    return steps


def add_fleet_results(report: Report, args, bundle, messages: list[bytes], runs: list[dict[str, Any]]) -> None:
    report.results.update(
        nodes=args.nodes, frames=args.frames, step_seconds=args.step_seconds, knee_ms=args.knee_ms,
        min_messages_per_step=getattr(args, "min_messages", None),
        bundle=bundle.name, feature_message_bytes=len(messages[0]), runs=runs,
        batching=batching_ratios(runs), targets=check_targets(runs))
    write_fleet_report(report, runs, args)


def step_seconds(rate: float, args) -> float:
    """--step-seconds, or longer where that would send fewer than --min-messages (bounded by --max-messages)."""
    want = min(getattr(args, "min_messages", 0), args.max_messages)
    return max(args.step_seconds, want / rate)


KEEP_UP = 0.95  # a step "kept up" when it answered at least this share of the offered rate, losing nothing


def kept_up(step: dict[str, Any]) -> bool:
    return (step["achieved_per_s"] >= KEEP_UP * step["offered_per_s"] and step["lost"] == 0
            and step["duplicated"] == 0 and step["rejected"] == 0)


def _past_knee(step: dict[str, Any], knee_ms: float) -> bool:
    return step["latency"]["p99_ms"] is None or step["latency"]["p99_ms"] > knee_ms


def summarize(workers: int, steps: list[dict[str, Any]], knee_ms: float) -> dict[str, Any]:
    """sustained = highest achieved rate of a step that kept up with its offered rate (>= 95 %,
    nothing lost, duplicated or rejected), whatever its latency; knee = the first offered rate whose
    p99 passed knee_ms (None: never); sustained_under_knee = the same as sustained, p99 <= knee_ms."""
    good = [s for s in steps if kept_up(s)]
    best = max(good, key=lambda s: s["achieved_per_s"], default=None)
    under = max((s for s in good if not _past_knee(s, knee_ms)), key=lambda s: s["achieved_per_s"], default=None)
    past = next((s for s in steps if _past_knee(s, knee_ms)), None)
    # CPU time per escalation per process (CPU seconds, not wall time: less affected by other load on
    # the machine) at the busiest step measured: where a worker runs flat out, as on a core of its own
    # (at a low rate, idle wake-ups weigh on each message; with batching, batches grow with the load).
    cost_step = max(steps, key=lambda s: s["achieved_per_s"], default=None)
    per_escalation = {}
    if cost_step and cost_step["achieved_per_s"] > 0:
        per_escalation = {k: v * 10.0 / cost_step["achieved_per_s"]
                          for k, v in cost_step["cpu_percent"].items() if v is not None}
    edge_ms = [v for k, v in per_escalation.items() if k.startswith("edge worker") and v > 0]
    # The cloud worker sees only the escalations the edge passes up: its cost per message it handled.
    cloud_share = (cost_step or {}).get("answered_by", {}).get("cloud", 0) / max((cost_step or {}).get("answered", 0), 1)
    cloud_ms = sum(v for k, v in per_escalation.items() if k.startswith("cloud worker"))
    return {
        "edge_workers": workers, "steps": steps,
        "sustained_per_s": best["achieved_per_s"] if best else 0.0,
        "sustained_step": best,
        "sustained_under_knee_per_s": under["achieved_per_s"] if under else 0.0,
        "knee_offered_per_s": past["offered_per_s"] if past else None,
        "lost_up_to_sustained": sum(s["lost"] for s in steps if best and s["offered_per_s"] <= best["offered_per_s"]),
        "lost_total": sum(s["lost"] for s in steps),
        "duplicated_total": sum(s["duplicated"] for s in steps),
        "lowest_rate_p99_ms": steps[0]["latency"]["p99_ms"] if steps else None,
        "cpu_ms_per_escalation": per_escalation,
        "cpu_cost_at_offered_per_s": cost_step["offered_per_s"] if cost_step else None,
        # what the edge workers could answer if each had a core of its own: 1000 ms / CPU ms per escalation
        # (edge_ms sums every worker's share of one escalation's cost)
        "cpu_bound_capacity_per_s": len(edge_ms) * 1000.0 / sum(edge_ms) if edge_ms else None,
        "cloud_share": cloud_share,
        "cloud_cpu_ms_per_cloud_message": cloud_ms / cloud_share if cloud_ms and cloud_share > 0 else None,
    }


def _worker_ms(run: dict[str, Any], kind: str) -> float | None:
    """CPU ms per escalation summed over the processes of one kind ("edge worker", "cloud worker")."""
    vals = [v for k, v in run["cpu_ms_per_escalation"].items() if k.startswith(kind)]
    return sum(vals) if vals else None


def _step_ms(step: dict[str, Any], kind: str) -> float | None:
    vals = [v for k, v in step["cpu_percent"].items() if k.startswith(kind) and v is not None]
    return sum(vals) * 10.0 / step["achieved_per_s"] if vals and step["achieved_per_s"] > 0 else None


def batching_ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Batching on vs off, same worker count, same run, two ways: CPU ms per escalation at the same
    offered rate (the highest both kept up with), and at each run's busiest step (the worker flat out,
    the per-core figure). Ratios off / on for CPU ms, on / off for rates, so a shared machine's
    absolute speed cancels out."""
    out = []
    for on in runs:
        off = next((r for r in runs if r["edge_workers"] == on["edge_workers"] and r.get("batch_max_size") == 1), None)
        if off is None or on is off or on.get("batch_max_size", 1) == 1:
            continue
        row = {"edge_workers": on["edge_workers"], "batch_max_size": on["batch_max_size"]}
        both = {s["offered_per_s"]: s for s in off["steps"] if kept_up(s)}
        same = max((s for s in on["steps"] if kept_up(s) and s["offered_per_s"] in both),
                   key=lambda s: s["offered_per_s"], default=None)
        row["same_rate_per_s"] = same["offered_per_s"] if same else None
        for kind in ("edge worker", "cloud worker"):
            key = kind.replace(" ", "_")
            a, b = _worker_ms(off, kind), _worker_ms(on, kind)
            row[f"{key}_cpu_ms_off"], row[f"{key}_cpu_ms_on"] = a, b
            row[f"{key}_cpu_ratio_off_to_on"] = a / b if a and b else None
            if same:
                a, b = _step_ms(both[same["offered_per_s"]], kind), _step_ms(same, kind)
                row[f"{key}_same_rate_ms_off"], row[f"{key}_same_rate_ms_on"] = a, b
                row[f"{key}_same_rate_ratio"] = a / b if a and b else None
        row["sustained_ratio_on_to_off"] = (on["sustained_per_s"] / off["sustained_per_s"]
                                            if off["sustained_per_s"] else None)
        out.append(row)
    return out


def check_targets(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    # Targets are checked on the batching configuration (the default), when both were run.
    on = [r for r in runs if r.get("batch_max_size", 1) > 1] or runs
    one = next((r for r in on if r["edge_workers"] == 1), None)
    two = next((r for r in on if r["edge_workers"] == 2), None)
    if one:
        out.append({**T_PER_WORKER.check(one["sustained_per_s"]), "config": "1 edge worker"})
        out.append({**T_PER_WORKER.check(one["cpu_bound_capacity_per_s"]),
                    "config": "1 edge worker, derived: 1000 / its CPU ms per escalation (a full core)"})
        out.append({**T_ESCALATION_P99.check(one["lowest_rate_p99_ms"]), "config": "1 edge worker"})
    for r in on:
        cloud = r.get("cloud_cpu_ms_per_cloud_message")
        if r["edge_workers"] == 1 and cloud:
            out.append({**T_CLOUD_PER_CORE.check(1000.0 / cloud), "config": "1 cloud worker, derived: 1000 / its CPU ms "
                        "per message it answered"})
    if one and two and one["sustained_per_s"] > 0:
        out.append({**T_SCALING.check(two["sustained_per_s"] / one["sustained_per_s"]), "config": "2 vs 1 edge workers"})
    return out


def _cpu_text(cpu: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {v:.0f}%" for k, v in cpu.items() if v is not None)


def _opt(fmt: str):
    return lambda x: "–" if x is None else fmt.format(x)


STEP_COLUMNS = [
    ("edge_workers", "edge workers", None), ("batch", "batch", str), ("offered_per_s", "offered /s", None),
    ("achieved_per_s", "achieved /s", lambda x: f"{x:,.0f}"), ("p50", "p50 ms", None), ("p99", "p99 ms", None),
    ("lost", "lost", None), ("duplicated", "dup", None), ("rejected", "rejected", None),
    ("behind_s", "sender lag s", lambda x: f"{x:.2f}"), ("cpu", "CPU (% of one core)", str),
]
SUMMARY_COLUMNS = [
    ("edge_workers", "edge workers", None), ("batch", "batch", str),
    ("sustained_per_s", "sustained escalations/s (kept up, 0 lost)", lambda x: f"{x:,.0f}"),
    ("sustained_under_knee_per_s", "sustained with p99 <= knee", lambda x: f"{x:,.0f}"),
    ("knee", "knee: offered rate where p99 passed the limit", str),
    ("lost_up_to_sustained", "lost up to the sustained rate", None), ("lost_total", "lost, all steps", None),
    ("duplicated_total", "duplicated", None), ("cpu", "CPU at the sustained step (% of one core)", str),
    ("cost", "CPU ms per escalation (busiest step)", str),
    ("cpu_bound_capacity_per_s", "edge capacity if each worker had a core (from CPU ms)",
     lambda x: "–" if x is None else f"{x:,.0f}/s"),
    ("cloud_cpu_ms_per_cloud_message", "cloud worker CPU ms per message it answered", _opt("{:.3f}")),
]

RATIO_COLUMNS = [
    ("edge_workers", "edge workers", None), ("batch_max_size", "batch max size", None),
    ("same_rate_per_s", "same offered rate /s", None),
    ("edge_worker_same_rate_ms_off", "edge worker CPU ms/esc there, off", _opt("{:.3f}")),
    ("edge_worker_same_rate_ms_on", "on", _opt("{:.3f}")),
    ("cloud_worker_same_rate_ms_off", "cloud worker, off", _opt("{:.3f}")),
    ("cloud_worker_same_rate_ms_on", "on", _opt("{:.3f}")),
    ("edge_worker_cpu_ms_off", "edge worker CPU ms/esc at the busiest step, off", _opt("{:.3f}")),
    ("edge_worker_cpu_ms_on", "on", _opt("{:.3f}")),
    ("edge_worker_cpu_ratio_off_to_on", "off/on", _opt("{:.2f}x")),
    ("cloud_worker_cpu_ms_off", "cloud worker CPU ms/esc, off", _opt("{:.3f}")),
    ("cloud_worker_cpu_ms_on", "on", _opt("{:.3f}")),
    ("cloud_worker_cpu_ratio_off_to_on", "off/on", _opt("{:.2f}x")),
    ("sustained_ratio_on_to_off", "sustained /s on/off", _opt("{:.2f}x")),
]
TARGET_COLUMNS = [("target", "target", str), ("config", "measured on", str), ("goal", "goal", str),
                  ("measured", "measured", None), ("status", "status", str)]


def _batch_text(run: dict[str, Any]) -> str:
    size = run.get("batch_max_size", 1)
    return "off" if size == 1 else f"<= {size}"


def _series_name(run: dict[str, Any]) -> str:
    return f"{run['edge_workers']} edge worker(s), batch {_batch_text(run)}"


def write_fleet_report(report: Report, runs: list[dict[str, Any]], args) -> None:
    rows = []
    for r in runs:
        for s in r["steps"]:
            rows.append({"edge_workers": r["edge_workers"], "batch": _batch_text(r), **s, "p50": s["latency"]["p50_ms"],
                         "p99": s["latency"]["p99_ms"], "cpu": _cpu_text(s["cpu_percent"])})
    summary = [{**r, "batch": _batch_text(r), "knee": f"{r['knee_offered_per_s']:,}/s" if r["knee_offered_per_s"] else
                f"not reached (<= {r['steps'][-1]['offered_per_s']:,}/s)" if r["steps"] else "–",
                "cpu": _cpu_text(r["sustained_step"]["cpu_percent"]) if r["sustained_step"] else "–",
                "cost": ", ".join(f"{k} {v:.3f}" for k, v in r["cpu_ms_per_escalation"].items()) or "–"} for r in runs]
    report.add_markdown(f"{args.nodes} simulated nodes, {args.frames} distinct real escalations replayed, "
                        f"{args.step_seconds:g} s per step, knee at p99 > {args.knee_ms:g} ms (confirmed by a second "
                        f"attempt). A step keeps up when it answers >= {KEEP_UP:.0%} of the offered rate and loses "
                        "nothing; stepping stops at the first step that does not. Sender lag: how far the open-loop "
                        "sender fell behind its schedule (large = the load generator, not the system, limited the "
                        "offered rate).\n")
    report.add_markdown(markdown_table(SUMMARY_COLUMNS, summary))
    if report.results["batching"]:
        report.add_markdown("Batching on vs off (same run; CPU ms per escalation at each run's sustained step):\n\n"
                            + markdown_table(RATIO_COLUMNS, report.results["batching"]))
        print(markdown_table(RATIO_COLUMNS, report.results["batching"]))
        print()
    report.add_markdown("Targets (from the brief; reported, not asserted):\n\n"
                        + markdown_table(TARGET_COLUMNS, report.results["targets"]))
    report.add_markdown("Every step:\n\n" + markdown_table(STEP_COLUMNS, rows))
    print(markdown_table(SUMMARY_COLUMNS, summary))
    print()
    print(markdown_table(TARGET_COLUMNS, report.results["targets"]))
    series_p99 = {_series_name(r): ([s["offered_per_s"] for s in r["steps"]],
                                                         [s["latency"]["p99_ms"] for s in r["steps"]]) for r in runs}
    report.line_plot("p99", series_p99, "offered escalations/s", "p99 latency (ms)",
                     "Escalation round trip p99 vs offered load", hline=args.knee_ms, logy=True)
    series_rate = {_series_name(r): ([s["offered_per_s"] for s in r["steps"]],
                                                          [s["achieved_per_s"] for s in r["steps"]]) for r in runs}
    report.line_plot("throughput", series_rate, "offered escalations/s", "achieved escalations/s",
                     "Throughput vs offered load")
