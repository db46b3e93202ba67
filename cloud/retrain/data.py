"""What a run learns from: the stored hard examples (end features, teacher logits), the frames of
opted-in nodes, and labelled replay and validation frames from the training folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.bundle import Bundle
from tierlite.cloud.retrain.options import RetrainOptions
from tierlite.errors import ConfigError, DataError


def load_hard_examples(opts: RetrainOptions, bundle: Bundle) -> dict[str, Any]:
    """Stored end features + teacher logits of every hard example (and which are audits), and the
    frames of opted-in nodes."""
    from tierlite.cloud.store import HardExampleStore

    feats, teacher, nodes, audits = [], [], [], []
    with HardExampleStore.open_readonly(opts.store) as store:
        for ex in store.iter_examples(bundle_name=bundle.name):
            if opts.since is not None and ex.ts < opts.since:
                continue
            f = ex.end_feature_array()
            if f is None:
                continue  # the edge did not forward the node's feature (forward_end_feature: false)
            feats.append(f.reshape(bundle.segment("edge").inputs[0].shape[1:]))
            teacher.append(ex.logits["cloud"])
            nodes.append(ex.node)
            audits.append(ex.audit)
    out = {"end_features": np.stack(feats) if feats else np.zeros((0,)), "teacher": np.stack(teacher) if teacher else None,
           "nodes": nodes, "audits": np.array(audits, bool), "frames": np.zeros((0, *bundle.input_shape[1:]), np.uint8), "frame_nodes": [],
           "refused_frames": 0}
    if opts.frames is not None and opts.frames.is_file():
        from tierlite.cloud.frames import FrameStore

        with FrameStore(opts.frames, readonly=True) as fs:
            images, frame_nodes, refused = [], [], 0
            for rec in fs.iter_frames(bundle.name, since=opts.since):
                if not opts.privacy.allows_frames(rec.node):
                    refused += 1  # uploaded, but this node is not opted in at the cloud: never used
                    continue
                try:
                    images.append(rec.image(bundle.input_shape[1:3]))
                    frame_nodes.append(rec.node)
                except DataError:
                    refused += 1
        if images:
            out["frames"], out["frame_nodes"] = np.stack(images), frame_nodes
        out["refused_frames"] = refused
    return out


def workdir(bundle: Bundle, opts: RetrainOptions) -> Path:
    """The folder holding the bundle's checkpoint/ and cache/: the one --checkpoint points into,
    else the converters' default "<bundle>-work"."""
    from tierlite.converters import default_workdir

    if opts.checkpoint is not None:
        ck = Path(opts.checkpoint)
        ck = ck.parent if ck.suffix == ".keras" else ck
        return ck.parent if ck.name == "checkpoint" else ck
    return default_workdir(bundle.root)


def replay_and_val(opts: RetrainOptions, bundle: Bundle):
    """Labelled replay frames (training split) and the validation split of the training folder,
    split as the original training did (its seed and val_fraction, from the checkpoint's metadata)."""
    from tierlite.converters import load_splits

    work = workdir(bundle, opts)
    meta_file = work / "checkpoint" / "model.json"
    seed, val_fraction, limit, replay = int(bundle.manifest.get("training", {}).get("seed", 0)), 0.1, None, opts.replay
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        seed, val_fraction, limit = meta.get("seed", seed), meta["train"]["val_fraction"], meta["train"].get("limit")
        if replay is None and meta.get("train_dir") and Path(meta["train_dir"]).is_dir():
            replay = Path(meta["train_dir"])  # the folder the checkpoint was trained on (--replay's default)
    if replay is None:
        raise ConfigError("--replay: the labelled training folder is needed to keep clean accuracy and to "
                          "re-calibrate the thresholds (the checkpoint's own training folder is not available)")
    cache = work / "cache" if (work / "cache").is_dir() else opts.cache_dir  # the training's decoded frames
    splits = load_splits(replay, bundle.input_shape[1], val_fraction, seed, limit, cache)
    if splits.classes != bundle.labels:
        raise DataError(f"--replay {replay}: classes {splits.classes} differ from the bundle's {bundle.labels}")
    rng = np.random.default_rng(opts.seed)
    n = min(opts.replay_frames, len(splits.train.labels))
    idx = rng.choice(len(splits.train.labels), n, replace=False)
    return splits.train.images[idx], splits.train.labels[idx], splits.val.images, splits.val.labels


def load_labelled_holdout(path: Path, bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    """An operator's labelled frames from the drifted site: <path>/<class>/*.jpg, class folders named
    as the bundle's labels (any subset of them, at least two); labels as the bundle numbers them.
    The folder's layout and class names are checked before any frame is decoded, and the run calls
    this before it retrains: a wrong folder is one clear error up front, not after the refit.
    Unreadable files are skipped and logged (tierlite.data)."""
    from tierlite.data import list_image_folder, load_image_folder

    where = f"--labelled-holdout {path}"
    try:
        _, _, classes = list_image_folder(path)
        unknown = sorted(set(classes) - set(bundle.labels))
        if unknown:
            raise DataError(f"{where}: class folders {unknown} are not classes of the bundle "
                            f"({', '.join(bundle.labels)})")
        s = load_image_folder(path, tuple(bundle.input_shape[1:3]))
    except DataError as e:
        msg = str(e)
        raise DataError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    to_bundle = np.array([bundle.labels.index(c) for c in s.classes], np.int64)
    return s.images, to_bundle[s.labels]
