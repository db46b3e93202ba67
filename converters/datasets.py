"""Training data: an image folder decoded once (tierlite.data) and cached as .npz, because
decoding 50,000 JPEGs takes longer than an epoch of a small model."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tierlite.data import ImageSet, list_image_folder, load_image_folder, split_validation
from tierlite.errors import DataError

log = logging.getLogger("tierlite.converters")


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    classes: list[str]
    skipped: list[tuple[str, str]]  # (path, reason) of unreadable files


def _folder_key(root: Path, size: int, limit: int | None, seed: int) -> str:
    paths, _, classes = list_image_folder(root)
    h = hashlib.sha256(json.dumps([str(root.resolve()), size, limit, seed, classes]).encode())
    for p in paths:  # names + sizes + mtimes: cheap, catches added/removed/replaced files
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_folder_cached(root: str | Path, size: int, cache_dir: str | Path | None = None,
                       limit: int | None = None, seed: int = 0) -> ImageSet:
    """load_image_folder(root, (size, size)), cached as <cache_dir>/<key>.npz when cache_dir is set."""
    root = Path(root)
    if cache_dir is None:
        return load_image_folder(root, (size, size), limit=limit, seed=seed, progress=True)
    key = _folder_key(root, size, limit, seed)
    cache = Path(cache_dir) / f"images-{key}.npz"
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        skipped = [tuple(s) for s in json.loads(str(z["skipped"]))]
        log.info("%s: %d images from cache %s", root, len(z["labels"]), cache.name)
        return ImageSet(z["images"], z["labels"], json.loads(str(z["classes"])),
                        [Path(p) for p in json.loads(str(z["paths"]))], [(Path(p), r) for p, r in skipped])
    log.info("%s: decoding images (cached afterwards in %s)", root, cache.parent)
    s = load_image_folder(root, (size, size), limit=limit, seed=seed, progress=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")  # unique: builders may run concurrently
    np.savez(tmp, images=s.images, labels=s.labels, classes=json.dumps(s.classes),
             paths=json.dumps([str(p) for p in s.paths]),
             skipped=json.dumps([[str(p), r] for p, r in s.skipped]))
    tmp.rename(cache)
    return s


def load_splits(train_dir: str | Path, size: int, val_fraction: float, seed: int = 0,
                limit: int | None = None, cache_dir: str | Path | None = None) -> Splits:
    """Decode the training folder and carve a stratified validation split from it."""
    full = load_folder_cached(train_dir, size, cache_dir, limit, seed)
    tr, va = split_validation(full.labels, val_fraction, seed)
    return Splits(full.subset(tr), full.subset(va), full.classes,
                  [(str(p), r) for p, r in full.skipped])


def representative_frames(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The training frames int8 export calibrates on: a seeded sample, so re-exporting the same
    checkpoint (the retraining job) reproduces the parent's quantization of layers it froze."""
    rng = np.random.default_rng(seed)
    return images[rng.choice(len(images), min(count, len(images)), replace=False)]


def checkpoint_splits(meta: dict, workdir: str | Path) -> Splits:
    """The train/validation splits a checkpoint was trained on (its metadata), from the workdir's cache."""
    train_dir = meta.get("train_dir")
    if not train_dir or not Path(train_dir).is_dir():
        raise DataError(f"checkpoint's training folder is not available: {train_dir}")
    tc = meta["train"]
    return load_splits(train_dir, meta["arch"]["input_size"], tc["val_fraction"], meta["seed"], tc.get("limit"),
                       Path(workdir) / "cache")
