"""`tierlite cloud --config cloud.yaml`: the cloud worker (final segment, answers, hard-example store).
Run several with the same `share_group` to split the load (MQTT 5 shared subscription)."""
from __future__ import annotations

import argparse


def configure_cloud(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="cloud worker YAML (see docs/RUNTIME.md)")


def run_cloud(args: argparse.Namespace) -> int:
    from tierlite.cloud.worker import CloudWorker
    from tierlite.config import CloudConfig, load_config
    from tierlite.service import run_until_signal

    worker = CloudWorker(load_config(args.config, CloudConfig))
    return run_until_signal(worker.run, worker.stop)
