"""Shared fixtures. Data comes from a pip package (scikit-learn's digits as JPEG frames); models
are trained here on the spot and cached in pytest's cache, keyed by the converters' source."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]


def _source_key(*dirs: str) -> str:
    h = hashlib.sha256()
    for d in dirs:
        for f in sorted((REPO / d).rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """<dir>/{train,test}/<digit>/*.jpg: ~1,350 train and ~450 test frames, 32x32 RGB JPEG."""
    from tierlite.data import make_digits_folder

    return make_digits_folder(tmp_path_factory.mktemp("digits"))


def _cached_bundle(request, digits_dir: Path, binarized: bool) -> Path:
    from tierlite.converters.pipeline import build_bundle

    key = _source_key("converters", "tierlite")
    cache = Path(request.config.cache.mkdir(f"bundle-{'bin' if binarized else 'int8'}-{key}"))
    if not (cache / "manifest.json").exists():
        # Per-process scratch name: two pytest runs may build the same key at once.
        work = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        build_bundle(digits_dir / "train", work, preset="small", binarized=binarized, seed=0)
        if not (cache / "manifest.json").exists():
            shutil.rmtree(cache, ignore_errors=True)
            work.rename(cache)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return cache


@pytest.fixture(scope="session")
def small_bundle_dir(request, digits_dir) -> Path:
    """A small int8 bundle trained on the digits frames (built once, then cached)."""
    return _cached_bundle(request, digits_dir, binarized=False)


@pytest.fixture(scope="session")
def binary_bundle_dir(request, digits_dir) -> Path:
    """The same with a binarized end segment (bit-packed boundary feature)."""
    return _cached_bundle(request, digits_dir, binarized=True)
