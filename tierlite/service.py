"""Daemon plumbing shared by the device, edge and cloud commands: clean shutdown on SIGTERM and
SIGINT (first signal: stop gracefully; a second one: exit at once)."""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable

log = logging.getLogger("tierlite.service")


def run_until_signal(main: Callable[[], int], stop: Callable[[], None]) -> int:
    """Run main() in this (the main) thread; SIGTERM/SIGINT call stop(), which must make main return."""
    if threading.current_thread() is not threading.main_thread():
        return main()
    signals = {"count": 0}

    def handler(signum, frame):
        signals["count"] += 1
        if signals["count"] > 1:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return main()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def wait_for_stop(stop: threading.Event, tick: Callable[[], None] | None = None, interval: float = 0.2) -> None:
    """Block until `stop` is set, calling tick() every `interval` seconds (housekeeping)."""
    while not stop.wait(interval):
        if tick is not None:
            tick()
