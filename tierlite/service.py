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


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A subprocess.Popen `preexec_fn`: the child gets `sig` when the process that started it dies,
    even by SIGKILL (Linux prctl PR_SET_PDEATHSIG through ctypes), so a supervisor's children never
    outlive it as orphans holding its ports. None where prctl is not available.

    The signal fires when the *thread* that started the child ends: start children from a thread
    that lives as long as the supervisor (its main thread)."""
    import sys

    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    parent = os.getpid()
    PR_SET_PDEATHSIG = 1

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def stop_processes(procs, timeout: float) -> None:
    """SIGTERM every live child, wait up to `timeout` s for them together, SIGKILL what is left."""
    import subprocess
    import time

    procs = [p for p in procs if p is not None]
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
