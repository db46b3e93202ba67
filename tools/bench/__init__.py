"""`tierlite bench SUBCOMMAND`: benchmarks that print their figures and write JSON.

Each subcommand lives in its own module, which defines configure_<name>(parser) and
run_<name>(args) -> int (the same convention as tierlite.tools.cli). Add one by adding a row to
SUBCOMMANDS; modules import heavy libraries inside run_<name>.
"""
from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {
    # name: (module, one-line help)
    "runtime": ("tierlite.tools.bench.runtime", "camera decision, node daemon round trip, then the fleet's open-loop "
                                          "rate steps (batching off/on; real Mosquitto on loopback)"),
    "accuracy": ("tierlite.tools.bench.accuracy", "accuracy, uplink bytes and latency of every configuration on the same frames"),
    "fleet": ("tierlite.tools.bench.fleet", "fleet load test: simulated nodes against one and two edge workers"),
    "offload": ("tierlite.tools.bench.offload", "a real model server (Ray Serve, [bench] extra) beside tierlite on the "
                                          "same frames: latency, bytes per frame, frames/s per core"),
    "drift": ("tierlite.tools.bench.drift", "co-updating under drift: fleet escalates low-light frames, retrain, "
                                      "signed update rolled out; accuracy and escalation before/after"),
}


def configure_bench(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="SUBCOMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            getattr(importlib.import_module(module), f"configure_{name}")(p)
        except (ImportError, AttributeError) as e:
            p.set_defaults(_bench_unavailable=f"'tierlite bench {name}' is not available in this install: {e}")


def run_bench(args: argparse.Namespace) -> int:
    from tierlite.errors import ConfigError

    if not getattr(args, "bench", None):
        raise ConfigError(f"choose a benchmark: tierlite bench {{{','.join(SUBCOMMANDS)}}} ...")
    if getattr(args, "_bench_unavailable", None):
        raise ConfigError(args._bench_unavailable)
    module = importlib.import_module(SUBCOMMANDS[args.bench][0])
    return int(getattr(module, f"run_{args.bench}")(args) or 0)
