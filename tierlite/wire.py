"""The binary wire format between tiers: a small versioned header plus raw tensor bytes.

Two tensor messages carry a boundary feature up the chain:
  FEATURE   node -> edge   end segment's feature (int8, or bit-packed binary) + end exit logits
  ESCALATE  edge -> cloud  edge segment's feature (int8) + end and edge exit logits
                           (+ optionally the node's end feature, for the hard-example store)
Two small fixed-size messages come back down to the node:
  ANSWER    edge|cloud -> node   tier, label, confidence, entropy for one frame
  REJECT    edge|cloud -> node   "I cannot run this" (wrong bundle, quantization...), so the node
                                 falls back to its own answer at once instead of at its deadline

Decoders check the bundle, quantization and shape against what this tier runs and raise
WireError with a short `.reason` (a metrics label). The boundary feature's codec (int8 raw or
bit-packed binary) lives here too. Byte by byte: docs/protocol.md.
"""
from __future__ import annotations

import math
import struct
import time
import zlib
from dataclasses import dataclass
from functools import cached_property, lru_cache
from enum import IntEnum
from typing import Any, Mapping

import numpy as np

from tierlite.bundle import Bundle, FeatureEncoding, TensorInfo
from tierlite.errors import BundleError, WireError

__all__ = [
    "ANSWER_STRUCT", "Answer", "BoundarySpec", "FLAG_AUDIT", "FeatureEncoding", "Kind", "LogitsCodec", "MAGIC",
    "REJECT_REASONS_WORTH_ANSWERING", "RejectReason", "TENSOR_HEADER", "TIER_CODES", "TensorMessage",
    "WIRE_VERSION", "boundary_spec", "bundle_id", "decode_answer", "decode_feature",
    "decode_tensor_batch", "decode_tensor_message", "encode_answer", "encode_feature", "encode_reject", "encode_tensor_batch", "encode_tensor_message",
    "TensorBatch", "encoded_size", "now_us", "peek_frame", "reason_of", "wire_error",
]

MAGIC = b"TL"
WIRE_VERSION = 1


class Kind(IntEnum):
    FEATURE = 1
    ESCALATE = 2
    ANSWER = 3
    REJECT = 4


TIER_CODES = {"end": 0, "edge": 1, "cloud": 2}
TIER_NAMES = {v: k for k, v in TIER_CODES.items()}
ENCODING_CODES = {"int8": 0, "binary": 1, "uniform": 2}
FLAG_END_FEATURE = 0x01  # ESCALATE: the node's end feature follows the edge feature
FLAG_AUDIT = 0x02  # FEATURE/ESCALATE: an audit of a frame the node already answered itself (no answer wanted)
MAX_NDIM = 6

# magic, version, kind, encoding, flags, n_exits, ndim, bundle_id, bundle_version, frame_id,
# sent_us, scale, zero_point, n_classes; then ndim x uint16 dims. Little-endian throughout.
TENSOR_HEADER = struct.Struct("<2sBBBBBBIIIQfhH")
# magic, version, kind, tier, reason, label, bundle_id, bundle_version, frame_id, confidence, entropy
ANSWER_STRUCT = struct.Struct("<2sBBBBHIIIff")


class RejectReason(IntEnum):
    OTHER = 0
    BUNDLE = 1  # bundle name or version differs from what this tier runs
    QUANTIZATION = 2
    SHAPE = 3
    ENCODING = 4
    SIZE = 5
    BUDGET = 6  # the node is over its escalation budget at this tier (edge.node_budget)


_REASON_OF = {"bundle": RejectReason.BUNDLE, "quantization": RejectReason.QUANTIZATION,
              "shape": RejectReason.SHAPE, "encoding": RejectReason.ENCODING,
              "truncated": RejectReason.SIZE, "oversized": RejectReason.SIZE, "budget": RejectReason.BUDGET}


def wire_error(reason: str, message: str) -> WireError:
    err = WireError(message)
    err.reason = reason  # type: ignore[attr-defined]  # short label for counters
    return err


def reason_of(err: WireError) -> str:
    return getattr(err, "reason", "invalid")


def bundle_id(name: str) -> int:
    """A bundle's name as 4 bytes on the wire (crc32)."""
    return zlib.crc32(name.encode("utf-8")) & 0xFFFFFFFF


def now_us() -> int:
    return time.time_ns() // 1000


# -- boundary features: int8 raw, bit-packed binary, or bit-packed uniform levels -------------
Encoding = FeatureEncoding | Mapping[str, Any]  # typed, or a manifest's `feature_encoding` dict


@lru_cache(maxsize=16)  # one table per encoding: the edge decodes every message with it
def uniform_levels(enc: FeatureEncoding) -> np.ndarray:
    """The int8 value each code of a uniform encoding stands for (2**bits levels, low to high); read-only."""
    n = 1 << enc.bits
    levels = np.round(enc.low + np.arange(n) * ((enc.high - enc.low) / (n - 1))).astype(np.int8)
    levels.setflags(write=False)
    return levels


def pack_features(flat: np.ndarray, encoding: Encoding) -> np.ndarray:
    """(N, n) int8 feature rows -> (N, encoded bytes) uint8, numpy throughout. binary: 1 bit per
    element (1 = high), big-endian bit order (np.packbits); uniform: each element's nearest level
    code (clipped to [low, high]) in `bits` bits, most significant first, packed the same way."""
    enc = FeatureEncoding.of(encoding)
    flat = np.asarray(flat)
    if enc.kind == "binary":
        return np.packbits(flat == enc.high, axis=1)
    if enc.kind == "uniform":
        top = (1 << enc.bits) - 1
        codes = np.clip(np.round((flat.astype(np.float64) - enc.low) * (top / (enc.high - enc.low))), 0, top)
        bits = np.unpackbits(codes.astype(np.uint8)[..., None], axis=-1)[..., 8 - enc.bits:]
        return np.packbits(bits.reshape(len(flat), -1), axis=1)
    return np.ascontiguousarray(flat, dtype=np.int8).view(np.uint8)


def unpack_features(rows: np.ndarray, n: int, encoding: Encoding) -> np.ndarray:
    """`pack_features` undone: (N, encoded bytes) uint8 -> (N, n) int8 (each code as its level)."""
    enc = FeatureEncoding.of(encoding)
    if enc.kind == "binary":
        bits = np.unpackbits(rows, axis=1, count=n).astype(bool)
        return np.where(bits, np.int8(enc.high), np.int8(enc.low)).astype(np.int8)
    if enc.kind == "uniform":
        bits = np.unpackbits(rows, axis=1, count=n * enc.bits).reshape(len(rows), n, enc.bits)
        codes = bits @ (1 << np.arange(enc.bits - 1, -1, -1))  # most significant bit first
        return uniform_levels(enc)[codes]
    return np.ascontiguousarray(rows).view(np.int8)


def as_received(features: np.ndarray, encoding: Encoding) -> np.ndarray:
    """int8 features (N, ...) as the next tier decodes them after the wire: the same for int8 and
    binary (their values are the levels), each element's level for a uniform encoding. What
    calibration and retraining feed the edge, so thresholds match the deployed chain."""
    enc = FeatureEncoding.of(encoding)
    if enc.kind != "uniform" or not len(features):
        return features
    flat = np.asarray(features).reshape(len(features), -1)
    return unpack_features(pack_features(flat, enc), flat.shape[1], enc).reshape(np.shape(features))


def encode_feature(q: np.ndarray, encoding: Encoding) -> bytes:
    """One feature tensor as its wire bytes (`pack_features` of one row)."""
    return pack_features(np.asarray(q).reshape(1, -1), encoding).tobytes()


def encoded_size(shape: tuple[int, ...], encoding: Encoding) -> int:
    n, enc = int(np.prod(shape)), FeatureEncoding.of(encoding)
    return {"binary": (n + 7) // 8, "uniform": (n * (enc.bits or 8) + 7) // 8}.get(enc.kind, n)


def decode_feature(payload: bytes | memoryview, shape: tuple[int, ...], encoding: Encoding) -> np.ndarray:
    """The int8 tensor back (binary: each bit as its level, `high` or `low`; uniform: each code's level)."""
    enc = FeatureEncoding.of(encoding)
    expected = encoded_size(shape, enc)
    if len(payload) != expected:
        raise WireError(f"feature payload is {len(payload)} bytes, shape {shape} needs {expected}")
    row = np.frombuffer(payload, dtype=np.uint8).reshape(1, -1)
    return unpack_features(row, int(np.prod(shape)), enc).reshape(shape).copy()


# -- logits blocks: each exit's raw output quantization (int8 -> 1 byte per class) ----------
@dataclass(frozen=True)
class LogitsCodec:
    info: TensorInfo

    @cached_property
    def n_classes(self) -> int:
        return int(np.prod(self.info.shape))

    @cached_property
    def quantized(self) -> bool:
        return self.info.scale > 0 and self.info.dtype in ("int8", "uint8")

    @cached_property
    def size(self) -> int:
        return self.n_classes * (1 if self.quantized else 4)

    def encode(self, logits: np.ndarray) -> bytes:
        if not self.quantized:
            return np.asarray(logits, dtype="<f4").tobytes()
        # Segment.run dequantized the model's int8 output; this is the exact inverse.
        q = np.round(np.asarray(logits, np.float32) / self.info.scale) + self.info.zero_point
        return np.clip(q, -128 if self.info.dtype == "int8" else 0,
                       127 if self.info.dtype == "int8" else 255).astype(self.info.dtype).tobytes()

    def encode_rows(self, logits: np.ndarray) -> np.ndarray:
        """`encode` of N frames' logits (N, C) at once: (N, size) uint8, row i == encode(logits[i])."""
        n = len(logits)
        if not self.quantized:
            return np.ascontiguousarray(logits, dtype="<f4").view(np.uint8).reshape(n, -1)
        q = np.round(np.asarray(logits, np.float32) / self.info.scale) + self.info.zero_point
        q = np.clip(q, -128 if self.info.dtype == "int8" else 0, 127 if self.info.dtype == "int8" else 255)
        return q.astype(self.info.dtype).view(np.uint8).reshape(n, -1)

    def decode_rows(self, rows: np.ndarray) -> np.ndarray:
        """`decode` of (N, size) uint8 rows at once: (N, C) float32."""
        if not self.quantized:
            return np.ascontiguousarray(rows).view("<f4").astype(np.float32)
        q = np.ascontiguousarray(rows).view(self.info.dtype).astype(np.float32)
        return (q - self.info.zero_point) * self.info.scale

    def decode(self, data: bytes | memoryview) -> np.ndarray:
        if not self.quantized:
            return np.frombuffer(data, dtype="<f4").astype(np.float32)
        q = np.frombuffer(data, dtype=self.info.dtype).astype(np.float32)
        return (q - self.info.zero_point) * self.info.scale


# -- what one boundary carries, derived from the bundle this tier runs ----------------------
@dataclass(frozen=True)
class BoundarySpec:
    """Everything a tensor message must match. Producer and consumer derive it from the same
    bundle; `input_info` is the consumer's input (its quantization is what the header must say)."""

    kind: Kind
    bundle_name: str
    bundle_version: int
    encoding: FeatureEncoding  # a manifest-style dict is read into one
    feature: TensorInfo  # producer's feature output
    input_info: TensorInfo  # consumer's input
    exits: tuple[LogitsCodec, ...]  # earlier exits' logits carried along, in tier order
    end_feature: TensorInfo | None = None  # ESCALATE: the node's feature, when forwarded
    end_encoding: FeatureEncoding | None = None

    def __post_init__(self):
        object.__setattr__(self, "encoding", FeatureEncoding.of(self.encoding))
        if self.end_encoding is not None:
            object.__setattr__(self, "end_encoding", FeatureEncoding.of(self.end_encoding))

    @cached_property
    def bundle_id(self) -> int:
        return bundle_id(self.bundle_name)

    @cached_property
    def encoding_code(self) -> int:
        return ENCODING_CODES[self.encoding.kind]

    @cached_property
    def feature_size(self) -> int:
        return encoded_size(self.feature.shape, self.encoding)

    @cached_property
    def end_feature_size(self) -> int:
        return encoded_size(self.end_feature.shape, self.end_encoding) if self.end_feature else 0

    @cached_property
    def n_classes(self) -> int:
        return self.exits[0].n_classes

    @cached_property
    def exits_size(self) -> int:
        return sum(c.size for c in self.exits)

    @cached_property
    def max_size(self) -> int:
        return (TENSOR_HEADER.size + 2 * len(self.feature.shape) + sum(c.size for c in self.exits)
                + self.feature_size + self.end_feature_size)


def boundary_spec(bundle: Bundle, kind: Kind) -> BoundarySpec:
    """FEATURE: end -> edge (the bundle's feature encoding). ESCALATE: edge -> cloud (int8)."""
    if kind == Kind.FEATURE:
        producer, consumer, encoding = bundle.segment("end"), bundle.segment("edge"), bundle.encoding
        exits = (producer,)
    elif kind == Kind.ESCALATE:
        producer, consumer, encoding = bundle.segment("edge"), bundle.segment("cloud"), FeatureEncoding.INT8
        exits = (bundle.segment("end"), producer)
    else:
        raise ValueError(f"not a tensor message kind: {kind!r}")
    feature = producer.output("feature")
    if feature is None:
        raise BundleError(f"bundle {bundle.name} v{bundle.version}: {producer.tier} segment has no feature output")
    end_feature = bundle.segment("end").output("feature") if kind == Kind.ESCALATE else None
    return BoundarySpec(
        kind=kind, bundle_name=bundle.name, bundle_version=bundle.version, encoding=encoding,
        feature=feature, input_info=consumer.inputs[0],
        exits=tuple(LogitsCodec(s.output("logits")) for s in exits),
        end_feature=end_feature, end_encoding=bundle.encoding if end_feature else None)


# -- tensor messages --------------------------------------------------------------------------
@dataclass
class TensorMessage:
    kind: Kind
    frame_id: int
    sent_us: int
    bundle_version: int
    scale: float
    zero_point: int
    shape: tuple[int, ...]
    exit_logits: list[np.ndarray]  # float32 (C,) per earlier exit, tier order
    feature: memoryview  # the feature as it travelled (forwarded and stored as it is)
    tensor: np.ndarray  # the feature decoded: the int8 input of this tier's segment
    end_feature: memoryview | None = None  # ESCALATE: the node's feature as it travelled
    audit: bool = False  # flag bit 1: score it, do not answer (issue 13, docs/protocol.md)


def encode_tensor_message(spec: BoundarySpec, frame_id: int, feature_q: np.ndarray,
                          exit_logits: list[np.ndarray], sent_us: int | None = None,
                          end_feature: bytes | None = None, audit: bool = False) -> bytes:
    """Build a FEATURE/ESCALATE payload. feature_q: the producer's quantized feature tensor."""
    if len(exit_logits) != len(spec.exits):
        raise ValueError(f"{spec.kind.name} carries {len(spec.exits)} exits' logits, got {len(exit_logits)}")
    f = spec.feature
    flags = (FLAG_END_FEATURE if end_feature is not None else 0) | (FLAG_AUDIT if audit else 0)
    header = TENSOR_HEADER.pack(
        MAGIC, WIRE_VERSION, spec.kind, spec.encoding_code, flags, len(spec.exits), len(f.shape),
        spec.bundle_id, spec.bundle_version, frame_id & 0xFFFFFFFF, now_us() if sent_us is None else sent_us,
        f.scale, f.zero_point, spec.n_classes)
    parts = [header, struct.pack(f"<{len(f.shape)}H", *f.shape)]
    parts += [codec.encode(lg) for codec, lg in zip(spec.exits, exit_logits)]
    parts.append(encode_feature(feature_q, spec.encoding))
    if end_feature is not None:
        parts.append(bytes(end_feature))
    return b"".join(parts)


def encode_tensor_batch(spec: BoundarySpec, frame_ids: list[int], features_q: np.ndarray,
                        exit_logits: list[np.ndarray], sent_us: list[int],
                        end_features: list[bytes | memoryview | None] | None = None,
                        audit: list[bool] | None = None) -> list[bytes]:
    """`encode_tensor_message` for N frames at once: features_q (N, ...) stacked, exit_logits one
    (N, C) array per exit; the logits and features are encoded by numpy in one go. Message i is
    byte for byte what encode_tensor_message gives for frame i (tested)."""
    n = len(frame_ids)
    if len(exit_logits) != len(spec.exits):
        raise ValueError(f"{spec.kind.name} carries {len(spec.exits)} exits' logits, got {len(exit_logits)}")
    f = spec.feature
    cols = [codec.encode_rows(lg) for codec, lg in zip(spec.exits, exit_logits)]
    cols.append(pack_features(np.asarray(features_q).reshape(n, -1), spec.encoding))
    body = np.concatenate(cols, axis=1)
    dims = struct.pack(f"<{len(f.shape)}H", *f.shape)
    pack = TENSOR_HEADER.pack
    out = []
    for i in range(n):
        end = end_features[i] if end_features is not None else None
        flags = (FLAG_END_FEATURE if end is not None else 0) | (FLAG_AUDIT if audit is not None and audit[i] else 0)
        header = pack(MAGIC, WIRE_VERSION, spec.kind, spec.encoding_code, flags, len(spec.exits), len(f.shape),
                      spec.bundle_id, spec.bundle_version, frame_ids[i] & 0xFFFFFFFF, sent_us[i],
                      f.scale, f.zero_point, spec.n_classes)
        out.append(b"".join((header, dims, body[i].tobytes(), bytes(end) if end is not None else b"")))
    return out


def peek_frame(payload: bytes | memoryview) -> tuple[Kind, int] | None:
    """(kind, frame_id) of a payload whose header at least parses; None otherwise. Lets a tier
    send a REJECT for a frame it cannot run (so the node stops waiting)."""
    if len(payload) < TENSOR_HEADER.size:
        return None
    h = TENSOR_HEADER.unpack_from(payload)
    if h[0] != MAGIC or h[1] != WIRE_VERSION or h[2] not in (Kind.FEATURE, Kind.ESCALATE):
        return None
    return Kind(h[2]), h[9]


def _check_tensor_header(payload: bytes | memoryview, spec: BoundarySpec) -> tuple[tuple, bool]:
    """Every check of a FEATURE/ESCALATE payload that the header and length allow: the header
    fields and whether the node's end feature follows. Raises WireError."""
    n = len(payload)
    if n < TENSOR_HEADER.size:
        raise wire_error("truncated", f"message is {n} bytes, shorter than the {TENSOR_HEADER.size}-byte header")
    if n > spec.max_size:
        raise wire_error("oversized", f"message is {n} bytes, at most {spec.max_size} expected")
    h = TENSOR_HEADER.unpack_from(payload)
    magic, version, kind, enc, flags, n_exits, ndim, b_id, b_ver, frame_id, sent_us, scale, zp, n_classes = h
    if magic != MAGIC:
        raise wire_error("magic", f"not a tierlite message (magic {magic!r})")
    if version != WIRE_VERSION:
        raise wire_error("version", f"wire version {version}, this tier speaks {WIRE_VERSION}")
    if kind != spec.kind:
        raise wire_error("kind", f"message kind {kind}, expected {spec.kind.name}")
    # Any version of the same bundle: tiers and nodes take model updates at different times (staged
    # rollout), and an update keeps the boundary tensors (tierlite.update checks it); the encoding,
    # quantization and shape checks below still refuse a producer whose boundary differs.
    if b_id != spec.bundle_id:
        raise wire_error("bundle", f"feature from bundle id {b_id:08x} v{b_ver}, this tier runs "
                                   f"{spec.bundle_name} ({spec.bundle_id:08x}) v{spec.bundle_version}")
    if enc != spec.encoding_code:
        raise wire_error("encoding", f"feature encoding {enc}, expected {spec.encoding.kind}")
    want = spec.input_info
    if not math.isclose(scale, want.scale, rel_tol=1e-6) or zp != want.zero_point:
        raise wire_error("quantization", f"feature quantization ({scale:g}, {zp}) differs from this "
                                         f"tier's input ({want.scale:g}, {want.zero_point})")
    if n_exits != len(spec.exits) or n_classes != spec.n_classes:
        raise wire_error("shape", f"{n_exits} exits x {n_classes} classes, expected "
                                  f"{len(spec.exits)} x {spec.n_classes}")
    if ndim > MAX_NDIM or n < TENSOR_HEADER.size + 2 * ndim:
        raise wire_error("truncated", f"bad rank {ndim} or header cut short")
    off = TENSOR_HEADER.size
    shape = struct.unpack_from(f"<{ndim}H", payload, off)
    off += 2 * ndim
    if shape != tuple(want.shape) or shape != tuple(spec.feature.shape):
        raise wire_error("shape", f"feature shape {shape}, this tier expects {tuple(want.shape)}")
    has_end = bool(flags & FLAG_END_FEATURE)
    if has_end and spec.end_feature is None:
        raise wire_error("shape", "unexpected end feature block")
    expected = off + spec.exits_size + spec.feature_size + (spec.end_feature_size if has_end else 0)
    if n != expected:
        raise wire_error("truncated" if n < expected else "oversized",
                         f"message is {n} bytes, header says {expected}")
    return h, has_end


def decode_tensor_message(payload: bytes | memoryview, spec: BoundarySpec) -> TensorMessage:
    """Parse and check a FEATURE/ESCALATE payload against what this tier runs."""
    h, has_end = _check_tensor_header(payload, spec)
    kind, flags, b_ver, frame_id, sent_us, scale, zp = h[2], h[4], h[8], h[9], h[10], h[11], h[12]
    shape = tuple(spec.feature.shape)
    off = TENSOR_HEADER.size + 2 * len(shape)
    view = memoryview(payload)
    logits = []
    for codec in spec.exits:
        logits.append(codec.decode(view[off: off + codec.size]))
        off += codec.size
    if not all(c.quantized or np.isfinite(lg).all() for c, lg in zip(spec.exits, logits)):
        raise wire_error("invalid", "non-finite logits")
    feature = view[off: off + spec.feature_size]
    off += spec.feature_size
    end_feature = view[off:] if has_end else None
    tensor = decode_feature(feature, shape, spec.encoding)
    return TensorMessage(Kind(kind), frame_id, sent_us, b_ver, float(scale), zp, shape, logits, feature, tensor,
                         end_feature, bool(flags & FLAG_AUDIT))


@dataclass
class TensorBatch:
    """`decode_tensor_batch`: the valid messages of a batch, one row each, in arrival order."""
    index: list[int]  # position of each row in the payload list given
    frame_id: list[int]
    sent_us: list[int]
    audit: list[bool]
    exit_logits: list[np.ndarray]  # per earlier exit, (N, C) float32
    tensor: np.ndarray  # (N, *feature shape): this tier's int8 input, stacked
    feature: list[memoryview]  # each feature as it travelled
    end_feature: list[memoryview | None]
    bundle_version: list[int]
    spec: BoundarySpec

    def __len__(self) -> int:
        return len(self.index)

    def message(self, r: int) -> TensorMessage:
        """Row r as the one-message decoder gives it (for code that takes a TensorMessage)."""
        f = self.spec.input_info
        return TensorMessage(self.spec.kind, self.frame_id[r], self.sent_us[r], self.bundle_version[r], f.scale,
                             f.zero_point, tuple(f.shape), [lg[r] for lg in self.exit_logits], self.feature[r],
                             self.tensor[r:r + 1], self.end_feature[r], self.audit[r])


def decode_tensor_batch(payloads: list[bytes | memoryview], spec: BoundarySpec
                        ) -> tuple[TensorBatch, list[tuple[int, WireError]]]:
    """`decode_tensor_message` for many payloads at once: each header checked as one message is,
    the bodies of the valid ones decoded together by numpy (row i equals what the one-message
    decoder gives). Returns the batch and (position, error) for every payload refused."""
    shape = tuple(spec.feature.shape)
    off = TENSOR_HEADER.size + 2 * len(shape)
    body = spec.exits_size + spec.feature_size
    errors: list[tuple[int, WireError]] = []
    index, ids, sent, audit, ends, bodies, versions = [], [], [], [], [], [], []
    for i, p in enumerate(payloads):
        try:
            h, has_end = _check_tensor_header(p, spec)
        except WireError as e:
            errors.append((i, e))
            continue
        index.append(i)
        ids.append(h[9])
        sent.append(h[10])
        audit.append(bool(h[4] & FLAG_AUDIT))
        versions.append(h[8])
        ends.append(memoryview(p)[off + body:] if has_end else None)
        bodies.append(p[off: off + body])
    rows = np.frombuffer(b"".join(bodies), dtype=np.uint8).reshape(len(bodies), body)
    logits, col = [], 0
    for codec in spec.exits:
        logits.append(codec.decode_rows(rows[:, col: col + codec.size]))
        col += codec.size
    bad = np.zeros(len(rows), dtype=bool)
    for codec, lg in zip(spec.exits, logits):
        if not codec.quantized:
            bad |= ~np.isfinite(lg).all(axis=1)
    tensor = unpack_features(rows[:, col:], int(np.prod(shape)), spec.encoding)
    tensor = tensor.reshape(len(rows), *shape[1:]) if shape[:1] == (1,) else tensor.reshape(len(rows), *shape)
    features = [memoryview(payloads[i])[off + spec.exits_size: off + body] for i in index]
    if bad.any():  # rare: drop the rows with non-finite float logits
        keep = ~bad
        errors += [(index[r], wire_error("invalid", "non-finite logits")) for r in np.flatnonzero(bad)]
        pick = [r for r in range(len(rows)) if keep[r]]
        index, ids, sent, audit, ends, features, versions = (
            [x[r] for r in pick] for x in (index, ids, sent, audit, ends, features, versions))
        logits, tensor = [lg[keep] for lg in logits], tensor[keep]
    errors.sort(key=lambda e: e[0])
    return TensorBatch(index, ids, sent, audit, logits, tensor, features, ends, versions, spec), errors


# -- answers ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    kind: Kind  # ANSWER or REJECT
    tier: str
    frame_id: int
    label: int
    confidence: float
    entropy: float
    bundle_id: int
    bundle_version: int
    reason: RejectReason = RejectReason.OTHER


def encode_answer(tier: str, frame_id: int, label: int, confidence: float, entropy: float,
                  bundle_name: str, bundle_version: int) -> bytes:
    return ANSWER_STRUCT.pack(MAGIC, WIRE_VERSION, Kind.ANSWER, TIER_CODES[tier], 0, label,
                              bundle_id(bundle_name), bundle_version, frame_id & 0xFFFFFFFF,
                              confidence, entropy)


def encode_reject(tier: str, frame_id: int, err: WireError, bundle_name: str, bundle_version: int) -> bytes:
    reason = _REASON_OF.get(reason_of(err), RejectReason.OTHER)
    return ANSWER_STRUCT.pack(MAGIC, WIRE_VERSION, Kind.REJECT, TIER_CODES[tier], reason, 0,
                              bundle_id(bundle_name), bundle_version, frame_id & 0xFFFFFFFF, 0.0, 1.0)


# A tier tells the node at once that its frame cannot run here, instead of leaving it to its deadline.
REJECT_REASONS_WORTH_ANSWERING = ("bundle", "quantization", "shape", "encoding", "budget")


def decode_answer(payload: bytes | memoryview) -> Answer:
    if len(payload) != ANSWER_STRUCT.size:
        raise wire_error("truncated" if len(payload) < ANSWER_STRUCT.size else "oversized",
                         f"answer is {len(payload)} bytes, expected {ANSWER_STRUCT.size}")
    magic, version, kind, tier, reason, label, b_id, b_ver, frame_id, conf, ent = ANSWER_STRUCT.unpack(payload)
    if magic != MAGIC:
        raise wire_error("magic", f"not a tierlite message (magic {magic!r})")
    if version != WIRE_VERSION:
        raise wire_error("version", f"wire version {version}, this node speaks {WIRE_VERSION}")
    if kind not in (Kind.ANSWER, Kind.REJECT) or tier not in TIER_NAMES:
        raise wire_error("kind", f"answer kind {kind} tier {tier} invalid")
    try:
        reason = RejectReason(reason)
    except ValueError:
        reason = RejectReason.OTHER
    return Answer(Kind(kind), TIER_NAMES[tier], frame_id, label, conf, ent, b_id, b_ver, reason)
