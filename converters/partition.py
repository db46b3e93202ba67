"""Profiles and re-cut segments for the partition planner (tierlite.partition, docs/PARTITIONING.md).

    tierlite profile BUNDLE_OR_WORKDIR --out profile.json
    tierlite plan profile.json --bandwidth 10e6 --rtt-ms 5 [--min-accuracy 0.9] [--json plan.json]
                  [--export-points BUNDLE] [--recut DIR]

The unsplit model is the whole trained network (frame -> camera exit logits, final logits) exported
as ONE int8 TFLite model, with every block output (and the trained bottlenecks) kept as named
outputs so each has its own quantization. A candidate cut is one of those tensors; its segments
are cut out of that flatbuffer (operators before / after the tensor), so nothing is re-quantised
and the pair is bit-exact with the unsplit model, which `recut` checks on real frames. Latency per
candidate: the head and tail segments timed on LiteRT on this host (median of repeated runs).
Exit statistics: the unsplit int8 model on the checkpoint's validation split.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tierlite.errors import BundleError, ConfigError

log = logging.getLogger("tierlite.converters")

END_LOGITS, FINAL_LOGITS = "end_logits", "cloud_logits"
BIT_EXACT_FRAMES = 32  # validation frames each re-cut is checked on


@dataclass
class UnsplitModel:
    model: bytes  # int8 TFLite: uint8 frame in; every named tensor out
    names: list[str]  # name of each TFLite output, in the interpreter's output order
    trained: set[str]  # names that are trained bottlenecks (the bundle's own boundaries)
    order: list[str]  # candidate tensors in network order (shallow -> deep)


# -- the unsplit model ------------------------------------------------------------------------
def _taps(sub, names: list[str]) -> list:
    return [sub.get_layer(n).output for n in names]


def _block_names(sub) -> list[str]:
    """Block outputs of a segment sub-model, in order: the stem and every residual/separable block."""
    return [layer.name for layer in sub.layers if layer.name.endswith("_out") or layer.name == "end_stem_relu"]


def unsplit_keras(joint):
    """A flat Keras model: frame -> [end logits, final logits, every block output, bottlenecks]."""
    import keras
    from tierlite.converters.models import segments_of

    end, edge, cloud = segments_of(joint)
    end_names = _block_names(end) + ["end_feature"]
    edge_names = _block_names(edge)
    cloud_names = _block_names(cloud)
    end_multi = keras.Model(end.inputs, [end.outputs[0], end.outputs[1]] + _taps(end, end_names), name="end_taps")
    edge_multi = keras.Model(edge.inputs, [edge.outputs[0]] + _taps(edge, edge_names), name="edge_taps")
    cloud_multi = keras.Model(cloud.inputs, [cloud.output] + _taps(cloud, cloud_names), name="cloud_taps")
    inp = keras.Input(end.inputs[0].shape[1:], name="pixels")
    f1, l1, *t1 = end_multi(inp)
    f2, *t2 = edge_multi(f1)
    l3, *t3 = cloud_multi(f2)
    names = [END_LOGITS, FINAL_LOGITS] + end_names + edge_names + cloud_names
    outs = [l1, l3] + t1 + t2 + t3
    # Trained bottlenecks: the end's, and the edge's (its own, or its last block output).
    trained = {"end_feature"}
    if "edge_feature_bn" in [layer.name for layer in edge.layers]:
        names.append("edge_feature")
        outs.append(f2)
        trained.add("edge_feature")
    elif edge_names:
        trained.add(edge_names[-1])
    return keras.Model(inp, outs, name="unsplit"), names, trained


def build_unsplit(joint, representative: np.ndarray) -> UnsplitModel:
    """Export the unsplit model to int8 and name its TFLite outputs (matched to the float model's
    outputs by shape and correlation: the converter does not keep Keras's output order)."""
    from tierlite.converters.export import _interpreter, pixel_representative, to_tflite

    flat, names, trained = unsplit_keras(joint)
    tfl = to_tflite(flat, pixel_representative(representative), uint8_input=True)
    probe = representative[: min(8, len(representative))].astype(np.float32)
    ref = [np.asarray(o) for o in flat.predict(probe, verbose=0)]
    interp = _interpreter(tfl)
    din, douts = interp.get_input_details()[0], interp.get_output_details()
    got = [[] for _ in douts]
    for x in probe:
        interp.set_tensor(din["index"], x[None].astype(np.uint8))
        interp.invoke()
        for k, d in enumerate(douts):
            scale, zp = d["quantization"]
            got[k].append((interp.get_tensor(d["index"])[0].astype(np.float32) - zp) * scale)
    tfl_names, free = [], set(range(len(names)))
    for k, d in enumerate(douts):
        q = np.stack(got[k]).reshape(-1)
        same = [i for i in free if ref[i].shape[1:] == tuple(d["shape"][1:])]
        if not same:
            raise BundleError(f"unsplit model: output {k} {tuple(d['shape'])} matches no named tensor")
        best = max(same, key=lambda i: _corr(q, ref[i].reshape(-1)))
        free.discard(best)
        tfl_names.append(names[best])
    order = [n for n in names if n not in (END_LOGITS, FINAL_LOGITS)]
    return UnsplitModel(tfl, tfl_names, trained, order)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float(-np.abs(a - b).mean())
    return float(np.corrcoef(a, b)[0, 1])


# -- cutting the flatbuffer -------------------------------------------------------------------
def _graph(model: bytes):
    from tensorflow.lite.tools import flatbuffer_utils
    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    return fb, fb.subgraphs[0]


def _producers(sub) -> dict[int, int]:
    return {int(t): i for i, op in enumerate(sub.operators) for t in op.outputs if t >= 0}


def _ancestors(sub, tensors, producers) -> set[int]:
    ops, stack = set(), [t for t in tensors]
    while stack:
        op = producers.get(int(stack.pop()))
        if op is None or op in ops:
            continue
        ops.add(op)
        stack.extend(int(t) for t in sub.operators[op].inputs if t >= 0)
    return ops


def _write(fb, sub, ops: list[int], inputs: list[int], outputs: list[int]) -> bytes:
    from tensorflow.lite.tools import flatbuffer_utils
    new = copy.deepcopy(fb)
    s = new.subgraphs[0]
    s.operators = [copy.deepcopy(sub.operators[i]) for i in sorted(ops)]  # original order is topological
    s.inputs, s.outputs = np.array(inputs, dtype=np.int32), np.array(outputs, dtype=np.int32)
    new.signatureDefs = []  # they name the unsplit model's inputs and outputs
    return bytes(flatbuffer_utils.convert_object_to_bytearray(new))


@dataclass
class Recut:
    cut: str
    head: bytes  # frame -> [cut tensor, camera exit logits if on device]
    tail: bytes  # cut tensor -> final logits
    exit_on_device: bool
    cut_bytes: int


def recut(unsplit: UnsplitModel, cut: str) -> Recut:
    """Head and tail segments of the unsplit model at tensor `cut` (a name in `unsplit.order`)."""
    fb, sub = _graph(unsplit.model)
    out_of = {n: int(sub.outputs[k]) for k, n in enumerate(unsplit.names)}
    if cut not in out_of or cut in (END_LOGITS, FINAL_LOGITS):
        raise ConfigError(f"unknown cut {cut!r}; candidates: {', '.join(unsplit.order)}")
    producers = _producers(sub)
    t_cut, t_exit, t_final = out_of[cut], out_of[END_LOGITS], out_of[FINAL_LOGITS]
    before = _ancestors(sub, [t_cut], producers)
    exit_ops = _ancestors(sub, [t_exit], producers)
    after = _ancestors(sub, [t_final], producers) - before
    # The camera exit stays on the device only if it needs nothing computed after the cut.
    exit_on_device = not (exit_ops & after)
    head_ops = before | (exit_ops if exit_on_device else set())
    made_in_tail = {int(t) for i in after for t in sub.operators[i].outputs}
    for i in after:  # a tail may read only the cut, constants and what it computes itself
        for t in sub.operators[i].inputs:
            t = int(t)
            if t >= 0 and t != t_cut and t not in made_in_tail and t in producers:
                raise ConfigError(f"cut {cut!r} is not a single-tensor cut (the tail also needs tensor {t})")
    head = _write(fb, sub, sorted(head_ops), [int(sub.inputs[0])], [t_cut] + ([t_exit] if exit_on_device else []))
    tail = _write(fb, sub, sorted(after), [t_cut], [t_final])
    shape = sub.tensors[t_cut].shape
    return Recut(cut, head, tail, exit_on_device, int(np.prod(shape[1:])))


def run_model(model: bytes, inputs: np.ndarray) -> list[np.ndarray]:
    from tierlite.converters.export import run_tflite
    return run_tflite(model, inputs)


def check_bit_exact(unsplit: UnsplitModel, cut: Recut, frames: np.ndarray) -> dict[str, int]:
    """Run the unsplit model and head -> tail on `frames`; raise unless every int8 value agrees.
    Returns the number of values compared per tensor."""
    full = dict(zip(unsplit.names, run_model(unsplit.model, frames)))
    head = run_model(cut.head, frames)
    tail = run_model(cut.tail, head[0])
    pairs = {cut.cut: (full[cut.cut], head[0]), FINAL_LOGITS: (full[FINAL_LOGITS], tail[0])}
    if cut.exit_on_device:
        pairs[END_LOGITS] = (full[END_LOGITS], head[1])
    for name, (a, b) in pairs.items():
        if a.shape != b.shape or not np.array_equal(a, b):
            diff = int(np.count_nonzero(a != b)) if a.shape == b.shape else -1
            raise BundleError(f"re-cut at {cut.cut}: {name} differs from the unsplit model ({diff} values)")
    return {name: int(a.size) for name, (a, _) in pairs.items()}


# -- timing and exit statistics ---------------------------------------------------------------
def time_model(model: bytes, x: np.ndarray, repeats: int = 50, threads: int = 1) -> float:
    """Median seconds per invoke on LiteRT (after a warm-up), one thread."""
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=model, num_threads=threads)
    interp.allocate_tensors()
    d = interp.get_input_details()[0]
    interp.set_tensor(d["index"], x[None].astype(d["dtype"]))
    for _ in range(5):
        interp.invoke()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        interp.invoke()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def exit_points(end_logits: np.ndarray, final_logits: np.ndarray, labels: np.ndarray,
                count: int = 9) -> tuple[list[dict], float]:
    """Operating points of the camera exit (threshold grid at quantiles of its normalized
    entropy) and the server-only accuracy."""
    from tierlite.policy import normalized_entropy, softmax

    h = normalized_entropy(softmax(end_logits))
    end_ok = end_logits.argmax(1) == labels
    final_ok = final_logits.argmax(1) == labels
    thresholds = sorted({float(t) for t in np.quantile(h, np.linspace(0.0, 1.0, count))})  # the last: every frame
    points = []
    for i, t in enumerate(thresholds):
        local = h <= t
        points.append({"name": f"exit{i}", "end_threshold": t, "device_fraction": float(local.mean()),
                       "accuracy": float(np.where(local, end_ok, final_ok).mean())})
    return points, float(final_ok.mean())


def dequantized_outputs(model: bytes, names: list[str], frames: np.ndarray, wanted: list[str]) -> list[np.ndarray]:
    from tierlite.converters.export import _interpreter
    details = _interpreter(model).get_output_details()
    outs = run_model(model, frames)
    res = []
    for w in wanted:
        k = names.index(w)
        scale, zp = details[k]["quantization"]
        res.append((outs[k].astype(np.float32) - zp) * scale)
    return res


def profile(workdir: str | Path, repeats: int = 50, count: int = 9, limit: int | None = None) -> dict:
    """Profile a trained checkpoint: per-candidate device/server latency on LiteRT here, int8 cut
    sizes, bit-exact re-cut check on validation frames, camera-exit operating points."""
    return profile_model(workdir, repeats, count, limit)[0]


def profile_model(workdir: str | Path, repeats: int = 50, count: int = 9,
                  limit: int | None = None) -> tuple[dict, UnsplitModel, dict]:
    """profile() plus the unsplit model and the checkpoint's metadata (for re-cut bundles)."""
    from tierlite.converters.datasets import checkpoint_splits, representative_frames
    from tierlite.converters.train import load_checkpoint
    from tierlite.partition import Candidate, OperatingPoint, Profile

    joint, meta = load_checkpoint(workdir)
    if meta["arch"].get("binarized"):
        raise ConfigError("profiling a binarized end segment is not supported (its boundary is bit-packed)")
    splits = checkpoint_splits(meta, workdir)
    rep = representative_frames(splits.train.images, int(meta["train"].get("calibration_frames", 300)), meta["seed"])
    val_x, val_y = splits.val.images, splits.val.labels
    if limit:
        val_x, val_y = val_x[:limit], val_y[:limit]
    unsplit = build_unsplit(joint, rep)
    end_l, final_l = dequantized_outputs(unsplit.model, unsplit.names, val_x, [END_LOGITS, FINAL_LOGITS])
    points, server_only = exit_points(end_l, final_l, val_y, count)
    frame = val_x[0]
    cands, blocks, checked = [], [], {}
    for name in unsplit.order:
        try:
            cut = recut(unsplit, name)
        except ConfigError as e:
            log.info("skipping %s: %s", name, e)
            continue
        checked[name] = check_bit_exact(unsplit, cut, val_x[:BIT_EXACT_FRAMES])
        cut_input = run_model(cut.head, frame[None])[0][0]
        dev, srv = time_model(cut.head, frame, repeats), time_model(cut.tail, cut_input, repeats)
        cands.append(Candidate(name, dev, srv, cut.cut_bytes, cut.exit_on_device, name in unsplit.trained))
        blocks.append({"block": name, "int8_bytes": cut.cut_bytes, "prefix_ms": round(dev * 1e3, 4)})
    whole = time_model(unsplit.model, frame, repeats)
    ops = [OperatingPoint(**p) for p in points]
    prof = Profile(meta.get("preset", "model") + f" ({Path(workdir).name})", cands, ops, server_only, notes={
        "runtime": "LiteRT (ai-edge-litert) on this host, 1 thread, median of %d invokes" % repeats,
        "device_and_server": "both measured on this host; scale device_s for a slower board",
        "validation_frames": int(len(val_y)), "unsplit_ms": round(whole * 1e3, 4),
        "blocks": blocks, "bit_exact_frames": int(min(BIT_EXACT_FRAMES, len(val_y))),
        "bit_exact_values_checked": checked})
    return prof.to_json(), unsplit, meta


# -- CLI: tierlite profile / tierlite plan ----------------------------------------------------
def _workdir_of(path: Path) -> Path:
    from tierlite.converters.pipeline import default_workdir
    if (path / "checkpoint").is_dir() or path.name == "checkpoint" or path.suffix == ".keras":
        return path
    work = default_workdir(path)
    if not (work / "checkpoint").is_dir():
        raise ConfigError(f"{path}: no checkpoint here or at {work}/checkpoint (pass the workdir)")
    return work


def configure_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="a bundle (its '<bundle>-work' checkpoint is used) or a workdir")
    p.add_argument("--workdir", type=Path, help="checkpoint workdir, when it is not beside the bundle")
    p.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    p.add_argument("--repeats", type=int, default=50, help="timed invokes per segment (median)")
    p.add_argument("--points", type=int, default=9, help="camera-exit operating points (threshold quantiles)")
    p.add_argument("--limit", type=int, help="validation frames to use (default: all)")


def run_profile(args) -> int:
    work = args.workdir or _workdir_of(args.model)
    prof = profile(work, args.repeats, args.points, args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(prof, indent=2) + "\n")
    print(f"{'cut':<22} {'int8 B':>8} {'device ms':>10} {'server ms':>10} exit-on-device")
    for c in prof["candidates"]:
        print(f"{c['name'] + (' *' if c['trained'] else ''):<22} {c['cut_bytes']:>8} {c['device_s'] * 1e3:>10.3f} "
              f"{c['server_s'] * 1e3:>10.3f} {c['exit_on_device']}")
    print(f"unsplit model {prof['notes']['unsplit_ms']:.3f} ms; server-only accuracy {prof['server_only_accuracy']:.4f}; "
          f"every re-cut bit-exact with it on {prof['notes']['bit_exact_frames']} validation frames")
    print(f"profile: {args.out}")
    return 0


def configure_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("profile", type=Path, help="JSON from `tierlite profile`")
    p.add_argument("--bandwidth", type=float, required=True, help="uplink bits per second, e.g. 10e6")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time of the link")
    p.add_argument("--overhead-bytes", type=int, help="bytes per escalated message on top of the tensor")
    p.add_argument("--burst-bytes", type=int, default=0, help="token-bucket burst of a shaped link (0: serial link)")
    p.add_argument("--objective", default="p50", help="p50 | p99 | mean | energy | uplink")
    p.add_argument("--min-accuracy", type=float, help="accuracy bound (validation, fraction)")
    p.add_argument("--device-slowdown", type=float, default=1.0,
                   help="multiply device times by this (the device is slower than the profiling host)")
    p.add_argument("--compute-watts", type=float, default=1.0, help="device power while computing")
    p.add_argument("--radio-watts", type=float, default=1.0, help="device power while sending")
    p.add_argument("--json", type=Path, help="write the table and the choice as JSON")
    p.add_argument("--export-points", type=Path, metavar="BUNDLE",
                   help="write the profile's camera-exit operating points into this (unsigned) bundle's manifest")


def load_profile(path: Path, device_slowdown: float = 1.0):
    from dataclasses import replace

    from tierlite.partition import Profile
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable profile ({e})") from None
    prof = Profile.from_json(data, str(path))
    if device_slowdown != 1.0:
        prof.candidates = [replace(c, device_s=c.device_s * device_slowdown) for c in prof.candidates]
    return prof


def run_plan(args) -> int:
    from tierlite.partition import DEFAULT_OVERHEAD_BYTES, Link, Power, choose, format_table, predict_all

    prof = load_profile(args.profile, args.device_slowdown)
    link = Link(args.bandwidth, args.rtt_ms / 1000.0,
                DEFAULT_OVERHEAD_BYTES if args.overhead_bytes is None else args.overhead_bytes, args.burst_bytes)
    rows = predict_all(prof, link, Power(args.compute_watts, args.radio_watts))
    best = choose(rows, args.objective, args.min_accuracy)
    print(f"{prof.model}: link {args.bandwidth / 1e6:g} Mbit/s, RTT {args.rtt_ms:g} ms, objective {args.objective}"
          + (f", accuracy >= {args.min_accuracy}" if args.min_accuracy is not None else ""))
    print(format_table(rows, best))
    acc = "unknown" if best.accuracy is None else f"{best.accuracy:.4f}"
    print(f"chosen: cut {best.candidate}, {best.operating_point}: p50 {best.p50_s * 1e3:.2f} ms, "
          f"p99 {best.p99_s * 1e3:.2f} ms, accuracy {acc}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"profile": str(args.profile), "link": vars(link), "objective": args.objective,
                                         "min_accuracy": args.min_accuracy, "chosen": best.to_json(),
                                         "table": [r.to_json() for r in rows]}, indent=2) + "\n")
    if args.export_points:
        export_operating_points(args.export_points, prof)
        print(f"operating points written to {args.export_points}/manifest.json")
    return 0


def export_operating_points(bundle_dir: Path, prof) -> None:
    """Write the camera-exit operating points into an unsigned bundle's manifest (the node's
    `adaptive` section moves between them)."""
    from tierlite.bundle import Bundle, write_manifest
    b = Bundle.load(bundle_dir)
    if "signature" in b.manifest:
        raise BundleError(f"{bundle_dir}: signed manifest; add operating points before signing")
    points = [{"name": o.name, "thresholds": {"end": o.end_threshold}, "device_fraction": o.device_fraction,
               "accuracy": o.accuracy} for o in prof.operating_points]
    write_manifest(bundle_dir, dict(b.manifest, operating_points=points))
