"""`tierlite bench accuracy`: accuracy, uplink bytes and latency of every configuration on the
same frames, in one run.

Configurations (rows): tierlite co-inference with the int8 bundle at calibrated operating points
(max accuracy drop 0.5 / 1 / 2 points against the full chain); tierlite with the binarized end
model; camera-only (the end exit decides every frame); cloud-only offload as Sedna-style systems
do it (every frame sent as its JPEG, the full end->edge->cloud chain run in the cloud); optionally
MLPerf Tiny reference models run on the camera (--reference).

How the figures are obtained:
- offline chain, every frame: each frame is run through every tier of every bundle once
  (block by block, each model back to back within a block of 64 frames, so background load hits
  all configurations alike and no model is timed on caches another just evicted); a configuration is then the
  exit policy (tierlite.policy.chain_decisions) applied to those logits at its thresholds.
  Camera decision latency = end segment invoke + exit entropy, per frame. Offline end-to-end
  latency = compute of the tiers a frame visits (no network), plus JPEG decode for cloud-only.
- real runtime, a subset (--e2e-frames): the same frames through real processes and a real
  Mosquitto on loopback (tierlite.tools.bench.e2e); end-to-end = frame in hand -> result at the camera.
- uplink bytes: camera -> first hop. Payload = the feature (tierlite) or the JPEG file (offload);
  "with MQTT" adds the real wire header, topic, properties and MQTT fixed header of each message.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.errors import ConfigError, DataError
from tierlite.tools.bench.accuracy_report import NOTES, check_targets, print_summary, write_accuracy_report
from tierlite.tools.bench.configs import (ConfigResult, camera_only, cascade, cloud_only, escalation_overhead,
                                          reference_config)
from tierlite.tools.stack import reference_bundle
from tierlite.tools.bench.report import DEFAULT_DATA, Report, fmt_num, say
from tierlite.tools.bench.trace import ChainRunner, ReferenceRunner, load_frames, reference_paths, run_offline

DEFAULT_DROPS = "0.5,1,2"


def configure_accuracy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", default=reference_bundle(), required=reference_bundle() is None,
                   help="int8 bundle (directory or .tar.gz) (default: models/cifar10 when present)")
    p.add_argument("--binary-bundle", help="bundle with the binarized end segment (adds its rows)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"image folder <class>/*.jpg, the test frames (default {DEFAULT_DATA})")
    p.add_argument("--limit", type=int, help="use a stratified sample of this many frames (quick runs)")
    p.add_argument("--drops", default=DEFAULT_DROPS,
                   help="operating points: max top-1 drop in points vs the full chain, from the bundle's "
                        f"calibration on validation data (default {DEFAULT_DROPS})")
    p.add_argument("--val-data", help="validation image folder (never the test frames) to compute thresholds "
                                      "for drops the bundle's calibration does not hold")
    p.add_argument("--reference", action="append", default=[], metavar="TFLITE_OR_DIR",
                   help="reference model(s) run on the camera, int8 input pixel-128 (e.g. "
                        "../shared/reference_models/mlperf-tiny-ic); repeatable")
    p.add_argument("--e2e-frames", type=int, default=300,
                   help="frames per configuration sent through the real runtime (Mosquitto + processes); 0 skips")
    p.add_argument("--e2e-fps", type=float, default=50.0,
                   help="pace of frames through the real runtime (default 50/s, a camera's rate)")
    p.add_argument("--runtime", default="litert", help="runtime plugin for every model (default litert)")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1, like a camera)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit and --e2e-frames samples")
    p.add_argument("--out", default="bench-results", help="output folder (results.json, accuracy.md, PNGs)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


# -- operating points -------------------------------------------------------------------------------
def operating_points(bundle_path: str | Path, bundle, drops: list[float],
                     val_data: str | None = None) -> list[tuple[float, dict[str, float], str]]:
    """(drop in points, thresholds, where they came from) for each max drop, chosen on validation
    data, never on the test frames: the manifest (its chosen max_drop, then calibration.operating_points,
    the converters' sweep), else <bundle>-work/calibration.json (the same sweep, older bundles), else
    --val-data recomputed with the converters' calibration code."""
    cal = bundle.manifest.get("calibration", {})
    sweep = {round(float(p["max_drop"]), 6): p["thresholds"] for p in cal.get("operating_points", [])}
    sweep_file = Path("calibration.json")
    if not sweep:  # bundles exported before the manifest kept the sweep: the converters' report
        sweep_file, sweep = _sweep_report(Path(bundle_path))
    val_logits = None
    out = []
    for drop in drops:
        frac = round(drop / 100.0, 6)
        if cal.get("max_drop") is not None and round(float(cal["max_drop"]), 6) == frac:
            out.append((drop, bundle.thresholds, "manifest (validation)"))
        elif frac in sweep:
            where = "manifest sweep" if cal.get("operating_points") else sweep_file.name
            out.append((drop, {k: float(v) for k, v in sweep[frac].items()}, f"{where} (validation)"))
        elif val_data:
            from tierlite.converters.calibrate import search_thresholds

            if val_logits is None:
                val_logits = _validation_logits(bundle, val_data)
            logits, labels, fbytes = val_logits
            op = search_thresholds(logits, labels, fbytes, max_drop=frac)
            out.append((drop, op.thresholds, f"recomputed on {val_data}"))
        else:
            raise ConfigError(f"bundle {bundle_path}: no calibrated thresholds for a {drop:g} pt drop "
                              f"(manifest has {cal.get('max_drop')}, sweep has {sorted(sweep)}); "
                              "pass --val-data DIR (validation frames, never test) to compute them")
    return out


def _sweep_report(bundle_path: Path) -> tuple[Path, dict[float, dict]]:
    """The converters' calibration.json for this bundle (beside it in <bundle>-work, or in the
    folder that holds it), as {max_drop: thresholds}; empty if there is none."""
    import json

    from tierlite.converters.pipeline import default_workdir

    beside = default_workdir(bundle_path) / "calibration.json"  # named after the bundle: it is this one's
    for f in (beside, bundle_path.parent / "calibration.json"):
        try:
            doc = json.loads(f.read_text())
            if f != beside and Path(doc.get("bundle", "")).resolve() != bundle_path.resolve():
                continue
            return f, {round(float(p["max_drop"]), 6): p["thresholds"] for p in doc["sweep"]}
        except (OSError, KeyError, TypeError, ValueError):
            continue
    return Path("calibration.json"), {}


def _validation_logits(bundle, val_data: str):
    from tierlite.converters.pipeline import run_chain
    from tierlite.data import load_image_folder
    from tierlite.wire import FeatureEncoding, encoded_size

    val = load_image_folder(val_data, size=tuple(bundle.input_shape[1:3]))
    enc = bundle.feature_encoding
    fbytes = (encoded_size(bundle.segment("end").output("feature").shape, enc),
              encoded_size(bundle.segment("edge").output("feature").shape, FeatureEncoding.INT8))
    return run_chain(bundle.root, val.images), val.labels, fbytes



# -- the command ------------------------------------------------------------------------------------
def parse_drops(text: str) -> list[float]:
    try:
        drops = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--drops must be comma-separated numbers of points, got {text!r}") from None
    if not drops or any(d < 0 for d in drops):
        raise ConfigError(f"--drops must be non-negative numbers of points, got {text!r}")
    return drops


def run_accuracy(args: argparse.Namespace) -> int:
    from tierlite.bundle import Bundle
    from tierlite.data import stratified_sample

    drops = parse_drops(args.drops)
    if args.limit is not None and args.limit < 2:
        raise ConfigError("--limit must be at least 2 frames")
    progress = not args.quiet
    bundle = Bundle.load(args.bundle)
    binary = Bundle.load(args.binary_bundle) if args.binary_bundle else None
    if binary is not None and binary.input_shape != bundle.input_shape:
        raise ConfigError(f"--binary-bundle input {binary.input_shape} differs from --bundle {bundle.input_shape}")
    refs_paths = reference_paths(args.reference)
    report = Report("accuracy", args.out, args)

    say(f"loading frames from {args.data} ...")
    frames = load_frames(args.data, tuple(bundle.input_shape[1:3]), args.limit, args.seed, progress)
    if frames.classes != bundle.labels:
        raise DataError(f"{args.data}: class folders {frames.classes} do not match the bundle's labels {bundle.labels}")
    n = len(frames.labels)
    say(f"{n} frames, {len(frames.classes)} classes; running every model on every frame")

    chains = [ChainRunner("int8", bundle, args.runtime, args.threads, n)]
    if binary is not None:
        chains.append(ChainRunner("binary", binary, args.runtime, args.threads, n))
    refs = [ReferenceRunner(p, args.runtime, args.threads, n) for p in refs_paths]
    decode_s = run_offline(frames, chains, refs, progress)
    traces = {c.name: c.trace() for c in chains}

    configs: list[ConfigResult] = []
    for trace in traces.values():
        overhead = escalation_overhead(trace.bundle)
        path = args.bundle if trace.name == "int8" else args.binary_bundle
        for drop, thr, source in operating_points(path, trace.bundle, drops, args.val_data):
            config = cascade(trace, f"tierlite {trace.name} @ max drop {fmt_num(drop)} pt", "tierlite", thr,
                             overhead, drop)
            config.threshold_source = source
            config.bundle_dir = trace.bundle.root
            configs.append(config)
    for trace in traces.values():
        configs.append(camera_only(trace, f"camera-only {trace.name} (end exit decides all)"))
    configs.append(cloud_only(traces["int8"], frames, decode_s))
    configs[-1].bundle_dir = bundle.root
    configs += [reference_config(r) for r in refs]

    rows = [c.row(frames.labels) for c in configs]
    jpeg_mqtt = next(r["uplink_mqtt_B"] for r in rows if r["kind"] == "cloud-only")
    for r in rows:
        r["uplink_reduction_x"] = jpeg_mqtt / r["uplink_mqtt_B"] if r["uplink_mqtt_B"] > 0 else None

    e2e_n = min(args.e2e_frames, n)
    if e2e_n > 0:
        from tierlite.tools.bench.e2e import measure_e2e

        idx = np.sort(stratified_sample(frames.labels, e2e_n, args.seed))
        networked = [c for c in configs if c.kind in ("tierlite", "cloud-only")]
        real = measure_e2e(networked, frames, idx, args)
        for r, c in zip(rows, configs):
            if r["config"] in real:
                # The same frames offline, to check that the runtime decides as the offline chain does.
                r.update(real[r["config"]], subset_offline_top1=100.0 * float(np.mean(c.labels[idx] == frames.labels[idx])),
                         subset_offline_share={t: 100.0 * float(np.mean(c.tier[idx] == k)) for k, t in enumerate(c.tiers)})

    targets = check_targets(rows)
    report.results.update(frames=n, data=str(args.data), e2e_frames=e2e_n, rows=rows, targets=targets,
                          notes=NOTES, bundles={t.name: _describe(t.bundle) for t in traces.values()})
    write_accuracy_report(report, rows, targets, e2e_n)
    print_summary(rows, targets)
    paths = report.write()
    say(f"wrote {paths['results']} and {paths['markdown']}")
    return 0



def _describe(bundle) -> dict[str, Any]:
    return {"name": bundle.name, "version": bundle.version, "path": str(bundle.root),
            "segment_bytes": {t: s.bytes for t, s in bundle.segments.items()},
            "feature_encoding": bundle.feature_encoding["kind"]}

