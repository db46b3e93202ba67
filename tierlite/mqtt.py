"""The one boundary between tierlite and paho-mqtt 2.x (callback API v2, MQTT 5 by default).

Why the settings below: a naive loop that publishes QoS 1 and waits for every PUBACK manages a few
thousand msg/s here, and a QoS-1 stream that outruns its QoS-1 subscriber overflows Mosquitto's
default 1,000-message per-client queue, after which Mosquitto drops messages and delivery
collapses to ~70-100 msg/s (measured on this box, see docs/RUNTIME.md). So: the data path is
QoS 0 with application deadlines (a lost message costs one fallback, never a stall), nothing
waits on a publish, paho's inflight window is 1,000 instead of 20, TCP_NODELAY is set on the
socket (small messages, latency matters), and the generated Mosquitto config raises the queue.

MqttClient never raises on network trouble: publish() returns False, connection changes go to
callbacks, a handler's exception is logged and counted (paho would otherwise kill its thread).
Connection is asynchronous with reconnect backoff, so a daemon starts and runs with no broker.
`broker: {host: auto}` finds the gateway first (tierlite.discovery).
"""
from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable

from tierlite.config import BrokerConfig
from tierlite.discovery import discover_broker
from tierlite.errors import ConfigError

__all__ = ["Handler", "Message", "MqttClient", "default_client_id"]

log = logging.getLogger("tierlite.mqtt")

Handler = Callable[[str, bytes], None]  # (topic, payload)


@dataclass(frozen=True)
class Message:
    """One message to publish as it is: a last will, a final status at shutdown, a reply."""

    topic: str
    payload: bytes | str
    qos: int = 0
    retain: bool = False


class MqttClient:
    """A paho client with tierlite's defaults, subscriptions that survive reconnects, and an error
    boundary. Call start() once; it returns at once and connects (and reconnects) in the background."""

    def __init__(self, config: BrokerConfig, client_id: str, *,
                 will: Message | None = None,
                 on_connect: Callable[[], None] | None = None,
                 on_disconnect: Callable[[], None] | None = None):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.config = config
        self.client_id = config.client_id or client_id
        self._paho = paho
        v5 = config.protocol == "5"
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                   protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                                   clean_session=None if v5 else True)
        c = self._client
        c.max_inflight_messages_set(config.max_inflight)
        c.max_queued_messages_set(config.max_queued)
        c.reconnect_delay_set(min_delay=config.reconnect_min, max_delay=config.reconnect_max)
        user, password = config.username, config.resolved_password()
        if user is not None:
            c.username_pw_set(user, password)
        if config.tls is not None:
            t = config.tls
            try:
                c.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file)
            except (ssl.SSLError, OSError, ValueError) as e:
                raise ConfigError(f"broker TLS files unusable: {e}") from None
            if t.insecure:
                c.tls_insecure_set(True)
        if will is not None:
            c.will_set(will.topic, will.payload, will.qos, will.retain)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        c.on_message = self._on_unrouted
        self._user_on_connect, self._user_on_disconnect = on_connect, on_disconnect
        self._subs: dict[str, int] = {}  # filter as subscribed ($share/... kept) -> qos
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stopping = False
        self._failures = 0
        self._publish_errors = 0
        self.handler_errors = 0
        self.endpoint: tuple[str, int] | None = None
        self._started = False
        self._discovery_thread: threading.Thread | None = None
        self._stop_event = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self.config.auto:
            self._discovery_thread = threading.Thread(target=self._discover_then_connect,
                                                      name="mqtt-discovery", daemon=True)
            self._discovery_thread.start()
        else:
            self._connect(self.config.host, self.config.port)

    def _connect(self, host: str, port: int) -> None:
        self.endpoint = (host, port)
        kwargs = {}
        if self.config.protocol == "5":
            kwargs["clean_start"] = True
        try:
            self._client.connect_async(host, port, keepalive=self.config.keepalive, **kwargs)
        except (ValueError, OSError) as e:
            raise ConfigError(f"broker {host}:{port}: {e}") from None
        self._client.loop_start()  # its thread connects, and reconnects with backoff
        log.info("mqtt: connecting to %s:%d as %s", host, port, self.client_id)

    def _discover_then_connect(self) -> None:
        delay = self.config.reconnect_min
        rejected: dict[tuple[str, int], float] = {}  # endpoint -> until when it is ignored
        while not self._stop_event.is_set():
            now = time.monotonic()
            try:
                found = discover_broker(self.config.discovery_timeout, self.config.discovery_interfaces,
                                        self.config.discovery_match,
                                        skip=lambda b: rejected.get((b.host, b.port), 0.0) > time.monotonic())
            except Exception as e:  # zeroconf/network trouble: keep trying, never crash the daemon
                log.warning("mqtt: zeroconf discovery failed: %s", e)
                found = None
            if found is not None:
                log.info("mqtt: discovered gateway %s at %s:%d (%s)", found.name, found.host, found.port,
                         ", ".join(f"{k}={v}" for k, v in sorted(found.properties.items())))
                self.discovered = found
                if self._stop_event.is_set():
                    return
                self._failures = 0
                self._connect(found.host, found.port)
                if self.config.tls is None or self._proves_itself():
                    return
                # Anyone on the LAN can advertise _mqtt._tcp: with TLS, an endpoint that fails the
                # handshake (a certificate not from our CA) or refuses our credentials is not our gateway.
                log.warning("mqtt: %s at %s:%d failed TLS or authentication (not signed by our CA?); "
                            "ignoring it for 60 s and browsing on", found.name, found.host, found.port)
                self._client.loop_stop()
                rejected[(found.host, found.port)] = now + 60.0
                self.endpoint = None
                continue
            log.warning("mqtt: no tierlite gateway found by zeroconf yet; retrying in %.1fs", delay)
            self._stop_event.wait(delay)
            delay = min(delay * 2, self.config.reconnect_max)

    def _proves_itself(self, attempts: int = 2) -> bool:
        """After connecting to a discovered endpoint: True once connected, False after `attempts`
        failed connection attempts (TLS handshake or CONNACK refusal)."""
        deadline = time.monotonic() + max(10.0, 4 * self.config.reconnect_max)
        while time.monotonic() < deadline and not self._stop_event.is_set():
            if self._connected.wait(0.05):
                return True
            if self._failures >= attempts:
                return False
        return self._connected.is_set() or self._stop_event.is_set()

    def stop(self, final: list[Message] | None = None, timeout: float = 2.0) -> None:
        """Publish `final` messages (e.g. a retained 'offline' status), then disconnect cleanly."""
        self._stopping = True
        self._stop_event.set()
        if self.connected and final:
            infos = []
            for m in final:
                try:
                    infos.append(self._client.publish(m.topic, m.payload, m.qos, m.retain))
                except (ValueError, OSError, RuntimeError):
                    pass
            deadline = time.monotonic() + timeout
            for info in infos:
                try:
                    info.wait_for_publish(max(0.01, deadline - time.monotonic()))
                except (RuntimeError, ValueError):
                    pass
        try:
            self._client.disconnect()
        except (OSError, RuntimeError):
            pass
        self._client.loop_stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # -- subscribe / publish ------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 0) -> None:
        """Route messages matching `topic_filter` to handler(topic, payload). A shared subscription
        ($share/<group>/<filter>) routes on <filter>. Re-subscribed after every reconnect."""
        route = topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
        self._client.message_callback_add(route, self._guard(handler))
        with self._lock:
            self._subs[topic_filter] = qos
        if self.connected:
            self._client.subscribe(topic_filter, qos)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> bool:
        """Queue a message; never blocks or raises. False: not connected (QoS 0) or queue full."""
        try:
            info = self._client.publish(topic, payload, qos, retain)
        except (ValueError, OSError, RuntimeError, TypeError) as e:
            self._publish_errors += 1
            if self._publish_errors == 1 or self._publish_errors % 1000 == 0:
                log.warning("mqtt: publish to %s failed (%d so far): %s", topic, self._publish_errors, e)
            return False
        return info.rc == self._paho.MQTT_ERR_SUCCESS

    def send(self, message: Message) -> bool:
        """publish() a Message."""
        return self.publish(message.topic, message.payload, message.qos, message.retain)

    def publish_batch(self, messages: list[tuple[str, bytes]]) -> bool:
        """QoS-0 (topic, payload) messages queued as ONE write: the PUBLISH packets are built here
        and handed to paho as one out-packet, so a worker's answers to a batch cost one wake-up
        and one send() instead of one each (issue 15). Same bytes on the wire as publish()."""
        c = self._client
        if not messages:
            return True
        if not self.connected or not hasattr(c, "_packet_queue"):
            return all([self.publish(t, p) for t, p in messages])
        v5 = self.config.protocol == "5"
        parts = []
        for topic, payload in messages:
            t = topic.encode()
            length = 2 + len(t) + (1 if v5 else 0) + len(payload)  # v5: an empty property block
            head = bytearray(b"\x30")
            while True:
                byte, length = length % 128, length // 128
                head.append(byte | (0x80 if length else 0))
                if not length:
                    break
            parts += [head, len(t).to_bytes(2, "big"), t, b"\x00" if v5 else b"", payload]
        try:
            c._packet_queue(self._paho.PUBLISH, b"".join(parts), 0, 0, self._paho.MQTTMessageInfo(0))
        except (ValueError, OSError, RuntimeError, AttributeError) as e:
            self._publish_errors += 1
            log.warning("mqtt: batched publish of %d messages failed: %s", len(messages), e)
            return False
        return True

    def input_waiting(self) -> bool:
        """True when more bytes from the broker wait on the socket: the next message is already
        here (a batching worker drains those before it runs its batch). False when unsure."""
        sock = self._client.socket()
        if sock is None:
            return False
        try:
            if getattr(sock, "pending", None) and sock.pending():  # TLS: decrypted bytes held by ssl
                return True
            return bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def unsubscribe(self, topic_filter: str) -> None:
        """Undo subscribe() (model updates subscribe to a version's chunks only while fetching it)."""
        route = topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
        self._client.message_callback_remove(route)
        with self._lock:
            self._subs.pop(topic_filter, None)
        if self.connected:
            self._client.unsubscribe(topic_filter)

    def publish_and_wait(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                         timeout: float = 10.0) -> bool:
        """Publish and wait until the broker has it (QoS >= 1). For rare control messages such as a
        model update's chunks, never on the data path. False on timeout or error."""
        try:
            info = self._client.publish(topic, payload, qos, retain)
            info.wait_for_publish(timeout)
            return info.is_published()
        except (ValueError, OSError, RuntimeError, TypeError) as e:
            log.warning("mqtt: publish to %s failed: %s", topic, e)
            return False

    # -- paho callbacks -----------------------------------------------------------------------
    def _guard(self, handler: Handler):
        def call(client, userdata, message):
            try:
                handler(message.topic, message.payload)
            except Exception:  # the error boundary: one bad message never kills the network thread
                self.handler_errors += 1
                if self.handler_errors <= 5 or self.handler_errors % 1000 == 0:
                    log.exception("mqtt: handler for %s failed (%d so far)", message.topic, self.handler_errors)
        return call

    def _on_unrouted(self, client, userdata, message) -> None:
        log.debug("mqtt: message on %s with no handler", message.topic)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._failures += 1
            level = logging.WARNING if self._failures == 1 else logging.DEBUG
            log.log(level, "mqtt: broker %s refused the connection: %s", self._where(), reason_code)
            return
        sock = client.socket()
        try:  # small messages, latency matters: no Nagle delay
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        with self._lock:
            subs = list(self._subs.items())
        for topic_filter, qos in subs:
            client.subscribe(topic_filter, qos)
        log.info("mqtt: connected to %s%s", self._where(), f" after {self._failures} failed attempt(s)" if self._failures else "")
        self._failures = 0
        self._connected.set()
        if self._user_on_connect:
            try:
                self._user_on_connect()
            except Exception:
                log.exception("mqtt: on_connect hook failed")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping:
            log.warning("mqtt: lost connection to %s (%s); reconnecting with backoff", self._where(), reason_code)
        if was and self._user_on_disconnect:
            try:
                self._user_on_disconnect()
            except Exception:
                log.exception("mqtt: on_disconnect hook failed")

    def _on_connect_fail(self, client, userdata) -> None:
        self._failures += 1
        if self._failures == 1:
            log.warning("mqtt: cannot reach broker %s; retrying with backoff (up to %.1fs apart)",
                        self._where(), self.config.reconnect_max)

    def _where(self) -> str:
        return f"{self.endpoint[0]}:{self.endpoint[1]}" if self.endpoint else "(not resolved)"


def default_client_id(role: str, name: str | None = None) -> str:
    return f"tierlite-{role}-{name or socket.gethostname()}-{os.getpid()}"
