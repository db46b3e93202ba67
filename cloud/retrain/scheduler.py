"""The cloud worker's trigger: `tierlite retrain` as a child process when enough new hard examples
have arrived or enough time has passed; the bundle it published is the next run's parent."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tierlite.cloud.retrain.options import default_frames_path

log = logging.getLogger("tierlite.cloud.retrain")  # one logger for the whole job


class RetrainScheduler:
    """Runs `tierlite retrain` as a child process when enough new hard examples have arrived or
    enough time has passed (the cloud worker calls tick() from its housekeeping loop), and keeps
    frames uploaded by opted-in nodes. The child process keeps TensorFlow-free numpy work and any
    publishing out of the worker, which goes on answering escalations meanwhile. The latest bundle
    it published becomes the parent of the next run (state in <store stem>.retrain.json)."""

    def __init__(self, config, mqtt):
        from tierlite.cloud.frames import FrameCollector, FrameStore

        self.config, self.trigger = config, config.retrain
        store = Path(config.store.path)
        self.frames_path = Path(self.trigger.frames_path) if self.trigger.frames_path else default_frames_path(store)
        sc = config.store
        self.collector = (FrameCollector(FrameStore(self.frames_path, per_node_max_rows=sc.frames_per_node_max_rows,
                                                    max_bytes=sc.frames_max_bytes), mqtt, config.prefix,
                                         sc.frames_per_node_rate, sc.frames_per_node_burst)
                          if self.trigger.collect_frames else None)
        self.state_file = store.with_name(store.stem + ".retrain.json")
        self.state = {"parent": str(Path(config.bundle).resolve()), "runs": 0}
        if self.state_file.is_file():
            try:
                self.state.update(json.loads(self.state_file.read_text()))
            except ValueError:
                log.warning("retrain state %s unreadable; starting afresh", self.state_file)
        self._proc = None
        self._log_path: Path | None = None
        self._last = time.monotonic()
        self._base: int | None = None  # store.written at the last run (or at start)
        self._requested: str | None = None  # a drift alarm / agreement fall asked for a run (issue 13)

    def request(self, why: str) -> None:
        """Ask for a run at the next tick that min_interval_seconds allows, whatever the example count:
        a drift the node is sure about escalates nothing, so waiting for hard examples would wait forever."""
        if self._requested is None:
            log.info("retrain: run requested (%s)", why)
            self._requested = why

    def tick(self, written: int) -> None:
        """written: hard examples this worker has stored since it started."""
        if self._proc is not None:
            if self._proc.poll() is not None:
                self._finished()
            return
        if self._base is None:
            self._base = written
        new, now = written - self._base, time.monotonic()
        if now - self._last < self.trigger.min_interval_seconds:
            return
        due_examples = self.trigger.every_examples is not None and new >= self.trigger.every_examples
        due_time = self.trigger.every_seconds is not None and now - self._last >= self.trigger.every_seconds
        if due_examples or due_time or self._requested:
            self._base = written
            why = (f"{new} new hard examples" if due_examples else
                   "the retraining period elapsed" if due_time else str(self._requested))
            self._requested = None
            self._start(why)

    def _start(self, why: str) -> None:
        import subprocess
        import sys

        parent = Path(self.state["parent"])
        run = int(self.state["runs"]) + 1
        out = parent.with_name(f"{parent.name.split('-v')[0]}-retrain{run}")
        self._report = out.with_name(out.name + ".json")
        argv = [sys.executable, "-m", "tierlite", "retrain", "--store", str(self.config.store.path),
                "--bundle", str(parent), "--replay", self.trigger.replay, "--out", str(out),
                "--frames", str(self.frames_path), "--json", str(self._report), *self.trigger.args]
        if "--publish" in self.trigger.args and "--broker" not in self.trigger.args:
            b = self.config.broker
            argv += ["--broker", f"{b.host}:{b.port}", "--prefix", self.config.prefix]
        self._log_path = out.with_name(out.name + ".log")
        log.info("retrain: starting run %d (%s): %s", run, why, " ".join(argv[3:]))
        with open(self._log_path, "wb") as f:
            self._proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._out = out
        self._last = time.monotonic()
        self.state["runs"] = run

    def _finished(self) -> None:
        code, self._proc = self._proc.returncode, None
        try:
            report = json.loads(self._report.read_text())
        except (OSError, ValueError):
            report = None
        if code != 0 or report is None:
            tail = self._log_path.read_text(errors="replace").strip().splitlines()[-1:] if self._log_path else []
            log.error("retrain: run %d failed (exit %d): %s", self.state["runs"], code, tail[0] if tail else "no output")
        else:
            rollout = report.get("rollout", {})
            log.info("retrain: run %d: candidate v%s %s; %s", self.state["runs"], report["candidate"]["version"],
                     "better" if report["better"] else "not better", report["reason"])
            if rollout.get("stage") in ("published", "complete"):
                self.state["parent"] = str(self._out.resolve())  # the fleet runs it now
        self._save()

    def _save(self) -> None:
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            log.info("retrain: stopping the running job")
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except Exception:  # noqa: BLE001
                self._proc.kill()
        if self.collector is not None:
            self.collector.store.close()
        self._save()
