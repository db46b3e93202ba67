"""Retraining the end segment itself from opted-in frames (TensorFlow, from the parent's Keras
checkpoint): the branch past the boundary, the whole segment under a boundary hint, or a condition
profile; each re-exported to int8 with the parent's boundary and logits quantization."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.bundle import Bundle
from tierlite.cloud.retrain.data import workdir
from tierlite.cloud.retrain.options import RetrainOptions
from tierlite.errors import BundleError, ConfigError, DataError
from tierlite.policy import softmax

log = logging.getLogger("tierlite.cloud.retrain")  # one logger for the whole job
PROFILE_FRAMES = 2000  # uploaded frames a profile's statistics are estimated on (one batch)


def retrain_end_segment(parent: Bundle, opts: RetrainOptions, frames: np.ndarray, teacher: np.ndarray,
                        replay_x: np.ndarray, replay_y: np.ndarray,
                        branch_only: bool = False) -> tuple[bytes, dict[str, Any]]:
    """Opted-in frames: retrain the end segment from the parent's Keras checkpoint with the same
    distillation loss as the heads, then export it to int8 with the parent's exact boundary and
    logits quantization. Needs TensorFlow.

    branch_only: only the layers that feed the camera's exit alone are trained (with an early cut,
    `boundary_after`, the end blocks past the tap and the head); the layers that make the boundary
    feature are frozen, so the edge, the cloud and nodes on the parent version read the same
    feature. Otherwise the whole segment trains under a FitNets-style hint, MSE between the new and
    the parent's boundary feature, which keeps it close."""
    import keras
    import tensorflow as tf

    from tierlite.converters import load_checkpoint, pixel_representative, segments_of, to_tflite

    joint, meta = load_checkpoint(opts.checkpoint or workdir(parent, opts))
    end = segments_of(joint)[0]
    if branch_only:
        shared = {layer.name for layer in keras.Model(end.inputs, end.outputs[0]).layers}
        for layer in end.layers:
            layer.trainable = layer.name not in shared
        if not end.trainable_variables:
            raise ConfigError("the end segment has no layers of its own past the boundary to retrain")
    f_parent = [np.asarray(end.predict(x.astype(np.float32), batch_size=256, verbose=0)[0]) for x in (frames, replay_x)]
    T, n = opts.temperature, len(frames)
    pt = tf.constant(softmax(teacher / T), tf.float32)
    hard_y = tf.constant(teacher.argmax(1), tf.int32)
    opt = tf.keras.optimizers.Adam(1e-3)
    rng = np.random.default_rng(opts.seed)
    batch = 64

    @tf.function
    def step(x, t, y, f0, rxb, ryb, rf0):
        with tf.GradientTape() as tape:
            f, s = end(x, training=False)  # BatchNorm statistics stay the parent's
            rf, rs = end(rxb, training=False)
            kd = T * T * tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(t, s / T))
            ce_hard = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, s))
            ce_replay = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(ryb, rs))
            hint = tf.reduce_mean(tf.square(f - f0)) + tf.reduce_mean(tf.square(rf - rf0))
            loss = kd + opts.hard_weight * ce_hard + ce_replay + opts.hint_weight * hint
        grads = tape.gradient(loss, end.trainable_variables)
        opt.apply_gradients(zip(grads, end.trainable_variables))
        return loss, hint

    trained = [layer.name for layer in end.layers if layer.trainable_weights]
    log.info("retrain: end %s on %d frames + %d replay, %d epochs (TensorFlow): %s", "branch" if branch_only else "segment",
             n, len(replay_x), opts.end_epochs, ", ".join(trained))
    for epoch in range(opts.end_epochs):
        order = rng.permutation(n)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            r = rng.integers(0, len(replay_x), len(idx))
            loss, hint = step(frames[idx].astype(np.float32), tf.gather(pt, idx), tf.gather(hard_y, idx),
                              f_parent[0][idx], replay_x[r].astype(np.float32), replay_y[r].astype(np.int32),
                              f_parent[1][r])
        log.info("retrain: end segment epoch %d/%d: loss %.3f, boundary hint %.4f", epoch + 1, opts.end_epochs,
                 float(loss), float(hint))
    rep = _parent_representative(meta, workdir(parent, opts)) if branch_only else None
    if rep is None:  # the boundary moves anyway (segment scope) or the parent's frames are not at hand
        rep = np.concatenate([replay_x[: max(1, min(500, len(replay_x)))], frames[:200]])
    model = to_tflite(end, pixel_representative(rep), uint8_input=True)
    model = _pin_quantization(model, parent, len(parent.labels))
    return model, {"retrained": "end branch past the boundary" if branch_only else "whole end segment",
                   "layers": trained, "frames": int(n), "replay_frames": int(len(replay_x)),
                   "epochs": opts.end_epochs, "hint_weight": opts.hint_weight, "final_hint_mse": float(hint)}


def build_end_profile(parent: Bundle, opts: RetrainOptions, frames: np.ndarray,
                      replay_x: np.ndarray) -> tuple[bytes, Any, dict[str, Any]]:
    """A condition profile (tierlite.conditions) from the opted-in nodes' uploaded frames: the parent's
    end segment with every BatchNorm's statistics re-estimated on those frames (no labels, no
    teacher), exported to int8 with the parent's exact boundary and logits quantization, and the
    selector that tells such frames from the training set's (the replay frames). Needs TensorFlow."""
    import keras

    from tierlite.converters import load_checkpoint, pixel_representative, segments_of, to_tflite
    from tierlite.conditions import Selector

    joint, _ = load_checkpoint(opts.checkpoint or workdir(parent, opts))
    end = segments_of(joint)[0]
    rng = np.random.default_rng(opts.seed)
    sample = frames[rng.permutation(len(frames))[:PROFILE_FRAMES]].astype(np.float32)
    norms = [layer for layer in end._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in norms:
        bn.momentum = 0.0  # the moving statistics become those of the one batch below
    end(sample, training=True)
    model = to_tflite(end, pixel_representative(sample[:500]), uint8_input=True)
    model = _pin_quantization(model, parent, len(parent.labels))
    selector = Selector.fit(frames, replay_x)
    hit = float(selector.picks(frames).mean()) if len(frames) else 0.0
    false = float(selector.picks(replay_x).mean()) if len(replay_x) else 0.0
    log.info("retrain: end profile: statistics of %d uploaded frames in %d BatchNorm layers; selector picks "
             "%.1f %% of them and %.1f %% of the replay frames", len(sample), len(norms), hit * 100, false * 100)
    return model, selector, {"retrained": "condition profile: end statistics of the uploaded frames",
                             "frames": int(len(sample)), "batchnorm_layers": len(norms),
                             "selector_picks_uploaded": hit, "selector_picks_replay": false}


def _parent_representative(meta: dict, work: Path) -> np.ndarray | None:
    """The frames the parent's int8 export was calibrated on: calibrating the re-export on the
    same frames gives the frozen layers the same quantization, hence a bit-identical boundary."""
    from tierlite.converters import checkpoint_splits, representative_frames

    try:
        splits = checkpoint_splits(meta, work)
    except DataError as e:
        log.warning("retrain: %s; calibrating the re-export on replay frames (boundary close, not identical)", e)
        return None
    return representative_frames(splits.train.images, meta["train"]["calibration_frames"], meta["seed"])


def _pin_quantization(model: bytes, parent: Bundle, num_classes: int) -> bytes:
    """Give a re-exported end segment's outputs the parent's exact (scale, zero point): every other
    tier reads the boundary feature and carried logits with those. An output's quantization is
    read when the interpreter prepares the op producing it, so this is a requantization, not a
    relabelling. Values outside the parent's range saturate."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    from tierlite.converters import tensor_infos

    _, outs = tensor_infos(model, num_classes)
    fb = fbu.read_model_from_bytearray(bytearray(model))
    sub = fb.subgraphs[0]
    for o in outs:
        want = parent.segment("end").output(o.role)
        q = sub.tensors[sub.outputs[o.index]].quantization
        q.scale, q.zeroPoint = [float(want.scale)], [int(want.zero_point)]
    pinned = bytes(fbu.convert_object_to_bytearray(fb))
    _, outs = tensor_infos(pinned, num_classes)
    for o in outs:
        want = parent.segment("end").output(o.role)
        if (o.shape, o.dtype, o.zero_point) != (want.shape, want.dtype, want.zero_point) or not np.isclose(o.scale, want.scale):
            raise BundleError(f"re-exported end segment's {o.role} output {o} cannot match the parent's {want}")
    if [o.index for o in sorted(outs, key=lambda o: o.role)] != [parent.segment("end").output(r).index for r in ("feature", "logits")]:
        raise BundleError("re-exported end segment orders its outputs differently from the parent")
    return pinned
