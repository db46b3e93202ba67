"""tierlite on this machine, for the demo, the benchmarks and the tests: free loopback ports,
waiting, tier processes started as a user starts them (`python -m tierlite ...`), a broker
(Mosquitto, or amqtt where it is missing), a small bundle, and `Stack`: an edge gateway and cloud
workers on loopback, ready when every worker is online.

    with Stack(bundle_dir, edge_workers=2) as stack:
        stack.host, stack.port, stack.prefix, stack.pids()
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from tierlite import topics
from tierlite.errors import ConfigError, TierliteError

__all__ = ["Broker", "Stack", "TierProcess", "free_port", "prepare_bundle", "quiet", "read_jsonl",
           "wait_until", "write_yaml"]

log = logging.getLogger("tierlite.tools.stack")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """predicate()'s first truthy value, polled every `interval` s; TierliteError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TierliteError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- processes -----------------------------------------------------------------------------------
class TierProcess:
    """`python -m tierlite <args>` (or another `module`) with its output in <log_dir>/<name>.log."""

    def __init__(self, name: str, args: list[str], log_dir: Path, *, module: str = "tierlite",
                 cwd: Path | None = None, env: dict[str, str] | None = None):
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        with open(self.log_path, "wb") as out:  # fresh per start: callers wait for lines in it
            self.proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 3) -> str:
        try:
            return " | ".join(self.log().strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """Its exit code; one still running after `timeout` s is stopped, and stop()'s code returned."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.stop()

    def expect_exit(self, timeout: float) -> int:
        """Its exit code; one still running after `timeout` s is killed and TierliteError raised."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise TierliteError(f"{self.name}: still running after {timeout:.0f}s; {self.log_path}: "
                                f"{self.log()[-3000:]}") from None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after `timeout` s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class quiet:
    """Send this process's stdout/stderr (file descriptors, so C++ logs too) to a file, printing
    an elapsed-time line every 15 s to the real stdout."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self._file = open(self.path, "ab")
        os.dup2(self._file.fileno(), 1)
        os.dup2(self._file.fileno(), 2)
        self._done = threading.Event()
        out = os.fdopen(os.dup(self._saved[0]), "w")
        t0 = time.monotonic()

        def tick():
            while not self._done.wait(15):
                print(f"   ... {time.monotonic() - t0:.0f}s (log: {self.path})", file=out, flush=True)
            out.close()

        self._thread = threading.Thread(target=tick, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._file.close()
        self._thread.join(timeout=1)


# -- a broker and a bundle -------------------------------------------------------------------------
class Broker:
    """A broker on 127.0.0.1:<port> with the config the edge gateway generates: Mosquitto, or
    where it is missing and `fallback` holds, amqtt (MQTT 3.1.1: one edge worker, no $share)."""

    def __init__(self, workdir: Path, port: int | None = None, fallback: bool = True, settings: dict | None = None):
        """`settings`: more `mosquitto:` keys (tls, password_file, acl_file, persistence; Mosquitto only)."""
        self.workdir, self.port = Path(workdir), port or free_port()
        self.settings = settings or {}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.fallback, self.protocol = fallback, "5"
        self._mosquitto = None
        self._amqtt: subprocess.Popen | None = None

    def start(self) -> "Broker":
        from tierlite.config import MosquittoConfig
        from tierlite.edge.broker import MosquittoProcess, find_mosquitto, mosquitto_config

        if find_mosquitto() or not self.fallback:
            m = MosquittoConfig(port=self.port, **self.settings)
            state = self.workdir if self.settings.get("persistence") else None
            self._mosquitto = MosquittoProcess(m, self.workdir, mosquitto_config(m, state_dir=state))
            self._mosquitto.start()
        else:
            self._amqtt = self._start_amqtt()
            self.protocol = "3.1.1"
        return self

    def _start_amqtt(self) -> subprocess.Popen:
        from tierlite.edge.broker import port_open

        if shutil.which("amqtt") is None:
            raise ConfigError("neither mosquitto (apt install mosquitto) nor amqtt (pip install amqtt) is installed")
        print("warning: mosquitto not found; using the embedded amqtt broker (MQTT 3.1.1, one edge worker)",
              file=sys.stderr)
        conf = write_yaml(self.workdir / "amqtt.yaml", {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}})
        with open(self.workdir / "amqtt.log", "ab") as out:
            proc = subprocess.Popen(["amqtt", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        wait_until(lambda: port_open("127.0.0.1", self.port) or proc.poll() is not None, 20, "the amqtt broker")
        if proc.poll() is not None:
            raise ConfigError(f"amqtt exited at start; see {self.workdir / 'amqtt.log'}")
        return proc

    @property
    def pid(self) -> int | None:
        """The Mosquitto process id (None for amqtt or before start)."""
        return self._mosquitto.proc.pid if self._mosquitto is not None and self._mosquitto.proc else None

    def stop(self) -> None:
        if self._mosquitto is not None:
            self._mosquitto.stop()
        if self._amqtt is not None:
            self._amqtt.terminate()
            try:
                self._amqtt.wait(5)
            except subprocess.TimeoutExpired:
                self._amqtt.kill()


# The trained CIFAR-10 reference bundle shipped in the repo (models/cifar10/MODEL_CARD.md).
REFERENCE_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "cifar10"


def reference_bundle() -> str | None:
    """models/cifar10 when this checkout has it (the benchmarks' default --bundle), else None."""
    return str(REFERENCE_BUNDLE) if (REFERENCE_BUNDLE / "manifest.json").is_file() else None


def prepare_bundle(train_dir: Path, bundle_dir: Path, retrain: bool = False, binarized: bool = False) -> Path:
    """A small bundle trained on `train_dir`, reused from `bundle_dir` when it is already there."""
    from tierlite.bundle import Bundle
    from tierlite.errors import BundleError

    if not retrain and (bundle_dir / "manifest.json").exists():
        try:
            Bundle.load(bundle_dir)
            return bundle_dir
        except BundleError as e:
            log.warning("rebuilding %s: %s", bundle_dir, e)
    from tierlite.converters.pipeline import build_bundle

    shutil.rmtree(bundle_dir, ignore_errors=True)
    return Path(build_bundle(train_dir, bundle_dir, preset="small", binarized=binarized, seed=0))


# -- an edge gateway and cloud workers -------------------------------------------------------------
def _merged(config: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `config`, a section (dict) merged key by key: a caller's store: {frames_per_node_rate}
    keeps the generated store path."""
    return {**config, **{k: {**config[k], **v} if isinstance(config.get(k), dict) and isinstance(v, dict) else v
                         for k, v in extra.items()}}


class Stack:
    """`tierlite edge` (its managed Mosquitto on a free port, N edge workers on a shared
    subscription, no zeroconf, no metrics port) and `tierlite cloud` worker(s), each a process
    started from generated YAML configs. Ready when the gateway's retained status shows every
    edge worker online and every cloud worker has announced itself."""

    def __init__(self, bundle: str | Path, edge_workers: int = 1, cloud_workers: int = 1,
                 prefix: str = "tierlite", edge_threshold: float | None = None, timeout: float = 90.0,
                 log_level: str = "warning", edge_extra: dict | None = None, cloud_extra: dict | None = None,
                 keep_dir: bool = False):
        self.edge_extra, self.cloud_extra = edge_extra or {}, cloud_extra or {}  # more config keys (e.g. update:)
        self.keep_dir = keep_dir  # keep configs, logs and the hard-example store after stop()
        self.bundle = str(Path(bundle).resolve())
        self.edge_workers, self.cloud_workers = edge_workers, cloud_workers
        self.prefix, self.edge_threshold = prefix, edge_threshold
        self.timeout, self.log_level = timeout, log_level
        self.host = "127.0.0.1"
        self.port = 0
        self.dir: Path | None = None
        self.procs: dict[str, TierProcess] = {}
        self._status: dict[str, dict[str, Any]] = {}
        self._status_lock = threading.Lock()
        self._watch = None

    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, tier: str, config: dict[str, Any]) -> None:
        path = write_yaml(self.dir / f"{name}.yaml", config)
        self.procs[name] = TierProcess(name, ["--log-level", self.log_level, tier, "--config", str(path)], self.dir)

    def start(self) -> None:
        from tierlite.config import BrokerConfig
        from tierlite.edge.broker import port_open
        from tierlite.mqtt import MqttClient

        self.dir = Path(tempfile.mkdtemp(prefix="tierlite-bench-"))
        self.port = free_port()
        broker = {"host": self.host, "port": self.port}
        edge = {"bundle": self.bundle, "prefix": self.prefix, "gateway_id": "bench-edge",
                "broker": broker, "mosquitto": {"port": self.port, "state_dir": str(self.dir / "mosquitto")},
                "discovery": {"advertise": False}, "workers": self.edge_workers, "metrics_port": None}
        if self.edge_threshold is not None:
            edge["threshold"] = self.edge_threshold
        self._spawn("edge", "edge", _merged(edge, self.edge_extra))
        self._wait(lambda: port_open(self.host, self.port), "the edge gateway's Mosquitto")
        self._watch = MqttClient(BrokerConfig(host=self.host, port=self.port), "tierlite-bench-watch")
        self._watch.subscribe(topics.gateway_status(self.prefix, "bench-edge"), self._on_status("gateway"), 1)
        self._watch.subscribe(topics.cloud_statuses(self.prefix), self._on_status(None), 1)
        self._watch.start()
        for i in range(self.cloud_workers):
            cloud = {"bundle": self.bundle, "prefix": self.prefix, "worker_id": f"bench-cloud-{i}", "broker": broker,
                     "store": {"path": str(self.dir / f"hard-{i}.sqlite")}, "metrics_port": None}
            self._spawn(f"cloud-{i}", "cloud", _merged(cloud, self.cloud_extra))
        self._wait(self._ready, f"{self.edge_workers} edge worker(s) and {self.cloud_workers} cloud worker(s)")

    def _on_status(self, key: str | None):
        def handle(topic: str, payload: bytes) -> None:
            try:
                doc = json.loads(payload)
            except ValueError:
                return
            with self._status_lock:
                self._status[key or topic.split("/")[-2]] = doc
        return handle

    def _ready(self) -> bool:
        with self._status_lock:
            gw = self._status.get("gateway", {})
            clouds = [self._status.get(f"bench-cloud-{i}", {}) for i in range(self.cloud_workers)]
        workers = gw.get("workers", [])
        return (len(workers) == self.edge_workers and all(w.get("online") for w in workers)
                and all(c.get("state") == "online" for c in clouds))

    def _wait(self, cond, what: str) -> None:
        def ready() -> bool:
            for name, p in self.procs.items():
                if not p.running():
                    raise TierliteError(f"bench: `tierlite {name.split('-')[0]}` exited with code "
                                        f"{p.proc.returncode} while starting: {p.tail()}")
            return cond()

        wait_until(ready, self.timeout, f"{what} (logs in {self.dir})")

    def pids(self) -> dict[str, int]:
        """Process name -> pid for every process of the stack (for CpuMeter)."""
        out: dict[str, int] = {}
        with self._status_lock:
            gw = dict(self._status.get("gateway", {}))
            clouds = {k: v for k, v in self._status.items() if k.startswith("bench-cloud-")}
        if gw.get("broker", {}).get("pid"):
            out["mosquitto"] = gw["broker"]["pid"]
        if "edge" in self.procs:
            out["edge gateway"] = self.procs["edge"].pid
        for w in gw.get("workers", []):
            if w.get("pid"):
                out[f"edge worker {w['index']}"] = w["pid"]
        for name, doc in sorted(clouds.items()):
            if doc.get("pid"):
                out[f"cloud worker {name.rsplit('-', 1)[1]}"] = doc["pid"]
        return out

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop(timeout=0.5)
            self._watch = None
        # Cloud workers first, the gateway (which stops its workers and Mosquitto) last.
        for name, p in sorted(self.procs.items(), key=lambda kv: kv[0] == "edge"):
            p.stop()
        self.procs = {}
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
