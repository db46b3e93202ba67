"""`tierlite bench accuracy`: accuracy, uplink bytes and latency of every configuration on the
same frames, in one run.

Configurations (rows): tierlite co-inference with the int8 bundle at calibrated operating points
(max accuracy drop 0.5 / 1 / 2 points against the full chain); tierlite with the binarized end
model; camera-only (the end exit decides every frame); cloud-only offload as Sedna-style systems
do it (every frame sent as its JPEG, the full end->edge->cloud chain run in the cloud); optionally
MLPerf Tiny reference models run on the camera (--reference).

How the figures are obtained:
- offline chain, every frame: each frame is run through every tier of every bundle once
  (frame-major, so background load hits all configurations alike); a configuration is then the
  exit policy (tierlite.policy.chain_decisions) applied to those logits at its thresholds.
  Camera decision latency = end segment invoke + exit entropy, per frame. Offline end-to-end
  latency = compute of the tiers a frame visits (no network), plus JPEG decode for cloud-only.
- real runtime, a subset (--e2e-frames): the same frames through real processes and a real
  Mosquitto on loopback (tierlite.bench.e2e); end-to-end = frame in hand -> result at the camera.
- uplink bytes: camera -> first hop. Payload = the feature (tierlite) or the JPEG file (offload);
  "with MQTT" adds the real wire header, topic, properties and MQTT fixed header of each message.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.bench.report import DEFAULT_DATA, Progress, Report, Target, fmt_num, latency_ms, markdown_table, say
from tierlite.errors import ConfigError, DataError

log = logging.getLogger("tierlite.bench.accuracy")

DEFAULT_DROPS = "0.5,1,2"

# Targets from the brief (reported against, never asserted).
T_END_ACC = Target("end model standalone top-1", 80.0, True, " %", " pt")
T_END_BYTES = Target("end model bytes", 64 * 1024, False, " B")
T_SYSTEM_ACC = Target("system top-1", 90.0, True, " %", " pt")
T_CAMERA_SHARE = Target("frames decided on camera (within 0.5 pt of cloud-only)", 75.0, True, " %", " pt")
T_WITHIN = Target("top-1 gap to cloud-only", 0.5, False, " pt")
T_UPLINK = Target("uplink reduction vs JPEG offload", 10.0, True, "x")
T_CAMERA_P50 = Target("camera decision p50", 0.2, False, " ms")
T_ESCALATION_P99 = Target("escalation round trip p99", 10.0, False, " ms")


def configure_accuracy(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="int8 bundle (directory or .tar.gz)")
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


# -- frames --------------------------------------------------------------------------------------
@dataclass
class Frames:
    images: np.ndarray  # (N, H, W, 3) uint8 RGB
    labels: np.ndarray  # (N,)
    classes: list[str]
    paths: list[Path]
    jpeg_bytes: np.ndarray  # (N,) size of each frame's file: what offload sends


def load_frames(data: str | Path, size: tuple[int, int], limit: int | None, seed: int, progress: bool) -> Frames:
    from tierlite.data import load_image_folder

    data = Path(data)
    if not data.is_dir():
        raise DataError(f"test frames not found: {data} (pass --data DIR, an image folder <class>/*.jpg)")
    s = load_image_folder(data, size=size, limit=limit, seed=seed, progress=progress)
    return Frames(s.images, s.labels, s.classes, s.paths, np.array([p.stat().st_size for p in s.paths]))


# -- offline trace: every tier of a bundle on every frame ----------------------------------------
@dataclass
class ChainTrace:
    """What one bundle's chain does on every frame, independent of thresholds."""
    name: str
    tiers: list[str]
    logits: list[np.ndarray]  # per tier, (N, C)
    seconds: list[np.ndarray]  # per tier, (N,) compute time; end includes the exit decision
    feature_bytes: list[int]  # encoded size of the feature each tier sends up (last tier: 0)
    camera_model_bytes: int
    thresholds: dict[str, float]  # the bundle's own (manifest) thresholds
    bundle: Any = None


class ChainRunner:
    """Runs one bundle's segments frame by frame, timing each tier, through the wire codec."""

    def __init__(self, name: str, bundle, runtime: str, threads: int, n: int):
        from tierlite.segment import Segment

        self.name, self.bundle = name, bundle
        self.tiers = [t for t in ("end", "edge", "cloud") if t in bundle.segments]
        opts = {"threads": threads}
        self.segments = [Segment(bundle, t, runtime=runtime, options=opts) for t in self.tiers]
        self.encoding = bundle.feature_encoding
        classes = len(bundle.labels)
        self.logits = [np.zeros((n, classes), np.float32) for _ in self.tiers]
        self.seconds = [np.zeros(n) for _ in self.tiers]
        self.feature_bytes = [0] * len(self.tiers)

    def run(self, i: int, image: np.ndarray) -> None:
        from tierlite.policy import normalized_entropy, softmax
        from tierlite.segment import decode_feature, encode_feature

        x = image[None]
        payload, shape, enc = b"", (), self.encoding
        for k, seg in enumerate(self.segments):
            t0 = time.perf_counter()
            if k > 0:  # a receiving tier decodes the wire payload: exactly what the wire delivers
                x = decode_feature(payload, shape, enc)
            out = seg.run(x)
            normalized_entropy(softmax(out.logits))  # the exit decision is part of the tier's work
            self.seconds[k][i] = time.perf_counter() - t0
            self.logits[k][i] = out.logits
            if out.feature is None:
                break
            # end -> edge in the bundle's encoding (binary: 1 bit per element), edge -> cloud int8
            enc = self.encoding if k == 0 else {"kind": "int8"}
            payload, shape = encode_feature(out.feature, enc), out.feature.shape
            self.feature_bytes[k] = len(payload)

    def trace(self) -> ChainTrace:
        return ChainTrace(self.name, self.tiers, self.logits, self.seconds, self.feature_bytes,
                          self.bundle.segment("end").bytes, self.bundle.thresholds, self.bundle)


class ReferenceRunner:
    """A single-model reference (e.g. MLPerf Tiny ResNet-8) on the camera: int8 input pixel-128."""

    def __init__(self, path: Path, runtime: str, threads: int, n: int):
        from tierlite.runtimes import open_runtime

        self.path, self.name = path, path.stem
        self.rt = open_runtime(path, runtime, {"threads": threads}, fallback=True)
        self.input = self.rt.inputs[0]
        self.logits: np.ndarray | None = None
        self.seconds = np.zeros(n)
        self.n = n

    def run(self, i: int, image: np.ndarray) -> None:
        t0 = time.perf_counter()
        if self.input.dtype == np.int8:
            x = (image.astype(np.int16) - 128).astype(np.int8)[None]
        else:
            x = image.astype(self.input.dtype)[None]
        scores = self.rt.run([x.reshape(self.input.shape)])[0].reshape(-1)
        int(scores.argmax())  # the decision is part of the camera's work
        self.seconds[i] = time.perf_counter() - t0
        if self.logits is None:
            self.logits = np.zeros((self.n, scores.size), np.float32)
        self.logits[i] = scores


def reference_paths(specs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("*.tflite"))
            if not found:
                raise ConfigError(f"--reference {p}: no .tflite files in this folder")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise ConfigError(f"--reference {p}: no such file or folder")
    return paths


def run_offline(frames: Frames, chains: list[ChainRunner], refs: list[ReferenceRunner],
                progress: bool) -> np.ndarray:
    """Frame-major pass over every model; returns per-frame JPEG decode seconds (offload's cloud cost)."""
    from tierlite.data import decode_image

    n = len(frames.labels)
    decode_s = np.zeros(n)
    size = frames.images.shape[1:3]
    bar = Progress(n, "offline chain (all models, every frame)", enabled=progress)
    for i in range(n):
        jpeg = frames.paths[i].read_bytes()
        t0 = time.perf_counter()
        decode_image(jpeg, size)
        decode_s[i] = time.perf_counter() - t0
        for runner in (*chains, *refs):
            runner.run(i, frames.images[i])
        bar.update()
    bar.close()
    return decode_s


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
    from tierlite.segment import encoded_size

    val = load_image_folder(val_data, size=tuple(bundle.input_shape[1:3]))
    enc = bundle.feature_encoding
    fbytes = (encoded_size(bundle.segment("end").output("feature").shape, enc),
              encoded_size(bundle.segment("edge").output("feature").shape, {"kind": "int8"}))
    return run_chain(bundle.root, val.images), val.labels, fbytes


# -- metrics per configuration ----------------------------------------------------------------------
@dataclass
class ConfigResult:
    name: str
    kind: str  # tierlite | camera-only | cloud-only | reference
    tier: np.ndarray  # (N,) index of the tier that decided
    labels: np.ndarray  # (N,) predicted class
    uplink_payload: np.ndarray  # (N,) camera uplink payload bytes per frame
    uplink_mqtt: np.ndarray  # (N,) the same as MQTT PUBLISH packets on the wire
    camera_s: np.ndarray | None  # (N,) camera decision latency (None: the camera decides nothing)
    e2e_s: np.ndarray  # (N,) offline end-to-end compute latency
    camera_model_bytes: int
    thresholds: dict[str, float] = field(default_factory=dict)
    drop: float | None = None
    bundle_dir: Path | None = None  # for the real-runtime pass
    tiers: tuple[str, ...] = ("end", "edge", "cloud")
    threshold_source: str = ""
    edge_to_cloud: np.ndarray | None = None  # (N,) edge feature bytes sent on to the cloud (the WAN, per site)

    def row(self, truth: np.ndarray) -> dict[str, Any]:
        n = len(truth)
        share = {t: 100.0 * float(np.mean(self.tier == k)) for k, t in enumerate(self.tiers)}
        cam = latency_ms(self.camera_s) if self.camera_s is not None else latency_ms([])
        e2e = latency_ms(self.e2e_s)
        return {
            "config": self.name, "kind": self.kind, "frames": n,
            "drop_pt": self.drop, "thresholds": self.thresholds, "threshold_source": self.threshold_source,
            "top1": 100.0 * float(np.mean(self.labels == truth)),
            "share_end": share.get("end", 0.0), "share_edge": share.get("edge", 0.0),
            "share_cloud": share.get("cloud", 0.0),
            "uplink_payload_B": float(self.uplink_payload.mean()),
            "uplink_mqtt_B": float(self.uplink_mqtt.mean()),
            "camera_p50_ms": cam["p50_ms"], "camera_p99_ms": cam["p99_ms"],
            "e2e_offline_p50_ms": e2e["p50_ms"], "e2e_offline_p99_ms": e2e["p99_ms"],
            "camera_model_B": self.camera_model_bytes,
            "edge_to_cloud_payload_B": float(self.edge_to_cloud.mean()) if self.edge_to_cloud is not None else None,
        }


def cascade(trace: ChainTrace, name: str, kind: str, thresholds: dict[str, float], escalation_wire: int,
            drop: float | None = None) -> ConfigResult:
    """Apply the exit policy at `thresholds` to a traced chain. escalation_wire: MQTT bytes of one
    escalation message around the feature payload (header + topic + properties + fixed header)."""
    from tierlite.policy import chain_decisions

    thr = [thresholds[t] for t in trace.tiers[:-1]]
    tier, labels = chain_decisions(trace.logits, thr)
    escalated = tier > 0
    payload = np.where(escalated, trace.feature_bytes[0], 0)
    mqtt = np.where(escalated, trace.feature_bytes[0] + escalation_wire, 0)
    # Offline e2e: a frame pays for every tier up to the one that decides it.
    spent = np.stack(trace.seconds, axis=1)
    visited = np.arange(len(trace.tiers))[None, :] <= tier[:, None]
    e2e = (spent * visited).sum(axis=1)
    wan = np.where(tier > 1, trace.feature_bytes[1], 0) if len(trace.tiers) > 2 else None
    return ConfigResult(name, kind, tier, labels, payload, mqtt, trace.seconds[0], e2e, trace.camera_model_bytes,
                        dict(thresholds), drop, tiers=tuple(trace.tiers), edge_to_cloud=wan)


def camera_only(trace: ChainTrace, name: str) -> ConfigResult:
    n = trace.logits[0].shape[0]
    zero = np.zeros(n)
    return ConfigResult(name, "camera-only", np.zeros(n, np.int64), trace.logits[0].argmax(1), zero, zero,
                        trace.seconds[0], trace.seconds[0].copy(), trace.camera_model_bytes,
                        tiers=tuple(trace.tiers))


def cloud_only(trace: ChainTrace, frames: Frames, decode_s: np.ndarray) -> ConfigResult:
    """Sedna-style offload: the JPEG goes up; the cloud decodes it and runs the whole chain."""
    n = len(frames.labels)
    last = len(trace.tiers) - 1
    e2e = decode_s + np.stack(trace.seconds, axis=1).sum(axis=1)
    return ConfigResult("cloud-only offload (JPEG, full chain in cloud)", "cloud-only", np.full(n, last),
                        trace.logits[-1].argmax(1), frames.jpeg_bytes.astype(float),
                        np.array([offload_message_bytes(int(b)) for b in frames.jpeg_bytes], dtype=float),
                        None, e2e, 0, tiers=tuple(trace.tiers))


def reference_config(ref: ReferenceRunner) -> ConfigResult:
    n = ref.n
    zero = np.zeros(n)
    return ConfigResult(f"reference {ref.name} (camera)", "reference", np.zeros(n, np.int64), ref.logits.argmax(1),
                        zero, zero, ref.seconds, ref.seconds.copy(), ref.path.stat().st_size)


# -- MQTT framing --------------------------------------------------------------------------------
def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def mqtt_publish_bytes(topic: str, payload_len: int, qos: int = 0, properties: bytes | None = None) -> int:
    """Bytes of one MQTT PUBLISH packet: fixed header (type byte + remaining length), topic,
    packet id (QoS > 0), MQTT 5 properties (`properties` = the packed block incl. its length;
    None for MQTT 3.1.1) and the payload."""
    variable = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + (len(properties) if properties is not None else 0)
    remaining = variable + payload_len
    return 1 + _varint_len(remaining) + remaining


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
        from tierlite.bench.e2e import measure_e2e

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


NOTES = [
    "uplink = camera -> first hop, mean over all frames (frames decided on the camera send nothing). "
    "tierlite: a tierlite.wire FEATURE message (header, shape, end logits, feature) per escalated frame; "
    "offload: frame id + JPEG file per frame. 'MQTT' adds topic, properties and fixed header of an MQTT 5 "
    "PUBLISH at QoS 0 (TCP/IP headers excluded on both sides). The node's optional JSON result event "
    "(<prefix>/<node>/result, for applications) is excluded on both sides.",
    "thresholds of each operating point are chosen on validation data (source in results.json), never on these frames.",
    "camera decision = end segment invoke + exit entropy on a decoded frame, 1 thread.",
    "e2e offline = compute of every tier a frame visits (cloud-only: JPEG decode + full chain), no network.",
    "e2e real = frame in hand -> result back at the camera through Mosquitto on loopback and real worker "
    "processes, on the stratified subset of frames given by --e2e-frames.",
]


def _pct(x: Any) -> str:
    return "–" if x is None else f"{x:.2f}"


def _ms(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _pair(a: str, b: str, f=_ms):
    return lambda r: f"{f(r.get(a))} / {f(r.get(b))}"


COLUMNS = [
    ("config", "configuration", str),
    ("top1", "top-1 %", _pct),
    ("shares", "decided end / edge / cloud %", None),
    ("uplink_payload_B", "uplink B/frame (payload)", None),
    ("uplink_mqtt_B", "uplink B/frame (MQTT)", None),
    ("uplink_reduction_x", "vs JPEG offload", lambda x: "–" if x is None else f"{x:.1f}x"),
    ("camera", "camera decision p50 / p99 ms", None),
    ("e2e_offline", "e2e offline p50 / p99 ms", None),
    ("e2e_real", "e2e real p50 / p99 ms (n)", None),
    ("camera_model_B", "model bytes on camera", None),
]


def _display_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        d = dict(r)
        d["shares"] = f"{r['share_end']:.1f} / {r['share_edge']:.1f} / {r['share_cloud']:.1f}"
        d["camera"] = _pair("camera_p50_ms", "camera_p99_ms")(r)
        d["e2e_offline"] = _pair("e2e_offline_p50_ms", "e2e_offline_p99_ms")(r)
        d["e2e_real"] = (f"{_ms(r['e2e_real_p50_ms'])} / {_ms(r['e2e_real_p99_ms'])} ({r['e2e_real_n']})"
                         if r.get("e2e_real_n") else "–")
        if r["kind"] == "cloud-only":
            d["camera_model_B"] = "0 (camera sends JPEG)"
        out.append(d)
    return out


def _first(rows, **match) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The brief's targets, each against the row it is about (the most accurate tierlite int8
    operating point = smallest drop)."""
    out: list[dict[str, Any]] = []
    cam = _first(rows, kind="camera-only")
    cloud = _first(rows, kind="cloud-only")
    ops = sorted((r for r in rows if r["kind"] == "tierlite" and r["config"].startswith("tierlite int8")),
                 key=lambda r: r["drop_pt"])
    op = ops[0] if ops else None

    def add(target: Target, value, where: str):
        out.append({**target.check(value), "config": where})

    if cam:
        add(T_END_ACC, cam["top1"], cam["config"])
        add(T_END_BYTES, float(cam["camera_model_B"]), cam["config"])
        add(T_CAMERA_P50, cam["camera_p50_ms"], cam["config"])
    bin_cam = _first(rows, config="camera-only binary (end exit decides all)")
    if bin_cam:
        add(T_END_ACC, bin_cam["top1"], bin_cam["config"])
        add(T_END_BYTES, float(bin_cam["camera_model_B"]), bin_cam["config"])
        add(T_CAMERA_P50, bin_cam["camera_p50_ms"], bin_cam["config"])
    if op:
        add(T_SYSTEM_ACC, op["top1"], op["config"])
        add(T_CAMERA_SHARE, op["share_end"], op["config"])
        if cloud:
            add(T_WITHIN, cloud["top1"] - op["top1"], f"{op['config']} vs cloud-only")
        if op["uplink_mqtt_B"] == 0:  # every frame decided on the camera: no uplink at all
            out.append({**T_UPLINK.check(None), "met": True, "status": "met (nothing sent up)",
                        "config": op["config"] + " (MQTT bytes)"})
        else:
            add(T_UPLINK, op.get("uplink_reduction_x"), op["config"] + " (MQTT bytes)")
        add(T_ESCALATION_P99, op.get("escalation_real_p99_ms"), op["config"] + " (real runtime, escalated frames)")
        if op.get("e2e_real_n") and not op.get("escalation_real_n"):
            out[-1]["status"] = "n/a: no frame of the subset escalated"
    return out


TARGET_COLUMNS = [("target", "target", str), ("config", "measured on", str), ("goal", "goal", str),
                  ("measured", "measured", None), ("status", "status", str)]


REAL_COLUMNS = [
    ("config", "configuration", str), ("e2e_real_n", "frames", None),
    ("real_top1", "top-1 % real", _pct), ("subset_offline_top1", "top-1 % offline, same frames", _pct),
    ("real_shares", "decided end / edge / cloud % real (offline)", str),
    ("camera_real", "camera decision p50 / p99 ms", str), ("e2e_real", "e2e p50 / p99 ms", str),
    ("escalation_real", "escalated frames p50 / p99 ms (n)", str), ("real_fallbacks", "fallbacks", None),
    ("real_missing", "missing results", None),
]


def _real_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if not r.get("e2e_real_n"):
            continue
        d = dict(r)
        rs, os_ = r.get("real_share"), r.get("subset_offline_share")
        d["real_shares"] = (" / ".join(f"{rs[t]:.1f} ({os_.get(t, 0):.1f})" for t in ("end", "edge", "cloud"))
                            if rs and os_ else "–")
        d["camera_real"] = _pair("camera_real_p50_ms", "camera_real_p99_ms")(r)
        d["e2e_real"] = _pair("e2e_real_p50_ms", "e2e_real_p99_ms")(r)
        d["escalation_real"] = (f"{_ms(r.get('escalation_real_p50_ms'))} / {_ms(r.get('escalation_real_p99_ms'))} "
                                f"({r.get('escalation_real_n', 0)})")
        out.append(d)
    return out


def write_accuracy_report(report: Report, rows: list[dict[str, Any]], targets: list[dict[str, Any]],
                          e2e_n: int) -> None:
    bundles = "; ".join(f"{k}: {b['name']} v{b['version']} (segments "
                        + ", ".join(f"{t} {v:,} B" for t, v in b["segment_bytes"].items()) + ")"
                        for k, b in report.results["bundles"].items())
    report.add_markdown(f"{rows[0]['frames']:,} frames; real-runtime end-to-end on a stratified subset of "
                        f"{e2e_n} frames per networked configuration. Bundles: {bundles}.\n")
    report.add_markdown(markdown_table(COLUMNS, _display_rows(rows)))
    real = _real_rows(rows)
    if real:
        report.add_markdown(f"Real runtime ({e2e_n} frames per configuration, offered one at a time at a camera's "
                            "pace; Mosquitto, `tierlite edge`, `tierlite cloud` / the offload worker as separate "
                            "processes on loopback; the camera node is tierlite.device's daemon):\n\n"
                            + markdown_table(REAL_COLUMNS, real))
    report.add_markdown("Targets (from the brief; reported, not asserted):\n\n" + markdown_table(TARGET_COLUMNS, targets))
    report.add_markdown("\n".join(f"- {n}" for n in NOTES))
    report.scatter_plot("tradeoff", [(r["config"], r["uplink_mqtt_B"], r["top1"]) for r in rows],
                        "mean uplink bytes / frame, MQTT (symlog)", "top-1 %",
                        "Accuracy against camera uplink, same frames", logx=True)
    plot_rows = [r for r in rows if r["uplink_mqtt_B"] > 0] or rows
    report.bar_plot("uplink", [r["config"] for r in plot_rows], [r["uplink_mqtt_B"] for r in plot_rows],
                    "mean uplink bytes / frame (MQTT)", "Camera uplink per frame", log=True)
    report.bar_plot("top1", [r["config"] for r in rows], [r["top1"] for r in rows], "top-1 %",
                    "Top-1 on the same frames", hline=T_SYSTEM_ACC.goal)
    report.bar_plot("camera-latency", [r["config"] for r in rows if r["camera_p50_ms"] is not None],
                    [r["camera_p50_ms"] for r in rows if r["camera_p50_ms"] is not None],
                    "camera decision p50 (ms)", "Camera decision latency", hline=T_CAMERA_P50.goal)


def print_summary(rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
    cols = [c for c in COLUMNS if c[0] in ("config", "top1", "shares", "uplink_mqtt_B", "camera", "e2e_real")]
    print(markdown_table(cols, _display_rows(rows)))
    print()
    print(markdown_table(TARGET_COLUMNS, targets))


DEFAULT_NODE = "cam-0001"  # node id used for topic lengths (8 characters)


def escalation_overhead(bundle, node: str = DEFAULT_NODE, prefix: str = "tierlite") -> int:
    """Bytes an escalation costs on MQTT beyond its feature payload: a real FEATURE message
    (tierlite.wire header, shape, end logits) in an MQTT 5 PUBLISH at the configured QoS on
    <prefix>/<node>/feature (tierlite.mqtt sends no properties: a 1-byte empty block)."""
    from tierlite.config import QoSConfig
    from tierlite.wire import Kind, boundary_spec, encode_tensor_message, topic

    spec = boundary_spec(bundle, Kind.FEATURE)
    feature = np.full(spec.feature.shape, spec.feature.zero_point, dtype=np.int8)
    if bundle.feature_encoding["kind"] == "binary":
        feature[...] = bundle.feature_encoding["low"]
    logits = [np.zeros(c.n_classes, np.float32) for c in spec.exits]
    message = encode_tensor_message(spec, 1, feature, logits)
    total = mqtt_publish_bytes(topic(prefix, node, "feature"), len(message), QoSConfig().feature, b"\x00")
    return total - spec.feature_size


def offload_message_bytes(jpeg_bytes: int, node: str = DEFAULT_NODE, prefix: str = "tierlite") -> int:
    """An offloaded frame on MQTT (tierlite.bench.offload): frame id + JPEG in an MQTT 5 PUBLISH,
    QoS 0, no properties - the least an offload message can carry."""
    import struct

    from tierlite.bench.offload import FRAME_ID, offload_topic

    return mqtt_publish_bytes(offload_topic(prefix, node), struct.calcsize(FRAME_ID) + jpeg_bytes, 0, b"\x00")
