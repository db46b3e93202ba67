"""Dynamic batching (issue 15): a batch gives each frame exactly what batch 1 gives (int8 segment
outputs, wire bytes, decisions), and a worker under a burst answers every frame once, while a
lone message is not held back. Real parts: the small digits bundle, real Mosquitto, a real
EdgeWorker on its paho thread."""
from __future__ import annotations

import time

import numpy as np
import pytest

from tierlite import topics, wire
from tierlite.bundle import Bundle
from tierlite.policy import decide, decide_batch
from tierlite.segment import Segment

from runtime_support import Mosquitto, Watcher


def _frames(digits_dir, bundle, n):
    from tierlite.data import load_image_folder

    return load_image_folder(digits_dir / "test", size=tuple(bundle.input_shape[1:3]), limit=n, seed=0).images


def _features(bundle, images):
    """Real FEATURE messages (end segment on real frames), frame ids 1..N."""
    end = Segment(bundle, "end")
    spec = wire.boundary_spec(bundle, wire.Kind.FEATURE)
    outs = [end.run(img[None]) for img in images]
    return [wire.encode_tensor_message(spec, i + 1, o.feature, [o.logits], sent_us=1000 + i) for i, o in enumerate(outs)]


def test_segment_batches_give_each_frame_its_batch_one_result(small_bundle_dir, digits_dir):
    bundle = Bundle.load(small_bundle_dir)
    images = _frames(digits_dir, bundle, 13)  # 13 = interpreter batches of 8 + 4 + 1
    end = Segment(bundle, "end")
    one = [end.run(img[None]) for img in images]
    batch = end.run_batch(images)
    assert np.array_equal(batch.feature, np.concatenate([o.feature for o in one]))
    assert np.array_equal(batch.logits, np.stack([o.logits for o in one]))
    x = batch.feature
    for tier in ("edge", "cloud"):
        seg = Segment(bundle, tier)
        one = [seg.run(x[i:i + 1]) for i in range(len(x))]
        got = seg.run_batch(x)
        assert seg._batched.get(8) is not None, f"{tier}: the int8 model took no batch dimension"
        assert np.array_equal(got.logits, np.stack([o.logits for o in one]))  # bit for bit, not approximately
        if tier == "edge":
            assert np.array_equal(got.feature, np.concatenate([o.feature for o in one]))
            x = got.feature
        decided = decide_batch(got.logits, 0.5)
        for i, o in enumerate(one):
            c, label, conf, ent = decide(o.logits, 0.5)
            assert (decided[0][i], decided[1][i]) == (c, label)
            assert decided[2][i] == pytest.approx(conf) and decided[3][i] == pytest.approx(ent)


@pytest.mark.parametrize("which", ["int8", "binary"])
def test_wire_batches_are_byte_for_byte_the_one_message_codec(which, small_bundle_dir, binary_bundle_dir, digits_dir):
    bundle = Bundle.load(small_bundle_dir if which == "int8" else binary_bundle_dir)
    payloads = _features(bundle, _frames(digits_dir, bundle, 9))
    spec = wire.boundary_spec(bundle, wire.Kind.FEATURE)
    bad = payloads[3][:-5]  # cut short: refused with its position, the others decoded
    batch, errors = wire.decode_tensor_batch(payloads[:3] + [bad] + payloads[3:], spec)
    assert [(i, wire.reason_of(e)) for i, e in errors] == [(3, "truncated")]
    assert batch.index == [0, 1, 2, 4, 5, 6, 7, 8, 9] and len(batch) == 9
    for r, p in enumerate(payloads):
        one = wire.decode_tensor_message(p, spec)
        assert (batch.frame_id[r], batch.sent_us[r], batch.audit[r]) == (one.frame_id, one.sent_us, one.audit)
        assert np.array_equal(batch.tensor[r:r + 1], one.tensor)
        assert np.array_equal(batch.exit_logits[0][r], one.exit_logits[0])
        assert bytes(batch.feature[r]) == bytes(one.feature)
    # Escalations, with the node's feature forwarded and one audit among them.
    up = wire.boundary_spec(bundle, wire.Kind.ESCALATE)
    edge = Segment(bundle, "edge").run_batch(batch.tensor)
    audit = [r == 2 for r in range(9)]
    encoded = wire.encode_tensor_batch(up, batch.frame_id, edge.feature, [batch.exit_logits[0], edge.logits],
                                       batch.sent_us, batch.feature, audit)
    for r in range(9):
        assert encoded[r] == wire.encode_tensor_message(
            up, batch.frame_id[r], edge.feature[r:r + 1], [batch.exit_logits[0][r], edge.logits[r]],
            sent_us=batch.sent_us[r], end_feature=batch.feature[r], audit=audit[r])


def test_edge_worker_batches_a_burst_and_answers_a_lone_frame_at_once(tmp_path, small_bundle_dir, digits_dir):
    from tierlite.config import BrokerConfig, EdgeConfig
    from tierlite.edge.worker import EdgeWorker
    from tierlite.mqtt import MqttClient

    bundle = Bundle.load(small_bundle_dir)
    images = _frames(digits_dir, bundle, 200)
    payloads = _features(bundle, images)
    spec_in, spec_out = wire.boundary_spec(bundle, wire.Kind.FEATURE), wire.boundary_spec(bundle, wire.Kind.ESCALATE)
    edge = Segment(bundle, "edge")
    threshold = 0.3
    expected = {}  # frame id -> the reply batch 1 would send: ("answer", label) or ("escalate", exact bytes)
    for p in payloads:
        m = wire.decode_tensor_message(p, spec_in)
        o = edge.run(m.tensor)
        confident, label, _, _ = decide(o.logits, threshold)
        expected[m.frame_id] = ("answer", label) if confident else ("escalate", wire.encode_tensor_message(
            spec_out, m.frame_id, o.feature, [m.exit_logits[0], o.logits], sent_us=m.sent_us, end_feature=m.feature))
    assert {k for k, _ in expected.values()} == {"answer", "escalate"}  # both paths exercised

    broker = Mosquitto(tmp_path / "broker").start()
    worker = watcher = sender = None
    try:
        # A long max wait: the lone frame below must come back long before it.
        cfg = EdgeConfig(bundle=str(small_bundle_dir), broker={"port": broker.port}, metrics_port=None,
                         threshold=threshold, node_budget={"enabled": False},
                         batch={"max_size": 32, "max_wait_ms": 1000})
        worker = EdgeWorker(cfg, 0, bundle)
        worker.start()
        assert worker.mqtt.wait_connected(10)
        watcher = Watcher(broker.port, [topics.node_filter("tierlite", topics.ANSWER),
                                        topics.node_filter("tierlite", topics.ESCALATE)])
        sender = MqttClient(BrokerConfig(port=broker.port), "test-burst")
        sender.start()
        assert sender.wait_connected(10)
        time.sleep(0.3)  # subscriptions in place
        burst = [(topics.node_topic("tierlite", f"cam{i % 7}", topics.FEATURE), p) for i, p in enumerate(payloads)]
        assert sender.publish_batch(burst)  # one write: the worker finds the frames waiting
        deadline = time.monotonic() + 30
        while len(watcher.messages) < len(payloads) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything duplicated would arrive by now
        got: dict[int, list] = {}
        for topic, payload in list(watcher.messages):
            if topic.endswith("/answer"):
                a = wire.decode_answer(payload)
                assert a.kind == wire.Kind.ANSWER and a.tier == "edge"
                got.setdefault(a.frame_id, []).append(("answer", a.label))
            else:
                got.setdefault(wire.peek_frame(payload)[1], []).append(("escalate", payload))
        assert sorted(got) == sorted(expected)  # nothing lost
        assert all(len(v) == 1 for v in got.values())  # nothing duplicated
        assert {k: v[0] for k, v in got.items()} == expected  # each reply is batch 1's, to the byte
        assert worker.batcher.mean_size > 1.5, "the burst was not batched"

        # At low rate: one frame alone runs at once, not after max_wait_ms (1 s).
        time.sleep(0.5)
        before = len(watcher.messages)
        t0 = time.monotonic()
        sender.publish(burst[0][0], payloads[0])
        while len(watcher.messages) == before and time.monotonic() - t0 < 5:
            time.sleep(0.002)
        assert len(watcher.messages) == before + 1
        assert time.monotonic() - t0 < 0.5
    finally:
        for c in (sender, watcher):
            if c is not None:
                c.stop()
        if worker is not None:
            worker.mqtt.stop()
        broker.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_publish_batch_rides_paho_private_queue_and_delivers_what_publish_would(protocol, tmp_path):
    """`MqttClient.publish_batch` builds the QoS-0 PUBLISH packets itself and hands them to paho's
    private `Client._packet_queue` as one out-packet. Pinned here so a paho upgrade that changes
    that method fails loudly instead of silently falling back to one write per message: its
    signature, one call per batch, and every message delivered once, in order, to the byte
    (payload sizes across the 1-, 2- and 3-byte remaining-length encodings)."""
    import inspect

    import paho.mqtt.client as paho

    from tierlite.config import BrokerConfig
    from tierlite.mqtt import MqttClient

    from runtime_support import Mosquitto

    assert list(inspect.signature(paho.Client._packet_queue).parameters) == \
        ["self", "command", "packet", "mid", "qos", "info"], "paho changed Client._packet_queue"
    broker = Mosquitto(tmp_path / "broker").start()
    sender = watcher = None
    try:
        watcher = Watcher(broker.port, ["pin/#"])
        sender = MqttClient(BrokerConfig(port=broker.port, protocol=protocol), f"test-pin-{protocol}")
        sender.start()
        assert sender.wait_connected(10)
        queued = []
        real_queue = sender._client._packet_queue
        sender._client._packet_queue = lambda *a, **k: (queued.append(a[0]), real_queue(*a, **k))[1]
        # remaining length = payload + 7 (3.1.1) or + 8 (v5, empty properties) for these topics: these
        # sizes put it on both sides of 127/128 and 16383/16384 for either protocol
        sizes = [0, 1, 119, 120, 121, 16_375, 16_376, 16_377, 70_000]
        batch = [(f"pin/{i}", bytes([i]) * n) for i, n in enumerate(sizes)]
        assert sender.publish_batch(batch)
        assert queued == [paho.PUBLISH], "publish_batch did not take paho's one-packet path"
        deadline = time.monotonic() + 10
        while len(watcher.messages) < len(batch) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # a duplicate would be here by now
        assert watcher.messages == batch
        assert sender.connected  # the broker took every packet as well-formed
    finally:
        for c in (sender, watcher and watcher.client):
            if c is not None:
                c.stop()
        broker.stop()
