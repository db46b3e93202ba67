"""The cloud worker's trigger: `tierlite retrain` as a child process when enough new hard examples
have arrived or enough time has passed; the bundle it published is the next run's parent."""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tierlite.cloud.retrain.options import PrivacyPolicy, RetrainOptions, default_frames_path
from tierlite.errors import ConfigError

log = logging.getLogger("tierlite.cloud.retrain")  # one logger for the whole job

# The job's refusal (cloud/retrain/job.py): "only <n> stored hard examples and <m> usable frames ...".
_TOO_FEW = re.compile(r"only (\d+) stored hard examples and (\d+) usable frames")


@dataclass
class PendingRequest:
    """A run asked for by a drift alarm or an agreement fall, waiting for enough hard examples."""
    why: str
    since: float  # clock() at the request; it expires request_expiry_seconds later
    need: int  # usable hard examples (as this scheduler counts them) before it may run
    have: int = 0
    counted_at: int | None = None  # store.written at the last count: recount only after new rows
    retries: int = 0  # runs that stopped for too few examples and put it back
    told: bool = False  # the "waits" line is logged once per wait


def _arg(args: list[str], flag: str) -> str | None:
    """The value of `flag V` or `flag=V` in a `tierlite retrain` argument list (the last one wins)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1:]
    return value


class RetrainScheduler:
    """Runs `tierlite retrain` as a child process when enough new hard examples have arrived or
    enough time has passed (the cloud worker calls tick() from its housekeeping loop), and keeps
    frames uploaded by opted-in nodes. The child process keeps TensorFlow-free numpy work and any
    publishing out of the worker, which goes on answering escalations meanwhile. The latest bundle
    it published becomes the parent of the next run (state in <store stem>.retrain.json)."""

    def __init__(self, config, mqtt, hard_examples=None, clock=time.monotonic):
        """hard_examples: the worker's HardExampleStore (counted while a request waits; else the file is
        opened read-only to count); clock: seconds, monotonic (tests pass a fake one)."""
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
        self.hard_examples, self.clock = hard_examples, clock
        # What the job will count as usable (load_hard_examples): its --min-examples, and frames
        # only where the --privacy policy's default lets them be used (per-node opt-ins are not
        # counted: the stored features of those frames are, so the wait ends anyway).
        args = list(self.trigger.args)
        try:
            self.min_examples = int(_arg(args, "--min-examples") or RetrainOptions.min_examples)
            self._count_frames = PrivacyPolicy.parse(_arg(args, "--privacy")).default == "raw"
        except ValueError:
            raise ConfigError(f"retrain.args: --min-examples must be a whole number, "
                              f"got {_arg(args, '--min-examples')!r}") from None
        self._proc = None
        self._log_path: Path | None = None
        self._last = clock()
        self._base: int | None = None  # store.written at the last run (or at start)
        self._pending: PendingRequest | None = None  # a drift alarm / agreement fall asked for a run (issue 13)
        self._serving: PendingRequest | None = None  # the request the running job answers
        self.expired = 0  # requests dropped for want of hard examples
        self._started_with = 0  # usable_examples() when the running job started

    def request(self, why: str) -> None:
        """Ask for a run as soon as the store holds the job's --min-examples usable hard examples
        (and min_interval_seconds allows): a drift the node is sure about escalates nothing, so the
        run cannot wait for `every_examples`, but a run on too few examples would only stop."""
        if self._pending is None:
            log.info("retrain: run requested (%s)", why)
            self._pending = PendingRequest(why, self.clock(), self.min_examples)

    def tick(self, written: int) -> None:
        """written: hard examples this worker has stored since it started."""
        if self._proc is not None:
            if self._proc.poll() is not None:
                self._finished()
            return
        if self._base is None:
            self._base = written
        new, now = written - self._base, self.clock()
        if self._pending is not None:
            self._check_pending(written, now)  # counts (after new rows), or drops it once expired
        if now - self._last < self.trigger.min_interval_seconds:
            return
        due_examples = self.trigger.every_examples is not None and new >= self.trigger.every_examples
        due_time = self.trigger.every_seconds is not None and now - self._last >= self.trigger.every_seconds
        ready = self._pending is not None and self._pending.have >= self._pending.need
        if due_examples or due_time or ready:
            self._base = written
            why = (f"{new} new hard examples" if due_examples else
                   "the retraining period elapsed" if due_time else self._pending.why)
            self._serving, self._pending = self._pending, None  # a run started for any reason answers it
            self._start(why)

    def _check_pending(self, written: int, now: float) -> None:
        """Counts the waiting request's examples; drops it (one warning) once it expired. The
        store is counted only when it wrote rows since the last count: no polling."""
        p = self._pending
        if p.counted_at != written:
            p.have, p.counted_at = self.usable_examples(), written
        if p.have >= p.need:
            return
        if now - p.since >= self.trigger.request_expiry_seconds:
            log.warning("retrain: requested run dropped after %.0f s: %d of %d usable hard examples stored (%s)",
                        now - p.since, p.have, p.need, p.why)
            self._pending = None
            self.expired += 1
        elif not p.told:
            log.info("retrain: requested run waits for hard examples: %d of %d usable stored; expires in %.0f s (%s)",
                     p.have, p.need, self.trigger.request_expiry_seconds - (now - p.since), p.why)
            p.told = True

    def usable_examples(self) -> int:
        """Hard examples the job would read for the current parent, counted as it does (stored
        features + frames the privacy default allows), with SQL counts only. It counts rows whose
        node did not forward its end feature too; a run that then stops puts the request back."""
        from tierlite.cloud.frames import FrameStore
        from tierlite.cloud.store import HardExampleStore

        try:
            name = json.loads((Path(self.state["parent"]) / "manifest.json").read_text())["name"]
        except (OSError, ValueError, KeyError, TypeError):
            name = None  # the job will say what is wrong with the parent
        n = 0
        if self.hard_examples is not None:
            n += self.hard_examples.count(bundle_name=name)
        elif Path(self.config.store.path).is_file():
            with HardExampleStore.open_readonly(self.config.store.path) as store:
                n += store.count(bundle_name=name)
        if self._count_frames:
            if self.collector is not None:
                n += self.collector.store.count(name)
            elif self.frames_path.is_file():
                with FrameStore(self.frames_path, readonly=True) as fs:
                    n += fs.count(name)
        return n

    @property
    def pending(self) -> PendingRequest | None:
        return self._pending

    def status(self) -> dict:
        """For the worker's retained status: whether a requested run waits, why, and for what."""
        p, now = self._pending, self.clock()
        return {"runs": int(self.state["runs"]), "running": self._proc is not None, "expired_requests": self.expired,
                "pending": None if p is None else {
                    "why": p.why, "waiting_for": "hard examples" if p.have < p.need else "min_interval_seconds",
                    "have": p.have, "need": p.need, "retries": p.retries, "waited_s": round(now - p.since, 1),
                    "expires_in_s": round(max(0.0, self.trigger.request_expiry_seconds - (now - p.since)), 1)}}

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
        self._last = self.clock()
        self.state["runs"] = run
        self._started_with = self.usable_examples() if self._serving is not None else 0

    def _finished(self) -> None:
        code, self._proc = self._proc.returncode, None
        try:
            report = json.loads(self._report.read_text())
        except (OSError, ValueError):
            report = None
        served, self._serving = self._serving, None
        if code != 0 or report is None:
            tail = self._log_path.read_text(errors="replace").strip().splitlines()[-1:] if self._log_path else []
            log.error("retrain: run %d failed (exit %d): %s", self.state["runs"], code, tail[0] if tail else "no output")
            too_few = _TOO_FEW.search(tail[0]) if tail else None
            if served is not None and too_few is not None:
                self._put_back(served, self.min_examples - int(too_few[1]) - int(too_few[2]))
        else:
            rollout = report.get("rollout", {})
            log.info("retrain: run %d: candidate v%s %s; %s", self.state["runs"], report["candidate"]["version"],
                     "better" if report["better"] else "not better", report["reason"])
            if rollout.get("stage") in ("published", "complete"):
                self.state["parent"] = str(self._out.resolve())  # the fleet runs it now
        self._save()

    def _put_back(self, p: PendingRequest, short: int) -> None:
        """A requested run stopped for too few examples: the request waits again, for as many more
        rows as the job was short of (this scheduler's count was too high), at most request_retries times."""
        if p.retries >= self.trigger.request_retries:
            log.warning("retrain: requested run dropped: %d run(s) stopped for too few hard examples (%s)",
                        p.retries + 1, p.why)
            self.expired += 1
            return
        log.info("retrain: request put back (%d of %d retries): waits for %d more hard examples (%s)",
                 p.retries + 1, self.trigger.request_retries, max(1, short), p.why)
        retries = p.retries + 1
        if self._pending is not None:  # asked again meanwhile: the newer request waits as long
            p = self._pending
        p.retries = retries
        p.need = self._started_with + max(1, short)
        p.counted_at, p.told = None, False
        self._pending = p

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
