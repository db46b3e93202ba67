"""The model bundle: TFLite segments (end, edge, cloud) plus a manifest that every tier trusts.

Layout: a directory with manifest.json and the files it names, or the same directory as a
single .tar.gz archive. Loading verifies the schema and every file's sha256; any mismatch is a
BundleError with one clear line.
"""
from __future__ import annotations

import atexit
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

from tierlite.conditions import end_variants
from tierlite.errors import BundleError

__all__ = [
    "Bundle", "FEATURE_KINDS", "FeatureEncoding", "MANIFEST", "SCHEMA_VERSION", "SegmentInfo", "TIERS",
    "TensorInfo", "manifest_file_hashes", "read_archive_manifest", "sha256_file", "validate_manifest",
    "write_archive", "write_manifest",
]

SCHEMA_VERSION = 1  # what a bundle is written as unless it needs a newer reader
# A bundle whose end exit decides on test-time-augmented logits is written as schema 2: a node of a
# tierlite before it reads only schema 1, ignores keys it does not know, and would decide on the
# plain logits with thresholds calibrated on augmented ones; schema 2 makes it refuse the bundle.
SCHEMA_TEST_TIME_AUGMENTATION = 2
READ_SCHEMAS = (1, 2)
MANIFEST = "manifest.json"
TIERS = ("end", "edge", "cloud")
FEATURE_KINDS = ("int8", "binary", "uniform")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int
    role: str = ""  # outputs: "feature" or "logits"
    index: int = 0  # position in the interpreter's output list

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> "TensorInfo":
        try:
            return cls(
                name=str(d["name"]), shape=tuple(int(x) for x in d["shape"]), dtype=str(d["dtype"]),
                scale=float(d.get("scale", 0.0)), zero_point=int(d.get("zero_point", 0)),
                role=str(d.get("role", "")), index=int(d.get("index", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest: bad tensor entry in {where}: {e!r}") from None

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
             "scale": self.scale, "zero_point": self.zero_point}
        if self.role:
            d.update(role=self.role, index=self.index)
        return d


@dataclass(frozen=True)
class FeatureEncoding:
    """How the end segment's feature crosses to the edge (the manifest's `feature_encoding`):
    int8, one byte an element; binary, one bit an element (1 = `high`, 0 = `low`); or uniform,
    `bits` bits an element: 2**bits evenly spaced int8 levels from `low` to `high` (values outside
    are clipped; `tierlite calibrate --feature-bits`). tierlite.wire encodes and decodes with it;
    the edge->cloud boundary is always INT8."""

    kind: Literal["int8", "binary", "uniform"] = "int8"
    low: int | None = None  # binary / uniform: the int8 levels the codes span
    high: int | None = None
    bits: int | None = None  # uniform only: 2..7
    INT8: ClassVar["FeatureEncoding"]

    @classmethod
    def from_manifest(cls, entry: Any, where: str = MANIFEST) -> "FeatureEncoding":
        kind = entry.get("kind") if isinstance(entry, Mapping) else None
        if kind not in FEATURE_KINDS:
            raise BundleError(f"{where}: feature_encoding.kind must be one of {FEATURE_KINDS}, got {kind!r}")
        if kind == "int8":
            return cls.INT8
        try:
            low, high = int(entry["low"]), int(entry["high"])
            bits = int(entry["bits"]) if kind == "uniform" else None
        except (KeyError, TypeError, ValueError):
            need = "integer 'low', 'high' and 'bits'" if kind == "uniform" else "integer 'low' and 'high'"
            raise BundleError(f"{where}: feature_encoding {kind!r} needs {need}") from None
        if kind == "uniform" and not (2 <= bits <= 7 and -128 <= low < high <= 127):
            raise BundleError(f"{where}: feature_encoding 'uniform' needs 2 <= bits <= 7 and "
                              f"-128 <= low < high <= 127, got bits {bits}, low {low}, high {high}")
        return cls(kind, low, high, bits)

    @classmethod
    def of(cls, encoding: "FeatureEncoding | Mapping[str, Any]") -> "FeatureEncoding":
        """Typed as it is, or read from a manifest-style dict."""
        return encoding if isinstance(encoding, cls) else cls.from_manifest(encoding, "feature encoding")

    def to_manifest(self) -> dict[str, Any]:
        if self.kind == "int8":
            return {"kind": "int8"}
        out = {"kind": self.kind, "low": self.low, "high": self.high}
        return out if self.bits is None else {**out, "bits": self.bits}


FeatureEncoding.INT8 = FeatureEncoding("int8")


def manifest_file_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """{file: sha256} of every segment and extra file a manifest lists."""
    hashes = {str(s["file"]): str(s["sha256"]) for s in manifest["segments"]}
    hashes.update({str(e["file"]): str(e["sha256"]) for e in manifest.get("files", [])})
    return hashes


@dataclass(frozen=True)
class SegmentInfo:
    tier: str
    file: str
    sha256: str
    bytes: int
    exit_index: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    # "hflip": the exit decides on the mean of the frame's and its mirror image's softmax (the
    # escalated feature is the frame's own); thresholds are calibrated that way. End segment only.
    test_time_augmentation: str | None = None

    def output(self, role: str) -> TensorInfo | None:
        return next((o for o in self.outputs if o.role == role), None)


class Bundle:
    """A verified bundle on disk. `Bundle.load(path)` is the only way tiers get one."""

    def __init__(self, root: Path, manifest: dict[str, Any], segments: dict[str, SegmentInfo]):
        self.root = root
        self.manifest = manifest
        self.segments = segments

    # -- identity -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"])

    @property
    def feature_encoding(self) -> dict[str, Any]:
        """The manifest's entry as written; `encoding` is the typed form."""
        return dict(self.manifest["feature_encoding"])

    @property
    def encoding(self) -> FeatureEncoding:
        return FeatureEncoding.from_manifest(self.manifest["feature_encoding"])

    @property
    def thresholds(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.manifest.get("thresholds", {}).items()}

    @property
    def operating_points(self) -> list[dict[str, Any]]:
        """Extra exit operating points (`tierlite plan --export`): [{name, thresholds: {end: x}, ...}],
        which an adaptive node moves between (tierlite.linkstate); [] when the manifest has none."""
        return [dict(p) for p in self.manifest.get("operating_points") or []]

    def segment_path(self, tier: str) -> Path:
        return self.root / self.segment(tier).file

    def model_file(self, tier: str, runtime: str) -> Path:
        """The file `runtime` should load for `tier`: the Edge TPU-compiled copy that
        `tierlite firmware --board coral-*` lists in `files` ({file, tier, runtime: "edgetpu"})
        when the runtime is edgetpu, else the plain segment."""
        if runtime == "edgetpu":
            for entry in self.manifest.get("files", []):
                if entry.get("runtime") == "edgetpu" and entry.get("tier") == tier:
                    return self.root / str(entry["file"])
        return self.segment_path(tier)

    def segment(self, tier: str) -> SegmentInfo:
        try:
            return self.segments[tier]
        except KeyError:
            raise BundleError(f"bundle {self.name} v{self.version} has no '{tier}' segment") from None

    # -- loading --------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "Bundle":
        path = Path(path)
        if not path.exists():
            raise BundleError(f"bundle not found: {path}")
        if path.is_file():
            unpacked = _extract_archive(path)
            try:
                return cls.load(unpacked, verify)
            except BundleError:
                _remove_tree(unpacked)  # not a bundle after all: nothing left behind
                raise
        mfile = path / MANIFEST
        if not mfile.is_file():
            raise BundleError(f"not a bundle (no {MANIFEST}): {path}")
        try:
            manifest = json.loads(mfile.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mfile}: manifest is not valid JSON ({e})") from None
        segments = validate_manifest(manifest, str(mfile))
        bundle = cls(path, manifest, segments)
        if verify:
            bundle.verify_files()
        return bundle

    def verify_files(self) -> None:
        for rel, digest in self.file_hashes().items():
            f = self.root / rel
            if not f.is_file():
                raise BundleError(f"bundle {self.root}: file missing: {rel}")
            actual = sha256_file(f)
            if actual != digest:
                raise BundleError(f"bundle {self.root}: sha256 mismatch for {rel} "
                                  f"(manifest {digest[:12]}..., file {actual[:12]}...): tampered or corrupt")

    def file_hashes(self) -> dict[str, str]:
        hashes = {s.file: s.sha256 for s in self.segments.values()}
        hashes.update({e["file"]: e["sha256"] for e in self.manifest.get("files", [])})
        return hashes

    def archive(self, dest: str | Path) -> Path:
        """Write the bundle as one .tar.gz file (manifest first, so a reader can stop early)."""
        return write_archive(self.root, dest)


def required_schema(m: dict) -> int:
    """The oldest schema whose readers run this manifest as meant (see SCHEMA_TEST_TIME_AUGMENTATION)."""
    augmented = any(isinstance(s, dict) and s.get("test_time_augmentation") not in (None, "none")
                    for s in m.get("segments") or [])
    return SCHEMA_TEST_TIME_AUGMENTATION if augmented else SCHEMA_VERSION


def validate_manifest(m: Any, where: str = MANIFEST) -> dict[str, SegmentInfo]:
    if not isinstance(m, dict):
        raise BundleError(f"{where}: manifest must be a JSON object")
    if m.get("schema") not in READ_SCHEMAS:
        raise BundleError(f"{where}: unsupported schema {m.get('schema')!r} (this tierlite reads "
                          f"{', '.join(map(str, READ_SCHEMAS))})")
    for key, typ in (("name", str), ("version", int), ("labels", list), ("input", dict),
                     ("segments", list), ("feature_encoding", dict)):
        if not isinstance(m.get(key), typ):
            raise BundleError(f"{where}: '{key}' missing or not a {typ.__name__}")
    if m["version"] < 1:
        raise BundleError(f"{where}: version must be >= 1")
    FeatureEncoding.from_manifest(m["feature_encoding"], where)
    segments: dict[str, SegmentInfo] = {}
    for i, s in enumerate(m["segments"]):
        at = f"{where} segments[{i}]"
        try:
            tier = s["tier"]
            if tier not in TIERS:
                raise BundleError(f"{at}: tier must be one of {TIERS}, got {tier!r}")
            if tier in segments:
                raise BundleError(f"{at}: duplicate tier {tier!r}")
            file = str(s["file"])
            if not _plain_relative(file):
                raise BundleError(f"{at}: file must be a plain relative name, got {file!r}")
            segments[tier] = SegmentInfo(
                tier=tier, file=file, sha256=str(s["sha256"]), bytes=int(s.get("bytes", 0)),
                exit_index=int(s.get("exit_index", TIERS.index(tier))),
                inputs=tuple(TensorInfo.from_json(t, at) for t in s["inputs"]),
                outputs=tuple(TensorInfo.from_json(t, at) for t in s["outputs"]),
                test_time_augmentation=_test_time_augmentation(s, tier, at),
            )
        except (KeyError, TypeError) as e:
            raise BundleError(f"{at}: missing or bad field {e}") from None
    if "end" not in segments:
        raise BundleError(f"{where}: a bundle needs at least an 'end' segment")
    for i, e in enumerate(m.get("files") or []):
        file = e.get("file") if isinstance(e, dict) else None
        if not isinstance(file, str) or not _plain_relative(file) or not isinstance(e.get("sha256"), str):
            raise BundleError(f"{where} files[{i}]: needs a plain relative 'file' and its 'sha256'")
    for i, p in enumerate(m.get("operating_points") or []):
        end = p.get("thresholds", {}).get("end") if isinstance(p, dict) and isinstance(p.get("thresholds"), dict) else None
        if not isinstance(end, (int, float)) or not 0.0 <= end <= 1.0:
            raise BundleError(f"{where} operating_points[{i}]: needs thresholds.end, a number in [0, 1]")
    end_variants(m)  # condition variants' selectors are well formed
    return segments


TEST_TIME_AUGMENTATIONS = ("hflip",)


def _test_time_augmentation(entry: dict, tier: str, at: str) -> str | None:
    tta = entry.get("test_time_augmentation")
    if tta in (None, "none"):
        return None
    if tta not in TEST_TIME_AUGMENTATIONS:
        raise BundleError(f"{at}: test_time_augmentation must be one of {('none',) + TEST_TIME_AUGMENTATIONS}, "
                          f"got {tta!r}")
    if tier != "end":
        raise BundleError(f"{at}: test_time_augmentation is for the end segment (it mirrors the camera frame), "
                          f"not {tier!r}")
    return tta


def _plain_relative(name: str) -> bool:
    return bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> Path:
    """Fill in sha256/bytes of every segment and extra file, validate, and write manifest.json."""
    root = Path(root)
    for s in manifest["segments"]:
        f = root / s["file"]
        s["sha256"], s["bytes"] = sha256_file(f), f.stat().st_size
    for e in manifest.get("files", []):
        if not _plain_relative(str(e.get("file", ""))):
            raise BundleError(f"{root / MANIFEST} files: {e.get('file')!r} is not a plain relative name")
        e["sha256"] = sha256_file(root / e["file"])
    schema = manifest.get("schema", SCHEMA_VERSION)
    manifest["schema"] = max(schema, required_schema(manifest)) if isinstance(schema, int) else schema
    validate_manifest(manifest, str(root / MANIFEST))
    out = root / MANIFEST
    out.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return out


def write_archive(root: str | Path, dest: str | Path) -> Path:
    root, dest = Path(root), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(root / MANIFEST, arcname=MANIFEST)
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.name != MANIFEST:
                tar.add(f, arcname=str(f.relative_to(root)))
    return dest


MAX_ARCHIVE_BYTES = 512 * 1024 * 1024  # a bundle archive named in a config unpacks to at most this
MAX_ARCHIVE_MEMBERS = 1000


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _extract_archive(path: Path, max_bytes: int = MAX_ARCHIVE_BYTES) -> Path:
    """Unpack a bundle archive into a temp dir, removed at exit (or at once when it fails). Bounded:
    at most `max_bytes` unpacked and MAX_ARCHIVE_MEMBERS members, checked before anything is written."""
    out: Path | None = None
    try:
        with tarfile.open(path, "r:*") as tar:
            total, members = 0, []
            for member in tar:  # streamed: a bomb is refused before its end is read
                if not member.isfile() or member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise BundleError(f"bundle archive {path}: unsafe member {member.name!r}")
                total += member.size
                members.append(member)
                if total > max_bytes or len(members) > MAX_ARCHIVE_MEMBERS:
                    raise BundleError(f"bundle archive {path}: unpacks to more than {max_bytes:,} bytes or "
                                      f"{MAX_ARCHIVE_MEMBERS} files")
            out = Path(tempfile.mkdtemp(prefix="tierlite-bundle-"))
            atexit.register(_remove_tree, out)
            tar.extractall(out, members=members)
    except (tarfile.TarError, OSError, EOFError) as e:
        if out is not None:
            _remove_tree(out)
        raise BundleError(f"bundle archive {path} is unreadable: {e}") from None
    except BundleError:
        if out is not None:
            _remove_tree(out)
        raise
    return out


def read_archive_manifest(data: bytes) -> dict[str, Any]:
    """Manifest of an in-memory archive (used to vet an update before unpacking it)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            f = tar.extractfile(MANIFEST)
            if f is None:
                raise BundleError("archive has no manifest.json")
            return json.loads(f.read())
    except (tarfile.TarError, KeyError, json.JSONDecodeError, EOFError, OSError) as e:
        raise BundleError(f"archive unreadable: {e}") from None

