"""`tierlite edge --config edge.yaml`: options, config checks, then the gateway (tierlite.edge.gateway)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

__all__ = ["configure_edge", "run_edge"]

log = logging.getLogger("tierlite.edge")


def configure_edge(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="gateway YAML (see docs/RUNTIME.md)")
    p.add_argument("--workers", type=int, help="edge worker processes (overrides `workers`)")
    p.add_argument("--print-mosquitto-config", action="store_true",
                   help="print the Mosquitto config (listener, limits, cloud bridge) the gateway would "
                        "generate, e.g. to add the bridge to a broker you run yourself, and exit")


def run_edge(args: argparse.Namespace) -> int:
    from tierlite.config import EdgeConfig, load_config
    from tierlite.edge.broker import bridge_config, mosquitto_config
    from tierlite.edge.gateway import Gateway
    from tierlite.errors import ConfigError
    from tierlite.service import run_until_signal

    cfg = load_config(args.config, EdgeConfig)
    if args.workers is not None:
        if not 1 <= args.workers <= 64:
            raise ConfigError("--workers: 1..64")
        cfg.workers = args.workers
    bridge = cfg.cloud.bridge if cfg.cloud.mode == "bridge" else None
    if args.print_mosquitto_config:
        if cfg.mosquitto.managed:
            print(mosquitto_config(cfg.mosquitto, bridge, cfg.prefix, cfg.gateway_id, cfg.mosquitto.state_dir), end="")
        elif bridge is None:
            raise ConfigError(f"{args.config}: mosquitto.managed is false and cloud.mode is local: your broker "
                              "needs nothing from tierlite")
        else:  # a drop-in for a broker the user runs (Debian: /etc/mosquitto/conf.d/, docs/PI_NODE.md)
            print("# tierlite cloud bridge: /etc/mosquitto/conf.d/tierlite.conf, from `tierlite edge "
                  "--print-mosquitto-config`\n" + bridge_config(bridge, cfg.prefix, cfg.gateway_id), end="")
        return 0
    if bridge is not None and not cfg.mosquitto.managed:
        log.info("cloud bridge: left to your broker (install `tierlite edge --print-mosquitto-config` as a "
                 "conf.d drop-in)")
    gateway = Gateway(cfg, Path(args.config).resolve(), args.log_level, args.log_format)
    return run_until_signal(gateway.run, gateway.stop)
