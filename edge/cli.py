"""`tierlite edge --config edge.yaml`: options, config checks, then the gateway (tierlite.edge.gateway)."""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["configure_edge", "run_edge"]


def configure_edge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="gateway YAML (see docs/RUNTIME.md)")
    p.add_argument("--workers", type=int, help="edge worker processes (overrides `workers`)")
    p.add_argument("--print-mosquitto-config", action="store_true",
                   help="print the Mosquitto config (listener, limits, cloud bridge) the gateway would "
                        "generate, e.g. to add the bridge to a broker you run yourself, and exit")


def run_edge(args: argparse.Namespace) -> int:
    from tierlite.config import EdgeConfig, load_config
    from tierlite.edge.broker import mosquitto_config
    from tierlite.edge.gateway import Gateway
    from tierlite.errors import ConfigError
    from tierlite.service import run_until_signal

    cfg = load_config(args.config, EdgeConfig)
    if args.workers is not None:
        if not 1 <= args.workers <= 64:
            raise ConfigError("--workers: 1..64")
        cfg.workers = args.workers
    if args.print_mosquitto_config:
        print(mosquitto_config(cfg.mosquitto, cfg.cloud.bridge if cfg.cloud.mode == "bridge" else None,
                               cfg.prefix, cfg.gateway_id, cfg.mosquitto.state_dir), end="")
        return 0
    if cfg.cloud.mode == "bridge" and not cfg.mosquitto.managed:
        raise ConfigError(f"{args.config}: cloud.mode 'bridge' needs mosquitto.managed: true (for a broker you "
                          "run yourself, add the bridge section printed by --print-mosquitto-config)")
    gateway = Gateway(cfg, Path(args.config).resolve(), args.log_level, args.log_format)
    return run_until_signal(gateway.run, gateway.stop)
