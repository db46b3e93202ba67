"""Mosquitto for the edge gateway: a generated config (listener, limits, optional bridge to a cloud
broker) and a supervised process (restarted with backoff if it dies)."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tierlite import topics
from tierlite.config import BridgeConfig, MosquittoConfig
from tierlite.errors import ConfigError

__all__ = ["MosquittoProcess", "bridge_config", "find_mosquitto", "is_loopback", "mosquitto_config", "port_open"]

log = logging.getLogger("tierlite.edge.broker")

DEBIAN_PATH = "/usr/sbin/mosquitto"  # Debian/Ubuntu install it outside a normal user's PATH


def find_mosquitto(binary: str = "mosquitto") -> str | None:
    if "/" in binary:
        return binary if Path(binary).is_file() else None
    found = shutil.which(binary)
    if found:
        return found
    return DEBIAN_PATH if binary == "mosquitto" and Path(DEBIAN_PATH).is_file() else None


def bridge_config(bridge: BridgeConfig, prefix: str, gateway_id: str) -> str:
    """Mosquitto bridge section: escalations out to the cloud broker, answers and model updates in,
    update reports and opted-in frame uploads out. MQTT 5 bridge (no-local subscriptions: nothing echoes back).

    With `bridge.site` (or a `cloud_prefix` of its own) the node topics are renamed on the way:
    <prefix>/<node>/... here is <cloud_prefix>/<site>/<node>/... on the cloud broker, so the bridge
    takes in this site's answers only and one pool of cloud workers serves every site."""
    b = bridge
    here = f"{prefix}/"
    cloud_root = f"{b.cloud_prefix or prefix}/"
    cloud_nodes = f"{topics.site_prefix(cloud_root[:-1], b.site)}/" if b.site else cloud_root

    def rule(topic_filter: str, direction: str, qos: int, there: str) -> str:
        if there == here:  # same name on both brokers: the plain form
            return f"topic {topic_filter} {direction} {qos}"
        return f"topic {topic_filter[len(here):]} {direction} {qos} {here} {there}"

    client_id = b.client_id or "-".join(["tierlite-bridge", *([b.site] if b.site else []), gateway_id])
    lines = [
        f"connection tierlite-{gateway_id}",
        f"address {b.host}:{b.port}",
        "bridge_protocol_version mqttv50",
        f"remote_clientid {client_id}",  # per site: two sites' gateways may share an id
        "cleansession true",
        f"keepalive_interval {b.keepalive}",
        f"restart_timeout 1 {b.reconnect_max}",  # reconnect backoff: 1 s doubling up to reconnect_max
        "try_private true",
        "notifications true",
        f"notification_topic {topics.bridge_notifications(prefix, gateway_id)}",
        rule(topics.node_filter(prefix, topics.ESCALATE), "out", b.qos, cloud_nodes),
        rule(topics.node_filter(prefix, topics.ANSWER), "in", b.qos, cloud_nodes),
        # Model updates: the fleet-wide ones from the cloud root, and (with a site) this site's own
        # (`tierlite publish --site`), taken in under the same local names; subscribed after the
        # fleet-wide ones, so on a reconnect the site's retained announcement arrives last.
        rule(topics.updates(prefix), "in", 1, cloud_root),
        *([rule(topics.updates(prefix), "in", 1, cloud_nodes)] if b.site else []),
        # Reports and opted-in hard-case frame uploads go up under the site too: the canary gate and
        # the frame store key them by <site>/<node>, and a site may write its own nodes' only.
        rule(topics.update_reports(prefix), "out", 1, cloud_nodes),
        rule(topics.frame_uploads(prefix), "out", 0, cloud_nodes),
    ]
    if b.site:  # two sites' gateways may share an id: their up/down notices stay on their own broker
        lines.insert(lines.index("notifications true") + 1, "notifications_local_only true")
    if b.username:
        lines.append(f"remote_username {b.username}")
    password = b.resolved_password()  # password_file / password_env: edge.yaml holds no secret
    if password:
        lines.append(f"remote_password {password}")
    if b.tls:
        if b.tls.ca_file:
            lines.append(f"bridge_cafile {b.tls.ca_file}")
        else:
            lines.append("bridge_capath /etc/ssl/certs")
        if b.tls.cert_file:
            lines += [f"bridge_certfile {b.tls.cert_file}", f"bridge_keyfile {b.tls.key_file}"]
        if b.tls.insecure:
            lines.append("bridge_insecure true")
    return "\n".join(lines) + "\n"


def is_loopback(bind: str) -> bool:
    """Whether a listener address is reachable from this host only."""
    return bind in ("localhost", "::1") or bind.startswith("127.")


_anonymous_logged = False


def _security_lines(m: MosquittoConfig) -> list[str]:
    """Authentication, TLS and ACL (docs/SECURITY.md). Beyond loopback: TLS + ACL + no anonymous,
    or a ConfigError that says how to get there (`tierlite provision`)."""
    global _anonymous_logged
    secured = m.tls is not None or m.password_file is not None or m.acl_file is not None
    if not secured:
        if not is_loopback(m.bind):
            raise ConfigError(
                f"mosquitto.bind {m.bind} is reachable beyond this host, so the broker needs mosquitto.tls, "
                "mosquitto.password_file and mosquitto.acl_file: run `tierlite provision` and paste its "
                "broker/edge-security.yaml (docs/SECURITY.md), or bind 127.0.0.1 for a single-box demo")
        if not _anonymous_logged:
            _anonymous_logged = True
            log.warning("mosquitto on %s:%d accepts anonymous clients (loopback-only demo; "
                        "`tierlite provision` for a real site, docs/SECURITY.md)", m.bind, m.port)
        return [f"listener {m.port} {m.bind}", "allow_anonymous true"]
    if not is_loopback(m.bind):
        missing = [k for k in ("tls", "acl_file") if getattr(m, k) is None]
        if m.password_file is None and not (m.tls and m.tls.require_certificate):
            missing.append("password_file (or tls.require_certificate)")
        if missing:
            raise ConfigError(f"mosquitto.bind {m.bind} is reachable beyond this host: set mosquitto."
                              f"{', mosquitto.'.join(missing)} (`tierlite provision` writes them; docs/SECURITY.md)")
    lines = ["allow_anonymous false"]
    if m.password_file:
        lines.append(f"password_file {m.password_file}")
    if m.acl_file:
        lines.append(f"acl_file {m.acl_file}")
    lines.append(f"listener {m.port} {m.bind}")
    if m.tls is not None:
        lines += [f"cafile {m.tls.ca_file}", f"certfile {m.tls.cert_file}", f"keyfile {m.tls.key_file}",
                  "tls_version tlsv1.2"]
        if m.tls.crl_file:
            from tierlite.edge.provision import check_crl

            check_crl(m.tls.crl_file, m.tls.ca_file)  # a foreign or tampered CRL would lock every client out
            lines.append(f"crlfile {m.tls.crl_file}")
        if m.tls.require_certificate:
            lines.append("require_certificate true")
            if m.password_file is None:  # certificate only: its CN is the username the ACL sees
                lines.append("use_identity_as_username true")
    return lines


def mosquitto_config(m: MosquittoConfig, bridge: BridgeConfig | None = None, prefix: str = "tierlite",
                     gateway_id: str = "edge", state_dir: Path | None = None) -> str:
    """The broker's config. `state_dir`: where retained messages persist (persistence needs one)."""
    text = [
        "# Generated by `tierlite edge` at every start; edit edge.yaml instead.",
        "per_listener_settings false",
        *_security_lines(m),
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Mosquitto started as root would switch to the `mosquitto` user, which cannot read the 0600
        # password/ACL/key files nor write the 0700 state dir; run the gateway as its own user instead.
        text.append("user root")
    if m.persistence and state_dir is not None:
        text += ["persistence true", f"persistence_location {Path(state_dir).resolve()}/", "autosave_interval 60"]
    else:
        text.append("persistence false")
    text += [
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages false",
        # Throughput: Nagle off, a deep per-client queue (the default 1,000 overflows under bursts
        # and then delivery collapses), a wide QoS>0 window.
        "set_tcp_nodelay true",
        f"max_queued_messages {m.max_queued_messages}",
        "max_inflight_messages 1000",
        f"max_packet_size {m.message_size_limit + 1024}",
    ]
    conf = "\n".join(text) + "\n"
    if bridge is not None:
        conf += "\n" + bridge_config(bridge, prefix, gateway_id)
    return conf


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class MosquittoProcess:
    """One supervised Mosquitto. check() restarts it after a crash, within restart_limit per minute."""

    def __init__(self, m: MosquittoConfig, state_dir: Path, conf_text: str):
        self.m = m
        self.binary = find_mosquitto(m.binary)
        if self.binary is None:
            raise ConfigError(f"mosquitto not found ({m.binary}); install it (apt install mosquitto) "
                              "or set mosquitto.managed: false and point `broker` at your broker")
        self.state_dir = state_dir
        self.conf_path = state_dir / "mosquitto.conf"
        self.log_path = state_dir / "mosquitto.log"
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)  # the config may hold bridge credentials: owner only
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)
            f.write(conf_text)
        self.pid_path = state_dir / "mosquitto.pid"  # `tierlite provision revoke` signals this pid
        self.proc: subprocess.Popen | None = None
        self.preexec = None  # the gateway sets tierlite.service.die_with_parent(): no orphan broker
        self._restarts: list[float] = []
        self._log_file = None

    @property
    def connect_host(self) -> str:
        return "127.0.0.1" if self.m.bind in ("0.0.0.0", "", "::") else self.m.bind

    def _reclaim_port(self, timeout: float = 5.0) -> None:
        """The port is taken: by our own Mosquitto left over from a gateway that died (its pid file
        names a live mosquitto running this very config), which is stopped; or by a broker that is
        dying with its gateway, which is waited for. Anything else keeps the port."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            pid, cmdline = None, []
        if pid is not None and str(self.conf_path).encode() in cmdline and pid != os.getpid():
            log.warning("mosquitto pid %d from an earlier gateway still holds port %d: stopping it", pid, self.m.port)
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while port_open(self.connect_host, self.m.port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def start(self, timeout: float = 10.0) -> None:
        if port_open(self.connect_host, self.m.port):
            self._reclaim_port()
        if port_open(self.connect_host, self.m.port):
            raise ConfigError(f"port {self.m.port} on {self.connect_host} is already in use: choose another "
                              "mosquitto.port, or set mosquitto.managed: false to use that broker")
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf_path)], stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=self.preexec)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise ConfigError(f"mosquitto exited at start (code {self.proc.returncode}): {' | '.join(tail)}")
            if port_open(self.connect_host, self.m.port):
                self.pid_path.write_text(f"{self.proc.pid}\n")
                log.info("mosquitto pid %d listening on %s:%d (config %s)", self.proc.pid, self.m.bind,
                         self.m.port, self.conf_path)
                return
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"mosquitto did not open port {self.m.port} within {timeout:.0f}s (log: {self.log_path})")

    def check(self) -> bool:
        """Restart a dead broker; False when it keeps dying (the gateway should give up)."""
        if self.proc is None or self.proc.poll() is None:
            return True
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 60] + [now]
        log.error("mosquitto exited with code %s (see %s)", self.proc.returncode, self.log_path)
        if len(self._restarts) > self.m.restart_limit:
            log.error("mosquitto died %d times within a minute: giving up", len(self._restarts))
            return False
        time.sleep(min(0.5 * 2 ** (len(self._restarts) - 1), 10.0))
        try:
            self.start()
        except ConfigError as e:
            log.error("mosquitto restart failed: %s", e)
            return len(self._restarts) <= self.m.restart_limit
        return True

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
