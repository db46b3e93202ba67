"""systemd readiness and watchdog (`Type=notify`, `WatchdogSec=`) without a dependency: the
sd_notify protocol is one datagram on the unix socket named by $NOTIFY_SOCKET.
Outside systemd (no $NOTIFY_SOCKET) every call is a no-op."""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

__all__ = ["Watchdog", "notify", "watchdog_interval"]

log = logging.getLogger("tierlite.systemd")


def notify(state: str, address: str | None = None) -> bool:
    """Send e.g. "READY=1", "WATCHDOG=1", "STOPPING=1" to `address` (default $NOTIFY_SOCKET);
    False when not run by systemd."""
    address = address or os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("sd_notify %s to %s failed: %s", state, address, e)
        return False


def watchdog_interval() -> float | None:
    """Seconds between two WATCHDOG=1 (half of WatchdogSec), or None when no watchdog is set for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


class Watchdog:
    """Pings systemd's watchdog while `alive()` says the work makes progress; when it stops saying
    so, the pings stop and systemd restarts the service after WatchdogSec."""

    def __init__(self, alive: Callable[[], bool], interval: float | None = None):
        self.alive, self.interval = alive, interval if interval is not None else watchdog_interval()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Watchdog":
        if self.interval is not None:
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.alive():
                notify("WATCHDOG=1")
            else:
                log.warning("no progress: not pinging the systemd watchdog (a restart follows)")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
