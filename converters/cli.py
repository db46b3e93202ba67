"""`tierlite train | convert | export | calibrate | inspect` (see docs/CONVERTERS.md).

    tierlite train TRAIN_DIR --workdir W [--preset full] [--binarized] [--set epochs=3]
    tierlite export --workdir W --out BUNDLE [--archive BUNDLE.tar.gz]   (needs W's checkpoint)
    tierlite convert TRAIN_DIR --out BUNDLE [--workdir W] [--test-dir TEST]   (train + export)
    tierlite calibrate BUNDLE --images DIR [--max-drop 0.005] [--write]
    tierlite inspect BUNDLE_OR_TFLITE
    tierlite recover BUNDLE --images TRAIN_DIR [--workdir W]   (a checkpoint rebuilt from the int8 segments)

TensorFlow is imported only inside run_* (and `inspect` needs none: it uses LiteRT).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from tierlite.errors import ConfigError, DataError

log = logging.getLogger("tierlite.converters")


def parse_sets(items: list[str] | None) -> dict:
    """--set key=value (value parsed as JSON when it parses, else kept as a string)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("train_dir", type=Path, help="image folder: <dir>/<class>/*.jpg")
    p.add_argument("--preset", default="small", help="small | cifar10 | full | mobilenet-96 (default small)")
    p.add_argument("--binarized", action="store_true", help="binarized end segment (bit-packed boundary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="override the preset's epochs")
    p.add_argument("--init-from", type=Path, help="workdir of a trained model whose matching layers seed this one")
    p.add_argument("--resume", action="store_true",
                   help="continue the workdir's unfinished training run (a finished one is not retrained)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any model/training setting, e.g. --set boundary=8 --set distill=0")


def _overrides(args) -> dict:
    o = parse_sets(args.set)
    if args.epochs is not None:
        o["epochs"] = args.epochs
    return o


# -- train -----------------------------------------------------------------------------------
def configure_train(p: argparse.ArgumentParser) -> None:
    _training_args(p)
    p.add_argument("--workdir", type=Path, required=True, help="checkpoint, data cache and reports go here")


def run_train(args) -> int:
    from tierlite.converters.pipeline import train_model
    _check_dir(args.train_dir)
    model, arch, tc, splits = train_model(args.train_dir, args.workdir, args.preset, args.binarized, args.seed,
                                          args.init_from, args.resume, **_overrides(args))
    print(f"checkpoint: {args.workdir / 'checkpoint' / 'model.keras'}")
    return 0


# -- export ----------------------------------------------------------------------------------
def configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, required=True, help="workdir of `tierlite train`")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--archive", type=Path, help="also write the bundle as one .tar.gz file")
    p.add_argument("--name", help="bundle name (default: from the checkpoint)")
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--max-drop", type=float, help="max accuracy drop vs cloud-only, fraction (default: preset's)")
    p.add_argument("--test-dir", type=Path, help="also evaluate on this folder (writes <workdir>/evaluation*.json)")


def run_export(args) -> int:
    out = _export_from_checkpoint(args.workdir, args.out, args.name, args.version, args.max_drop)
    _finish(args, out, args.workdir)
    return 0


def _export_from_checkpoint(workdir: Path, out: Path, name, version, max_drop):
    from tierlite.converters.datasets import checkpoint_splits, representative_frames
    from tierlite.converters.models import ArchConfig
    from tierlite.converters.pipeline import export_bundle
    from tierlite.converters.train import load_checkpoint

    model, meta = load_checkpoint(workdir)
    arch, tc = ArchConfig.from_json(meta["arch"]), meta["train"]
    train_dir = meta["train_dir"]
    splits = checkpoint_splits(meta, workdir)
    n = len(splits.train.labels)
    rep = representative_frames(splits.train.images, tc["calibration_frames"], meta["seed"])
    preset = meta.get("preset", "custom")
    return export_bundle(
        model, out, arch=arch, classes=meta["classes"], calib_images=splits.val.images,
        calib_labels=splits.val.labels, representative=rep,
        name=name or f"{Path(train_dir).parent.name}-{preset}{'-binary' if arch.binarized else ''}",
        version=version, max_drop=tc["max_drop"] if max_drop is None else max_drop, report_dir=workdir,
        extra={"training": {"preset": preset, "seed": meta["seed"], "epochs": tc["epochs"],
                            "train_frames": n, "val_frames": int(len(splits.val.labels)),
                            "checkpoint": f"{Path(workdir).name}/checkpoint (beside the bundle)"}})


def _finish(args, out: Path, workdir: Path) -> None:
    from tierlite.bundle import write_archive
    if getattr(args, "archive", None):
        write_archive(out, args.archive)
        print(f"archive: {args.archive}")
    print(f"bundle: {out}")
    if getattr(args, "test_dir", None):
        from tierlite.converters.pipeline import evaluate_bundle, write_json
        from tierlite.converters.train import load_checkpoint
        model, _ = load_checkpoint(workdir)
        res = evaluate_bundle(out, args.test_dir, model, cache_dir=Path(workdir) / "cache")
        path = write_json(Path(workdir) / f"evaluation-{out.name}.json", res)
        _print_evaluation(res)
        print(f"evaluation: {path}")


def _print_evaluation(res: dict) -> None:
    tiers = ("end", "edge", "cloud")
    print(f"test frames: {res['frames']}  segment bytes: {res['segment_bytes']}  feature bytes: {res['feature_bytes']}")
    if "float_exit_accuracy" in res:
        print("float top-1     " + "  ".join(f"{t} {res['float_exit_accuracy'][t] * 100:.2f}%" for t in tiers))
    print("int8 top-1      " + "  ".join(f"{t} {res['int8_exit_accuracy'][t] * 100:.2f}%" for t in tiers))
    if "int8_float_agreement" in res:
        print("int8~float agree " + "  ".join(f"{t} {res['int8_float_agreement'][t] * 100:.2f}%" for t in tiers))
    p = res["at_bundle_thresholds"]
    print(f"at bundle thresholds (validation-calibrated): system {p['accuracy'] * 100:.2f}% (cloud-only "
          f"{p['cloud_only_accuracy'] * 100:.2f}%), camera {p['fractions']['end'] * 100:.1f}%, edge "
          f"{p['fractions']['edge'] * 100:.1f}%, cloud {p['fractions']['cloud'] * 100:.1f}%, "
          f"{p['camera_uplink_bytes']:.1f} B/frame camera->edge")
    for p in res["oracle_on_test"]:
        print(f"  max drop {p['max_drop'] * 100:5.2f} pt (chosen on test): system {p['accuracy'] * 100:.2f}%, "
              f"camera {p['fractions']['end'] * 100:.1f}%, {p['camera_uplink_bytes']:.1f} B/frame")


# -- convert ---------------------------------------------------------------------------------
def configure_convert(p: argparse.ArgumentParser) -> None:
    _training_args(p)
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--workdir", type=Path, help="checkpoint and reports (default: <out>-work)")
    p.add_argument("--archive", type=Path, help="also write the bundle as one .tar.gz file")
    p.add_argument("--name", help="bundle name")
    p.add_argument("--version", type=int, default=1)
    p.add_argument("--test-dir", type=Path, help="evaluate the bundle on this folder afterwards")


def run_convert(args) -> int:
    from tierlite.converters.pipeline import build_bundle, default_workdir
    _check_dir(args.train_dir)
    workdir = args.workdir or default_workdir(args.out)
    out = build_bundle(args.train_dir, args.out, args.preset, args.binarized, args.seed, workdir=workdir,
                       name=args.name, version=args.version, init_from=args.init_from, resume=args.resume,
                       **_overrides(args))
    _finish(args, out, workdir)
    return 0


# -- calibrate -------------------------------------------------------------------------------
def configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="labelled held-out folder <dir>/<class>/*.jpg")
    src.add_argument("--site-stats", type=Path, nargs="+", metavar="FILE",
                     help="calibrate on the sites' statistics instead of frames (each site: `tierlite calibrate "
                          "BUNDLE --images ITS_VALIDATION_FRAMES --statistics-out FILE`); no frame leaves a site")
    p.add_argument("--statistics-out", type=Path, metavar="FILE",
                   help="with --images, also write this folder's summable exit statistics (counts by end and edge "
                        "entropy bin and which exits are right; no frames, no per-frame rows) for --site-stats")
    p.add_argument("--site", help="the site name written into --statistics-out")
    p.add_argument("--validation-split", type=float, metavar="FRACTION",
                   help="--images is the training folder: calibrate on the stratified validation split that "
                        "`tierlite convert` held out of it (its val_fraction, e.g. 0.1, and --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --validation-split (default 0, as convert)")
    p.add_argument("--max-drop", type=float, default=0.005, help="max accuracy drop vs cloud-only (fraction)")
    p.add_argument("--report", type=Path, help="report path prefix (default: <bundle>-work/calibration-<folder>)")
    p.add_argument("--write", action="store_true", help="write the chosen thresholds into the bundle's manifest")
    p.add_argument("--camera-slack", type=float, default=0.0, metavar="FRACTION",
                   help="give up at most this share of frames decided on the camera for the fewest uplink bytes "
                        "(camera->edge + edge->cloud); default 0: the most frames on the camera")
    p.add_argument("--feature-bits", type=int, choices=range(2, 9), metavar="{2..8}",
                   help="send the camera's int8 feature in this many bits an element: 2**bits levels spread over "
                        "the 0.5-99.5 percentile range of these frames' features (uniform encoding; 4 bits: half "
                        "the bytes, measured -0.03 pt edge exit on CIFAR-10); 8: plain int8. With --write it is "
                        "stored with the thresholds")
    p.add_argument("--end-tta", choices=("bundle", "none", "hflip"), default="bundle",
                   help="the end exit decides on the frame alone (none) or on the mean of the frame and its mirror "
                        "image (hflip: twice the camera's compute, measured +1.1 pt end exit on CIFAR-10); default: "
                        "as the bundle says. With --write it is stored with the thresholds")


def run_calibrate(args) -> int:
    from tierlite.bundle import Bundle, write_manifest
    from tierlite.converters import calibrate
    from tierlite.converters.pipeline import default_workdir, run_chain
    from tierlite.data import load_image_folder, split_validation
    from tierlite.bundle import FeatureEncoding
    from tierlite.wire import encoded_size

    b = Bundle.load(args.bundle)
    if args.site_stats:
        return _calibrate_from_site_statistics(b, args)
    if args.statistics_out is not None and (args.feature_bits is not None or args.end_tta != "bundle"):
        raise ConfigError("--statistics-out measures the bundle as it is: no --feature-bits or --end-tta")
    _check_dir(args.images)
    data = load_image_folder(args.images, tuple(b.input_shape[1:3]))
    if args.validation_split is not None:
        if not 0.0 < args.validation_split < 0.5:
            raise ConfigError(f"--validation-split is a fraction in (0, 0.5), got {args.validation_split}")
        data = data.subset(split_validation(data.labels, args.validation_split, args.seed)[1])
    if data.classes != b.labels:
        raise DataError(f"{args.images}: classes {data.classes} differ from the bundle's labels {b.labels}")
    if not 0.0 <= args.max_drop < 1.0:
        raise ConfigError(f"--max-drop is a fraction in [0, 1), got {args.max_drop}")
    end_tta = b.segment("end").test_time_augmentation if args.end_tta == "bundle" else \
        (None if args.end_tta == "none" else args.end_tta)
    encoding = b.encoding if args.feature_bits is None else _feature_encoding(b, data.images, args.feature_bits)
    logits = run_chain(args.bundle, data.images, end_tta, encoding)
    fbytes = (encoded_size(b.segment("end").output("feature").shape, encoding),
              encoded_size(b.segment("edge").output("feature").shape, FeatureEncoding.INT8))
    if not 0.0 <= args.camera_slack < 1.0:
        raise ConfigError(f"--camera-slack is a fraction in [0, 1), got {args.camera_slack}")
    points, table = calibrate.sweep(logits, data.labels, fbytes, camera_slack=args.camera_slack)
    chosen = calibrate.search_thresholds(logits, data.labels, fbytes, args.max_drop, table=table,
                                         camera_slack=args.camera_slack)
    prefix = args.report or default_workdir(args.bundle) / f"calibration-{args.images.name}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    calibrate.write_report(prefix.with_suffix(".json"), {
        "bundle": str(args.bundle), "images": str(args.images), "frames": len(data.labels),
        "skipped_files": len(data.skipped), "chosen": chosen.to_json(), "sweep": [p.to_json() for p in points]})
    calibrate.plot(prefix.with_suffix(".png"), points, table, title=f"{b.name} v{b.version}: {args.images.name}")
    print(f"end feature: {encoding.kind}" + (f" {encoding.bits} bits over [{encoding.low}, {encoding.high}]"
                                            if encoding.kind == "uniform" else "") + f", {fbytes[0]} B per escalation")
    print(f"end exit {'with ' + end_tta + ' test-time augmentation' if end_tta else 'on the frame alone'}: "
          f"{(logits[0].argmax(1) == data.labels).mean() * 100:.2f}%")
    print(f"thresholds end {chosen.thresholds['end']:.4f} edge {chosen.thresholds['edge']:.4f}: system "
          f"{chosen.accuracy * 100:.2f}% (cloud-only {chosen.cloud_only_accuracy * 100:.2f}%), camera "
          f"{chosen.camera_fraction * 100:.1f}%, {chosen.camera_uplink_bytes:.1f} B/frame up")
    print(f"report: {prefix.with_suffix('.json')}  plot: {prefix.with_suffix('.png')}")
    if args.statistics_out is not None:
        stats = calibrate.exit_statistics(logits, data.labels, **_statistics_identity(b), site=args.site)
        try:
            calibrate.write_report(args.statistics_out, stats)
        except OSError as e:
            raise ConfigError(f"{args.statistics_out}: cannot write ({e.strerror})") from None
        print(f"site statistics: {len(stats['cells'])} cells of {stats['frames']} frames -> {args.statistics_out}")
    if args.write:
        manifest = dict(b.manifest)
        manifest["thresholds"] = chosen.thresholds
        manifest.setdefault("calibration", {}).update(
            camera_slack=args.camera_slack,
            split=args.images.name if args.validation_split is None else
            f"validation ({args.validation_split:g} of {args.images.name}, seed {args.seed})",
            frames=len(data.labels), max_drop=args.max_drop,
            system_accuracy=chosen.accuracy, fractions=chosen.fractions,
            operating_points=[{"max_drop": p.max_drop, "thresholds": p.thresholds} for p in points])
        manifest["feature_encoding"] = encoding.to_manifest()
        manifest["segments"] = [dict(s, test_time_augmentation=end_tta or "none") if s["tier"] == "end" else s
                                for s in manifest["segments"]]
        if "drift_reference" in manifest:  # the node's monitor sees the augmented logits: same reference
            from tierlite.converters.pipeline import drift_reference_of
            manifest["drift_reference"] = drift_reference_of(
                b.segment_path("end").read_bytes(), list(b.segment("end").outputs), data.images,
                int(manifest["drift_reference"].get("window", 50)), end_tta)
        write_manifest(b.root, manifest)
        print(f"thresholds written to {b.root / 'manifest.json'}")
    return 0


def _statistics_identity(b) -> dict:
    """What site statistics were measured with: merged only with statistics of the same."""
    return {"bundle": b.name, "version": b.version, "classes": list(b.labels),
            "segments": {s["tier"]: s.get("sha256") for s in b.manifest["segments"]},
            "feature_encoding": b.encoding.to_manifest(),
            "test_time_augmentation": b.segment("end").test_time_augmentation or "none"}


def _calibrate_from_site_statistics(b, args) -> int:
    """`tierlite calibrate BUNDLE --site-stats FILE...`: thresholds from the sum of the sites'
    statistics (converters.calibrate.search_thresholds_from_statistics)."""
    from tierlite.bundle import FeatureEncoding, write_manifest
    from tierlite.converters import calibrate
    from tierlite.wire import encoded_size

    for flag, given in (("--feature-bits", args.feature_bits is not None), ("--end-tta", args.end_tta != "bundle"),
                        ("--validation-split", args.validation_split is not None),
                        ("--statistics-out", args.statistics_out is not None)):
        if given:
            raise ConfigError(f"{flag} needs frames; --site-stats calibrates the bundle as the sites measured it")
    reports = []
    for path in args.site_stats:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except OSError as e:
            raise DataError(f"{path}: cannot read site statistics ({e.strerror})") from None
        except ValueError:
            raise DataError(f"{path}: not JSON (site statistics are `--statistics-out` files)") from None
    try:
        stats = calibrate.merge_statistics(reports, [str(p) for p in args.site_stats])
    except ValueError as e:
        raise DataError(str(e)) from None
    mine = _statistics_identity(b)
    for key, value in mine.items():
        if stats.get(key) != value:
            raise DataError(f"the site statistics were measured with {key} {stats.get(key)!r}; "
                            f"this bundle has {value!r}")
    if not 0.0 <= args.max_drop < 1.0 or not 0.0 <= args.camera_slack < 1.0:
        raise ConfigError("--max-drop and --camera-slack are fractions in [0, 1)")
    fbytes = (encoded_size(b.segment("end").output("feature").shape, b.encoding),
              encoded_size(b.segment("edge").output("feature").shape, FeatureEncoding.INT8))
    chosen, points = calibrate.search_thresholds_from_statistics(stats, fbytes, args.max_drop, args.camera_slack)
    print(f"site statistics: {', '.join(map(str, stats['sites']))}: {stats['frames']} frames")
    print(f"thresholds end {chosen.thresholds['end']:.4f} edge {chosen.thresholds['edge']:.4f}: system "
          f"{chosen.accuracy * 100:.2f}% (cloud-only {chosen.cloud_only_accuracy * 100:.2f}%), camera "
          f"{chosen.camera_fraction * 100:.1f}%, {chosen.camera_uplink_bytes:.1f} B/frame up")
    if args.write:
        manifest = dict(b.manifest)
        manifest["thresholds"] = chosen.thresholds
        manifest.setdefault("calibration", {}).update(
            camera_slack=args.camera_slack, split=f"site statistics ({', '.join(map(str, stats['sites']))})",
            frames=stats["frames"], max_drop=args.max_drop, statistics_bins=stats["bins"],
            system_accuracy=chosen.accuracy, fractions=chosen.fractions,
            operating_points=[{"max_drop": p.max_drop, "thresholds": p.thresholds} for p in points])
        write_manifest(b.root, manifest)
        print(f"thresholds written to {b.root / 'manifest.json'}")
    return 0


def _feature_encoding(b, images: np.ndarray, bits: int):
    """int8 (bits 8), or `bits`-bit uniform levels over the 0.5-99.5 percentile range of the end
    features of these frames (clipping the tails cost nothing measurable; the full range lost
    0.9 pt edge exit at 4 bits on CIFAR-10)."""
    from tierlite.bundle import FeatureEncoding
    from tierlite.segment import Segment

    if b.encoding.kind != "int8":
        raise ConfigError(f"--feature-bits re-encodes an int8 feature; this bundle's is {b.encoding.kind}")
    if bits == 8:
        return FeatureEncoding.INT8
    feats = Segment(b, "end").run_batch(images).feature.astype(np.float64)
    low, high = (int(v) for v in np.round(np.percentile(feats, [0.5, 99.5])))
    return FeatureEncoding("uniform", low, max(high, low + 1), bits)


# -- inspect ---------------------------------------------------------------------------------
def configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="bundle directory, bundle .tar.gz, or any .tflite file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_inspect(args) -> int:
    from tierlite.converters.inspect import describe, format_text
    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


# -- recover ---------------------------------------------------------------------------------
def configure_recover(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, help="bundle directory (int8 segments, manifest with model and training)")
    p.add_argument("--images", type=Path, required=True,
                   help="the training folder the bundle was trained on (<dir>/<class>/*.jpg): its split is "
                        "regenerated and checked, BatchNorm statistics are measured on its training frames")
    p.add_argument("--workdir", type=Path, help="where checkpoint/ is written (default: <bundle>-work, where "
                                                "`tierlite retrain` looks); never overwrites a checkpoint")
    p.add_argument("--frames", type=int, default=5000, help="clean training frames for the BatchNorm statistics")
    p.add_argument("--verify-frames", type=int, default=2000,
                   help="validation frames the recovered model is compared on with the int8 bundle")


def run_recover(args) -> int:
    from tierlite.converters.pipeline import default_workdir
    from tierlite.converters.recover import recover_checkpoint

    if args.frames < 100 or args.verify_frames < 1:
        raise ConfigError("--frames must be >= 100 and --verify-frames >= 1")
    workdir = args.workdir or default_workdir(args.bundle)
    rep = recover_checkpoint(args.bundle, workdir, args.images, stat_frames=args.frames,
                             verify_frames=args.verify_frames)
    tiers = ("end", "edge", "cloud")
    print(f"recovered from {rep['recovered']['name']} v{rep['recovered']['version']}; BatchNorm statistics of "
          f"{rep['recovered']['statistics_frames']} training frames; checked on {rep['frames']} validation frames")
    print("float ~ int8 agreement " + "  ".join(f"{t} {rep['agreement'][t] * 100:.2f}%" for t in tiers))
    print("float top-1            " + "  ".join(f"{t} {rep['float_accuracy'][t] * 100:.2f}%" for t in tiers))
    print("bundle int8 top-1      " + "  ".join(f"{t} {rep['int8_accuracy'][t] * 100:.2f}%" for t in tiers))
    r = rep["re_export_end"]
    print(f"end re-exported to int8: feature within one step {r['feature']['within_one_step'] * 100:.2f}% "
          f"(identical {r['feature']['identical'] * 100:.2f}%), logits top-1 agreement "
          f"{r['logits']['top1_agreement'] * 100:.2f}%")
    print(f"checkpoint: {rep['checkpoint']}  report: {Path(workdir) / 'recovery.json'}  ({rep['seconds']:.0f} s)")
    return 0


def _check_dir(path: Path) -> None:
    if not Path(path).is_dir():
        raise DataError(f"image folder not found: {path}")
