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

Per site (`site=`, `tierlite publish --site NAME`; a site's personalised bundle): the chunks and the
announcement go to <prefix>/<site>/update/... on the cloud broker, which only that site's bridge
takes in (as its local <prefix>/update/...: docs/UPDATES.md, "One site only"); the canary counts
that site's reports only. A site's nodes see the fleet-wide and their site's announcement on the
same local topic, so the versions are kept apart: a site's version must be newer than the
fleet-wide one, a fleet-wide version newer than every site's, and a fleet-wide version that
goes out to every node replaces the sites' older announcements (the publisher writes it into
their slots too).
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

__all__ = ["RolloutResult", "check_site", "connect", "fleet_sites", "rollout"]

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
    """Collects node reports (retained: each node's latest) and the announcements the broker held
    when it subscribed: `announced[None]` the fleet-wide one, `announced[site]` each site's."""

    def __init__(self, mqtt, prefix: str, model: str):
        self.reports: dict[str, dict[str, Any]] = {}
        self.announced: dict[str | None, dict[str, Any]] = {}
        self.got_retained = threading.Event()
        self.changed = threading.Condition()
        self.prefix = prefix
        self._fleet_topic = topics.update_announcement(prefix, model)
        self._settled = False
        mqtt.subscribe(topics.update_reports(prefix, model), self._on_report, qos=1)
        mqtt.subscribe(topics.site_update_reports(prefix, model), self._on_report, qos=1)  # site bridges
        mqtt.subscribe(f"{topics.site_prefix(prefix, '+')}/{topics.UPDATE}/{model}", self._on_announcement, qos=1)
        # subscribed last: its retained message comes after the sites' (one ordered stream)
        mqtt.subscribe(self._fleet_topic, self._on_announcement, qos=1)

    @property
    def retained(self) -> dict[str, Any] | None:
        """The fleet-wide announcement the broker held."""
        return self.announced.get(None)

    def settle(self, timeout: float = 1.0) -> None:
        """Wait for the retained announcements (at most `timeout`: none may exist); later ones are ours."""
        self.got_retained.wait(timeout)
        self._settled = True

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
        if self._settled:
            return
        slot = None if topic == self._fleet_topic else topic.split("/")[len(self.prefix.split("/"))]
        try:
            doc = json.loads(payload) if payload else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("version"), int):
            self.announced[slot] = doc
        if slot is None:
            self.got_retained.set()


def fleet_sites(fleet_dir: str | Path) -> list[str]:
    """The sites of a cloud broker's folder (`tierlite provision cloud`), revoked ones left out."""
    path = Path(fleet_dir) / "fleet.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the fleet's sites ({e})") from None
    if not isinstance(state, dict) or state.get("kind") != "cloud":
        raise ConfigError(f"{fleet_dir} is a site's fleet folder, not a cloud broker's (`tierlite provision cloud`): "
                          "it has no sites")
    return [s for s in state.get("sites", []) if s not in state.get("revoked", [])]


def check_site(bundle: Bundle, site: str | None, known: list[str] | None = None) -> None:
    """Refuse (one line) a site that is not a valid id or not among `known`, and a bundle personalised
    for one site (manifest training.personalised_for) going elsewhere or to every site."""
    own = (bundle.manifest.get("training") or {}).get("personalised_for")
    what = f"{bundle.name} v{bundle.version}"
    if site is not None:
        if not topics.valid_node_id(site):
            raise ConfigError(f"--site {site!r}: one site id (1-64 of [A-Za-z0-9_.-], not starting with '_' or '.')")
        if known is not None and site not in known:
            raise ConfigError(f"unknown site {site!r}: the cloud broker's sites are {', '.join(known) or 'none'}")
    if own and site is None:
        raise ConfigError(f"{what} is personalised for site {own}: publish it with --site {own}, not to every site")
    if own and site != own:
        raise ConfigError(f"{what} is personalised for site {own}, not for {site}")


def _check_newer(announced: dict[str | None, dict[str, Any]], site: str | None, rep: ArtifactReport) -> None:
    """A site's nodes see the fleet-wide and their site's announcement on one local topic and refuse
    an older version than they run: a site's version must pass the fleet-wide one, and a fleet-wide
    version every site's."""
    slots = [site, None] if site is not None else list(announced)
    for slot in slots:
        doc = announced.get(slot)
        if doc and doc["version"] >= rep.version:
            where = "to every site" if slot is None else f"to site {slot}"
            raise UpdateError(f"the broker already announces {rep.name} v{doc['version']} {where}; "
                              f"publish a version newer than that (this bundle is v{rep.version})")


def _announce(mqtt, prefix: str, model: str, doc: dict[str, Any] | None) -> None:
    payload = json.dumps(doc).encode() if doc else b""
    mqtt.publish_and_wait(topics.update_announcement(prefix, model), payload, qos=1, retain=True)


def _clear_old_chunks(mqtt, prefix: str, model: str, old: dict[str, Any] | None) -> None:
    if old and isinstance(old.get("artifact"), dict):
        clear_chunks(mqtt, prefix, model, old["version"], int(old["artifact"].get("chunks", 0)))


def rollout(mqtt, bundle_dir: str | Path, private_key, prefix: str = "tierlite", parent: Bundle | None = None,
            full: bool = False, canary: float = 0.0, canary_nodes: list[str] | None = None,
            hold_s: float = 120.0, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            artifact_out: str | Path | None = None, site: str | None = None) -> RolloutResult:
    """Publish bundle_dir as an update on a connected MqttClient (to one site's nodes only with
    `site`); see the module docstring."""
    if not 0.0 <= canary < 1.0:
        raise ConfigError(f"--canary must be a share in [0, 1), got {canary}")
    check_site(Bundle.load(bundle_dir), site)
    data, rep = build_artifact(bundle_dir, parent=parent, full=full, private_key=private_key)
    log.info("%s", rep.summary())
    if artifact_out:
        Path(artifact_out).write_bytes(data)
    chunks = len(chunk_artifact(data, chunk_bytes))
    target = topics.site_prefix(prefix, site) if site else prefix
    reports = _Reports(mqtt, prefix, rep.name)
    reports.settle()  # retained announcements arrive at once if there are any
    announced = dict(reports.announced)
    _check_newer(announced, site, rep)
    old = announced.get(site)
    staged = canary > 0.0 or bool(canary_nodes)
    share = canary if staged else 1.0
    ann = make_announcement(rep, chunks, chunk_bytes, private_key, share=share, nodes=canary_nodes or [])
    publish_update(mqtt, target, data, ann, chunk_bytes)
    log.info("published %s v%s to %s (%d chunk(s), rollout share %.0f %%%s)", rep.name, rep.version,
             topics.update_announcement(target, rep.name), chunks, 100 * share,
             f", canary nodes {', '.join(canary_nodes)}" if canary_nodes else "")
    result = RolloutResult(rep, "published")
    if staged:
        # a node decides by its own id whether it is in the canary (<site>/<node> keys: the node
        # part); a site's rollout hears that site's nodes only
        def eligible(key: str) -> bool:
            return (site is None or key.startswith(f"{site}/")) and in_rollout(key.rsplit("/", 1)[-1], ann["rollout"])

        ok, reason = _watch_canary(reports, rep.version, hold_s, eligible)
        result.reports = {n: r for n, r in reports.reports.items() if site is None or n.startswith(f"{site}/")}
        if ok:
            ann = make_announcement(rep, chunks, chunk_bytes, private_key, share=1.0)
            _announce(mqtt, target, rep.name, ann)
            result.stage, result.reason = "complete", reason
            log.info("canary held (%s); v%s announced to every node%s", reason, rep.version,
                     f" of site {site}" if site else "")
        else:
            # Withdraw: no further node takes it. Put the previous announcement back, if any, so
            # that nodes which come back online still converge on the last good version (for a
            # site without one of its own: the fleet-wide one, which its nodes see on that topic).
            _announce(mqtt, target, rep.name, old or (announced.get(None) if site else None))
            clear_chunks(mqtt, target, rep.name, rep.version, chunks)
            if site is None:  # the fleet-wide topic reaches every site's local one: restore theirs
                for slot, doc in announced.items():
                    if slot is not None:
                        _announce(mqtt, topics.site_prefix(prefix, slot), rep.name, doc)
            result.stage, result.reason = "halted", reason
            log.warning("rollout of v%s halted: %s", rep.version, reason)
            return result
    if site is None:  # every node now takes this version: it replaces the sites' older ones
        for slot, doc in announced.items():
            if slot is not None:
                _announce(mqtt, topics.site_prefix(prefix, slot), rep.name, ann)
                _clear_old_chunks(mqtt, topics.site_prefix(prefix, slot), rep.name, doc)
    _clear_old_chunks(mqtt, target, rep.name, old)
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
