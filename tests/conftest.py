"""Shared fixtures. Data comes from a pip package (scikit-learn's digits as JPEG frames); models
are trained here on the spot and cached in pytest's cache, keyed by the source of the modules the build imports."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]


def _sources_hash(files: list[str]) -> str:
    h = hashlib.sha256()
    for name in files:
        path = REPO / name
        h.update(name.encode() + (path.read_bytes() if path.exists() else b"<missing>"))
    return h.hexdigest()[:16]


def _loaded_sources() -> list[str]:
    """Repo files of the tierlite modules imported so far (what a bundle build can depend on)."""
    import sys
    files = {Path(m.__file__).resolve() for n, m in list(sys.modules.items())
             if n.startswith("tierlite") and getattr(m, "__file__", None)}
    return sorted(str(f.relative_to(REPO)) for f in files if f.is_relative_to(REPO))


@pytest.fixture(scope="session")
def digits_dir(request) -> Path:
    """<dir>/{train,test}/<digit>/*.jpg: ~1,350 train and ~450 test frames, 32x32 RGB JPEG.
    Kept in pytest's cache beside the cached bundles, whose checkpoints name this folder."""
    from tierlite.data import make_digits_folder

    return make_digits_folder(Path(request.config.cache.mkdir("digits-frames")))


def _cached_bundle(request, digits_dir: Path, binarized: bool) -> Path:
    """Train once, then reuse while the modules the build imported are unchanged. Keyed on those
    files only (listed in <key>.sources.json beside the bundle), so edits elsewhere in the tree do not retrain it."""
    from tierlite.converters.pipeline import build_bundle, default_workdir

    kind = f"bundle-{'bin' if binarized else 'int8'}"
    root = Path(request.config.cache.mkdir(kind))
    for record in sorted(root.glob("*.sources.json")):
        bundle = root / record.name.removesuffix(".sources.json")
        if (bundle / "manifest.json").exists() and bundle.name == _sources_hash(json.loads(record.read_text())):
            return bundle
    # Per-process scratch names: two pytest runs may build at once. The checkpoint ends up in
    # "<bundle>-work", where default_workdir() looks for it.
    work, checkpoint = root / f"tmp{os.getpid()}", root / f"tmp{os.getpid()}-ckpt"
    for scratch in (work, checkpoint):
        shutil.rmtree(scratch, ignore_errors=True)
    build_bundle(digits_dir / "train", work, preset="small", binarized=binarized, seed=0, workdir=checkpoint)
    files = _loaded_sources()
    cache = root / _sources_hash(files)
    if (cache / "manifest.json").exists():
        for scratch in (work, checkpoint):
            shutil.rmtree(scratch, ignore_errors=True)
    else:
        for scratch, final in ((work, cache), (checkpoint, default_workdir(cache))):
            shutil.rmtree(final, ignore_errors=True)
            try:
                scratch.rename(final)
            except OSError:  # another run renamed the same build in meanwhile
                shutil.rmtree(scratch, ignore_errors=True)
    (root / f"{cache.name}.sources.json").write_text(json.dumps(files))
    return cache


@pytest.fixture(scope="session")
def small_bundle_dir(request, digits_dir) -> Path:
    """A small int8 bundle trained on the digits frames (built once, then cached)."""
    return _cached_bundle(request, digits_dir, binarized=False)


@pytest.fixture(scope="session")
def binary_bundle_dir(request, digits_dir) -> Path:
    """The same with a binarized end segment (bit-packed boundary feature)."""
    return _cached_bundle(request, digits_dir, binarized=True)
