"""Every MQTT topic and subscription filter tierlite uses, built here and nowhere else.

`Topic` (publish to it) and `Filter` (subscribe to it, wildcards allowed) are validated `str`s,
so paho takes them as they are. The table of topics is in docs/protocol.md.
"""
from __future__ import annotations

import re

from typing import NamedTuple

from tierlite.errors import WireError

__all__ = [
    "ANSWER", "DRIFT", "ESCALATE", "FEATURE", "HA_STATE", "NODE_SUFFIXES", "RESERVED_NODE_IDS", "RESULT", "STATUS",
    "Filter", "Sender", "Topic",
    "bridge_notifications", "cloud_status", "cloud_statuses", "frame_upload", "frame_uploads",
    "gateway_status", "gateway_worker", "gateway_workers", "home_assistant_config", "node_filter",
    "node_of", "node_topic", "sender_of", "site_frame_uploads", "site_node_filter", "site_prefix",
    "site_update_reports", "update_announcement", "update_chunk", "update_chunks", "update_report", "update_reports",
    "update_sender", "updates", "valid_node_id",
]

MAX_TOPIC_LENGTH = 65535

# <prefix>/<node>/<suffix>
FEATURE, ESCALATE, ANSWER, RESULT, STATUS = "feature", "escalate", "answer", "result", "status"
DRIFT = "drift"  # <prefix>/<node>/drift: the node's drift alarm (retained JSON event, issue 13)
HA_STATE = "ha_state"  # <prefix>/<node>/ha_state: throttled decision summary for Home Assistant
NODE_SUFFIXES = (FEATURE, ESCALATE, ANSWER, RESULT, STATUS, DRIFT)
UPDATE = "update"  # <prefix>/update/<model>/...: model updates
GATEWAY = "_gateway"  # <prefix>/_gateway/<gateway_id>/...: edge gateway and its workers
CLOUD = "_cloud"  # <prefix>/_cloud/<worker_id>/status
RESERVED_NODE_IDS = {UPDATE}

NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Topic(str):
    """A topic to publish to: no wildcards, no empty string, at most 65,535 characters."""

    __slots__ = ()

    def __new__(cls, value: str) -> "Topic":
        if not value or "+" in value or "#" in value or len(value) > MAX_TOPIC_LENGTH:
            raise ValueError(f"not a publishable MQTT topic: {value[:80]!r}")
        return super().__new__(cls, value)


class Filter(str):
    """A subscription filter: `+` stands for one whole level, `#` only as the last level."""

    __slots__ = ()

    def __new__(cls, value: str) -> "Filter":
        levels = value.split("/")
        if (not value or len(value) > MAX_TOPIC_LENGTH
                or any(("+" in lv and lv != "+") or ("#" in lv and lv != "#") for lv in levels)
                or "#" in levels[:-1]):
            raise ValueError(f"not a valid MQTT topic filter: {value[:80]!r}")
        return super().__new__(cls, value)

    def matches(self, topic: str) -> bool:
        """Whether a message on `topic` falls under this filter."""
        want, got = self.split("/"), topic.split("/")
        for i, level in enumerate(want):
            if level == "#":
                return True
            if i >= len(got) or level not in ("+", got[i]):
                return False
        return len(want) == len(got)

    def shared(self, group: str | None) -> str:
        """$share/<group>/<filter> (MQTT 5 shared subscription); the filter itself without a group."""
        return f"$share/{group}/{self}" if group else str(self)


def _join(*levels: object) -> str:
    return "/".join(str(level) for level in levels)


# -- node topics ------------------------------------------------------------------------------
def valid_node_id(node: str) -> bool:
    return bool(NODE_ID_RE.match(node)) and node not in RESERVED_NODE_IDS


def node_topic(prefix: str, node: str, suffix: str) -> Topic:
    """<prefix>/<node>/<suffix>, suffix one of NODE_SUFFIXES."""
    return Topic(_join(prefix, node, suffix))


def node_filter(prefix: str, suffix: str) -> Filter:
    """<prefix>/+/<suffix>: that suffix of every node."""
    return Filter(_join(prefix, "+", suffix))


def node_of(topic: str, prefix: str) -> str:
    """The node id in <prefix>/<node>/<suffix>; WireError (reason "topic") for anything else."""
    parts = topic.split("/")
    head = prefix.split("/")
    if len(parts) != len(head) + 2 or parts[: len(head)] != head or not valid_node_id(parts[-2]):
        err = WireError(f"unexpected topic {topic[:80]!r}")
        err.reason = "topic"  # type: ignore[attr-defined]  # the metrics label, as tierlite.wire sets it
        raise err
    return parts[-2]


# -- sites: several site brokers bridged into one cloud broker (docs/SCALING.md, "Several sites") --
def site_prefix(prefix: str, site: str) -> str:
    """<prefix>/<site>: where a site bridge puts that site's node topics on the cloud broker."""
    return _join(prefix, site)


def site_node_filter(prefix: str, suffix: str) -> Filter:
    """<prefix>/+/+/<suffix>: that suffix of every node of every site (the cloud side of site bridges)."""
    return Filter(_join(prefix, "+", "+", suffix))


class Sender(NamedTuple):
    """Who sent a node message: its node id, and its site when it came up through a site bridge."""

    site: str | None
    node: str

    @property
    def key(self) -> str:
        """The node's fleet-wide name (node ids are unique per site only): <site>/<node>, or <node>."""
        return self.node if self.site is None else _join(self.site, self.node)

    def topic(self, prefix: str, suffix: str) -> Topic:
        """The sender's own topic: a reply goes back to its site only."""
        return node_topic(prefix if self.site is None else site_prefix(prefix, self.site), self.node, suffix)


def sender_of(topic: str, prefix: str) -> Sender:
    """The sender of <prefix>/<node>/<suffix> or <prefix>/<site>/<node>/<suffix>; WireError (reason
    "topic") for anything else."""
    parts = topic.split("/")
    head = prefix.split("/")
    extra = len(parts) - len(head)
    if extra == 3 and parts[: len(head)] == head and valid_node_id(parts[-3]):
        return Sender(parts[-3], node_of(topic, site_prefix(prefix, parts[-3])))
    return Sender(None, node_of(topic, prefix))


def home_assistant_config(discovery_prefix: str, component: str, device_id: str, object_id: str) -> Topic:
    """Home Assistant's MQTT discovery topic for one entity (tierlite.homeassistant):
    <discovery_prefix>/<component>/<device_id>/<object_id>/config."""
    return Topic(_join(discovery_prefix, component, device_id, object_id, "config"))


# -- gateway and cloud workers ------------------------------------------------------------------
def gateway_status(prefix: str, gateway_id: str) -> Topic:
    return Topic(_join(prefix, GATEWAY, gateway_id, STATUS))


def gateway_worker(prefix: str, gateway_id: str, index: int) -> Topic:
    return Topic(_join(prefix, GATEWAY, gateway_id, "worker", index))


def gateway_workers(prefix: str, gateway_id: str) -> Filter:
    return Filter(_join(prefix, GATEWAY, gateway_id, "worker", "+"))


def bridge_notifications(prefix: str, gateway_id: str) -> Topic:
    """Where the gateway's Mosquitto reports its cloud bridge up (1) or down (0)."""
    return Topic(_join(prefix, GATEWAY, gateway_id, "bridge"))


def cloud_status(prefix: str, worker_id: str) -> Topic:
    return Topic(_join(prefix, CLOUD, worker_id, STATUS))


def cloud_statuses(prefix: str) -> Filter:
    return Filter(_join(prefix, CLOUD, "+", STATUS))


# -- model updates ------------------------------------------------------------------------------
def updates(prefix: str) -> Filter:
    """<prefix>/update/#: everything about model updates."""
    return Filter(_join(prefix, UPDATE, "#"))


def update_announcement(prefix: str, model: str) -> Topic:
    return Topic(_join(prefix, UPDATE, model))


def update_chunk(prefix: str, model: str, version: int, index: int) -> Topic:
    return Topic(_join(prefix, UPDATE, model, f"v{version}", index))


def update_chunks(prefix: str, model: str, version: int) -> Filter:
    return Filter(_join(prefix, UPDATE, model, f"v{version}", "+"))


def update_report(prefix: str, model: str, node: str) -> Topic:
    return Topic(_join(prefix, UPDATE, model, "report", node))


def update_reports(prefix: str, model: str = "+") -> Filter:
    """Every node's report on `model` (default: on every model)."""
    return Filter(_join(prefix, UPDATE, model, "report", "+"))


def frame_upload(prefix: str, model: str, node: str) -> Topic:
    return Topic(_join(prefix, UPDATE, model, "frames", node))


def frame_uploads(prefix: str, model: str = "+") -> Filter:
    """Every opted-in node's frame uploads for `model` (default: for every model)."""
    return Filter(_join(prefix, UPDATE, model, "frames", "+"))


def site_update_reports(prefix: str, model: str = "+") -> Filter:
    """<prefix>/+/update/<model>/report/+: every site's node reports on the cloud broker (a site
    bridge puts <prefix>/update/... of its site under <prefix>/<site>/update/...)."""
    return update_reports(site_prefix(prefix, "+"), model)


def site_frame_uploads(prefix: str, model: str = "+") -> Filter:
    """<prefix>/+/update/<model>/frames/+: every site's frame uploads on the cloud broker."""
    return frame_uploads(site_prefix(prefix, "+"), model)


def update_sender(topic: str, prefix: str, kind: str) -> tuple[str, Sender]:
    """(model, sender) of <prefix>[/<site>]/update/<model>/<kind>/<node>, kind "report" or "frames";
    WireError (reason "topic") for anything else. Node ids are unique per site only: key by Sender.key."""
    parts, head = topic.split("/"), prefix.split("/")
    rest = parts[len(head):]
    site = rest.pop(0) if len(rest) == 5 else None
    if (parts[: len(head)] != head or len(rest) != 4 or rest[0] != UPDATE or rest[2] != kind
            or not valid_node_id(rest[3]) or (site is not None and not valid_node_id(site))):
        err = WireError(f"unexpected {kind} topic {topic[:80]!r}")
        err.reason = "topic"  # type: ignore[attr-defined]  # the metrics label, as tierlite.wire sets it
        raise err
    return rest[1], Sender(site, rest[3])

