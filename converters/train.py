"""Joint training of the three exits, and the checkpoint format the cloud retraining job reloads.

Loss = sum_i w_i * CE(exit_i, label; label smoothing)
     + distill * sum_{i<cloud} T^2 * KL(softmax(cloud/T) || softmax(exit_i/T))   (self-distillation)
SGD-nesterov (or AdamW) with a one-cycle schedule (linear warm-up, cosine decay), pad-crop + flip
augmentation done on the batch inside the compiled step, a progress line every few seconds, and a
checkpoint after every epoch:

    <workdir>/checkpoint/model.keras   the joint Keras model (end, edge, cloud sub-models)
    <workdir>/checkpoint/model.json    arch config, train config, classes, history (load_checkpoint)
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.converters.distribute import make_strategy, native_bf16, replica_slices, worker_dir
from tierlite.converters.models import ArchConfig, _all_layers, _custom_layers, build_joint
from tierlite.converters.presets import TrainConfig
from tierlite.errors import BundleError, ConfigError

log = logging.getLogger("tierlite.converters")
CHECKPOINT_DIR = "checkpoint"


def _one_cycle(peak: float, total: int, warmup: float):
    import keras
    from keras import ops

    @keras.saving.register_keras_serializable(package="tierlite")
    class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, peak, total, warmup):
            self.peak, self.total, self.warmup = float(peak), int(total), float(warmup)

        def __call__(self, step):
            step = ops.cast(step, "float32")
            w = max(1.0, self.warmup * self.total)
            up = self.peak * (0.1 + 0.9 * step / w)
            t = ops.clip((step - w) / max(1.0, self.total - w), 0.0, 1.0)
            down = self.peak * 0.5 * (1.0 + ops.cos(math.pi * t))
            return ops.where(step < w, up, down)

        def get_config(self):
            return {"peak": self.peak, "total": self.total, "warmup": self.warmup}

    return OneCycle(peak, total, warmup)


def _augment(x, pad: int, flip: bool, seed_gen, cutout: int = 0):
    """Random pad-crop (reflect padding), horizontal flip and cutout of a (B,H,W,C) float batch."""
    import tensorflow as tf
    b, h, w = tf.shape(x)[0], x.shape[1], x.shape[2]
    if pad:
        x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        oy = seed_gen.uniform([b], 0, 2 * pad + 1, dtype=tf.int32)
        ox = seed_gen.uniform([b], 0, 2 * pad + 1, dtype=tf.int32)
        rows = oy[:, None] + tf.range(h)[None]
        cols = ox[:, None] + tf.range(w)[None]
        x = tf.gather(x, rows, axis=1, batch_dims=1)
        x = tf.gather(x, cols, axis=2, batch_dims=1)
    if flip:
        mask = seed_gen.uniform([b], 0, 2, dtype=tf.int32) > 0
        x = tf.where(mask[:, None, None, None], tf.reverse(x, axis=[2]), x)
    if cutout:
        # One mid-grey square per frame, centre anywhere (DeVries & Taylor 2017): fights the
        # overfitting of the wide cloud segment without touching the labels.
        top = seed_gen.uniform([b], 0, h, dtype=tf.int32)[:, None] - cutout // 2
        left = seed_gen.uniform([b], 0, w, dtype=tf.int32)[:, None] - cutout // 2
        inside_y = (tf.range(h)[None] >= top) & (tf.range(h)[None] < top + cutout)
        inside_x = (tf.range(w)[None] >= left) & (tf.range(w)[None] < left + cutout)
        hole = tf.logical_and(inside_y[:, :, None], inside_x[:, None, :])[..., None]
        x = tf.where(hole, tf.constant(128.0, x.dtype), x)
    return x


def multi_exit_loss(outs, y, num_classes: int, weights, smooth: float, distill: float, temp: float):
    """sum_i w_i CE(exit_i, smoothed label) + distill T^2 sum_{i<cloud} KL(cloud/T || exit_i/T)."""
    import tensorflow as tf
    target = tf.one_hot(y, num_classes) * (1.0 - smooth) + smooth / num_classes
    ces = [tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(target, o)) for o in outs]
    loss = tf.add_n([w * c for w, c in zip(weights, ces)])
    if distill:
        teacher = tf.stop_gradient(tf.nn.softmax(outs[-1] / temp))
        kd = [tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(teacher, o / temp))
              - tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(teacher, tf.math.log(teacher + 1e-8)))
              for o in outs[:-1]]
        loss += distill * temp * temp * tf.add_n(kd)
    return loss


def predict_logits(model, images: np.ndarray, batch: int = 500) -> list[np.ndarray]:
    """Float logits of every exit: [end (N,C), edge (N,C), cloud (N,C)]."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def fwd(x):
        return model(tf.cast(x, tf.float32), training=False)

    outs: list[list[np.ndarray]] = [[], [], []]
    for i in range(0, len(images), batch):
        for k, o in enumerate(fwd(images[i:i + batch])):
            outs[k].append(np.asarray(o, dtype=np.float32))
    return [np.concatenate(o) for o in outs]


def train(arch: ArchConfig, tc: TrainConfig, train_images: np.ndarray, train_labels: np.ndarray,
          val_images: np.ndarray, val_labels: np.ndarray, classes: list[str], workdir: str | Path,
          seed: int = 0, init_from: Any = None, extra: dict | None = None, resume: bool = False):
    """Train the joint model; returns it. Saves a checkpoint after every epoch.

    init_from: a joint model whose weights seed the layers with matching names and shapes
    (e.g. the int8 model when training a binarized end: edge and cloud start trained).
    resume: continue from <workdir>/checkpoint (weights, optimizer state, epoch) when it holds an
    unfinished run of the same configuration; a finished one is returned as it is.
    """
    import keras
    import tensorflow as tf

    strategy = make_strategy()  # first: multi-worker training must start before other TF ops
    replicas = strategy.num_replicas_in_sync
    workdir = worker_dir(Path(workdir))
    keras.utils.set_random_seed(seed)
    bf16 = tc.mixed_precision and native_bf16()
    if tc.mixed_precision and not bf16:
        log.info("mixed_precision: this machine has no native bfloat16 (GPU, AVX512-BF16, AMX or Arm BF16): "
                 "training in float32")
    with strategy.scope():
        if bf16:
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            model = build_joint(arch)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        if init_from is not None:
            _copy_matching_weights(init_from, model)
        for name in tc.freeze:  # frozen segments also keep their BatchNorm statistics
            model.get_layer(name).trainable = False

        n = len(train_labels)
        steps_per_epoch = max(1, n // tc.batch_size)
        total = steps_per_epoch * tc.epochs
        lr = _one_cycle(tc.lr, total, tc.warmup)
        if tc.optimizer == "sgd":
            opt = keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, weight_decay=tc.weight_decay)
        else:
            opt = keras.optimizers.AdamW(lr, weight_decay=tc.weight_decay)
        # No decay on BN/bias, nor on binary layers' latent weights (only their sign matters).
        BinaryConv2D, _ = _custom_layers()
        binary_kernels = [l.kernel for l in _all_layers(model) if isinstance(l, BinaryConv2D)]
        opt.exclude_from_weight_decay(var_list=binary_kernels, var_names=["gamma", "beta", "bias"])
        opt.build(model.trainable_variables)
        seed_gen = tf.random.Generator.from_seed(seed)
    history: list[dict[str, Any]] = _resume_state(workdir, arch, tc, model, opt, seed_gen) if resume else []
    if len(history) >= tc.epochs:
        log.info("checkpoint in %s already holds all %d epochs: nothing to train", workdir, tc.epochs)
        return model
    weights = [float(w) for w in tc.loss_weights]
    smooth, temp, distill = tc.label_smoothing, tc.temperature, tc.distill
    num_classes = arch.num_classes
    has_binary = arch.binarized

    def replica_step(x, y):
        x = _augment(tf.cast(x, tf.float32), tc.pad, tc.flip, seed_gen, tc.cutout)
        with tf.GradientTape() as tape:
            outs = [tf.cast(o, tf.float32) for o in model(x, training=True)]
            loss = multi_exit_loss(outs, y, num_classes, weights, smooth, distill, temp)
            # Replica gradients are summed across replicas: scale so the sum is the global-batch mean.
            replica_loss = loss / replicas
        grads = tape.gradient(replica_loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        correct = [tf.reduce_sum(tf.cast(tf.argmax(o, 1, output_type=tf.int32) == y, tf.float32)) for o in outs]
        return loss, tf.stack(correct)

    @tf.function(jit_compile=False)
    def step(x, y):
        loss, correct = strategy.run(replica_step, args=(x, y))
        for k in binary_kernels:  # BinaryConnect: latent weights stay in [-1, 1]
            k.assign(tf.clip_by_value(k, -1.0, 1.0))
        return (strategy.reduce(tf.distribute.ReduceOp.MEAN, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None))

    rng = np.random.default_rng(seed)
    for _ in history:  # a resumed run sees the same epoch orders as an uninterrupted one
        rng.permutation(n)
    log.info("training %s (%s%s): %d train / %d val images, %d epochs x %d steps, batch %d on %d replica(s) (%s)",
             model.name, arch.family, ", binarized end" if has_binary else "", n, len(val_labels),
             tc.epochs, steps_per_epoch, tc.batch_size, replicas, type(strategy).__name__)
    t_start = time.monotonic()
    for epoch in range(len(history) + 1, tc.epochs + 1):
        order = rng.permutation(n)
        t_epoch, t_log = time.monotonic(), time.monotonic()
        loss_sum, correct_sum, seen = 0.0, np.zeros(3), 0
        for s in range(steps_per_epoch):
            idx = order[s * tc.batch_size:(s + 1) * tc.batch_size]
            loss, correct = step(*replica_slices(strategy, train_images[idx], train_labels[idx].astype(np.int32),
                                                 tc.batch_size))
            if not np.isfinite(float(loss)):
                raise ConfigError(f"training diverged (loss {float(loss)}) at epoch {epoch} step {s + 1}; "
                                  f"lower the learning rate (now {tc.lr})")
            loss_sum += float(loss) * len(idx)
            correct_sum += correct.numpy()
            seen += len(idx)
            now = time.monotonic()
            if now - t_log >= tc.log_every_s:
                t_log = now
                done = (epoch - 1) * steps_per_epoch + s + 1
                rate = seen / (now - t_epoch)
                eta = (total - done) * tc.batch_size / rate
                log.info("epoch %d/%d step %d/%d loss %.3f acc end/edge/cloud %s  %.0f img/s  eta %s",
                         epoch, tc.epochs, s + 1, steps_per_epoch, loss_sum / seen,
                         "/".join(f"{c / seen:.3f}" for c in correct_sum), rate, _hms(eta))
        val_logits = predict_logits(model, val_images)
        val_acc = [float((l.argmax(1) == val_labels).mean()) for l in val_logits]
        record = {"epoch": epoch, "loss": loss_sum / max(seen, 1),
                  "train_acc": [float(c / max(seen, 1)) for c in correct_sum], "val_acc": val_acc,
                  "seconds": round(time.monotonic() - t_epoch, 1)}
        history.append(record)
        log.info("epoch %d/%d done in %s: loss %.3f, train acc %s, val acc end %.4f edge %.4f cloud %.4f",
                 epoch, tc.epochs, _hms(record["seconds"]), record["loss"],
                 "/".join(f"{a:.3f}" for a in record["train_acc"]), *val_acc)
        _save_optimizer(workdir, opt, seed_gen)  # before model.json, which marks the epoch done
        save_checkpoint(model, workdir, arch, tc, classes, history, seed, extra)
    log.info("training finished in %s", _hms(time.monotonic() - t_start))
    return model


OPTIMIZER_STATE = "optimizer.npz"


def _save_optimizer(workdir: Path, opt, seed_gen) -> None:
    """Optimizer slots, step counter and augmentation RNG: what --resume needs beyond the weights."""
    ckpt = Path(workdir) / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / f"{OPTIMIZER_STATE}.{os.getpid()}.tmp.npz"
    np.savez(tmp, *[np.asarray(v.numpy()) for v in opt.variables], rng_state=seed_gen.state.numpy())
    tmp.replace(ckpt / OPTIMIZER_STATE)


def _resume_state(workdir: Path, arch: ArchConfig, tc: TrainConfig, model, opt, seed_gen) -> list[dict]:
    """Load an unfinished run of the same configuration into model/opt; returns its history."""
    ckpt = Path(workdir) / CHECKPOINT_DIR
    if not (ckpt / "model.json").is_file():
        log.info("no checkpoint in %s: training from scratch", workdir)
        return []
    meta = json.loads((ckpt / "model.json").read_text())
    same = {k: v for k, v in asdict(tc).items() if k not in ("epochs", "log_every_s")}
    theirs = {k: v for k, v in meta.get("train", {}).items() if k not in ("epochs", "log_every_s")}
    if meta.get("arch") != arch.to_json() or theirs != same or meta["train"].get("epochs") != tc.epochs:
        raise ConfigError(f"{ckpt}: the checkpoint was trained with another configuration; "
                          "resume with the same preset and settings, or use a new --workdir")
    history = meta.get("history", [])
    saved, _ = load_checkpoint(ckpt)
    model.set_weights(saved.get_weights())
    if len(history) < tc.epochs:
        state_file = ckpt / OPTIMIZER_STATE
        if not state_file.is_file():
            raise BundleError(f"{ckpt}: no {OPTIMIZER_STATE}, cannot resume this run")
        try:
            z = np.load(state_file)
            slots = [z[f"arr_{i}"] for i in range(len(opt.variables))]
            for v, value in zip(opt.variables, slots):
                v.assign(value)
            seed_gen.reset(z["rng_state"])
        except (OSError, ValueError, KeyError) as e:
            raise BundleError(f"{state_file}: unreadable optimizer state ({e}); "
                              "train again with a new --workdir") from None
        log.info("resuming %s after epoch %d of %d", workdir, len(history), tc.epochs)
    return history


def _copy_matching_weights(src, dst) -> None:
    by_name = {l.name: l for l in _all_layers(src)}
    copied = 0
    for layer in _all_layers(dst):
        other = by_name.get(layer.name)
        if other is None or not layer.weights:
            continue
        ws = other.get_weights()
        if [w.shape for w in ws] == [tuple(v.shape) for v in layer.weights]:
            layer.set_weights(ws)
            copied += 1
    log.info("initialised %d layers from the given model", copied)


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------
# Checkpoint: the trained Keras model lives next to the bundle, never inside it.
# ---------------------------------------------------------------------------------------------
def save_checkpoint(model, workdir: str | Path, arch: ArchConfig, tc: TrainConfig,
                    classes: list[str], history: list[dict], seed: int, extra: dict | None = None) -> Path:
    ckpt = Path(workdir) / CHECKPOINT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / f"model.{os.getpid()}.tmp.keras"  # unique: concurrent builders may share a workdir
    model.save(tmp)
    tmp.replace(ckpt / "model.keras")
    meta = {"arch": arch.to_json(), "train": asdict(tc), "classes": classes, "history": history,
            "seed": seed, "input": {"shape": [1, arch.input_size, arch.input_size, 3], "dtype": "uint8",
                                    "color": "RGB", "scaling": "x/255 inside the end segment"}}
    meta.update(extra or {})
    tmp_meta = ckpt / f"model.{os.getpid()}.tmp.json"
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
    tmp_meta.replace(ckpt / "model.json")
    return ckpt


def load_checkpoint(path: str | Path):
    """(joint keras model, metadata dict) from a workdir, its checkpoint/ folder, or model.keras.

    The float32 model is rebuilt from the JSON arch config and the saved weights loaded into it,
    so a model trained in bfloat16 comes back in float32 (what export and distillation want).
    """
    import keras

    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_DIR).is_dir():
        path = path / CHECKPOINT_DIR
    if path.is_dir():
        path = path / "model.keras"
    meta_file = path.with_suffix(".json")
    if not path.is_file() or not meta_file.is_file():
        raise BundleError(f"no trained checkpoint at {path} (expected model.keras + model.json)")
    try:
        meta = json.loads(meta_file.read_text())
        arch = ArchConfig.from_json(meta["arch"])
    except (json.JSONDecodeError, KeyError, ConfigError) as e:
        raise BundleError(f"{meta_file}: unreadable checkpoint metadata ({e})") from None
    _custom_layers()
    saved = keras.models.load_model(path, compile=False)
    model = build_joint(arch)
    model.set_weights(saved.get_weights())
    return model, meta
