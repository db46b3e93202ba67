"""Local training for co-training (federated) sites: the converters' joint multi-exit model trained
on one site's frames for a few epochs from the federation's weights, optionally with FedProx's
proximal term. Weights travel as a named mapping (tierlite.federated), never frames.

Public through `tierlite.converters` (build_federated_model, model_weights, set_model_weights,
local_train, predict_logits): the site (edge) and the aggregator (cloud) both use them.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np

from tierlite.converters.models import ArchConfig, _all_layers, build_joint
from tierlite.converters.presets import TrainConfig, resolve
from tierlite.errors import ConfigError
from tierlite.federated import check_arrays

log = logging.getLogger("tierlite.converters")


def build_federated_model(preset: str = "small", num_classes: int = 10, seed: int = 0, **overrides):
    """(joint keras model, ArchConfig, TrainConfig) for a federation: preset + overrides, seeded."""
    import keras

    arch, tc = resolve(preset, **overrides)
    arch.num_classes = int(num_classes)
    keras.utils.set_random_seed(seed)
    return build_joint(arch), arch, tc


def _variables(model):
    for layer in _all_layers(model):
        for v in layer.weights:
            yield f"{layer.name}/{v.name}", v


def model_weights(model) -> dict[str, np.ndarray]:
    """Every weight of the joint model (BatchNorm statistics included) as name -> float32 array."""
    return {name: np.asarray(v.numpy(), dtype=np.float32) for name, v in _variables(model)}


def set_model_weights(model, weights: Mapping[str, np.ndarray], who: str = "site", partial: bool = False) -> None:
    """Load named weights; ModelMismatch (one line) when names or shapes differ from the model's.

    partial: load only the names given (e.g. the shared body), which must all exist in the model."""
    variables = dict(_variables(model))
    # expected: what arrived (the federation's); got: this model (shape-only views, no copies)
    mine = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in variables.items()}
    theirs = {k: tuple(np.shape(w)) for k, w in weights.items()}
    check_arrays(theirs, {k: a for k, a in mine.items() if k in theirs} if partial else mine, who)
    for k, v in variables.items():
        if k in weights:
            v.assign(np.asarray(weights[k], dtype=np.float32))


def federation_lr(peak: float, warmup: float, server_round: int, rounds: int, step: int, steps: int) -> float:
    """The converters' one-cycle schedule (linear warm-up, cosine decay) laid over the whole
    federation: local step `step` of `steps` in round `server_round` of `rounds` sits at
    ((round - 1) * steps + step) / (rounds * steps) of the run, so every site follows one
    schedule whatever its frame count, and the rate does not restart at its peak each round."""
    from tierlite.converters.train import _one_cycle

    return float(_one_cycle(peak, max(1, rounds * steps), warmup)((server_round - 1) * steps + step))


def local_train(model, images: np.ndarray, labels: np.ndarray, tc: TrainConfig, epochs: int = 1,
                lr: float | None = None, proximal_mu: float = 0.0, seed: int = 0,
                schedule: tuple[int, int] | None = None, weight_decay: float | None = None,
                steps: int | None = None) -> dict:
    """Train `model` in place on one site's frames (uint8 NHWC) for `epochs`.

    Loss as in converters.train (weighted CE with label smoothing + self-distillation of the early
    exits) plus, when proximal_mu > 0, FedProx's mu/2 ||w - w_start||^2 over the trainable weights
    (w_start: the weights the round began with, i.e. the federation's). SGD-nesterov with the
    converters' decoupled weight decay (tc.weight_decay unless given; none on BatchNorm/bias);
    momentum starts at zero every round (optimizer state does not travel).
    schedule: (server_round, rounds) -> `federation_lr` with peak `lr` (one schedule across the
    rounds, as centralised training has across its epochs); None -> constant `lr`.
    steps: exactly this many local steps instead of `epochs` epochs (more rounds of fewer steps at
    the same compute: less drift between averages); each epoch's order is a fresh permutation.
    Returns {"loss", "train_acc": [end, edge, cloud], "seconds", "steps", "examples", "lr": [first, last]}.
    """
    import keras
    import tensorflow as tf

    from tierlite.converters.train import _augment, multi_exit_loss

    if epochs < 1:
        raise ConfigError(f"local epochs must be >= 1, got {epochs}")
    if steps is not None and steps < 1:
        raise ConfigError(f"local steps must be >= 1, got {steps}")
    n = len(labels)
    if n == 0:
        raise ConfigError("a site with no training frames cannot train")
    batch = min(tc.batch_size, n)
    peak = float(lr if lr is not None else tc.lr)
    steps_per_epoch = max(1, n // batch)
    local_steps = int(steps) if steps else steps_per_epoch * epochs
    decay = float(tc.weight_decay if weight_decay is None else weight_decay)
    opt = keras.optimizers.SGD(peak, momentum=0.9, nesterov=True, weight_decay=decay or None)
    if decay:
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    trainable = model.trainable_variables
    opt.build(trainable)
    anchor = [tf.constant(v.numpy()) for v in trainable]
    weights = [float(w) for w in tc.loss_weights]
    smooth, temp, distill = tc.label_smoothing, tc.temperature, tc.distill
    num_classes = int(model.outputs[0].shape[-1])
    seed_gen = tf.random.Generator.from_seed(seed)
    mu = float(proximal_mu)

    @tf.function
    def step(x, y):
        x = _augment(tf.cast(x, tf.float32), tc.pad, tc.flip, seed_gen, tc.cutout)
        with tf.GradientTape() as tape:
            outs = [tf.cast(o, tf.float32) for o in model(x, training=True)]
            loss = multi_exit_loss(outs, y, num_classes, weights, smooth, distill, temp)
            if mu > 0.0:
                loss += 0.5 * mu * tf.add_n([tf.reduce_sum(tf.square(v - a)) for v, a in zip(trainable, anchor)])
        grads = tape.gradient(loss, trainable)
        opt.apply_gradients(zip(grads, trainable))
        correct = [tf.reduce_sum(tf.cast(tf.argmax(o, 1, output_type=tf.int32) == y, tf.float32)) for o in outs]
        return loss, tf.stack(correct)

    rng = np.random.default_rng(seed)
    t0 = time.monotonic()
    loss_sum, correct_sum, seen = 0.0, np.zeros(3), 0
    rates = []
    for done in range(local_steps):
        s = done % steps_per_epoch
        if s == 0:  # a fresh permutation each epoch (the remainder of an epoch is dropped)
            order = rng.permutation(n)
        if schedule is not None:
            opt.learning_rate = federation_lr(peak, tc.warmup, schedule[0], schedule[1], done, local_steps)
            rates.append(float(opt.learning_rate))
        idx = order[s * batch:(s + 1) * batch]
        loss, correct = step(images[idx], labels[idx].astype(np.int32))
        if not np.isfinite(float(loss)):
            raise ConfigError(f"local training diverged (loss {float(loss)}); lower the learning rate")
        loss_sum += float(loss) * len(idx)
        correct_sum += correct.numpy()
        seen += len(idx)
    return {"loss": loss_sum / max(seen, 1), "train_acc": [float(c / max(seen, 1)) for c in correct_sum],
            "seconds": round(time.monotonic() - t0, 2), "steps": local_steps, "examples": int(n),
            "lr": [rates[0], rates[-1]] if rates else [peak, peak]}


def recompute_batchnorm(model, images: np.ndarray) -> None:
    """Replace every BatchNorm layer's moving statistics with those of `images` (uint8 NHWC, e.g.
    the cloud's held-out frames) under the model's current weights: one forward pass in training
    mode with momentum 0, so each layer sees the statistics of the layers before it already
    recomputed. Why: an average of the sites' statistics is not the statistics of the averaged
    weights (and with FedBN the sites' statistics never leave them)."""
    import keras
    import tensorflow as tf

    from tierlite.converters.models import _all_layers

    if len(images) == 0:
        raise ConfigError("recomputing BatchNorm statistics needs at least one frame")
    layers = [l for l in _all_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    saved = [l.momentum for l in layers]
    try:
        for l in layers:
            l.momentum = 0.0
        model(tf.cast(images, tf.float32), training=True)
    finally:
        for l, m in zip(layers, saved):
            l.momentum = m


def exit_accuracy(model, images: np.ndarray, labels: np.ndarray) -> list[float]:
    """Float top-1 of every exit [end, edge, cloud] on labelled frames."""
    from tierlite.converters.train import predict_logits

    if len(labels) == 0:
        return [0.0, 0.0, 0.0]
    return [float((l.argmax(1) == labels).mean()) for l in predict_logits(model, images)]


__all__ = ["ArchConfig", "build_federated_model", "exit_accuracy", "federation_lr", "local_train", "model_weights",
           "recompute_batchnorm", "set_model_weights"]
