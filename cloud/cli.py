"""`tierlite cloud --config cloud.yaml`: the cloud worker (final segment, answers, hard-example store).
Run several with the same `share_group` to split the load (MQTT 5 shared subscription), or
`--workers N`: N worker processes supervised (a dead one is restarted; tierlite.cloud.supervisor)."""
from __future__ import annotations

import argparse


def configure_cloud(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="cloud worker YAML (see docs/RUNTIME.md)")
    p.add_argument("--workers", type=int, help="supervise N worker processes, restarting any that dies")
    p.add_argument("--index", type=int, default=None, help=argparse.SUPPRESS)  # a supervised child
    p.add_argument("--of", type=int, default=1, help=argparse.SUPPRESS)


def run_cloud(args: argparse.Namespace) -> int:
    from tierlite.config import CloudConfig, load_config
    from tierlite.errors import ConfigError
    from tierlite.service import run_until_signal

    if args.workers is not None and args.index is None:
        from tierlite.cloud.supervisor import CloudSupervisor

        if not 1 <= args.workers <= 64:
            raise ConfigError("--workers: 1..64")
        cfg = load_config(args.config, CloudConfig)  # fail here, not in N children
        if args.workers > 1 and cfg.broker.protocol != "5":
            raise ConfigError("several cloud workers need MQTT 5 shared subscriptions (broker.protocol: '5')")
        sup = CloudSupervisor(args.config, args.workers, args.log_level, args.log_format)
        return run_until_signal(sup.run, sup.stop)
    from tierlite.cloud.supervisor import child_config
    from tierlite.cloud.worker import CloudWorker

    cfg = load_config(args.config, CloudConfig)
    if args.index is not None:
        cfg = child_config(cfg, args.index, args.of)
    worker = CloudWorker(cfg)
    return run_until_signal(worker.run, worker.stop)
