"""`tierlite` command line (a tool: it sits above the tiers). Each command lives in its tier's or
tool's module, which defines `configure_<cmd>(parser)` and `run_<cmd>(args) -> int`; modules import
heavy libraries (TensorFlow, OpenCV) inside run_*, so `tierlite --help` and the device commands
stay light."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from tierlite import __version__
from tierlite.errors import TierliteError
from tierlite.logs import setup_logging

COMMANDS = {
    # name: (module, one-line help)
    "train": ("tierlite.converters.cli", "train a multi-exit model on an image folder"),
    "convert": ("tierlite.converters.cli", "train (or reuse a checkpoint), export int8 segments, calibrate, write a bundle"),
    "export": ("tierlite.converters.cli", "export a trained checkpoint as int8/binarized TFLite segments and a bundle"),
    "calibrate": ("tierlite.converters.cli", "choose exit thresholds on validation data; JSON report and PNG plot"),
    "inspect": ("tierlite.converters.cli", "print a bundle's or any .tflite file's segments, ops, quantization, sizes"),
    "recover": ("tierlite.converters.cli", "rebuild a trainable Keras checkpoint from a bundle's int8 segments (lost checkpoint)"),
    "profile": ("tierlite.converters.partition", "per-block latency, int8 cut sizes and exit statistics of a checkpoint (JSON)"),
    "plan": ("tierlite.converters.partition", "choose the cut and the exit operating point for a link from a profile"),
    "firmware": ("tierlite.converters.firmware", "emit TFLite Micro sources for a microcontroller board, checking it fits"),
    "device": ("tierlite.device.cli", "run the camera-node daemon"),
    "edge": ("tierlite.edge.cli", "run the edge gateway (broker, discovery, edge workers)"),
    "cloud": ("tierlite.cloud.cli", "run the cloud worker (final segment, hard-example store)"),
    "provision": ("tierlite.edge.provision", "fleet CA, per-node credentials, broker password/ACL files; revoke NODE"),
    "keygen": ("tierlite.cloud.publish_cli", "generate an Ed25519 key pair for signing model updates"),
    "retrain": ("tierlite.cloud.publish_cli", "distil escalated hard examples into the small models; optionally publish"),
    "publish": ("tierlite.cloud.publish_cli", "sign a bundle and publish it as a model update over MQTT"),
    "demo": ("tierlite.tools.demo", "train a small bundle and run all three tiers on localhost"),
    "bench": ("tierlite.tools.bench", "benchmarks: accuracy/bytes/latency side by side, fleet load test"),
    "federate": ("tierlite.tools.federate", "co-training on Flower: 'server' (cloud), 'site' (edge gateway), 'export'"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tierlite", description="End-edge-cloud co-inference for camera fleets.")
    parser.add_argument("--version", action="version", version=f"tierlite {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("TIERLITE_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default=os.environ.get("TIERLITE_LOG_FORMAT", "text"), choices=["text", "json"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
            getattr(mod, f"configure_{name}")(p)
        except (ImportError, AttributeError) as e:
            p.set_defaults(_unavailable=f"'tierlite {name}' is not available in this install: {e}")
    return parser


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ INFO/WARNING lines (SavedModel loader, MLIR passes, oneDNN...) would fill
    # train.log and the terminal; TF reads this once, when imported, so set it before any command.
    # (An explicit TF_CPP_MIN_LOG_LEVEL=0 still shows them.)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    setup_logging(args.log_level, args.log_format)
    if getattr(args, "_unavailable", None):
        print(f"error: {args._unavailable}", file=sys.stderr)
        return 2
    run = getattr(importlib.import_module(COMMANDS[args.command][0]), f"run_{args.command}")
    try:
        return int(run(args) or 0)
    except TierliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
