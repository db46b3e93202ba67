"""`tierlite cloud --workers N`: N cloud worker processes of one config, restarted when they die.

Each child is `python -m tierlite cloud --config X --index I --of N`. With N > 1 worker I answers
as `<worker_id>-<I>` on the same shared subscription and writes its own store
(`<store stem>-<I>.sqlite`, worker 0 keeps the configured one and the `retrain:` section). A
child that exits is restarted with a backoff; one that dies more than RESTARTS_PER_MINUTE times
in a minute stops the supervisor (exit 1). Children die with the supervisor (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

from tierlite.service import die_with_parent, stop_processes, wait_for_stop

__all__ = ["CloudSupervisor", "RESTARTS_PER_MINUTE", "child_config"]

log = logging.getLogger("tierlite.cloud.supervisor")
RESTARTS_PER_MINUTE = 10


def child_config(cfg, index: int, of: int):
    """The config worker `index` of `of` runs (its own id and store when there are several)."""
    if of <= 1:
        return cfg
    store = Path(cfg.store.path)
    update = {"worker_id": f"{cfg.worker_id}-{index}"}
    if index > 0:
        own = store.with_name(f"{store.stem}-{index}{store.suffix}")
        update["store"] = cfg.store.model_copy(update={"path": str(own)})
        update["retrain"] = None
        if cfg.metrics_port:
            update["metrics_port"] = cfg.metrics_port + index
    return cfg.model_copy(update=update)


class _Child:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.restarts: list[float] = []
        self.next_start = 0.0


class CloudSupervisor:
    def __init__(self, config_path: str, workers: int, log_level: str = "info", log_format: str = "text"):
        self.config_path, self.workers = str(Path(config_path).resolve()), workers
        self.log_args = ["--log-level", log_level, "--log-format", log_format]
        self.children = [_Child(i) for i in range(workers)]
        self.stop_event = threading.Event()
        self.exit_code = 0

    def _start(self, c: _Child) -> None:
        c.proc = subprocess.Popen(
            [sys.executable, "-m", "tierlite", *self.log_args, "cloud", "--config", self.config_path,
             "--index", str(c.index), "--of", str(self.workers)],
            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())
        log.info("cloud worker %d started (pid %d)", c.index, c.proc.pid)

    def _supervise(self) -> None:
        now = time.monotonic()
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                continue
            if c.proc is not None:  # it died: count it, schedule a restart with a backoff
                c.restarts = [t for t in c.restarts if now - t < 60] + [now]
                log.error("cloud worker %d (pid %d) exited with code %s: restarting", c.index, c.proc.pid,
                          c.proc.returncode)
                c.proc = None
                if len(c.restarts) > RESTARTS_PER_MINUTE:
                    log.error("cloud worker %d keeps dying: stopping", c.index)
                    self.exit_code = 1
                    self.stop_event.set()
                    return
                c.next_start = now + min(0.25 * 2 ** (len(c.restarts) - 1), 10.0)
            if now >= c.next_start:
                self._start(c)

    def run(self) -> int:
        for c in self.children:
            self._start(c)
        try:
            wait_for_stop(self.stop_event, self._supervise, 0.2)
        finally:
            self._shutdown()
        return self.exit_code

    def stop(self) -> None:
        self.stop_event.set()

    def _shutdown(self) -> None:
        stop_processes([c.proc for c in self.children], 10.0)
