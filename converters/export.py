"""Export each segment of a trained multi-exit model as its own full-int8 TFLite model.

* End segment: uint8 pixels in (scale 1, zero point 0: raw frame values), int8 feature + int8
  logits out. Edge: int8 feature in, int8 feature + logits out. Cloud: int8 feature in, logits out.
* Tier boundaries: the consumer's input quantization must equal the producer's output
  quantization, or the int8 values on the wire would be misread. The consumer is calibrated on
  the producer's own dequantized int8 outputs plus one frame carrying the producer's full int8
  range, so the calibrator lands on the same (scale, zero point); `match_boundary` checks it and
  snaps float rounding (< 1e-5 relative) to the producer's exact scale, or refuses.
* Binarized end: `fold_binary_end` rewrites the trained binary layers as plain Conv2D layers with
  +-W constant kernels (the per-channel scale and BatchNorm folded in, so each output channel
  has exactly two weight values) and ReLU6 as an exact step in int8 (see the function's notes).
  The stock converter would otherwise keep sign(kernel) as a runtime op, which no int8 kernel
  accepts (conv.cc: zero_point != 0).
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np

from tierlite.bundle import TensorInfo
from tierlite.converters.models import BINARY_HIGH, ArchConfig, _exit_head, stem_stride
from tierlite.errors import BundleError

log = logging.getLogger("tierlite.converters")
TIER_FILES = {"end": "end.tflite", "edge": "edge.tflite", "cloud": "cloud.tflite"}
# Stem requantization multiplier of the binarized end: >= 255 makes the int8 step exact (any
# accumulator >= 1 saturates) and < 256 keeps the conv eligible for XNNPACK.
_STEM_MULTIPLIER = 255.5
_BINARY_KERNEL = 127.0  # |kernel| of folded binary convs: requantization multiplier exactly 1


@dataclass
class ExportedSegment:
    tier: str
    model: bytes
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------
def to_tflite(keras_model, representative: np.ndarray, uint8_input: bool) -> bytes:
    """Full-integer (int8) conversion of a Keras model, calibrated on `representative`, with its
    batch dimension fixed to 1: under a dynamic batch a Flatten exports as SHAPE/STRIDED_SLICE/PACK,
    which the Edge TPU cannot run; with a static one they fold away (same outputs, bit for bit)."""
    import keras
    import tensorflow as tf

    inputs = [keras.Input(batch_shape=(1,) + tuple(i.shape[1:]), dtype=i.dtype, name=i.name)
              for i in keras_model.inputs]
    static = keras.models.clone_model(keras_model, input_tensors=inputs if len(inputs) > 1 else inputs[0])
    static.set_weights(keras_model.get_weights())
    converter = tf.lite.TFLiteConverter.from_keras_model(static)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([r[None].astype(np.float32)] for r in representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8 if uint8_input else tf.int8
    converter.inference_output_type = tf.int8
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # The converter prints its SavedModel signature and warns that int8 inputs lack
        # statistics (they are calibrated from the representative data instead).
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


def _interpreter(model: bytes):
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=model)
    interp.allocate_tensors()
    return interp


def tensor_infos(model: bytes, num_classes: int) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Manifest entries for a converted model's inputs and outputs (roles by shape)."""
    from tierlite.runtimes.base import detail_from_interpreter

    interp = _interpreter(model)
    ins, outs = [], []
    for d in interp.get_input_details():
        t = detail_from_interpreter(d)
        ins.append(TensorInfo(t.name, t.shape, t.dtype.name, t.scale, t.zero_point))
    for i, d in enumerate(interp.get_output_details()):
        t = detail_from_interpreter(d)
        role = "logits" if len(t.shape) == 2 and t.shape[-1] == num_classes else "feature"
        outs.append(TensorInfo(t.name, t.shape, t.dtype.name, t.scale, t.zero_point, role, i))
    roles = sorted(o.role for o in outs)
    if roles not in (["feature", "logits"], ["logits"]):
        raise BundleError(f"converted segment has unexpected outputs {[(o.name, o.shape) for o in outs]}")
    return ins, outs


def run_tflite(model: bytes, inputs: np.ndarray) -> list[np.ndarray]:
    """Run a batch-1 model over N inputs; one (N, ...) array per output, in output order."""
    interp = _interpreter(model)
    din, dout = interp.get_input_details()[0], interp.get_output_details()
    res: list[list[np.ndarray]] = [[] for _ in dout]
    for x in inputs:
        interp.set_tensor(din["index"], x[None].astype(din["dtype"]))
        interp.invoke()
        for k, d in enumerate(dout):
            res[k].append(interp.get_tensor(d["index"])[0])
    return [np.stack(r) for r in res]


def match_boundary(producer: TensorInfo, consumer_model: bytes, tier: str) -> bytes:
    """Make the consumer's input quantization identical to the producer's feature output."""
    from tensorflow.lite.tools import flatbuffer_utils

    interp = _interpreter(consumer_model)
    d = interp.get_input_details()[0]
    scale, zp = d["quantization"]
    if zp != producer.zero_point or not math.isclose(scale, producer.scale, rel_tol=1e-5):
        raise BundleError(f"{tier} input quantization (scale {scale:g}, zero point {zp}) does not match the "
                          f"producer's feature output (scale {producer.scale:g}, zero point {producer.zero_point})")
    if scale == producer.scale:
        return consumer_model
    # Only float rounding differs: write the producer's exact scale into the consumer.
    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(consumer_model))
    sub = fb.subgraphs[0]
    sub.tensors[sub.inputs[0]].quantization.scale = [float(producer.scale)]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(fb))


def _boundary_representative(q: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Dequantized producer outputs, plus one frame spanning the producer's whole int8 grid so the
    consumer's calibrated range is exactly the producer's."""
    x = (q.astype(np.float32) - info.zero_point) * info.scale
    extreme = x[0].copy().reshape(-1)
    extreme[0] = (-128 - info.zero_point) * info.scale
    extreme[-1] = (127 - info.zero_point) * info.scale
    return np.concatenate([x, extreme.reshape(1, *x.shape[1:])])


def pixel_representative(images: np.ndarray) -> np.ndarray:
    """Training frames plus one frame holding 0 and 255, so the uint8 input scale is exactly 1."""
    ramp = np.zeros_like(images[:1], dtype=np.float32)
    ramp.reshape(-1)[1::2] = 255.0
    return np.concatenate([images.astype(np.float32), ramp])


def export_segments(joint, arch: ArchConfig, representative: np.ndarray) -> dict[str, ExportedSegment]:
    """Convert end, edge and cloud; boundaries checked to match. representative: uint8 frames."""
    from tierlite.converters.models import segments_of

    end, edge, cloud = segments_of(joint)
    end_export = fold_binary_end(end, arch) if arch.binarized else end
    out: dict[str, ExportedSegment] = {}
    end_bytes = to_tflite(end_export, pixel_representative(representative), uint8_input=True)
    ins, outs = tensor_infos(end_bytes, arch.num_classes)
    out["end"] = ExportedSegment("end", end_bytes, ins, outs)
    log.info("exported end segment: %d bytes", len(end_bytes))
    producer = out["end"]
    for tier, model in (("edge", edge), ("cloud", cloud)):
        feat_info = next(o for o in producer.outputs if o.role == "feature")
        q = run_tflite(producer.model, _producer_inputs(producer, representative, out))[feat_info.index]
        rep = _boundary_representative(q, feat_info)
        tfl = match_boundary(feat_info, to_tflite(model, rep, uint8_input=False), tier)
        ins, outs = tensor_infos(tfl, arch.num_classes)
        out[tier] = ExportedSegment(tier, tfl, ins, outs)
        producer = out[tier]
        log.info("exported %s segment: %d bytes", tier, len(tfl))
    return out


def _producer_inputs(producer: ExportedSegment, images: np.ndarray, done: dict) -> np.ndarray:
    """The int8/uint8 inputs the producer segment sees for `images` (chained through earlier tiers)."""
    x = images.astype(np.uint8)
    for tier in ("end", "edge"):
        if tier == producer.tier:
            return x
        seg = done[tier]
        feat = next(o for o in seg.outputs if o.role == "feature")
        x = run_tflite(seg.model, x)[feat.index]
    return x


# ---------------------------------------------------------------------------------------------
# Binarized end: fold to +-W constant kernels and exact int8 steps
# ---------------------------------------------------------------------------------------------
def _bn_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm as y = a*x + c (inference)."""
    gamma, beta, mean, var = (np.asarray(w, dtype=np.float64) for w in bn.get_weights())
    a = gamma / np.sqrt(var + bn.epsilon)
    return a, beta - mean * a


def fold_binary_end(end, arch: ArchConfig):
    """A float Keras model computing the trained binarized end segment with plain layers.

    Binary conv i (input x in {0, 6}, sign kernel s, per-channel scale alpha, BN y = a*v + c):
        step(a * alpha * 6 * S + c), S = sum(s * x/6) an integer
      = step(sigma * S + t) with sigma = sign(a), t a half-integer (same decisions, never 0),
    exported as Conv2D(kernel = sigma*s*127, bias = 6*127*t, ReLU6). In int8 the accumulator is
    32385*(sigma*S + t), |.| >= 16192, with requantization multiplier 1: output saturates to
    exactly {-128, 127}. The stem (real weights on raw pixels, Rescaling folded in) has tiny
    accumulators (27 taps), so a multiplier of 255.5 makes every nonzero accumulator saturate.
    """
    import keras
    L = keras.layers

    def layer(name):
        return end.get_layer(name)

    inp = keras.Input((arch.input_size, arch.input_size, 3), name="pixels")
    # Stem: kernel/255 (Rescaling folded), BN folded, per-channel gain so max|w| = W_stem.
    k = np.asarray(layer("end_stem_conv").get_weights()[0], dtype=np.float64) / 255.0
    a, c = _bn_affine(layer("end_stem_bn"))
    kernel = k * a
    w_stem = _STEM_MULTIPLIER * 127.0 * (BINARY_HIGH / 255.0)  # input scale 1, output scale 6/255
    peak = np.maximum(np.abs(kernel).max(axis=(0, 1, 2)), 1e-12)
    gain = w_stem / peak
    limit = 255.0 * np.abs(kernel).sum(axis=(0, 1, 2)) + peak  # beyond this, bias alone decides
    bias = np.clip(c, -limit, limit) * gain
    x = L.Conv2D(arch.stem, 3, stem_stride(arch), padding="same", activation="relu6",
                 name="end_stem_step")(inp)
    weights = [(x, kernel * gain, bias)]
    for i, (ch, stride) in enumerate(arch.binary_end):
        x = L.Conv2D(int(ch), 3, int(stride), padding="same", activation="relu6", name=f"end_bin{i}")(x)
        weights.append((x, *_fold_binary(layer(f"end_bin{i}_conv"), layer(f"end_bin{i}_bn"))))
    trunk = x
    feature = L.Conv2D(arch.boundary, 1, padding="same", activation="relu6", name="end_binfeature")(trunk)
    weights.append((feature, *_fold_binary(layer("end_binfeat_conv"), layer("end_binfeat_bn"))))
    logits = _exit_head(trunk, arch, "end", grid=arch.end_head_grid)
    model = keras.Model(inp, [feature, logits], name="end_folded")
    for tensor, kern, b in weights:
        model.get_layer(tensor._keras_history.operation.name).set_weights(
            [kern.astype(np.float32), b.astype(np.float32)])
    model.get_layer("end_logits").set_weights(layer("end_logits").get_weights())
    return model


def _fold_binary(conv, bn) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(conv.get_weights()[0], dtype=np.float64)
    s = np.where(w >= 0, 1.0, -1.0)
    alpha = np.abs(w).mean(axis=(0, 1, 2))
    a, c = _bn_affine(bn)
    big_a = a * alpha * BINARY_HIGH            # pre-activation = big_a * S + c
    fan_in = float(np.prod(w.shape[:3]))
    sigma = np.where(big_a < 0, -1.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = -c / big_a                          # threshold on S
        t = np.where(big_a > 0, -(np.floor(v) + 0.5), np.ceil(v) - 0.5)
    # Dead channels (a == 0) or thresholds beyond the reachable |S| <= fan_in: constant output.
    edge = fan_in + 0.5
    t = np.where(np.isfinite(t), np.clip(t, -edge, edge), np.where(c > 0, edge, -edge))
    kernel = s * sigma * _BINARY_KERNEL
    bias = BINARY_HIGH * _BINARY_KERNEL * t
    return kernel, bias


def binary_levels(end: ExportedSegment) -> tuple[int, int]:
    """The two int8 values a binarized end emits for its boundary feature: (low, high)."""
    f = next(o for o in end.outputs if o.role == "feature")
    low = int(np.clip(round(0.0 / f.scale) + f.zero_point, -128, 127))
    high = int(np.clip(round(BINARY_HIGH / f.scale) + f.zero_point, -128, 127))
    return low, high
