"""A trainable Keras checkpoint recovered from a bundle's int8 segments, for a user who has a
shipped bundle but not the checkpoint it was exported from (`tierlite retrain --end-scope
branch|segment|profile` reloads the checkpoint; docs/CONVERTERS.md, "Recovering a checkpoint").

    tierlite recover BUNDLE --images TRAIN_DIR [--workdir W]     (W defaults to <bundle>-work)

What comes back:
* The joint model of the manifest's architecture, every Conv2D/Dense kernel and bias dequantized
  from the segments: int8 weights times their per-channel scale, an int32 bias times its own scale
  (input scale x weight scale). TFLite folded each BatchNorm into the conv before it, so a conv
  holds the folded kernel a*W and the folded bias b = beta - a*mean (a = gamma/sqrt(var + eps)).
  Ops are matched to layers by the layer name the converter wrote into each weight tensor's name,
  then by kernel shape; every weighted op and every Conv2D/Dense layer must be matched exactly once.
* Each BatchNormalization is made the identity plus the folded bias on clean frames, in a form
  whose statistics re-estimate as the original's: its input's per-channel mean m and variance v
  are measured on clean training frames (through the folded net), then moving_mean = m,
  moving_variance = v, gamma = sqrt(v + eps), beta = m + b. Re-estimating the statistics on
  drifted frames (a condition profile) then computes, for the original BatchNorm input u,
      gamma_o * (sigma_clean / sigma_o) * (u - mu_drift) / sigma_drift + beta_o + a * (mu_clean - mu_o)
  against the original net's gamma_o * (u - mu_drift) / sigma_drift + beta_o: the same adaptation up
  to the gap between the clean statistics measured here and the moving statistics the original
  training kept (not recoverable: only their ratio with gamma and beta survives folding).
* The checkpoint metadata: the manifest's architecture, the training recipe of its preset, its
  seed and the training folder, so `checkpoint_splits` regenerates the original train/validation
  split (checked against the manifest's frame counts) and a re-export calibrates on the original
  representative frames; "recovered" names the bundle and its segments' sha256s.

Not recovered: float precision below the int8 grid, the optimizer state and training history.
Refused: binarized ends (their int8 file holds folded +-W step kernels, not the latent weights a
binary layer trains) and families other than resnet (not exercised).
"""
from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.bundle import TIERS, Bundle
from tierlite.errors import BundleError, ConfigError, DataError

log = logging.getLogger("tierlite.converters")
STAT_FRAMES = 5000  # clean training frames each BatchNorm input's statistics are measured on
VERIFY_FRAMES = 2000  # validation frames the recovered float model is compared on with the int8 bundle
MIN_AGREEMENT = 0.9  # below this top-1 agreement with the int8 bundle on any exit, nothing is written
REPORT = "recovery.json"


@dataclass
class WeightedOp:
    """A conv or fully connected op of a segment: float kernel and bias, dequantized."""
    kind: str  # CONV_2D | FULLY_CONNECTED
    weight_name: str
    bias_name: str
    kernel: np.ndarray  # TFLite layout: (out, kh, kw, in) or (out, in)
    bias: np.ndarray


def recover_checkpoint(bundle_dir: str | Path, workdir: str | Path, train_dir: str | Path, *,
                       stat_frames: int = STAT_FRAMES, verify_frames: int = VERIFY_FRAMES,
                       min_agreement: float = MIN_AGREEMENT, batch: int = 250) -> dict[str, Any]:
    """Rebuild the bundle's Keras checkpoint in <workdir>/checkpoint; returns the verification report
    (also written to <workdir>/recovery.json). Raises a one-line BundleError/ConfigError/DataError
    for a bundle it cannot rebuild, a training folder that is not the bundle's, or a workdir that
    already holds a checkpoint."""
    from tierlite.converters.datasets import load_splits
    from tierlite.converters.models import build_joint, segments_of
    from tierlite.converters.train import CHECKPOINT_DIR, save_checkpoint

    t0 = time.monotonic()
    bundle = Bundle.load(bundle_dir)
    arch, tc, preset, seed = _recipe(bundle)
    workdir, train_dir = Path(workdir), Path(train_dir)
    if (workdir / CHECKPOINT_DIR / "model.json").exists():
        raise ConfigError(f"{workdir / CHECKPOINT_DIR} already holds a checkpoint; recovery never overwrites "
                          "one: choose another --workdir")
    if not train_dir.is_dir():
        raise DataError(f"training folder not found: {train_dir}")
    splits = load_splits(train_dir, arch.input_size, tc.val_fraction, seed, tc.limit, workdir / "cache")
    _check_split(bundle, splits, train_dir)

    joint = build_joint(arch)
    segs = segments_of(joint)
    folded: dict[str, np.ndarray] = {}  # BatchNorm name -> the bias folded into the conv before it
    for tier, seg in zip(TIERS, segs):
        folded.update(_copy_segment(bundle, tier, seg))
    rng = np.random.default_rng(seed)
    train = splits.train.images
    sample = train[rng.choice(len(train), min(stat_frames, len(train)), replace=False)]
    _identity_batchnorms(segs, folded, sample, batch)

    report = _verify(bundle, joint, splits, tc, seed, verify_frames)
    worst = min(report["agreement"].values())
    if worst < min_agreement:
        raise BundleError(f"recovered model agrees with the bundle's int8 exits on only "
                          f"{worst * 100:.1f} % of {report['frames']} validation frames (at least "
                          f"{min_agreement * 100:.0f} % needed): not written")
    recovered = {"bundle": str(Path(bundle.root).resolve()), "name": bundle.name, "version": bundle.version,
                 "sha256": {t: bundle.segment(t).sha256 for t in TIERS}, "statistics_frames": int(len(sample)),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save_checkpoint(joint, workdir, arch, tc, list(bundle.labels), [], seed,
                    {"preset": preset, "train_dir": str(train_dir.resolve()), "recovered": recovered})
    report.update(recovered=recovered, checkpoint=str(workdir / CHECKPOINT_DIR),
                  seconds=round(time.monotonic() - t0, 1))
    (workdir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


# -- what to rebuild -------------------------------------------------------------------------------
def _recipe(bundle: Bundle):
    """(ArchConfig, TrainConfig, preset, seed) from the manifest's model and training sections."""
    from tierlite.converters.models import ArchConfig
    from tierlite.converters.presets import PRESETS, resolve

    model, training = bundle.manifest.get("model"), bundle.manifest.get("training")
    where = f"{bundle.root}"
    if not isinstance(model, dict) or not isinstance(model.get("arch"), dict) or not isinstance(training, dict):
        raise BundleError(f"{where}: the manifest has no model/training section (architecture and recipe): "
                          "this bundle cannot be rebuilt")
    if model.get("binarized") or model["arch"].get("binarized") or bundle.encoding.kind == "binary":
        raise BundleError(f"{where}: a binarized end cannot be recovered (its int8 file holds folded step "
                          "kernels, not the latent weights a binary layer trains)")
    try:
        arch = ArchConfig.from_json(model["arch"])
    except (ConfigError, TypeError) as e:
        raise BundleError(f"{where}: the manifest's architecture cannot be rebuilt ({e})") from None
    if arch.family != "resnet":
        raise BundleError(f"{where}: recovery rebuilds the resnet family only; this bundle is {arch.family}")
    if arch.num_classes != len(bundle.labels):
        raise BundleError(f"{where}: the architecture has {arch.num_classes} classes, the bundle "
                          f"{len(bundle.labels)} labels")
    preset = training.get("preset")
    if preset not in PRESETS:
        raise BundleError(f"{where}: trained with preset {preset!r}, whose recipe (validation split, "
                          f"calibration frames) is not known here; recovery needs one of {', '.join(PRESETS)}")
    _, tc = resolve(preset)
    tc.epochs = int(training.get("epochs", tc.epochs))
    return arch, tc, preset, int(training.get("seed", 0))


def _check_split(bundle: Bundle, splits, train_dir: Path) -> None:
    """The folder must give the split the bundle was trained on (same classes and frame counts)."""
    if splits.classes != bundle.labels:
        raise DataError(f"{train_dir}: classes {splits.classes} differ from the bundle's {bundle.labels}")
    training = bundle.manifest["training"]
    want = (training.get("train_frames"), training.get("val_frames"))
    got = (len(splits.train.labels), len(splits.val.labels))
    if None not in want and tuple(want) != got:
        raise DataError(f"{train_dir}: gives {got[0]} training and {got[1]} validation frames, the bundle was "
                        f"trained on {want[0]} and {want[1]}: not the folder it was trained on")


# -- weights ---------------------------------------------------------------------------------------
def _weighted_ops(model: bytes) -> list[WeightedOp]:
    """The CONV_2D and FULLY_CONNECTED ops of an int8 TFLite model, weights dequantized."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    fb = fbu.read_model_from_bytearray(bytearray(model))
    sub = fb.subgraphs[0]
    wanted = {schema.BuiltinOperator.CONV_2D: "CONV_2D", schema.BuiltinOperator.FULLY_CONNECTED: "FULLY_CONNECTED",
              schema.BuiltinOperator.DEPTHWISE_CONV_2D: "DEPTHWISE_CONV_2D"}
    ops = []
    for op in sub.operators:
        code = fb.operatorCodes[op.opcodeIndex]
        kind = wanted.get(max(code.builtinCode, code.deprecatedBuiltinCode))
        if kind is None:
            continue
        if kind == "DEPTHWISE_CONV_2D" or len(op.inputs) < 3 or op.inputs[2] < 0:
            raise BundleError(f"segment has a {kind} op without the int8 conv+bias form recovery reads")
        w_t, b_t = sub.tensors[op.inputs[1]], sub.tensors[op.inputs[2]]
        x_scale = _scales(sub.tensors[op.inputs[0]])
        w_scale, b_scale = _scales(w_t), _scales(b_t)
        kernel = _buffer(fb, w_t, np.int8).astype(np.float64)
        kernel *= w_scale.reshape((-1,) + (1,) * (kernel.ndim - 1))
        bias = _buffer(fb, b_t, np.int32).astype(np.float64) * b_scale
        if not np.allclose(b_scale, x_scale * w_scale, rtol=1e-4):  # int8 conv: bias scale = input x weight
            raise BundleError(f"{w_t.name.decode()}: bias scale is not input scale x weight scale")
        ops.append(WeightedOp(kind, w_t.name.decode(), b_t.name.decode(), kernel, bias))
    return ops


def _scales(tensor) -> np.ndarray:
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        raise BundleError(f"{tensor.name.decode()}: not quantized (recovery reads int8 segments)")
    if q.zeroPoint is not None and len(q.scale) > 1 and np.any(np.asarray(q.zeroPoint) != 0):
        raise BundleError(f"{tensor.name.decode()}: per-channel weights with a zero point")
    return np.asarray(q.scale, np.float64)


def _buffer(fb, tensor, dtype) -> np.ndarray:
    data = fb.buffers[tensor.buffer].data
    if data is None or len(data) == 0:
        raise BundleError(f"{tensor.name.decode()}: no constant data in the file")
    return np.frombuffer(np.asarray(data, np.uint8).tobytes(), dtype).reshape(tuple(tensor.shape))


def _copy_segment(bundle: Bundle, tier: str, seg) -> dict[str, np.ndarray]:
    """Dequantized kernels into the segment's Conv2D/Dense layers; returns {BatchNorm name: folded bias}."""
    import keras
    L = keras.layers

    ops = _weighted_ops(bundle.segment_path(tier).read_bytes())
    layers = {l.name: l for l in seg.layers if isinstance(l, (L.Conv2D, L.Dense))}
    other = [l.name for l in seg.layers if l.weights and not isinstance(l, (L.Conv2D, L.Dense, L.BatchNormalization))]
    if other or any(type(l) is not L.Conv2D and isinstance(l, L.Conv2D) for l in layers.values()):
        raise BundleError(f"{tier}: layers recovery cannot fill: {other or sorted(layers)}")
    bn_after = {bn.input._keras_history.operation.name: bn for bn in seg.layers
                if isinstance(bn, L.BatchNormalization)}
    folded: dict[str, np.ndarray] = {}
    done: set[str] = set()
    for op in ops:
        layer = _layer_of(op, layers, tier)
        if layer.name in done:
            raise BundleError(f"{tier}: two ops carry the weights of layer {layer.name}")
        done.add(layer.name)
        kernel = op.kernel.T if op.kind == "FULLY_CONNECTED" else op.kernel.transpose(1, 2, 3, 0)
        if tuple(kernel.shape) != tuple(layer.kernel.shape):
            raise BundleError(f"{tier}: {op.weight_name} has shape {op.kernel.shape}, layer {layer.name} "
                              f"needs {tuple(layer.kernel.shape)}: the manifest's architecture is not this file's")
        source = layer.input._keras_history.operation
        if isinstance(source, L.Rescaling):  # the converter folded the end's x/255 into the stem kernel
            if np.any(np.asarray(source.offset) != 0):
                raise BundleError(f"{tier}: a rescaling with an offset before {layer.name}")
            kernel = kernel / float(source.scale)
        bn = bn_after.get(layer.name)
        if bn is not None:
            if f"/{bn.name}" not in op.bias_name:
                log.warning("recover: %s: bias tensor %r does not name BatchNorm %s", tier, op.bias_name, bn.name)
            layer.set_weights([kernel.astype(np.float32)])
            folded[bn.name] = op.bias
        elif layer.use_bias:
            layer.set_weights([kernel.astype(np.float32), op.bias.astype(np.float32)])
        else:
            raise BundleError(f"{tier}: layer {layer.name} has neither a bias nor a BatchNorm for the op's bias")
    missing = sorted(set(layers) - done)
    if missing:
        raise BundleError(f"{tier}: no op in {bundle.segment(tier).file} carries the weights of {', '.join(missing)}")
    return folded


def _layer_of(op: WeightedOp, layers: dict[str, Any], tier: str):
    """The one layer named in the op's weight tensor name (else its bias tensor name): the converter
    writes '<segment>_1/<layer>_1/...' paths, ';'-joined when ops were fused."""
    for name in (op.weight_name, op.bias_name):
        hits = [l for n, l in layers.items() if re.search(rf"(?:^|[;/]){re.escape(n)}(?:_\d+)?/", name)]
        if len(hits) == 1:
            return hits[0]
    raise BundleError(f"{tier}: cannot tell which layer op {op.kind} {op.weight_name!r} belongs to")


# -- BatchNorm statistics --------------------------------------------------------------------------
def _identity_batchnorms(segs, folded: dict[str, np.ndarray], frames: np.ndarray, batch: int) -> None:
    """Each BatchNorm -> x + folded bias, with the clean statistics of its input as moving statistics
    (module docstring). With gamma = sqrt(v + eps) and beta = m + b the output is x + b whatever m and
    v are, so one pass with placeholders (m = 0, v = 1) measures every BatchNorm's input at once."""
    import keras

    norms = [[l for l in seg.layers if isinstance(l, keras.layers.BatchNormalization)] for seg in segs]
    for bn in (b for group in norms for b in group):
        bias = folded.get(bn.name)
        if bias is None:
            raise BundleError(f"BatchNorm {bn.name} follows no conv whose weights were recovered")
        ones = np.ones_like(bias)
        bn.set_weights([np.full_like(bias, math.sqrt(1.0 + bn.epsilon)), bias, np.zeros_like(bias), ones])
    probes = [keras.Model(seg.inputs[0], [bn.input for bn in group] + [seg.outputs[0]])
              for seg, group in zip(segs, norms)]
    sums = {bn.name: [0.0, 0.0, 0] for group in norms for bn in group}
    for i in range(0, len(frames), batch):
        x = frames[i:i + batch].astype(np.float32)
        for probe, group in zip(probes, norms):
            outs = probe(x, training=False)
            for bn, u in zip(group, outs[:len(group)]):
                u = np.asarray(u, np.float64).reshape(-1, u.shape[-1])
                s = sums[bn.name]
                s[0], s[1], s[2] = s[0] + u.sum(0), s[1] + (u * u).sum(0), s[2] + len(u)
            x = np.asarray(outs[-1])
    for bn in (b for group in norms for b in group):
        s1, s2, n = sums[bn.name]
        m = s1 / n
        v = np.maximum(s2 / n - m * m, 0.0)  # population variance, as BatchNorm's training mode
        bn.set_weights([np.sqrt(v + bn.epsilon), m + folded[bn.name], m, v])
    log.info("recover: statistics of %d clean frames in %d BatchNorm layers", len(frames), len(sums))


# -- verification ----------------------------------------------------------------------------------
def _verify(bundle: Bundle, joint, splits, tc, seed: int, frames: int) -> dict[str, Any]:
    """The recovered float model against the int8 bundle on validation frames (top-1 agreement and
    accuracy per exit), and its end re-exported to int8 on the original representative frames
    against the bundle's end (the retraining job's re-export path)."""
    from tierlite.converters.datasets import representative_frames
    from tierlite.converters.export import pixel_representative, run_tflite, tensor_infos, to_tflite
    from tierlite.converters.models import segments_of
    from tierlite.converters.pipeline import run_chain
    from tierlite.converters.train import predict_logits

    rng = np.random.default_rng(seed)
    val = splits.val
    idx = np.sort(rng.choice(len(val.labels), min(frames, len(val.labels)), replace=False))
    x, y = val.images[idx], val.labels[idx]
    f_logits = predict_logits(joint, x)
    q_logits = run_chain(bundle.root, x, end_tta=None, encoding=None)
    report: dict[str, Any] = {
        "frames": int(len(y)), "split": "validation",
        "agreement": {t: float((f.argmax(1) == q.argmax(1)).mean()) for t, f, q in zip(TIERS, f_logits, q_logits)},
        "float_accuracy": {t: float((f.argmax(1) == y).mean()) for t, f in zip(TIERS, f_logits)},
        "int8_accuracy": {t: float((q.argmax(1) == y).mean()) for t, q in zip(TIERS, q_logits)},
    }
    end = segments_of(joint)[0]
    rep = representative_frames(splits.train.images, tc.calibration_frames, seed)
    new = to_tflite(end, pixel_representative(rep), uint8_input=True)
    _, new_outs = tensor_infos(new, len(bundle.labels))
    old_seg = bundle.segment("end")
    old = run_tflite(bundle.segment_path("end").read_bytes(), x)
    got = run_tflite(new, x)
    re_export: dict[str, Any] = {"representative_frames": int(len(rep))}
    for o in new_outs:
        want = old_seg.output(o.role)
        a = old[want.index].astype(np.float64)
        # onto the parent's grid, as the retraining job pins it (a requantization)
        b = np.clip(np.round((got[o.index].astype(np.float64) - o.zero_point) * o.scale / want.scale)
                    + want.zero_point, -128, 127)
        entry = {"scale": o.scale, "parent_scale": want.scale, "zero_point": o.zero_point,
                 "parent_zero_point": want.zero_point, "within_one_step": float((np.abs(a - b) <= 1).mean()),
                 "identical": float((a == b).mean())}
        if o.role == "logits":
            entry["top1_agreement"] = float((a.reshape(len(x), -1).argmax(1) == b.reshape(len(x), -1).argmax(1)).mean())
        re_export[o.role] = entry
    report["re_export_end"] = re_export
    return report
