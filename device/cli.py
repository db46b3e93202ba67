"""`tierlite device --config node.yaml`: the camera-node daemon."""
from __future__ import annotations

import argparse
import logging
from typing import Callable

log = logging.getLogger("tierlite.device")


def configure_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="node YAML (see docs/RUNTIME.md)")
    p.add_argument("--board", help="board profile (tierlite.boards, e.g. pi4, pi5, pi-zero-2w, coral-usb): "
                                   "sets the runtime plugin and threads; overrides the config's `board`")
    p.add_argument("--runtime", help="runtime plugin, overrides config and board (litert, tflite-runtime, edgetpu, tflm)")
    p.add_argument("--threads", type=int, help="interpreter threads, overrides config and board")
    p.add_argument("--limit", type=int, help="stop after this many frames (overrides source.limit)")


def run_device(args: argparse.Namespace) -> int:
    from tierlite.config import DeviceConfig, load_config
    from tierlite.service import run_until_signal
    from tierlite.device.daemon import DeviceDaemon
    from tierlite.errors import ConfigError
    from tierlite.systemd import Watchdog, notify

    cfg = load_config(args.config, DeviceConfig)
    runtime, options = cfg.runtime, {"threads": cfg.threads}
    board_name = args.board or cfg.board
    if board_name:
        try:
            from tierlite.boards import load_board
        except ImportError as e:
            raise ConfigError(f"board {board_name} needs tierlite.boards, not in this install ({e}); "
                              "use runtime/threads") from None
        board = load_board(board_name)
        if board.is_mcu:
            raise ConfigError(f"board {board.name} is a microcontroller: build firmware with `tierlite firmware`, "
                              "the daemon runs on Linux boards")
        runtime, options = board.runtime, board.runtime_options()
        log.info("board %s: runtime %s, %d thread(s)", board.name, runtime, board.threads)
    if args.runtime:
        runtime = args.runtime
    if args.threads:
        options["threads"] = args.threads
    if args.limit:
        cfg.source.limit = args.limit
    daemon = DeviceDaemon(cfg, runtime=runtime, runtime_options=options)
    # systemd (Type=notify, WatchdogSec): ready once the model is loaded; the watchdog is fed only
    # while frames keep being decided, so a wedged camera or runtime gets the service restarted.
    watchdog = Watchdog(_frames_advance(daemon)).start()
    notify("READY=1")
    try:
        return run_until_signal(daemon.run, daemon.stop)
    finally:
        notify("STOPPING=1")
        watchdog.stop()


def _frames_advance(daemon) -> Callable[[], bool]:
    """True when the daemon decided a frame since the previous call."""
    last = [-1]

    def advanced() -> bool:
        now = daemon.stats.frames
        moved, last[0] = now != last[0], now
        return moved
    return advanced
