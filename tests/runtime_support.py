"""Helpers for the runtime tests: the local stack's free ports, broker and tier processes
(tierlite.tools.stack), an MQTT watcher, offline chain results to compare against."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tierlite.tools.stack import Broker, TierProcess, free_port, read_jsonl, wait_until, write_yaml  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
TIER_NAMES = ("end", "edge", "cloud")


class Mosquitto(Broker):
    """A real Mosquitto, never the amqtt stand-in: the runtime tests need MQTT 5."""

    def __init__(self, workdir: Path, port: int | None = None):
        super().__init__(workdir, port, fallback=False)


class Proc(TierProcess):
    """`python -m tierlite <args>` logging to `log_path`; wait() fails the test if it runs too long."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path | None = None, env: dict | None = None):
        super().__init__(log_path.stem, args, log_path.parent, cwd=cwd, env=env)

    def wait(self, timeout: float) -> int:
        return self.expect_exit(timeout)


class Watcher:
    """Collects MQTT messages on the given filters (a test-side client through tierlite.mqtt)."""

    def __init__(self, port: int, filters: list[str], name: str = "watcher", broker=None):
        """`broker`: a BrokerConfig (credentials, TLS) to connect with instead of an anonymous one."""
        from tierlite.config import BrokerConfig
        from tierlite.mqtt import MqttClient

        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        config = broker or BrokerConfig(port=port)
        config = config.model_copy(update={"port": port, "reconnect_min": 0.1, "reconnect_max": 0.5})
        self.client = MqttClient(config, f"test-{name}-{os.getpid()}-{time.monotonic_ns()}")
        for f in filters:
            self.client.subscribe(f, self._on, 1)
        # Subscribed last: once a message on it comes back, the broker has taken every filter above
        # (it handles one connection's SUBSCRIBEs in order), so nothing published next is missed.
        # Anonymous watchers only: an identity's ACL would deny the probe topic (best effort, 5 s).
        probe, echoed = f"tierlite-test-probe/{self.client.client_id}", threading.Event()
        if broker is None:
            self.client.subscribe(probe, lambda t, p: echoed.set(), 1)
        self.client.start()
        assert self.client.wait_connected(10), "test watcher could not connect"
        deadline = time.monotonic() + 5
        while broker is None and not echoed.wait(0.1) and time.monotonic() < deadline:
            self.client.publish(probe, b"", 0)

    def _on(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.messages.append((topic, bytes(payload)))

    def on(self, topic_pred: Callable[[str], bool]) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.messages if topic_pred(t)]

    def json_on(self, suffix: str) -> list[dict]:
        return [json.loads(p) for p in self.on(lambda t: t.endswith(suffix))]

    def stop(self) -> None:
        self.client.stop()


# -- offline reference --------------------------------------------------------------------------
def offline_chain(bundle_dir: Path, paths: list[Path]) -> dict[str, list[np.ndarray]]:
    """Every tier's exit logits for each frame, run offline through the chained segments."""
    from tierlite.bundle import Bundle
    from tierlite.data import decode_image
    from tierlite.segment import Segment
    from tierlite.wire import decode_feature, encode_feature

    bundle = Bundle.load(bundle_dir)
    segs = {t: Segment(bundle, t) for t in ("end", "edge", "cloud")}
    size = tuple(bundle.input_shape[1:3])
    enc = bundle.feature_encoding
    logits: dict[str, list[np.ndarray]] = {t: [] for t in segs}
    for p in paths:
        out = segs["end"].run(decode_image(p, size)[None])
        logits["end"].append(out.logits)
        # the boundary feature as the edge receives it (bit-packed binary keeps two levels)
        out = segs["edge"].run(decode_feature(encode_feature(out.feature, enc), out.feature.shape, enc))
        logits["edge"].append(out.logits)
        logits["cloud"].append(segs["cloud"].run(out.feature).logits)
    return {t: np.stack(v) for t, v in logits.items()}


def split_thresholds(logits: dict[str, np.ndarray], end_share: float = 0.4, edge_share: float = 0.5):
    """Thresholds that send ~end_share of frames to the end exit and split the rest ~edge_share at the
    edge, placed half-way between two frames' entropies so no frame sits on a threshold."""
    from tierlite.policy import normalized_entropy, softmax

    def cut(h: np.ndarray, share: float) -> float:
        h = np.sort(h)
        k = min(max(int(len(h) * share), 1), len(h) - 1)
        return float((h[k - 1] + h[k]) / 2)

    h_end = normalized_entropy(softmax(logits["end"]))
    t_end = cut(h_end, end_share)
    h_edge = normalized_entropy(softmax(logits["edge"]))[h_end > t_end]
    return t_end, cut(h_edge, edge_share)


def select_frames(src: Path, dest: Path, bundle_dir: Path, per_tier: int = 12, pool: int = 240,
                  end_share: float = 0.4, edge_share: float = 0.5):
    """Copy ~per_tier frames that the offline chain sends to each tier into dest/<class>/...;
    returns (thresholds (end, edge), {path: (tier index, label)})."""
    from tierlite.data import list_image_folder, stratified_sample
    from tierlite.policy import chain_decisions

    paths, labels, _ = list_image_folder(src)
    idx = np.sort(stratified_sample(labels, min(pool, len(paths)), seed=1))
    pool_paths = [paths[i] for i in idx]
    logits = offline_chain(bundle_dir, pool_paths)
    t_end, t_edge = split_thresholds(logits, end_share, edge_share)
    tiers, labs = chain_decisions([logits["end"], logits["edge"], logits["cloud"]], [t_end, t_edge])
    expected = {}
    for tier in range(3):
        for i in np.flatnonzero(tiers == tier)[:per_tier]:
            p = pool_paths[i]
            out = dest / p.parent.name / p.name
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, out)
            expected[str(out)] = (int(tier), int(labs[i]))
    return (t_end, t_edge), expected


def check_against_offline(results: list[dict], expected: dict[str, tuple[int, int]]) -> None:
    assert len(results) == len(expected), "every frame gets exactly one result"
    by_source = {r["source"]: r for r in results}
    assert set(by_source) == set(expected)
    for src, (tier, label) in expected.items():
        r = by_source[src]
        assert not r["fallback"], r
        assert (r["tier"], r["label"]) == (TIER_NAMES[tier], label), f"{src}: got {r}, offline chain {tier, label}"
