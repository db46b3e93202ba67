"""The layer rule (tools > tiers > core, tiers independent), as import-linter contracts in
pyproject.toml. import-linter finds modules by walking the package's folder, and tierlite's
tiers and tools live in their own top-level folders (setuptools package-dir), so the check runs
on a staging tree: tierlite/ with each mapped folder linked in where its import name puts it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def stage_package(dest: Path) -> Path:
    """dest/tierlite laid out by the import names in [tool.setuptools.package-dir]; returns dest."""
    mapping = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    root = dest / "tierlite"
    root.mkdir(parents=True)
    for entry in (REPO / mapping["tierlite"]).iterdir():
        if entry.name != "__pycache__":
            (root / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "tierlite":
            (dest / name.replace(".", "/")).symlink_to(REPO / folder)
    return dest


def lint_imports() -> str:
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "lint-imports not found: pip install -e '.[test]' (import-linter)"
    return exe


def test_layer_contracts_hold(tmp_path):
    staged = stage_package(tmp_path / "staged")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(staged), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([lint_imports(), str(REPO / "pyproject.toml"), "--no-cache", "--no-logo"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"import-linter: layer contract broken\n{run.stdout}\n{run.stderr}"
