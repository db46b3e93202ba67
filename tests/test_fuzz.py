"""Issue 12, item 7: a seeded fuzz of every network decoder, >= 100,000 messages, 0 unhandled
exceptions. Inputs: valid messages mutated (bit flips, header fields overwritten with extreme
values, truncation, extension, splices) and plain random bytes, from a seeded numpy generator (so a
failure reproduces). Only the decoders' own error family may come out: WireError for the wire
format, UpdateError for updates and frame uploads. What decodes is also fed to the hard-example
store, which must take every field the wire can carry (a u64 send time, any frame id)."""
from __future__ import annotations

import json
import time

import numpy as np

from test_update import keys, make_bundle  # noqa: F401  (fixture: an update signing key pair)

SEED = 20261130
N_TENSOR = 60_000  # each decoded against 3 specs, peeked and read as an answer
N_ANSWER = 15_000
N_FRAME = 12_000
N_CHUNK = 10_000
N_ANNOUNCE = 2_500
N_ARTIFACT = 600
EXTREMES = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
            (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def _specs():
    from tierlite.bundle import FeatureEncoding, TensorInfo
    from tierlite.wire import BoundarySpec, Kind, LogitsCodec

    feat = TensorInfo("f", (1, 4, 4, 8), "int8", 0.05, -3, "feature")
    q_logits = LogitsCodec(TensorInfo("l", (1, 10), "int8", 0.1, 2, "logits"))
    f_logits = LogitsCodec(TensorInfo("l", (1, 10), "float32", 0.0, 0, "logits"))
    end = TensorInfo("e", (1, 8, 8, 4), "int8", 1.0, 0, "feature")
    binary = FeatureEncoding.from_manifest({"kind": "binary", "low": -1, "high": 1})
    return [
        BoundarySpec(Kind.FEATURE, "digits", 3, FeatureEncoding.INT8, feat, feat, (q_logits,)),
        BoundarySpec(Kind.FEATURE, "digits", 3, binary, feat, feat, (f_logits,)),
        BoundarySpec(Kind.ESCALATE, "digits", 3, FeatureEncoding.INT8, feat, feat, (q_logits, f_logits),
                     end_feature=end, end_encoding=binary),
    ]


def _mutate(rng: np.random.Generator, msg: bytes, pool: list[bytes], header: int) -> bytes:
    b = bytearray(msg)
    op = int(rng.integers(0, 8))
    if op == 0 and b:  # bit flips
        for i in rng.integers(0, len(b), int(rng.integers(1, 9))):
            b[i] ^= 1 << int(rng.integers(0, 8))
    elif op == 1 and len(b) > 1:  # an extreme value over any aligned field of the header
        width = int(rng.choice([1, 2, 4, 8]))
        at = int(rng.integers(0, max(1, min(header, len(b)) - width + 1)))
        v = EXTREMES[int(rng.integers(0, len(EXTREMES)))] & ((1 << (8 * width)) - 1)
        b[at:at + width] = v.to_bytes(width, "little")[:len(b) - at]
    elif op == 2:  # truncate
        del b[int(rng.integers(0, len(b) + 1)):]
    elif op == 3:  # extend
        b += rng.bytes(int(rng.integers(1, 64)))
    elif op == 4 and pool:  # splice two messages
        other = pool[int(rng.integers(0, len(pool)))]
        b = b[:int(rng.integers(0, len(b) + 1))] + other[int(rng.integers(0, len(other) + 1)):]
    elif op == 5:
        return rng.bytes(int(rng.integers(0, 400)))  # plain random bytes
    elif op == 6 and b:  # random bytes over a random span
        at = int(rng.integers(0, len(b)))
        n = min(len(b) - at, int(rng.integers(1, 16)))
        b[at:at + n] = rng.bytes(n)
    # op 7: unchanged (the valid message itself)
    return bytes(b)


def _expect(errors, fn, *args):
    try:
        return fn(*args)
    except errors:
        return None


def test_fuzz_wire_and_update_decoders(tmp_path, keys):  # noqa: F811
    from tierlite import wire
    from tierlite.cloud.publish import build_artifact, make_announcement
    from tierlite.cloud.store import HardExampleStore
    from tierlite.errors import UpdateError, WireError
    from tierlite.update.artifacts import read_artifact
    from tierlite.update.delivery import ChunkAssembler, chunk_artifact, parse_announcement
    from tierlite.update.frame_upload import decode_frame_upload, encode_frame_upload

    t0 = time.monotonic()
    rng = np.random.default_rng(SEED)
    specs = _specs()
    store = HardExampleStore(tmp_path / "fuzz.sqlite", batch=256, flush_interval=60)
    total = decoded = stored = 0

    # -- tensor messages (FEATURE int8 / binary, ESCALATE with the node's feature) ---------------
    valid = []
    for i in range(64):
        spec = specs[i % 3]
        q = rng.integers(-128, 128, spec.feature.shape, dtype=np.int8)
        if spec.encoding.kind == "binary":
            q = np.where(q >= 0, np.int8(1), np.int8(-1))
        logits = [rng.normal(0, 3, 10).astype(np.float32) for _ in spec.exits]
        end = rng.bytes(spec.end_feature_size) if spec.end_feature is not None and i % 2 else None
        valid.append(wire.encode_tensor_message(spec, int(rng.integers(0, 1 << 32)), q, logits,
                                                sent_us=EXTREMES[int(rng.integers(0, len(EXTREMES)))], end_feature=end))
    for _ in range(N_TENSOR):
        msg = _mutate(rng, valid[int(rng.integers(0, len(valid)))], valid, wire.TENSOR_HEADER.size + 8)
        total += 1
        wire.peek_frame(msg)
        _expect(WireError, wire.decode_answer, msg)
        for spec in specs:
            m = _expect(WireError, wire.decode_tensor_message, msg, spec)
            if m is None:
                continue
            decoded += 1
            if spec.kind == wire.Kind.ESCALATE and decoded % 4 == 0:
                store.add(node="fuzz", frame_id=m.frame_id, bundle_name="digits", bundle_version=m.bundle_version,
                          sent_us=m.sent_us, feature=m.feature, feature_shape=m.shape, feature_scale=m.scale,
                          feature_zero_point=m.zero_point,
                          logits={"end": m.exit_logits[0], "edge": m.exit_logits[1], "cloud": m.exit_logits[1]},
                          label=3, confidence=0.5, entropy=0.5, end_feature=m.end_feature,
                          end_feature_shape=spec.end_feature.shape if m.end_feature is not None else None,
                          end_feature_encoding=spec.end_encoding, end_feature_scale=1.0, end_feature_zero_point=0)
                stored += 1
        _expect(WireError, wire.decode_feature, msg[:128], (1, 4, 4, 8), specs[int(rng.integers(0, 2))].encoding)

    # -- answers / rejects --------------------------------------------------------------------
    answers = [wire.encode_answer("edge", 7, 3, 0.9, 0.1, "digits", 3),
               wire.encode_reject("cloud", 9, wire.wire_error("budget", "x"), "digits", 3)]
    for _ in range(N_ANSWER):
        total += 1
        _expect(WireError, wire.decode_answer, _mutate(rng, answers[int(rng.integers(0, 2))], answers,
                                                       wire.ANSWER_STRUCT.size))

    # -- frame uploads ------------------------------------------------------------------------
    uploads = [encode_frame_upload(b"\xff\xd8" + rng.bytes(200), 2),
               b"TLF1" + (24).to_bytes(4, "big") + b'{"version": 1, "ts": 1.0}'[:24] + b"\xff\xd8xx"]
    for _ in range(N_FRAME):
        total += 1
        _expect(UpdateError, decode_frame_upload, _mutate(rng, uploads[int(rng.integers(0, 2))], uploads, 40))

    # -- update chunks, announcements, artifacts ------------------------------------------------
    v1 = make_bundle(tmp_path / "v1", 1)
    v2 = make_bundle(tmp_path / "v2", 2, files={"end.tflite": b"N" + rng.bytes(300)})
    from tierlite.bundle import Bundle

    data, report = build_artifact(v2, parent=Bundle.load(v1), private_key=keys["priv"])
    chunks = chunk_artifact(data, 128)
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    for i in range(N_CHUNK):
        total += 1
        if i % 500 == 0:
            asm = ChunkAssembler(digest, len(data), len(chunks))
        _expect(UpdateError, asm.add, _mutate(rng, chunks[int(rng.integers(0, len(chunks)))], chunks, 48))
    ann = json.dumps(make_announcement(report, len(chunks), 128, keys["priv"])).encode()
    texts = [ann, ann.replace(b'"share": 1.0', b'"share": 1e999'), json.dumps({"format": "x"}).encode()]
    for _ in range(N_ANNOUNCE):
        total += 1
        _expect(UpdateError, parse_announcement, _mutate(rng, texts[int(rng.integers(0, 3))], texts, len(ann)),
                [keys["pub"]], "digits")
    for _ in range(N_ARTIFACT):
        total += 1
        _expect(UpdateError, read_artifact, _mutate(rng, data, [data], 64))

    store.flush()
    assert store.count() == stored - store.events["invalid"]
    store.close()
    elapsed = time.monotonic() - t0
    print(f"fuzz: {total:,} messages ({decoded:,} tensor decodes, {stored:,} stored) in {elapsed:.1f} s")
    assert total >= 100_000 and decoded > 1000
