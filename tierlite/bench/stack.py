"""The real runtime on loopback for benchmarks: `tierlite edge` (its managed Mosquitto on a free
127.0.0.1 port, N edge worker processes on a shared subscription, no zeroconf, no metrics port)
and `tierlite cloud` worker(s), each a separate process started from generated YAML configs, the
same way a user starts them. Ready when the gateway's retained status shows every edge worker
online and every cloud worker has announced itself; per-process pids for CPU measurement.

    with Stack(bundle_dir, edge_workers=2) as stack:
        stack.host, stack.port, stack.prefix, stack.pids()
"""
from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from tierlite.demo import TierProcess, free_port, wait_until, write_yaml  # the demo's process helpers
from tierlite.errors import TierliteError

__all__ = ["Stack", "free_port"]


class Stack:
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

    # -- start ------------------------------------------------------------------------------
    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write(self, name: str, doc: dict[str, Any]) -> Path:
        return write_yaml(self.dir / name, doc)

    def _spawn(self, name: str, argv: list[str]) -> None:
        self.procs[name] = TierProcess(name, ["--log-level", self.log_level, *argv], self.dir)

    def start(self) -> None:
        from tierlite.config import BrokerConfig
        from tierlite.mqtt import MqttClient

        self.dir = Path(tempfile.mkdtemp(prefix="tierlite-bench-"))
        self.port = free_port()
        broker = {"host": self.host, "port": self.port}
        edge = {"bundle": self.bundle, "prefix": self.prefix, "gateway_id": "bench-edge",
                "broker": broker, "mosquitto": {"port": self.port, "state_dir": str(self.dir / "mosquitto")},
                "discovery": {"advertise": False}, "workers": self.edge_workers, "metrics_port": None}
        if self.edge_threshold is not None:
            edge["threshold"] = self.edge_threshold
        edge.update(self.edge_extra)
        self._spawn("edge", ["edge", "--config", str(self._write("edge.yaml", edge))])
        self._wait(lambda: self._port_open(), "the edge gateway's Mosquitto")
        self._watch = MqttClient(BrokerConfig(host=self.host, port=self.port), "tierlite-bench-watch")
        self._watch.subscribe(f"{self.prefix}/_gateway/bench-edge/status", self._on_status("gateway"), 1)
        self._watch.subscribe(f"{self.prefix}/_cloud/+/status", self._on_status(None), 1)
        self._watch.start()
        for i in range(self.cloud_workers):
            cloud = {"bundle": self.bundle, "prefix": self.prefix, "worker_id": f"bench-cloud-{i}", "broker": broker,
                     "store": {"path": str(self.dir / f"hard-{i}.sqlite")}, "metrics_port": None}
            cloud.update(self.cloud_extra)
            self._spawn(f"cloud-{i}", ["cloud", "--config", str(self._write(f"cloud-{i}.yaml", cloud))])
        self._wait(self._ready, f"{self.edge_workers} edge worker(s) and {self.cloud_workers} cloud worker(s)")

    def _port_open(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

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
                                        f"{p.proc.returncode} while starting: {self._log_tail(name)}")
            return cond()

        wait_until(ready, self.timeout, f"{what} (logs in {self.dir})")

    def _log_tail(self, name: str) -> str:
        try:
            lines = (self.dir / f"{name}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:])

    # -- introspection ----------------------------------------------------------------------------
    def pids(self) -> dict[str, int]:
        """Process name -> pid for every process of the stack (for CpuMeter)."""
        out: dict[str, int] = {}
        with self._status_lock:
            gw = dict(self._status.get("gateway", {}))
            clouds = {k: v for k, v in self._status.items() if k.startswith("bench-cloud-")}
        if gw.get("broker", {}).get("pid"):
            out["mosquitto"] = gw["broker"]["pid"]
        if "edge" in self.procs:
            out["edge gateway"] = self.procs["edge"].proc.pid
        for w in gw.get("workers", []):
            if w.get("pid"):
                out[f"edge worker {w['index']}"] = w["pid"]
        for name, doc in sorted(clouds.items()):
            if doc.get("pid"):
                out[f"cloud worker {name.rsplit('-', 1)[1]}"] = doc["pid"]
        return out

    # -- stop ---------------------------------------------------------------------------------
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
