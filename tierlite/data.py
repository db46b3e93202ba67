"""Image folders (`<root>/<class>/*.jpg|png`, sorted class folders give label ids) decoded with
OpenCV as RGB, stratified validation splits, and the pip-shipped demo/test data set
(scikit-learn's digits, upscaled and JPEG-encoded so the camera path is real)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tierlite.errors import DataError

log = logging.getLogger("tierlite.data")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    labels: np.ndarray  # (N,) int64
    classes: list[str]
    paths: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable files and why

    def subset(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx], self.classes,
                        [self.paths[i] for i in idx] if self.paths else [], [])


def list_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{root}: no images found (expected {root}/<class>/*.jpg)")
    present = sorted(set(labels))
    if len(present) < 2:
        raise DataError(f"{root}: images in only {len(present)} class folder; need at least 2 classes")
    return paths, np.asarray(labels, dtype=np.int64), classes


def decode_image(data: bytes | np.ndarray | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """One frame, RGB uint8. Raises DataError on a corrupt or unreadable image."""
    import cv2

    if isinstance(data, Path):
        try:
            data = data.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {data}: {e.strerror}") from None
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if bgr is None:
        raise DataError("not a decodable image")
    if size is not None and bgr.shape[:2] != size:
        bgr = cv2.resize(bgr, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_image_folder(root: str | Path, size: tuple[int, int] | None = None,
                      limit: int | None = None, seed: int = 0, progress: bool = False) -> ImageSet:
    """Decode a class-folder tree. Corrupt files are skipped and reported, never fatal.

    limit: keep at most this many images, a stratified random sample (for quick runs).
    size: (H, W) to resize to; default the first image's size.
    """
    paths, labels, classes = list_image_folder(root)
    if limit is not None and limit < len(paths):
        idx = np.sort(stratified_sample(labels, limit, seed))
        paths, labels = [paths[i] for i in idx], labels[idx]
    images, keep, skipped = [], [], []
    for i, p in enumerate(paths):
        try:
            img = decode_image(p, size)
        except DataError as e:
            skipped.append((p, str(e)))
            continue
        if size is None:
            size = img.shape[:2]
        images.append(img)
        keep.append(i)
        if progress and (i + 1) % 5000 == 0:
            log.info("decoded %d/%d images", i + 1, len(paths))
    if skipped:
        log.warning("%s: skipped %d unreadable image(s), e.g. %s (%s)", root, len(skipped), skipped[0][0], skipped[0][1])
    if len(keep) == 0:
        raise DataError(f"{root}: none of {len(paths)} images could be decoded")
    return ImageSet(np.stack(images), labels[keep], classes, [paths[i] for i in keep], skipped)


def stratified_sample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    # Round-robin over classes in a random order: every class gets its share of n.
    by_class = [order[labels[order] == c] for c in np.unique(labels)]
    picked = [c[: int(np.ceil(n * len(c) / len(labels)))] for c in by_class]
    return rng.permutation(np.concatenate(picked))[:n]


def split_validation(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train_idx, val_idx)."""
    val = stratified_sample(labels, int(round(len(labels) * fraction)), seed)
    mask = np.ones(len(labels), dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask), np.sort(val)


DIGIT_CLASSES = [f"{d}" for d in range(10)]


def make_digits_folder(root: str | Path, size: int = 32, test_fraction: float = 0.25,
                       quality: int = 90, seed: int = 0) -> Path:
    """Write scikit-learn's 1,797 digits as RGB JPEG frames: <root>/{train,test}/<digit>/NNNN.jpg.

    Each 8x8 digit is upscaled, tinted and given sensor noise so that colour and JPEG artefacts
    are real. Idempotent: an existing complete folder is reused.
    """
    import cv2
    from sklearn.datasets import load_digits

    root = Path(root)
    marker = root / ".complete"
    if marker.exists():
        return root
    digits = load_digits()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(digits.target), dtype=bool)
    test[stratified_sample(digits.target, int(len(digits.target) * test_fraction), seed)] = True
    for i, (img8, label) in enumerate(zip(digits.images, digits.target)):
        grey = cv2.resize((img8 / 16.0).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
        fg, bg = rng.uniform(0.55, 1.0, 3), rng.uniform(0.0, 0.35, 3)
        rgb = bg + np.clip(grey, 0, 1)[..., None] * (fg - bg)
        rgb = np.clip(rgb + rng.normal(0, 0.03, rgb.shape), 0, 1)
        bgr = (rgb[..., ::-1] * 255).astype(np.uint8)
        out = root / ("test" if test[i] else "train") / DIGIT_CLASSES[label] / f"{i:04d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        ok, jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        out.write_bytes(jpg.tobytes())
    marker.touch()
    return root
