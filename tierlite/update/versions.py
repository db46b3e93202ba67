"""The versions a node keeps on disk: <state_dir>/versions/v<N>/ (full bundle directories) and
state.json (current, previous, rejected, the version on probation). `stage` writes an artifact
out as a full bundle, taking unchanged files from kept versions by hash."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tierlite.bundle import MANIFEST, Bundle, manifest_file_hashes
from tierlite.errors import BundleError, UpdateError
from tierlite.update.artifacts import Artifact, xor_bytes

__all__ = ["VersionStore"]

log = logging.getLogger("tierlite.update")


class VersionStore:
    """<state_dir>/versions/v<N>/ holds installed bundles; state.json says which is current,
    which is the previous one kept for rollback, and which versions were rejected."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        self.state = self._read_state()

    def _read_state(self) -> dict[str, Any]:
        f = self.root / "state.json"
        empty = {"current": None, "previous": None, "rejected": [], "pending": None}
        if not f.exists():
            return empty
        try:
            state = json.loads(f.read_text())
            pending = state.get("pending")
            return {"current": state.get("current"), "previous": state.get("previous"),
                    "rejected": [int(v) for v in state.get("rejected", [])],
                    "pending": {"version": int(pending["version"]), "starts": int(pending["starts"]),
                                "baseline": float(pending.get("baseline", 1.0))} if pending else None}
        except (json.JSONDecodeError, ValueError, AttributeError, KeyError, TypeError) as e:
            log.warning("update state %s unreadable (%s); starting from the configured bundle", f, e)
            return empty

    def save(self) -> None:
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        os.replace(tmp, self.root / "state.json")  # atomic: a crash leaves the old or the new state

    def path(self, version: int) -> Path:
        return self.root / "versions" / f"v{version}"

    def has(self, version: int | None) -> bool:
        return version is not None and (self.path(version) / MANIFEST).is_file()

    def adopt(self, bundle: Bundle) -> Path:
        """Copy a bundle (e.g. the configured one) in as a kept version, if not there yet."""
        dest = self.path(bundle.version)
        if not self.has(bundle.version):
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for rel in list(bundle.file_hashes()) + [MANIFEST]:
                shutil.copy2(bundle.root / rel, tmp / rel)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        return dest

    def find_file(self, sha256: str) -> Path | None:
        for d in sorted((self.root / "versions").glob("v*"), reverse=True):
            try:
                manifest = json.loads((d / MANIFEST).read_text())
                hashes = manifest_file_hashes(manifest)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            for rel, h in hashes.items():
                if h == sha256 and (d / rel).is_file():
                    return d / rel
        return None

    def stage(self, art: Artifact) -> Bundle:
        """Write the artifact as a full bundle directory (delta files copied from kept versions by
        hash), verify every file, then move it into place atomically."""
        dest = self.path(art.version)
        tmp = dest.with_name(dest.name + ".staging")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for rel, digest in art.file_hashes().items():
                if rel in art.files:
                    (tmp / rel).write_bytes(art.files[rel])
                    continue
                if rel in art.patches:
                    (tmp / rel).write_bytes(self._apply_patch(art, rel, digest))
                    continue
                src = self.find_file(digest)
                if src is None:
                    raise UpdateError(f"update {art.name} v{art.version} is a delta that needs {rel} "
                                      f"(sha256 {digest[:12]}...), which this node does not have; "
                                      f"publish a full artifact (--full)")
                shutil.copyfile(src, tmp / rel)
            (tmp / MANIFEST).write_bytes(art.manifest_bytes)
            try:
                Bundle.load(tmp)  # re-verifies schema and every file hash on disk
            except BundleError as e:
                raise UpdateError(f"staged update v{art.version} does not verify: {e}") from None
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return Bundle.load(dest)

    def _apply_patch(self, art: Artifact, rel: str, digest: str) -> bytes:
        base_sha, xor = art.patches[rel]
        base = self.find_file(base_sha)
        what = f"update {art.name} v{art.version}: patch for {rel}"
        if base is None:
            raise UpdateError(f"{what} applies to a file (sha256 {base_sha[:12]}...) this node does not have; "
                              f"publish a full artifact (--full)")
        old = base.read_bytes()
        if len(old) != len(xor):
            raise UpdateError(f"{what} is {len(xor)} bytes, its base {len(old)}: truncated or corrupt")
        new = xor_bytes(old, xor)
        if hashlib.sha256(new).hexdigest() != digest:
            raise UpdateError(f"{what} does not produce the signed hash: tampered or corrupt")
        return new

    def prune(self) -> None:
        keep = {self.state["current"], self.state["previous"]}
        for d in (self.root / "versions").iterdir():
            try:
                v = int(d.name.lstrip("v").split(".")[0])
            except ValueError:
                continue
            if v not in keep:
                shutil.rmtree(d, ignore_errors=True)
