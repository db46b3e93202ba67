"""Image folder -> trained multi-exit model -> int8 segments -> calibrated exits -> model bundle.

Public API (also used by the cloud retraining job):
    build_bundle(train_dir, out_dir, preset="small", binarized=False, seed=0, **overrides) -> Path
    load_checkpoint(workdir)            -> (joint keras model, metadata)    [tierlite.converters.train]
    export_bundle(model, out_dir, arch=..., classes=..., calib_images=..., calib_labels=...) -> Path
    run_chain(bundle_dir, images)       -> int8 exit logits of every tier (LiteRT)
    evaluate_bundle(bundle_dir, test_dir, model=None) -> dict of float/int8 figures

The trained Keras model is kept next to the bundle, never inside it:
    <workdir>/checkpoint/model.keras + model.json   (workdir defaults to "<out_dir>-work")
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.bundle import TIERS, Bundle, FeatureEncoding, write_archive, write_manifest
from tierlite.converters import calibrate
from tierlite.converters.datasets import representative_frames
from tierlite.converters.models import ArchConfig
from tierlite.converters.presets import resolve
from tierlite.errors import BundleError
from tierlite.policy import mirror, mirror_average
from tierlite.wire import as_received, encoded_size

log = logging.getLogger("tierlite.converters")


def default_workdir(out_dir: str | Path) -> Path:
    """Where the checkpoint and reports of a bundle live: "<bundle>-work" beside it.

    A trailing ".tmp" or ".tmp<pid>" is dropped, so a bundle built in "X.tmp123" and renamed to
    "X" (as the test fixtures do) still finds its checkpoint in "X-work".
    """
    out_dir = Path(out_dir)
    return out_dir.with_name(re.sub(r"\.tmp\d*$", "", out_dir.name) + "-work")


def build_bundle(train_dir: str | Path, out_dir: str | Path, preset: str = "small", binarized: bool = False,
                 seed: int = 0, *, workdir: str | Path | None = None, name: str | None = None,
                 version: int = 1, archive: str | Path | None = None, init_from: str | Path | None = None,
                 resume: bool = False, **overrides) -> Path:
    """Train on `train_dir` (<class>/*.jpg), export, calibrate and write a bundle directory.

    overrides: any ArchConfig / TrainConfig field (epochs=3, boundary=8, ...).
    init_from: workdir/checkpoint of a trained model whose matching layers seed this one.
    resume: continue the workdir's unfinished training run (or skip training if it is finished).
    Returns out_dir (a directory Bundle.load accepts).
    """
    t0 = time.monotonic()
    out_dir = Path(out_dir)
    workdir = Path(workdir) if workdir else default_workdir(out_dir)
    model, arch, tc, splits = train_model(train_dir, workdir, preset, binarized, seed, init_from, resume,
                                          **overrides)
    rep = representative_frames(splits.train.images, tc.calibration_frames, seed)
    out = export_bundle(model, out_dir, arch=arch, classes=splits.classes, calib_images=splits.val.images,
                        calib_labels=splits.val.labels, representative=rep,
                        name=name or f"{Path(train_dir).resolve().parent.name or 'tierlite'}-{preset}"
                                     f"{'-binary' if binarized else ''}",
                        version=version, max_drop=tc.max_drop, report_dir=workdir,
                        extra={"training": {"preset": preset, "seed": seed, "epochs": tc.epochs,
                                            "train_frames": int(len(splits.train.labels)),
                                            "val_frames": int(len(splits.val.labels)),
                                            "skipped_files": len(splits.skipped),
                                            "checkpoint": f"{workdir.name}/checkpoint (beside the bundle)"}})
    if archive:
        write_archive(out, archive)
    log.info("bundle %s written in %.0f s", out, time.monotonic() - t0)
    return out


def train_model(train_dir: str | Path, workdir: str | Path, preset: str = "small", binarized: bool = False,
                seed: int = 0, init_from: str | Path | None = None, resume: bool = False, **overrides):
    """Train only (checkpoint in <workdir>/checkpoint). Returns (model, arch, train config, splits)."""
    from tierlite.converters.datasets import load_splits
    from tierlite.converters.train import load_checkpoint, train

    workdir = Path(workdir)
    arch, tc = resolve(preset, binarized=binarized, **overrides)
    splits = load_splits(train_dir, arch.input_size, tc.val_fraction, seed, tc.limit, workdir / "cache")
    arch.num_classes = len(splits.classes)
    if splits.skipped:
        log.warning("%d unreadable training image(s) skipped, e.g. %s (%s)", len(splits.skipped), *splits.skipped[0])
    seed_model = load_checkpoint(init_from)[0] if init_from else None
    model = train(arch, tc, splits.train.images, splits.train.labels, splits.val.images, splits.val.labels,
                  splits.classes, workdir, seed=seed, init_from=seed_model, resume=resume,
                  extra={"preset": preset, "train_dir": str(Path(train_dir).resolve())})
    if tc.mixed_precision:  # export and distillation want float32: the checkpoint reloads as float32
        model = load_checkpoint(workdir)[0]
    return model, arch, tc, splits


def export_bundle(model, out_dir: str | Path, *, arch: ArchConfig | dict, classes: list[str],
                  calib_images: np.ndarray, calib_labels: np.ndarray, representative: np.ndarray | None = None,
                  name: str = "tierlite", version: int = 1, parent_version: int | None = None,
                  max_drop: float = 0.005, report_dir: str | Path | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Export a trained joint model (e.g. from load_checkpoint) as a calibrated bundle directory.

    calib_images/labels: held-out frames (uint8 NHWC) the exit thresholds are chosen on.
    representative: uint8 training frames for int8 calibration (default: calib_images).
    report_dir: where calibration.json / calibration.png go (default: out_dir's workdir).
    """
    from tierlite.converters.export import TIER_FILES, binary_levels, export_segments

    if isinstance(arch, dict):
        arch = ArchConfig.from_json(arch)
    if version < 1:
        raise BundleError(f"bundle version must be >= 1, got {version}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = representative if representative is not None else calib_images
    segs = export_segments(model, arch, rep)
    for tier, seg in segs.items():
        (out_dir / TIER_FILES[tier]).write_bytes(seg.model)
    if arch.binarized:
        low, high = binary_levels(segs["end"])
        encoding = FeatureEncoding("binary", low, high)
    else:
        encoding = FeatureEncoding.INT8

    # Calibrate the exits on the int8 chain (what devices run), not on the float model.
    logits = run_chain_segments(segs, calib_images)
    fbytes = _feature_bytes(segs, encoding)
    points, table = calibrate.sweep(logits, calib_labels, fbytes)
    chosen = calibrate.search_thresholds(logits, calib_labels, fbytes, max_drop, table=table)
    exit_acc = {t: float((l.argmax(1) == calib_labels).mean()) for t, l in zip(TIERS, logits)}
    manifest = {
        "schema": 1, "name": name, "version": int(version), "parent_version": parent_version,
        "labels": list(classes),
        "input": {"shape": [1, arch.input_size, arch.input_size, 3], "dtype": "uint8", "color": "RGB",
                  "scaling": "raw pixel values 0..255; the end segment rescales (x/255) itself"},
        "feature_encoding": encoding.to_manifest(),
        "segments": [{"tier": t, "file": TIER_FILES[t], "exit_index": i,
                      "inputs": [x.to_json() for x in segs[t].inputs],
                      "outputs": [x.to_json() for x in segs[t].outputs]} for i, t in enumerate(TIERS)],
        "thresholds": chosen.thresholds,
        "calibration": {"criterion": "normalized entropy <= threshold", "split": "validation",
                        "frames": int(len(calib_labels)), "max_drop": max_drop,
                        "exit_accuracy_int8": exit_acc, "system_accuracy": chosen.accuracy,
                        "cloud_only_accuracy": chosen.cloud_only_accuracy, "fractions": chosen.fractions,
                        "feature_bytes": {"end": fbytes[0], "edge": fbytes[1]},
                        "camera_uplink_bytes_per_frame": chosen.camera_uplink_bytes,
                        # every max drop of the sweep (validation), for benchmarks of other operating points
                        "operating_points": [{"max_drop": p.max_drop, "thresholds": p.thresholds} for p in points]},
        "model": {"family": arch.family, "binarized": arch.binarized, "arch": arch.to_json()},
        # label-free drift monitor's reference (issue 13, docs/DRIFT.md): same frames, int8 end segment
        "drift_reference": drift_reference_of(segs["end"].model, segs["end"].outputs, calib_images),
    }
    manifest.update(extra or {})
    write_manifest(out_dir, manifest)
    report_dir = Path(report_dir) if report_dir else default_workdir(out_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    calibrate.write_report(report_dir / "calibration.json", {
        "bundle": str(out_dir), "chosen": chosen.to_json(), "sweep": [p.to_json() for p in points],
        "exit_accuracy_int8": exit_acc, "feature_bytes": list(fbytes)})
    calibrate.plot(report_dir / "calibration.png", points, table,
                   title=f"{name} v{version}: validation, int8 chain")
    log.info("thresholds end %.4f edge %.4f: system %.4f (cloud-only %.4f), camera %.1f%%, %.0f B/frame up",
             chosen.thresholds["end"], chosen.thresholds["edge"], chosen.accuracy, chosen.cloud_only_accuracy,
             chosen.camera_fraction * 100, chosen.camera_uplink_bytes)
    return out_dir


def drift_reference_of(end_model: bytes, outputs, images: np.ndarray, window: int = 50,
                       end_tta: str | None = None, **kw) -> dict[str, Any]:
    """tierlite.drift reference statistics of clean held-out frames through the int8 end segment
    (with its test-time augmentation: the logits the node's monitor sees)."""
    from tierlite.drift import reference_stats

    outs, logits = _segment_exit(end_model, outputs, images.astype(np.uint8), end_tta)
    fe = next(o for o in outputs if o.role == "feature")
    return reference_stats(outs[fe.index], logits, window=min(window, len(images)), **kw)


def add_drift_reference(bundle_dir: str | Path, images: np.ndarray, window: int = 50, **kw) -> dict[str, Any]:
    """Record drift reference statistics in an existing (unsigned) bundle's manifest: for bundles
    built before issue 13. `images`: clean held-out frames (uint8 NHWC), never training frames."""
    b = Bundle.load(bundle_dir)
    if "signature" in b.manifest:
        raise BundleError(f"{bundle_dir}: signed manifest; add the reference before signing")
    seg = b.segment("end")
    ref = drift_reference_of(b.segment_path("end").read_bytes(), list(seg.outputs), images, window,
                             seg.test_time_augmentation, **kw)
    manifest = dict(b.manifest, drift_reference=ref)
    write_manifest(bundle_dir, manifest)
    return ref


def _feature_bytes(segs, encoding) -> tuple[int, int]:
    end_f = next(o for o in segs["end"].outputs if o.role == "feature")
    edge_f = next(o for o in segs["edge"].outputs if o.role == "feature")
    return encoded_size(end_f.shape, encoding), encoded_size(edge_f.shape, FeatureEncoding.INT8)


def _dequantize(q: np.ndarray, info) -> np.ndarray:
    return (q.astype(np.float32) - info.zero_point) * info.scale


def _segment_exit(model: bytes, outputs, x: np.ndarray, tta: str | None = None) -> tuple[list, np.ndarray]:
    """One int8 segment over N frames: its raw outputs and its exit's dequantized logits (N, C).
    tta "hflip": the logits average the frames' and their mirror images' softmax."""
    from tierlite.converters.export import run_tflite

    outs = run_tflite(model, x)
    lo = next(o for o in outputs if o.role == "logits")
    logits = _dequantize(outs[lo.index], lo).reshape(len(x), -1)
    if tta:
        mirrored = run_tflite(model, mirror(x))[lo.index]
        logits = mirror_average(logits, _dequantize(mirrored, lo).reshape(len(x), -1))
    return outs, logits


def run_chain_segments(segs: dict, images: np.ndarray, end_tta: str | None = None,
                       encoding: FeatureEncoding | None = None) -> list[np.ndarray]:
    """int8 chain end -> edge -> cloud over N frames; dequantized logits (N, C) per exit.
    end_tta "hflip": the end exit's logits average the frame's and its mirror image's softmax.
    encoding: the end feature crosses as the wire carries it (a uniform encoding's levels)."""
    x, logits = images.astype(np.uint8), []
    for tier in TIERS:
        seg = segs[tier]
        outs, exit_logits = _segment_exit(seg.model, seg.outputs, x, end_tta if tier == "end" else None)
        logits.append(exit_logits)
        feat = next((o for o in seg.outputs if o.role == "feature"), None)
        if feat is not None:
            x = outs[feat.index]
            if tier == "end" and encoding is not None:
                x = as_received(x, encoding)
    return logits


def run_chain(bundle_dir: str | Path, images: np.ndarray, end_tta: str | None = "bundle",
              encoding: FeatureEncoding | str | None = "bundle") -> list[np.ndarray]:
    """run_chain_segments for a bundle on disk; "bundle": the end's test-time augmentation and
    feature encoding as its manifest says."""
    from tierlite.converters.export import ExportedSegment

    b = Bundle.load(bundle_dir)
    segs = {t: ExportedSegment(t, b.segment_path(t).read_bytes(), list(b.segment(t).inputs),
                               list(b.segment(t).outputs)) for t in TIERS}
    if end_tta == "bundle":
        end_tta = b.segment("end").test_time_augmentation
    return run_chain_segments(segs, images, end_tta, b.encoding if encoding == "bundle" else encoding)


def evaluate_bundle(bundle_dir: str | Path, test_dir: str | Path, model=None,
                    cache_dir: str | Path | None = None, max_drops=calibrate.DEFAULT_DROPS) -> dict[str, Any]:
    """Figures on a test folder: int8 (and float, if the Keras model is given) per-exit accuracy,
    int8/float agreement, the cascade at the bundle's thresholds, and what thresholds chosen *on
    test* would give for each max drop (the issue's "at 0.5 pt measured on test")."""
    from tierlite.converters.datasets import load_folder_cached

    b = Bundle.load(bundle_dir)
    size = b.input_shape[1]
    test = load_folder_cached(test_dir, size, cache_dir)
    if test.classes != b.labels:
        raise BundleError(f"{test_dir}: classes {test.classes} differ from the bundle's labels {b.labels}")
    y = test.labels
    t0 = time.monotonic()
    q_logits = run_chain(bundle_dir, test.images)
    enc = b.feature_encoding
    fbytes = (encoded_size(b.segment("end").output("feature").shape, enc),
              encoded_size(b.segment("edge").output("feature").shape, FeatureEncoding.INT8))
    res: dict[str, Any] = {
        "bundle": str(bundle_dir), "test_dir": str(test_dir), "frames": int(len(y)),
        "skipped_files": len(test.skipped),
        "jpeg_bytes_per_frame": float(np.mean([p.stat().st_size for p in test.paths])) if test.paths else None,
        "segment_bytes": {t: b.segment(t).bytes for t in TIERS},
        "feature_bytes": {"end": fbytes[0], "edge": fbytes[1]}, "feature_encoding": enc,
        "int8_exit_accuracy": {t: float((l.argmax(1) == y).mean()) for t, l in zip(TIERS, q_logits)},
        "int8_chain_seconds": round(time.monotonic() - t0, 1),
    }
    at_bundle = calibrate.evaluate(q_logits, y, b.thresholds, fbytes)
    res["at_bundle_thresholds"] = at_bundle.to_json()
    points, _ = calibrate.sweep(q_logits, y, fbytes, max_drops)
    res["oracle_on_test"] = [p.to_json() for p in points]
    if model is not None:
        from tierlite.converters.train import predict_logits
        f_logits = predict_logits(model, test.images)
        res["float_exit_accuracy"] = {t: float((l.argmax(1) == y).mean()) for t, l in zip(TIERS, f_logits)}
        res["int8_float_agreement"] = {t: float((q.argmax(1) == f.argmax(1)).mean())
                                       for t, q, f in zip(TIERS, q_logits, f_logits)}
        res["float_at_bundle_thresholds"] = calibrate.evaluate(f_logits, y, b.thresholds, fbytes).to_json()
    return res


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
