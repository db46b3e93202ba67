"""Prometheus metrics for the edge and cloud workers (prometheus-client).

One family set for both tiers, told apart by the `tier` label:
  tierlite_frames_total{tier,node,outcome}     outcome: answered (exit here) | escalated
  tierlite_rejected_messages_total{tier,reason} dropped network input (truncated, version, bundle...)
  tierlite_received_bytes_total{tier,node}     payload bytes of accepted features
  tierlite_sent_bytes_total{tier,kind}         kind: answer | escalate | reject
  tierlite_budget_rejects_total{tier,node}     edge: features refused, node over its escalation budget
The `node` label is bounded: provisioned nodes (metrics_labels.nodes) or the first 256 seen; every
other node is counted under "other" (configure_labels).
  tierlite_process_seconds{tier}               decode + segment + encode, per message
  tierlite_message_age_seconds{tier}           now - the node's send time (meaningful with NTP)
  tierlite_stored_examples_total               cloud: rows written to the hard-example store
  tierlite_store_events_total{event}           cloud: store bounds and faults (evicted, dropped, recovered...)
  tierlite_audit_agreement{node,bound}         cloud: node end exit vs cloud exit on audited frames, sliding
                                               window; bound: estimate | low | high (Wilson 95 %)
  tierlite_drift_alarm{node}                   cloud: 1 while the node's retained drift event says alarm
Per-node exit rate at the edge: rate(frames_total{outcome="answered"}) / rate(frames_total).

A camera node's own endpoint (DeviceConfig.metrics_port, NodeMetrics), one node per process:
  tierlite_node_frames_total{node,tier}        results, by the tier that decided (exit share per tier)
  tierlite_node_escalations_total{node}        frames sent up (their feature left the node)
  tierlite_node_fallbacks_total{node,reason}   sent up, answered locally: deadline | offline | rejected | ...
  tierlite_node_decision_seconds{node}         end segment + exit decision per frame
  tierlite_node_latency_seconds{node,tier}     frame to result
  tierlite_node_model_version{node,model}      the version running now
  tierlite_node_broker_connected{node}         1 while connected to the broker
  tierlite_node_update_events_total{node,event} applied | confirmed | rolled_back | refused | ...

Several edge worker processes share one endpoint through prometheus-client's multiprocess mode:
the gateway sets PROMETHEUS_MULTIPROC_DIR for its workers and serves `serve_multiprocess(dir)`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("tierlite.metrics")

OTHER = "other"  # the node label of every node without its own (see TierMetrics.configure_labels)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class TierMetrics:
    """Counters for one worker. Without prometheus-client installed every call is a no-op."""

    def __init__(self, tier: str):
        self.tier = tier
        self._frames: dict[tuple[str, str], Any] = {}
        self._bytes_in: dict[str, Any] = {}
        self._budget: dict[str, Any] = {}
        self._allowed: frozenset[str] | None = None  # node label allow-list (provisioned nodes)
        self._max_nodes = 256  # without an allow-list: the first nodes seen get a label
        self._labelled: set[str] = set()
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError:
            log.warning("prometheus-client is not installed: metrics are off (pip install prometheus-client)")
            self.enabled = False
            return
        self.enabled = True
        self.registry = CollectorRegistry()
        r = self.registry
        self.frames = Counter("tierlite_frames", "Frames processed by this tier, by node and outcome",
                              ["tier", "node", "outcome"], registry=r)
        self.rejected = Counter("tierlite_rejected_messages", "Network messages dropped as invalid",
                                ["tier", "reason"], registry=r)
        self.bytes_in = Counter("tierlite_received_bytes", "Payload bytes of accepted feature messages",
                                ["tier", "node"], registry=r)
        self.bytes_out = Counter("tierlite_sent_bytes", "Payload bytes sent", ["tier", "kind"], registry=r)
        self.process_seconds = Histogram("tierlite_process_seconds", "Decode + segment + encode time per message",
                                         ["tier"], buckets=LATENCY_BUCKETS, registry=r).labels(tier)
        self.age_seconds = Histogram("tierlite_message_age_seconds", "Time since the node sent the feature",
                                     ["tier"], buckets=LATENCY_BUCKETS, registry=r).labels(tier)
        self.stored = Counter("tierlite_stored_examples", "Hard examples written to the store", registry=r)
        self.store_events = Counter("tierlite_store_events", "Store bounds and faults: evicted, dropped, invalid, "
                                    "clamped, failed_flush, recovered", ["event"], registry=r)
        self.budget_rejects = Counter("tierlite_budget_rejects", "Features refused: node over its escalation budget",
                                      ["tier", "node"], registry=r)
        self._out = {k: self.bytes_out.labels(tier, k) for k in ("answer", "escalate", "reject")}
        from prometheus_client import Gauge

        self.audit_agreement = Gauge("tierlite_audit_agreement", "Audited frames: node end exit agrees with the "
                                     "cloud exit (sliding window; bound estimate|low|high)", ["node", "bound"], registry=r)
        self.drift_alarm = Gauge("tierlite_drift_alarm", "1 while the node reports a drift alarm", ["node"], registry=r)
        self.retrain_running = Gauge("tierlite_retrain_running", "1 while a retraining job runs", registry=r)
        self.retrain_pending = Gauge("tierlite_retrain_pending", "1 while a requested retraining run waits "
                                     "(for hard examples or min_interval_seconds)", registry=r)
        self.retrain_examples = Gauge("tierlite_retrain_pending_examples", "The waiting run's usable hard "
                                      "examples: stored (have) and needed (need)", ["count"], registry=r)
        self.retrain_expired = Counter("tierlite_retrain_expired_requests", "Requested runs dropped for want "
                                       "of hard examples", registry=r)
        self._expired_reported = 0

    def configure_labels(self, nodes: list[str] | None, max_nodes: int = 256) -> None:
        """Per-node labels only for `nodes` (the provisioned ones) or, without a list, for the first
        `max_nodes` nodes seen; every other node is counted under the label "other"."""
        self._allowed = frozenset(nodes) if nodes is not None else None
        self._max_nodes = max_nodes

    def node_label(self, node: str) -> str:
        if self._allowed is not None:
            return node if node in self._allowed else OTHER
        if node in self._labelled:
            return node
        if len(self._labelled) < self._max_nodes:
            self._labelled.add(node)
            return node
        return OTHER

    def frame(self, node: str, outcome: str, nbytes: int, process_s: float, age_s: float | None) -> None:
        if not self.enabled:
            return
        node = node if node in self._labelled else self.node_label(node)
        key = (node, outcome)
        child = self._frames.get(key)
        if child is None:  # labels() costs a few microseconds: cache per node
            child = self._frames[key] = self.frames.labels(self.tier, node, outcome)
        child.inc()
        b = self._bytes_in.get(node)
        if b is None:
            b = self._bytes_in[node] = self.bytes_in.labels(self.tier, node)
        b.inc(nbytes)
        self.process_seconds.observe(process_s)
        if age_s is not None and 0 <= age_s < 3600:
            self.age_seconds.observe(age_s)

    def budget_reject(self, node: str) -> None:
        if not self.enabled:
            return
        node = self.node_label(node)
        child = self._budget.get(node)
        if child is None:
            child = self._budget[node] = self.budget_rejects.labels(self.tier, node)
        child.inc()

    def sent(self, kind: str, nbytes: int) -> None:
        if self.enabled:
            self._out[kind].inc(nbytes)

    def reject(self, reason: str) -> None:
        if self.enabled:
            self.rejected.labels(self.tier, reason).inc()

    def stored_rows(self, n: int) -> None:
        if self.enabled and n:
            self.stored.inc(n)

    def audit(self, node: str, estimate: dict[str, Any]) -> None:
        if self.enabled and estimate.get("agreement") is not None:
            for bound, key in (("estimate", "agreement"), ("low", "low"), ("high", "high")):
                self.audit_agreement.labels(self.node_label(node), bound).set(estimate[key])

    def drift(self, node: str, alarm: bool) -> None:
        if self.enabled:
            self.drift_alarm.labels(self.node_label(node)).set(1.0 if alarm else 0.0)

    def retrain(self, status: dict[str, Any]) -> None:
        """The retraining scheduler's status (RetrainScheduler.status): running, a waiting request."""
        if not self.enabled:
            return
        pending = status.get("pending")
        self.retrain_running.set(1.0 if status.get("running") else 0.0)
        self.retrain_pending.set(0.0 if pending is None else 1.0)
        for count in ("have", "need"):
            self.retrain_examples.labels(count).set(0 if pending is None else pending[count])
        expired = int(status.get("expired_requests", 0))
        if expired > self._expired_reported:
            self.retrain_expired.inc(expired - self._expired_reported)
            self._expired_reported = expired

    def store_event(self, event: str, n: int = 1) -> None:
        if self.enabled and n > 0:
            self.store_events.labels(event).inc(n)

    def serve(self, port: int, bind: str = "127.0.0.1") -> int | None:
        """Serve /metrics on bind:port (0 = any free port); returns the port."""
        if not self.enabled:
            return None
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=bind, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", bind, server.server_port)
        return server.server_port


class NodeMetrics:
    """A camera node's metrics, fed by its result events (DeviceDaemon.add_result_listener).
    Without prometheus-client every call is a no-op."""

    def __init__(self, node: str, connected: Callable[[], bool] | None = None,
                 update_counters: Callable[[], dict[str, int]] | None = None):
        self.node = node
        self._model: tuple[str, int] | None = None
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            log.warning("prometheus-client is not installed: node metrics are off (pip install prometheus-client)")
            self.enabled = False
            return
        self.enabled = True
        self.registry = r = CollectorRegistry()
        self.frames = Counter("tierlite_node_frames", "Results, by the tier that decided", ["node", "tier"], registry=r)
        self.escalations = Counter("tierlite_node_escalations", "Frames whose feature was sent up",
                                   ["node"], registry=r).labels(node)
        self.fallbacks = Counter("tierlite_node_fallbacks", "Frames sent up but answered locally, by reason",
                                 ["node", "reason"], registry=r)
        self.decision = Histogram("tierlite_node_decision_seconds", "End segment + exit decision per frame",
                                  ["node"], buckets=LATENCY_BUCKETS, registry=r).labels(node)
        self.latency = Histogram("tierlite_node_latency_seconds", "Frame to result, by the tier that decided",
                                 ["node", "tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.model_version = Gauge("tierlite_node_model_version", "Model version running now",
                                   ["node", "model"], registry=r)
        self.connected = Gauge("tierlite_node_broker_connected", "1 while connected to the broker", ["node"], registry=r)
        if connected is not None:
            self.connected.labels(node).set_function(lambda: 1.0 if connected() else 0.0)
        self._children: dict[tuple[str, str], Any] = {}
        if update_counters is not None:
            r.register(_UpdateEvents(node, update_counters))

    def _child(self, family: Any, *labels: str) -> Any:
        key = (family._name, *labels)
        child = self._children.get(key)
        if child is None:  # labels() costs a few microseconds: cache per label set
            child = self._children[key] = family.labels(self.node, *labels)
        return child

    def on_result(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        tier = str(event.get("tier"))
        self._child(self.frames, tier).inc()
        self._child(self.latency, tier).observe(float(event.get("latency_ms") or 0.0) / 1000.0)
        self.decision.observe(float(event.get("decision_ms") or 0.0) / 1000.0)
        if event.get("bytes_up"):
            self.escalations.inc()
        if event.get("reason"):
            self._child(self.fallbacks, str(event["reason"])).inc()
        model = (str(event.get("model")), int(event.get("model_version") or 0))
        if model != self._model:
            if self._model is not None:
                self.model_version.remove(self.node, self._model[0])
            self.model_version.labels(self.node, model[0]).set(model[1])
            self._model = model

    serve = TierMetrics.serve  # /metrics of self.registry on bind:port (0 = any free port)


class _UpdateEvents:
    """tierlite_node_update_events_total, read from the update manager's counters at scrape time."""

    def __init__(self, node: str, counters: Callable[[], dict[str, int]]):
        self.node, self.counters = node, counters

    def describe(self):  # registration without a first collect() call
        from prometheus_client.core import CounterMetricFamily

        return [CounterMetricFamily("tierlite_node_update_events", "Model update events on this node",
                                    labels=["node", "event"])]

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("tierlite_node_update_events", "Model update events on this node",
                                     labels=["node", "event"])
        for event, n in sorted(self.counters().items()):
            family.add_metric([self.node, event], n)
        yield family


def metric_names(registry: Any) -> set[str]:
    """Every sample name a registry can expose (families with their _total/_bucket/... suffixes)."""
    names: set[str] = set()
    for family in registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
        names.update(family.name + sfx for sfx in suffixes.get(family.type, ()))
    return names


def serve_multiprocess(directory: str, port: int, bind: str = "127.0.0.1") -> int | None:
    """Serve the merged metrics of every worker process writing to `directory`."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector
    except ImportError:
        log.warning("prometheus-client is not installed: metrics are off")
        return None
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    server, _ = start_http_server(port, addr=bind, registry=registry)
    log.info("metrics on http://%s:%d/metrics (%s)", bind, server.server_port, directory)
    return server.server_port


def mark_process_dead(pid: int, directory: str) -> None:
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, directory)
    except (ImportError, OSError):
        pass


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Read a /metrics page into {'name{labels}': value} (tests, bench, demo)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = out.get(key, 0.0) + float(value)
            except ValueError:
                pass
    return out
