"""The edge gateway: one process supervising the rest. Mosquitto with a generated config (unless
`mosquitto.managed: false`), N edge worker processes on a shared subscription, the zeroconf
advertisement and one Prometheus endpoint merging every worker's metrics. Dead workers and a dead
broker are restarted with backoff. Status (retained): <prefix>/_gateway/<gateway_id>/status.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tierlite import topics
from tierlite.mqtt import Message, MqttClient, default_client_id
from tierlite.service import die_with_parent, stop_processes
from tierlite.systemd import notify

__all__ = ["Gateway", "WORKER_RESTARTS_PER_MINUTE"]

log = logging.getLogger("tierlite.edge")

WORKER_RESTARTS_PER_MINUTE = 10


class _Worker:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.restarts: list[float] = []
        self.online = False


class Gateway:
    """`run()` until `stop()`: broker, workers, advertisement, status; then everything stopped."""

    def __init__(self, cfg, config_path: Path, log_level: str = "info", log_format: str = "text"):
        from tierlite.bundle import Bundle

        self.cfg = cfg
        self.config_path = config_path
        self.log_level, self.log_format = log_level, log_format
        self.bundle = Bundle.load(cfg.bundle)  # fail at start-up, not in N workers
        for tier in ("end", "edge"):
            self.bundle.segment(tier)
        self.stop_event = threading.Event()
        # systemd's socket is the gateway's alone: Mosquitto (built with systemd support) and the
        # workers would otherwise inherit it and say READY before the workers are online.
        self._notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
        self.workers = [_Worker(i) for i in range(cfg.workers)]
        self.mosquitto = None
        self.advertiser = None
        self.mqtt = None
        self._own_state_dir = cfg.mosquitto.state_dir is None
        self.state_dir = Path(cfg.mosquitto.state_dir or tempfile.mkdtemp(prefix="tierlite-edge-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_dir = self.state_dir / "metrics"

    # -- pieces ----------------------------------------------------------------------------------
    def _start_broker(self) -> tuple[str, int]:
        cfg = self.cfg
        if not cfg.mosquitto.managed:
            return cfg.broker.host, cfg.broker.port
        from tierlite.edge.broker import MosquittoProcess, mosquitto_config

        bridge = cfg.cloud.bridge if cfg.cloud.mode == "bridge" else None
        self.mosquitto = MosquittoProcess(cfg.mosquitto, self.state_dir,
                                          mosquitto_config(cfg.mosquitto, bridge, cfg.prefix, cfg.gateway_id,
                                                           self.state_dir))
        self.mosquitto.preexec = die_with_parent()  # Mosquitto dies with the gateway, even on SIGKILL
        self.mosquitto.start()
        if bridge is not None:
            cloud_prefix = bridge.cloud_prefix or cfg.prefix
            there = topics.site_prefix(cloud_prefix, bridge.site) if bridge.site else cloud_prefix
            log.info("bridge to cloud broker %s:%d%s: %s out, %s in (as %s there)", bridge.host, bridge.port,
                     f" as site {bridge.site}" if bridge.site else "", topics.node_filter(cfg.prefix, topics.ESCALATE),
                     topics.node_filter(cfg.prefix, topics.ANSWER), topics.node_filter(there, "<suffix>"))
        return self.mosquitto.connect_host, cfg.mosquitto.port

    def _start_worker(self, w: _Worker, host: str, port: int) -> None:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir),
                   TIERLITE_EDGE_BROKER_HOST=host, TIERLITE_EDGE_BROKER_PORT=str(port))
        w.proc = subprocess.Popen(
            [sys.executable, "-m", "tierlite.edge.worker", "--config", str(self.config_path), "--index", str(w.index),
             "--log-level", self.log_level, "--log-format", self.log_format],
            env=env, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())  # no orphans if the gateway dies
        w.online = False
        log.info("edge worker %d started (pid %d)", w.index, w.proc.pid)

    def _advertise(self, port: int) -> None:
        d = self.cfg.discovery
        if not d.advertise:
            return
        from tierlite.discovery import Advertiser, GatewayRecord

        bind = self.cfg.mosquitto.bind if self.cfg.mosquitto.managed else self.cfg.broker.host
        address = d.address or (bind if bind not in ("0.0.0.0", "::", "", "localhost") else None)
        record = GatewayRecord(self.bundle.name, self.bundle.version, self.cfg.prefix, self.cfg.gateway_id)
        name = d.name or f"tierlite-{self.cfg.gateway_id}-{socket.gethostname()}"
        self.advertiser = Advertiser(name, port, record, address, d.interfaces)
        try:
            self.advertiser.start()
        except Exception as e:  # no multicast here: nodes can still be given the host/port
            log.error("zeroconf advertisement failed (%s); nodes need an explicit broker host", e)
            self.advertiser = None

    def _status(self, state: str = "online") -> bytes:
        return json.dumps({
            "gateway": self.cfg.gateway_id, "state": state, "pid": os.getpid(),
            "model": self.bundle.name, "model_version": self.bundle.version,
            "broker": {"managed": self.cfg.mosquitto.managed,
                       "pid": self.mosquitto.proc.pid if self.mosquitto and self.mosquitto.proc else None},
            "workers": [{"index": w.index, "pid": w.proc.pid if w.proc else None, "online": w.online}
                        for w in self.workers],
            "ts": round(time.time(), 3)}).encode()

    def _offline(self) -> Message:
        return Message(self._status_topic, self._status("offline"), 1, True)

    def _on_worker_status(self, topic: str, payload: bytes) -> None:
        try:
            index = int(topic.rsplit("/", 1)[1])
            doc = json.loads(payload)
        except (ValueError, IndexError):
            return
        for w in self.workers:
            if w.index == index and w.proc is not None and doc.get("pid") in (w.proc.pid, None):
                was, w.online = w.online, doc.get("state") == "online"
                if w.online and not was and all(x.online for x in self.workers):
                    log.info("gateway ready: %d edge worker(s) online", len(self.workers))
                    notify("READY=1", self._notify_socket)  # systemd Type=notify: up once every worker answers
        self._publish_status()

    def _publish_status(self) -> None:
        if self.mqtt is not None:
            self.mqtt.publish(self._status_topic, self._status(), 1, retain=True)

    # -- main ------------------------------------------------------------------------------------
    def run(self) -> int:
        from tierlite.metrics import mark_process_dead, serve_multiprocess
        from tierlite.service import wait_for_stop

        cfg = self.cfg
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True)
        try:
            host, port = self._start_broker()
            if cfg.metrics_port is not None:
                serve_multiprocess(str(self.metrics_dir), cfg.metrics_port, cfg.metrics_bind)
            self._status_topic = topics.gateway_status(cfg.prefix, cfg.gateway_id)
            broker = cfg.broker
            broker.host, broker.port = host, port
            self.mqtt = MqttClient(broker, default_client_id("gateway", cfg.gateway_id),
                                   will=self._offline(), on_connect=self._publish_status)
            self.mqtt.subscribe(topics.gateway_workers(cfg.prefix, cfg.gateway_id), self._on_worker_status, 1)
            self.mqtt.start()
            for w in self.workers:
                self._start_worker(w, host, port)
            self._advertise(port)

            def supervise() -> None:
                if self.mosquitto is not None and not self.mosquitto.check():
                    log.error("broker cannot be kept running: stopping the gateway")
                    self.exit_code = 1
                    self.stop_event.set()
                    return
                for w in self.workers:
                    if w.proc is None or w.proc.poll() is None:
                        continue
                    now = time.monotonic()
                    w.restarts = [t for t in w.restarts if now - t < 60] + [now]
                    log.error("edge worker %d (pid %d) exited with code %s", w.index, w.proc.pid, w.proc.returncode)
                    mark_process_dead(w.proc.pid, str(self.metrics_dir))
                    w.online = False
                    if len(w.restarts) > WORKER_RESTARTS_PER_MINUTE:
                        log.error("edge worker %d keeps dying: stopping the gateway", w.index)
                        self.exit_code = 1
                        self.stop_event.set()
                        return
                    self._start_worker(w, host, port)
                    self._publish_status()

            self.exit_code = 0
            wait_for_stop(self.stop_event, supervise)
            return self.exit_code
        finally:
            self._shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def _shutdown(self) -> None:
        if self.advertiser is not None:
            self.advertiser.stop()
        stop_processes([w.proc for w in self.workers], 5.0)
        if self.mqtt is not None:
            self.mqtt.stop(final=[self._offline()])
        if self.mosquitto is not None:
            self.mosquitto.stop()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        log.info("gateway stopped")
