"""Publishing a signed update to the fleet, in stages.

1. Pack the new bundle as an artifact (a delta against the version the fleet runs, xz-compressed)
   and sign its manifest (tierlite.cloud.publish).
2. Publish the chunks and a signed announcement, retained, with rollout share = the canary share
   (or 1.0 without a canary): only nodes whose stable hash falls below the share take it.
3. Canary: watch the nodes' update reports (<prefix>/update/<model>/report/<node>, and at a cloud
   broker of several sites <prefix>/<site>/update/<model>/report/<node>, keyed <site>/<node>: node
   ids are unique per site only). When the canary
   nodes that applied it have all confirmed it (their post-swap watch held: error and escalation
   rates within bounds) and none rolled back or refused it, re-announce with share 1.0. If one
   rolls back or refuses it, or none confirms within the hold time, halt: clear the retained
   announcement so no further node takes it (nodes that confirmed keep it: it passed their checks).
4. Clear the retained chunks of the version it replaces.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierlite import topics
from tierlite.bundle import Bundle
from tierlite.cloud.publish import ArtifactReport, build_artifact, clear_chunks, make_announcement, publish_update
from tierlite.errors import ConfigError, UpdateError, WireError
from tierlite.update.delivery import DEFAULT_CHUNK_BYTES, chunk_artifact, in_rollout

__all__ = ["RolloutResult", "connect", "rollout"]

log = logging.getLogger("tierlite.cloud.rollout")


@dataclass
class RolloutResult:
    artifact: ArtifactReport
    stage: str  # "published" (no canary), "complete", "halted"
    reason: str = ""
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"artifact": self.artifact.to_json(), "stage": self.stage, "reason": self.reason,
                "reports": self.reports}


def connect(broker: str, prefix: str = "tierlite", timeout: float = 10.0, broker_config: str | None = None):
    """A started tierlite.mqtt.MqttClient connected to host:port (UpdateError if unreachable), or with
    the `broker:` section of `broker_config` (TLS, credentials: fleet/publisher/publisher-security.yaml)."""
    import yaml

    from tierlite.config import BrokerConfig, config_from_dict
    from tierlite.mqtt import MqttClient, default_client_id

    if broker_config:
        path = Path(broker_config)
        try:
            section = (yaml.safe_load(path.read_text()) or {}).get("broker")
        except (OSError, yaml.YAMLError, AttributeError) as e:
            raise ConfigError(f"--broker-config {path}: {e}") from None
        if not isinstance(section, dict):
            raise ConfigError(f"--broker-config {path}: no `broker:` section")
        cfg = config_from_dict(section, BrokerConfig, f"{path.name}.broker", base=path.parent)
        broker = f"{cfg.host}:{cfg.port}"
    else:
        host, _, port = broker.rpartition(":")
        try:
            port_number = int(port) if host else 1883
        except ValueError:
            raise ConfigError(f"--broker: expected host:port, got {broker!r}") from None
        cfg = config_from_dict({"host": host or broker, "port": port_number}, BrokerConfig, "--broker")
    mqtt = MqttClient(cfg, default_client_id("publish"))
    mqtt.start()
    if not mqtt.wait_connected(timeout):
        mqtt.stop()
        raise UpdateError(f"cannot reach the MQTT broker at {broker} within {timeout:.0f} s")
    return mqtt


class _Reports:
    """Collects node reports (retained: each node's latest) and the announcement the broker holds."""

    def __init__(self, mqtt, prefix: str, model: str):
        self.reports: dict[str, dict[str, Any]] = {}
        self.retained: dict[str, Any] | None = None
        self.got_retained = threading.Event()
        self.changed = threading.Condition()
        self.prefix = prefix
        mqtt.subscribe(topics.update_reports(prefix, model), self._on_report, qos=1)
        mqtt.subscribe(topics.site_update_reports(prefix, model), self._on_report, qos=1)  # site bridges
        mqtt.subscribe(topics.update_announcement(prefix, model), self._on_announcement, qos=1)

    def _on_report(self, topic: str, payload: bytes) -> None:
        # The node is who the topic says (.../report/<node>: the broker's ACL lets only that node
        # write there, and at a cloud broker only its site's bridge under <site>/); a body naming
        # another node is a forgery and counts for nobody.
        try:
            _, sender = topics.update_sender(topic, self.prefix, "report")
            doc = json.loads(payload)
            claimed = doc["node"]
        except (WireError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            log.warning("dropped a malformed update report on %s", topic[:200])
            return
        if claimed != sender.node:
            log.warning("dropped an update report on %s that names node %r", topic[:200], str(claimed)[:64])
            return
        with self.changed:
            self.reports[sender.key] = doc
            self.changed.notify_all()

    def _on_announcement(self, topic: str, payload: bytes) -> None:
        if not self.got_retained.is_set():  # the first message after subscribing: the retained one
            try:
                self.retained = json.loads(payload) if payload else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.retained = None
            self.got_retained.set()


def rollout(mqtt, bundle_dir: str | Path, private_key, prefix: str = "tierlite", parent: Bundle | None = None,
            full: bool = False, canary: float = 0.0, canary_nodes: list[str] | None = None,
            hold_s: float = 120.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            artifact_out: str | Path | None = None) -> RolloutResult:
    """Publish bundle_dir as an update on a connected MqttClient; see the module docstring."""
    if not 0.0 <= canary < 1.0:
        raise ConfigError(f"--canary must be a share in [0, 1), got {canary}")
    data, rep = build_artifact(bundle_dir, parent=parent, full=full, private_key=private_key)
    log.info("%s", rep.summary())
    if artifact_out:
        Path(artifact_out).write_bytes(data)
    chunks = len(chunk_artifact(data, chunk_bytes))
    reports = _Reports(mqtt, prefix, rep.name)
    reports.got_retained.wait(1.0)  # a retained announcement arrives at once if there is one
    old = reports.retained
    if old and isinstance(old.get("version"), int) and old["version"] >= rep.version:
        raise UpdateError(f"the broker already announces {rep.name} v{old['version']}; "
                          f"publish a version newer than that (this bundle is v{rep.version})")
    staged = canary > 0.0 or bool(canary_nodes)
    share = canary if staged else 1.0
    ann = make_announcement(rep, chunks, chunk_bytes, private_key, share=share, nodes=canary_nodes or [])
    publish_update(mqtt, prefix, data, ann, chunk_bytes)
    log.info("published %s v%s to %s (%d chunk(s), rollout share %.0f %%%s)", rep.name, rep.version,
             topics.update_announcement(prefix, rep.name), chunks, 100 * share,
             f", canary nodes {', '.join(canary_nodes)}" if canary_nodes else "")
    result = RolloutResult(rep, "published")
    if staged:
        # a node decides by its own id whether it is in the canary (<site>/<node> keys: the node part)
        ok, reason = _watch_canary(reports, rep.version, hold_s,
                                   lambda key: in_rollout(key.rsplit("/", 1)[-1], ann["rollout"]))
        result.reports = {n: r for n, r in reports.reports.items()}
        if ok:
            ann = make_announcement(rep, chunks, chunk_bytes, private_key, share=1.0)
            mqtt.publish_and_wait(topics.update_announcement(prefix, rep.name), json.dumps(ann).encode(), qos=1,
                                  retain=True)
            result.stage, result.reason = "complete", reason
            log.info("canary held (%s); v%s announced to every node", reason, rep.version)
        else:
            # Withdraw: no further node takes it. Put the previous announcement back, if any, so
            # that nodes which come back online still converge on the last good version.
            payload = json.dumps(old).encode() if old else b""
            mqtt.publish_and_wait(topics.update_announcement(prefix, rep.name), payload, qos=1, retain=True)
            clear_chunks(mqtt, prefix, rep.name, rep.version, chunks)
            result.stage, result.reason = "halted", reason
            log.warning("rollout of v%s halted: %s", rep.version, reason)
            return result
    if old and isinstance(old.get("version"), int) and isinstance(old.get("artifact"), dict):
        clear_chunks(mqtt, prefix, rep.name, old["version"], int(old["artifact"].get("chunks", 0)))
    return result


def _watch_canary(reports: _Reports, version: int, hold_s: float,
                  eligible=lambda node: True) -> tuple[bool, str]:
    """Wait (at most hold_s) until every canary node that applied `version` has confirmed it. Reports
    of nodes outside the canary (`eligible` false) count for nothing: they cannot have applied it."""
    deadline = time.monotonic() + hold_s
    with reports.changed:
        while True:
            about = {n: r for n, r in reports.reports.items()
                     if eligible(n) and isinstance(r.get("last_event"), dict)
                     and r["last_event"].get("version") == version}
            states = {n: r["last_event"].get("state") for n, r in about.items()}
            bad = {n: about[n]["last_event"].get("detail", "") for n, s in states.items() if s in ("rolled_back", "refused")}
            if bad:
                node, detail = next(iter(bad.items()))
                return False, f"{len(bad)} canary node(s) rejected it, e.g. {node}: {detail}"
            confirmed = [n for n, s in states.items() if s == "confirmed"]
            if confirmed and len(confirmed) == len(states):
                return True, f"{len(confirmed)} canary node(s) confirmed: {', '.join(sorted(confirmed))}"
            left = deadline - time.monotonic()
            if left <= 0:
                pending = sorted(n for n, s in states.items() if s != "confirmed")
                return False, (f"no verdict within {hold_s:.0f} s "
                               f"({len(confirmed)} confirmed, waiting on {', '.join(pending) or 'any canary node'})")
            reports.changed.wait(min(left, 1.0))
