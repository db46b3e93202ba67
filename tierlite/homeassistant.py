"""Home Assistant MQTT discovery for tierlite (docs/RUNTIME.md, "Home Assistant").

Each camera node is one HA device with:
  sensor        class          the decided class (changes only when the decision changes)
  binary_sensor <class> seen   per class: ON while the class is decided (off_delay: a silent node)
  sensor        <class> count  per class: frames decided as that class (total_increasing)
  sensor        tier, latency, model   diagnostic
Every entity reads one compact, throttled state topic (<prefix>/<node>/ha_state, `StateThrottle`)
rather than the per-frame result topic: at 10-40 fps the recorder would otherwise write every frame.
Availability comes from the node's retained status (and its will). `service_discovery` builds a
device for a gateway or cloud worker from its retained status (not yet published by those daemons).

Builders return (topic, payload) pairs; the caller publishes them retained. Payloads use HA's full
key names (no abbreviations) so they read as the HA documentation does.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tierlite import __version__, topics

__all__ = ["DEFAULT_DISCOVERY_PREFIX", "HomeAssistantOptions", "HomeAssistantPublisher", "StateThrottle",
           "class_keys", "node_device_id", "node_discovery", "retract", "service_discovery"]

log = logging.getLogger("tierlite.homeassistant")

DEFAULT_DISCOVERY_PREFIX = "homeassistant"
MAX_AUTO_CLASSES = 32  # beyond this (ImageNet: 1000) per-class entities need an explicit `classes:` list
ORIGIN = {"name": "tierlite", "sw_version": __version__}


@dataclass(frozen=True)
class HomeAssistantOptions:
    """What the discovery payloads need from the node config (tierlite.config.HomeAssistantConfig)."""

    discovery_prefix: str = DEFAULT_DISCOVERY_PREFIX
    # per-class entities for these labels; None = every label when there are at most MAX_AUTO_CLASSES
    classes: tuple[str, ...] | None = None
    min_interval: float = 1.0  # seconds between two state messages, even if the decision flips faster
    heartbeat: float = 10.0  # a state message at least this often (keeps expire_after from firing)
    # A "<class> seen" sensor is switched off by the next state message without that class; off_delay
    # (> heartbeat, or a class still in view would blink off between heartbeats) covers a node that
    # stops sending.
    off_delay: float = 15.0

    @classmethod
    def from_config(cls, section: Any) -> "HomeAssistantOptions":
        """From a tierlite.config.HomeAssistantConfig."""
        return cls(discovery_prefix=section.discovery_prefix,
                   classes=tuple(section.classes) if section.classes is not None else None,
                   min_interval=section.min_interval, heartbeat=section.heartbeat, off_delay=section.off_delay)

    @property
    def expire_after(self) -> int:
        """Entities go 'unavailable' after two missed heartbeats (a node wedged but still connected)."""
        return int(2 * self.heartbeat + 5)


def _slug(text: str) -> str:
    """HA discovery object/node ids: [a-zA-Z0-9_-] only."""
    return re.sub(r"[^a-zA-Z0-9_-]+", "_", text).strip("_").lower() or "x"


def class_keys(labels: list[str]) -> list[str]:
    """One stable, unique object id per label (its slug; the index resolves clashes)."""
    keys, seen = [], set()
    for i, name in enumerate(labels):
        key = _slug(name)
        if key in seen:
            key = f"{key}_{i}"
        seen.add(key)
        keys.append(key)
    return keys


def node_device_id(node: str) -> str:
    """A node's HA device id and discovery node_id level (the broker ACL grants it by this name)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", f"tierlite_{node}")


def _device_id(kind: str, name: str) -> str:
    return node_device_id(name) if kind == "node" else re.sub(r"[^a-zA-Z0-9_]", "_", f"tierlite_{kind}_{name}")


def _availability(status_topic: str) -> dict[str, Any]:
    return {"availability_topic": status_topic, "availability_template": "{{ value_json.state }}",
            "payload_available": "online", "payload_not_available": "offline"}


def _entity(component: str, device_id: str, key: str, options: HomeAssistantOptions, device: dict,
            status_topic: str, **payload: Any) -> tuple[topics.Topic, dict[str, Any]]:
    body = {"unique_id": f"{device_id}_{key}", "object_id": f"{device_id}_{key}", **payload,
            **_availability(status_topic), "device": device, "origin": ORIGIN}
    return topics.home_assistant_config(options.discovery_prefix, component, device_id, key), body


def node_discovery(prefix: str, node: str, labels: list[str], model: str, model_version: int,
                   options: HomeAssistantOptions = HomeAssistantOptions()) -> list[tuple[topics.Topic, dict[str, Any]]]:
    """Discovery configs of one camera node: its device and every entity (see the module doc)."""
    device_id = _device_id("node", node)
    state = topics.node_topic(prefix, node, topics.HA_STATE)
    status = topics.node_topic(prefix, node, topics.STATUS)
    device = {"identifiers": [device_id], "name": f"tierlite {node}", "manufacturer": "tierlite",
              "model": "camera node", "sw_version": f"{model} v{model_version}"}
    common = {"state_topic": state, "expire_after": options.expire_after}

    def entity(component: str, key: str, **payload: Any):
        return _entity(component, device_id, key, options, device, status, **{**common, **payload})

    out = [
        entity("sensor", "class", name="Class", value_template="{{ value_json.label }}", icon="mdi:eye"),
        entity("sensor", "tier", name="Deciding tier", value_template="{{ value_json.tier }}",
               entity_category="diagnostic", icon="mdi:layers-triple"),
        entity("sensor", "latency", name="Latency", value_template="{{ value_json.latency_ms }}",
               unit_of_measurement="ms", device_class="duration", state_class="measurement",
               suggested_display_precision=1, entity_category="diagnostic"),
        entity("sensor", "model", name="Model", value_template="{{ value_json.model }}",
               entity_category="diagnostic", icon="mdi:brain"),
    ]
    wanted = set(options.classes) if options.classes is not None else None
    if wanted is None and len(labels) > MAX_AUTO_CLASSES:
        wanted = set()  # two entities per class would swamp HA; the publisher logs how to pick some
    for index, (name, key) in enumerate(zip(labels, class_keys(labels))):
        if wanted is not None and name not in wanted:
            continue
        # By index, not by name: a label may hold quotes or spaces that a Jinja key would need escaped.
        out.append(entity("binary_sensor", f"seen_{key}", name=f"{name} seen",
                          value_template=f"{{{{ 'ON' if {index} in value_json.seen else 'OFF' }}}}",
                          payload_on="ON", payload_off="OFF", off_delay=options.off_delay))
        out.append(entity("sensor", f"count_{key}", name=f"{name} count",
                          value_template=f"{{{{ value_json.counts[{index}] }}}}",
                          state_class="total_increasing", unit_of_measurement="frames", icon="mdi:counter"))
    return out


def service_discovery(kind: str, service_id: str, status_topic: str,
                      options: HomeAssistantOptions = HomeAssistantOptions()) -> list[tuple[topics.Topic, dict[str, Any]]]:
    """A device for an edge gateway (kind "gateway") or cloud worker ("cloud"): a connectivity
    sensor and its model, both read from its retained status."""
    device_id = _device_id(kind, service_id)
    device = {"identifiers": [device_id], "name": f"tierlite {kind} {service_id}", "manufacturer": "tierlite",
              "model": "edge gateway" if kind == "gateway" else "cloud worker"}
    return [
        _entity("binary_sensor", device_id, "online", options, device, status_topic, name="Online",
                state_topic=status_topic, value_template="{{ 'ON' if value_json.state == 'online' else 'OFF' }}",
                payload_on="ON", payload_off="OFF", device_class="connectivity", entity_category="diagnostic"),
        _entity("sensor", device_id, "model", options, device, status_topic, name="Model", state_topic=status_topic,
                value_template="{{ value_json.model | default('') }} v{{ value_json.model_version | default('') }}",
                entity_category="diagnostic", icon="mdi:brain"),
    ]


def retract(published: list[str], current: list[str]) -> list[str]:
    """Topics published before but not now (a model update with other labels): the caller sends an
    empty retained payload to each, which removes the entity from HA."""
    keep = set(current)
    return [t for t in published if t not in keep]


@dataclass
class StateThrottle:
    """Turns the per-frame result events into few HA state messages: one when the decided class
    changes (at most one per `min_interval`), otherwise one per `heartbeat`. Between two messages
    it remembers every class decided (`seen`), the frame counts and the mean latency."""

    labels: list[str]
    options: HomeAssistantOptions = field(default_factory=HomeAssistantOptions)
    clock: Callable[[], float] = time.monotonic
    counts: list[int] = field(init=False)
    _seen: set[int] = field(init=False, default_factory=set)
    _label: int | None = field(init=False, default=None)
    _sent_label: int | None = field(init=False, default=None)
    _sent_at: float = field(init=False, default=float("-inf"))
    _latency_sum: float = field(init=False, default=0.0)
    _latency_n: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.labels)

    def relabel(self, labels: list[str]) -> None:
        """A new model: counts restart (HA's total_increasing takes a reset as a new cycle)."""
        self.labels, self.counts = list(labels), [0] * len(labels)
        self._seen.clear()
        self._label = self._sent_label = None

    def observe(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Count one result event; the state message to publish now, or None."""
        label = event.get("label")
        if not isinstance(label, int) or not 0 <= label < len(self.labels):
            return None  # a label the current model does not have (an answer from another version)
        self.counts[label] += 1
        self._seen.add(label)
        self._label = label
        self._latency_sum += float(event.get("latency_ms") or 0.0)
        self._latency_n += 1
        now = self.clock()
        since = now - self._sent_at
        if not ((label != self._sent_label and since >= self.options.min_interval) or since >= self.options.heartbeat):
            return None
        message = {"label": self.labels[label], "seen": sorted(self._seen), "counts": list(self.counts),
                   "tier": event.get("tier"), "latency_ms": round(self._latency_sum / self._latency_n, 3),
                   "model": f"{event.get('model')} v{event.get('model_version')}", "ts": event.get("ts")}
        self._sent_label, self._sent_at = label, now
        self._seen = set()  # the next message lists only what was decided after this one
        self._latency_sum, self._latency_n = 0.0, 0
        return message


class HomeAssistantPublisher:
    """The node side: discovery configs on every (re)connect and after a model swap (new labels),
    empty retained configs for entities that no longer exist, and the throttled state.
    `on_result` is a DeviceDaemon result listener (any thread)."""

    def __init__(self, mqtt: Any, prefix: str, node: str, options: HomeAssistantOptions,
                 bundle_of: Callable[[], Any]):
        self.mqtt, self.prefix, self.node, self.options = mqtt, prefix, node, options
        self._bundle_of = bundle_of  # the model running now (it changes on a hot swap)
        self.state_topic = topics.node_topic(prefix, node, topics.HA_STATE)
        self.throttle = StateThrottle(list(bundle_of().labels), options)
        self._published: list[str] = []
        self._model: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self.state_messages = 0

    def publish_discovery(self) -> None:
        bundle = self._bundle_of()
        configs = node_discovery(self.prefix, self.node, list(bundle.labels), bundle.name, bundle.version, self.options)
        now = [str(t) for t, _ in configs]
        if self.options.classes is None and len(bundle.labels) > MAX_AUTO_CLASSES:
            log.warning("home assistant: %d classes; list the ones you want as entities in home_assistant.classes",
                        len(bundle.labels))
        unknown = sorted(set(self.options.classes or ()) - set(bundle.labels))
        if unknown:
            log.warning("home assistant: classes %s are not labels of %s v%d", unknown, bundle.name, bundle.version)
        with self._lock:
            gone = retract(self._published, now)
            self._published = now
            if list(bundle.labels) != self.throttle.labels:
                self.throttle.relabel(list(bundle.labels))
            self._model = (bundle.name, bundle.version)
        for topic in gone:
            self.mqtt.publish(topic, b"", 1, retain=True)
        for topic, body in configs:
            self.mqtt.publish(topic, json.dumps(body), 1, retain=True)
        log.info("home assistant: %d entities for node %s under %s/", len(configs), self.node,
                 self.options.discovery_prefix)

    def on_result(self, event: dict[str, Any]) -> None:
        bundle = self._bundle_of()
        if self._model != (bundle.name, bundle.version) and self.mqtt.connected:
            self.publish_discovery()  # swapped model: its labels may differ
        with self._lock:
            message = self.throttle.observe(event)
        if message is not None and self.mqtt.connected:
            self.state_messages += 1
            self.mqtt.publish(self.state_topic, json.dumps(message), 0)
