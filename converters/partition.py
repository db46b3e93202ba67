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

END_LOGITS, EDGE_LOGITS, FINAL_LOGITS = "end_logits", "edge_logits", "cloud_logits"
LOGITS = (END_LOGITS, EDGE_LOGITS, FINAL_LOGITS)
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
    edge_multi = keras.Model(edge.inputs, [edge.outputs[0], edge.outputs[1]] + _taps(edge, edge_names),
                             name="edge_taps")
    cloud_multi = keras.Model(cloud.inputs, [cloud.output] + _taps(cloud, cloud_names), name="cloud_taps")
    inp = keras.Input(end.inputs[0].shape[1:], name="pixels")
    f1, l1, *t1 = end_multi(inp)
    f2, l2, *t2 = edge_multi(f1)
    l3, *t3 = cloud_multi(f2)
    names = [END_LOGITS, FINAL_LOGITS, EDGE_LOGITS] + end_names + edge_names + cloud_names
    outs = [l1, l3, l2] + t1 + t2 + t3
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
    # Same-shaped outputs (the three logits, equal-sized blocks) are told apart by correlation with
    # the float model; pairs are fixed best-first so one good match cannot steal another's name.
    pairs = []
    for k, d in enumerate(douts):
        q = np.stack(got[k]).reshape(-1)
        same = [i for i in range(len(names)) if ref[i].shape[1:] == tuple(d["shape"][1:])]
        if not same:
            raise BundleError(f"unsplit model: output {k} {tuple(d['shape'])} matches no named tensor")
        pairs += [(_corr(q, ref[i].reshape(-1)), k, i) for i in same]
    tfl_names: list[str | None] = [None] * len(douts)
    taken = set()
    for _, k, i in sorted(pairs, reverse=True):
        if tfl_names[k] is None and i not in taken:
            tfl_names[k] = names[i]
            taken.add(i)
    if None in tfl_names:
        raise BundleError("unsplit model: could not name every output")
    order = [n for n in names if n not in LOGITS]
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
    """A model of operators `ops` of the unsplit graph, keeping only the tensors and weight buffers
    they use (a segment must not carry the whole network's weights)."""
    from tensorflow.lite.tools import flatbuffer_utils
    new = copy.copy(fb)  # shallow: the lists replaced below are new, the rest is shared read-only
    s = copy.copy(new.subgraphs[0])
    new.subgraphs = [s]
    kept = [copy.deepcopy(sub.operators[i]) for i in sorted(ops)]  # original order is topological
    used = sorted({int(t) for op in kept for t in [*op.inputs, *op.outputs] if t >= 0} | set(inputs) | set(outputs))
    remap = {old: i for i, old in enumerate(used)}
    for op in kept:
        op.inputs = np.array([remap[int(t)] if t >= 0 else -1 for t in op.inputs], dtype=np.int32)
        op.outputs = np.array([remap[int(t)] for t in op.outputs], dtype=np.int32)
    tensors = [copy.copy(sub.tensors[t]) for t in used]
    buffers = sorted({0} | {int(t.buffer) for t in tensors})  # buffer 0: the empty sentinel
    bremap = {old: i for i, old in enumerate(buffers)}
    for t in tensors:
        t.buffer = bremap[int(t.buffer)]
    new.buffers = [fb.buffers[b] for b in buffers]
    meta = [m for m in (fb.metadata or []) if int(m.buffer) < len(fb.buffers)]
    new.buffers += [fb.buffers[int(m.buffer)] for m in meta]  # metadata keeps its own buffers
    new.metadata = [copy.copy(m) for m in meta]
    for k, m in enumerate(new.metadata):
        m.buffer = len(buffers) + k
    new.metadataBuffer = None
    s.tensors, s.operators = tensors, kept
    s.inputs = np.array([remap[t] for t in inputs], dtype=np.int32)
    s.outputs = np.array([remap[t] for t in outputs], dtype=np.int32)
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
    if cut not in out_of or cut in LOGITS:
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


@dataclass
class ChainSegment:
    tier: str  # end, edge, cloud
    model: bytes
    outputs: list[str]  # names of its outputs: [boundary tensor, exit logits] or [final logits]


def recut_chain(unsplit: UnsplitModel, cuts: list[str], build: bool = True) -> list[ChainSegment]:
    """Runnable tier segments of the unsplit model cut at `cuts` (one: end | edge, two: end | edge |
    cloud), in network order. Every segment but the last also outputs its tier's exit logits, which
    must be computable from what the segment has (the tiers' runtime needs an exit per segment).
    Raises ConfigError for cuts that cannot run so; `build=False` only checks."""
    if not 1 <= len(cuts) <= 2:
        raise ConfigError(f"one or two cuts, got {cuts}")
    fb, sub = _graph(unsplit.model)
    out_of = {n: int(sub.outputs[k]) for k, n in enumerate(unsplit.names)}
    for c in cuts:
        if c not in out_of or c in LOGITS:
            raise ConfigError(f"unknown cut {c!r}; candidates: {', '.join(unsplit.order)}")
    if len(cuts) == 2 and unsplit.order.index(cuts[0]) >= unsplit.order.index(cuts[1]):
        raise ConfigError(f"the edge | cloud cut {cuts[1]!r} must come after the device | edge cut {cuts[0]!r}")
    tiers = ["end", "edge", "cloud"][: len(cuts) + 1]
    exits = {"end": END_LOGITS, "edge": EDGE_LOGITS}
    producers = _producers(sub)
    whole_path = _ancestors(sub, [out_of[FINAL_LOGITS]], producers)
    bounds = [None, *cuts, FINAL_LOGITS]  # segment k: bounds[k] -> bounds[k + 1]
    done: set[int] = set()
    segments = []
    for k, tier in enumerate(tiers):
        outs = [bounds[k + 1]] + ([exits[tier]] if k < len(tiers) - 1 else [])
        if exits.get(tier) not in out_of and k < len(tiers) - 1:
            raise ConfigError(f"the unsplit model has no {exits[tier]} output (rebuild it)")
        ops = _ancestors(sub, [out_of[o] for o in outs], producers) - done
        made = {int(t) for i in ops for t in sub.operators[i].outputs}
        source = int(sub.inputs[0]) if k == 0 else out_of[bounds[k]]
        for i in ops:  # a segment may read only its input, constants and what it computes itself
            for t in sub.operators[i].inputs:
                t = int(t)
                if t >= 0 and t != source and t not in made and t in producers:
                    what = "its exit" if k < len(tiers) - 1 else "the rest"
                    raise ConfigError(f"cuts {' | '.join(cuts)}: the {tier} segment cannot compute {what} from "
                                      f"{bounds[k] or 'the frame'} alone (it needs tensor {t})")
        main_path = _ancestors(sub, [out_of[bounds[k + 1]]], producers)
        if ops & (whole_path - main_path):
            raise ConfigError(f"cuts {' | '.join(cuts)}: the {tier} exit needs blocks after {bounds[k + 1]} "
                              "(the exit would not sit on its own tier)")
        done |= main_path  # exit-head ops stay out of `done`: no later segment needs them
        if build:
            model = _write(fb, sub, sorted(ops), [source], [out_of[o] for o in outs])
            segments.append(ChainSegment(tier, model, outs))
    return segments


def runnable_pairs(unsplit: UnsplitModel) -> list[list[str]]:
    """Every (device | edge, edge | cloud) cut pair the three tiers' runtime can run (recut_chain)."""
    pairs = []
    for i, a in enumerate(unsplit.order):
        for b in unsplit.order[i + 1:]:
            try:
                recut_chain(unsplit, [a, b], build=False)
                pairs.append([a, b])
            except ConfigError:
                pass
    return pairs


def check_chain_bit_exact(unsplit: UnsplitModel, segments: list[ChainSegment], frames: np.ndarray) -> dict[str, int]:
    """Run the unsplit model and the segments chained; raise unless every int8 value of every
    boundary tensor and every exit's logits agrees. Returns the values compared per tensor."""
    full = dict(zip(unsplit.names, run_model(unsplit.model, frames)))
    x, checked = frames, {}
    for seg in segments:
        outs = run_model(seg.model, x)
        for name, got in zip(seg.outputs, outs):
            want = full[name]
            if want.shape != got.shape or not np.array_equal(want, got):
                diff = int(np.count_nonzero(want != got)) if want.shape == got.shape else -1
                raise BundleError(f"re-cut {seg.tier} segment: {name} differs from the unsplit model ({diff} values)")
            checked[name] = int(want.size)
        x = outs[0]
    return checked


def write_recut_bundle(unsplit: UnsplitModel, cuts: list[str], labels: list[str], out: Path, *,
                       thresholds: dict[str, float] | None = None, operating_points: list[dict] | None = None,
                       check_frames: np.ndarray | None = None, plan: dict | None = None,
                       name: str | None = None) -> Path:
    """A bundle of the unsplit model re-cut at `cuts` (see recut_chain): one segment per tier,
    checked bit-exact on `check_frames` before anything is written, the manifest with every file's
    sha256 (write_manifest), the cuts, the check and the plan that chose them."""
    from tierlite.bundle import write_manifest
    from tierlite.converters.export import tensor_infos

    segments = recut_chain(unsplit, cuts)
    checked = check_chain_bit_exact(unsplit, segments, check_frames) if check_frames is not None else None
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, seg in enumerate(segments):
        (out / f"{seg.tier}.tflite").write_bytes(seg.model)
        ins, outs = tensor_infos(seg.model, len(labels))
        entries.append({"tier": seg.tier, "file": f"{seg.tier}.tflite", "exit_index": i,
                        "inputs": [x.to_json() for x in ins], "outputs": [x.to_json() for x in outs]})
    # No edge exit was planned: the edge passes every frame on unless told otherwise.
    thr = {"end": 0.0, **({"edge": -1.0} if len(segments) == 3 else {}), **(thresholds or {})}
    manifest = {"schema": 1, "name": name or f"recut-{'-'.join(cuts)}", "version": 1, "labels": list(labels),
                "input": {"shape": entries[0]["inputs"][0]["shape"], "dtype": "uint8", "color": "RGB",
                          "scaling": "raw pixel values 0..255; the end segment rescales (x/255) itself"},
                "feature_encoding": {"kind": "int8"}, "segments": entries, "thresholds": thr,
                "partition": {"cuts": list(cuts), "cut_bytes": {c: tensor_bytes(unsplit, c) for c in cuts},
                              "bit_exact": None if checked is None else {
                                  "frames": int(len(check_frames)), "values_checked": checked},
                              "plan": plan}}
    if operating_points:
        manifest["operating_points"] = operating_points
    write_manifest(out, manifest)
    return out


def tensor_bytes(unsplit: UnsplitModel, name: str) -> int:
    _, sub = _graph(unsplit.model)
    t = int(sub.outputs[unsplit.names.index(name)])
    return int(np.prod(sub.tensors[t].shape[1:]))


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
    return median_invoke_s(interp.invoke, repeats, warmup=5)


def median_invoke_s(invoke, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `invoke()` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        invoke()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        invoke()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_tflm(model: bytes, x: np.ndarray, repeats: int = 10) -> float:
    """Median seconds per invoke on TFLite Micro's reference kernels on this host (the kernels an MCU
    build without CMSIS-NN / ESP-NN runs; not the board's speed: x86 here, a Cortex-M or LX7 there)."""
    from tierlite.converters.firmware.tflm_host import _tflm, captured_stderr

    arena = 256 << 10
    with captured_stderr() as err:
        while True:
            try:
                interp = _tflm(model, arena)
                break
            except RuntimeError:
                if arena >= 256 << 20:
                    raise ConfigError(f"TFLite Micro cannot allocate this segment ({err['text'][-200:]})") from None
                arena *= 2
        interp.set_input(x[None], 0)
        return median_invoke_s(interp.invoke, repeats)


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


def profile(workdir: str | Path, repeats: int = 50, count: int = 9, limit: int | None = None,
            tflm_repeats: int = 0) -> dict:
    """Profile a trained checkpoint: per-candidate device/server latency on LiteRT here, int8 cut
    sizes, bit-exact re-cut check on validation frames, camera-exit operating points; with
    `tflm_repeats`, each device prefix also on TFLite Micro's reference kernels (MCU boards)."""
    return profile_model(workdir, repeats, count, limit, tflm_repeats)[0]


def profile_model(workdir: str | Path, repeats: int = 50, count: int = 9, limit: int | None = None,
                  tflm_repeats: int = 0) -> tuple[dict, UnsplitModel, dict]:
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
        dev_tflm = time_tflm(cut.head, frame, tflm_repeats) if tflm_repeats else None
        cands.append(Candidate(name, dev, srv, cut.cut_bytes, cut.exit_on_device, name in unsplit.trained,
                               dev_tflm))
        blocks.append({"block": name, "int8_bytes": cut.cut_bytes, "prefix_ms": round(dev * 1e3, 4)}
                      | ({"prefix_tflm_ms": round(dev_tflm * 1e3, 4)} if dev_tflm is not None else {}))
    whole = time_model(unsplit.model, frame, repeats)
    pairs = runnable_pairs(unsplit)
    ops = [OperatingPoint(**p) for p in points]
    prof = Profile(meta.get("preset", "model") + f" ({Path(workdir).name})", cands, ops, server_only, notes={
        "runtime": "LiteRT (ai-edge-litert) on this host, 1 thread, median of %d invokes" % repeats,
        "device_tflm": (f"device_tflm_s: TFLite Micro reference kernels on this host (measured, median of "
                        f"{tflm_repeats} invokes), not an MCU's speed") if tflm_repeats else "not measured",
        "workdir": str(Path(workdir).resolve()),
        "device_and_server": "both measured on this host; scale device_s for a slower board",
        "validation_frames": int(len(val_y)), "unsplit_ms": round(whole * 1e3, 4),
        "blocks": blocks, "bit_exact_frames": int(min(BIT_EXACT_FRAMES, len(val_y))),
        "bit_exact_values_checked": checked, "three_tier_pairs": pairs})
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
    p.add_argument("--tflm-repeats", type=int, default=0,
                   help="also time each device prefix on TFLite Micro's reference kernels (invokes, median)")


def run_profile(args) -> int:
    work = args.workdir or _workdir_of(args.model)
    prof = profile(work, args.repeats, args.points, args.limit, args.tflm_repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(prof, indent=2) + "\n")
    print(f"{'cut':<22} {'int8 B':>8} {'device ms':>10} {'TFLM ms':>9} {'server ms':>10} exit-on-device")
    for c in prof["candidates"]:
        tflm = "-" if c.get("device_tflm_s") is None else f"{c['device_tflm_s'] * 1e3:.3f}"
        print(f"{c['name'] + (' *' if c['trained'] else ''):<22} {c['cut_bytes']:>8} {c['device_s'] * 1e3:>10.3f} "
              f"{tflm:>9} {c['server_s'] * 1e3:>10.3f} {c['exit_on_device']}")
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
    p.add_argument("--board", help="camera board (tierlite boards): its documented power figure, and for a "
                                   "microcontroller the profile's TFLite Micro device times")
    p.add_argument("--device-slowdown", type=float, default=1.0,
                   help="multiply device times by this (the device is slower than the profiling host)")
    p.add_argument("--compute-watts", type=float, help="device power while computing (default: the board's, else 1)")
    p.add_argument("--radio-watts", type=float, help="device power while sending (default: the board's, else 1)")
    p.add_argument("--tiers", type=int, choices=(2, 3), default=2,
                   help="3: also cut edge | cloud (both cuts chosen together)")
    p.add_argument("--cloud-bandwidth", type=float, help="--tiers 3: the edge's uplink to the cloud, bits/s")
    p.add_argument("--cloud-rtt-ms", type=float, default=0.0, help="--tiers 3: edge <-> cloud round trip")
    p.add_argument("--edge-slowdown", type=float, default=1.0, help="--tiers 3: edge compute vs the profiling host")
    p.add_argument("--cloud-slowdown", type=float, default=1.0, help="--tiers 3: cloud compute vs the profiling host")
    p.add_argument("--json", type=Path, help="write the table and the choice as JSON")
    p.add_argument("--export-points", type=Path, metavar="BUNDLE",
                   help="write the profile's camera-exit operating points into this (unsigned) bundle's manifest")
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="write the chosen plan as a bundle: segments re-cut at the chosen cut(s), checked "
                        "bit-exact, the chosen operating point as the end threshold")
    p.add_argument("--workdir", type=Path, help="--export: the checkpoint (default: the one the profile names)")


def load_profile(path: Path, device_slowdown: float = 1.0, device_runtime: str = "litert"):
    """A profile from JSON; device times from `device_runtime` ("litert" or "tflm": the prefix on
    TFLite Micro's reference kernels, which the profile must carry), times `device_slowdown`."""
    from dataclasses import replace

    from tierlite.partition import Profile
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable profile ({e})") from None
    prof = Profile.from_json(data, str(path))
    if device_runtime == "tflm":
        missing = [c.name for c in prof.candidates if c.device_tflm_s is None]
        if missing:
            raise ConfigError(f"{path}: no TFLite Micro times for {', '.join(missing)} "
                              "(profile again with `tierlite profile --tflm-repeats N`)")
        prof.candidates = [replace(c, device_s=c.device_tflm_s) for c in prof.candidates]
    if device_slowdown != 1.0:
        prof.candidates = [replace(c, device_s=c.device_s * device_slowdown) for c in prof.candidates]
    return prof


def _plan_power(args):
    """Watts for the energy objective: the flags, else the board's documented figure, else 1 W."""
    from tierlite.boards import load_board
    from tierlite.partition import Power

    board = load_board(args.board) if args.board else None
    fig = board.power if board else None
    compute = args.compute_watts if args.compute_watts is not None else (fig.active_w if fig else 1.0)
    radio = args.radio_watts if args.radio_watts is not None else (fig.sending_w if fig else 1.0)
    if fig:
        what = f"board {board.name}: {fig.active_w:g} W active ({fig.basis}: {fig.source})"
    elif board:
        what = f"board {board.name} has no power figure; 1 W (a relative scale)"
    else:
        what = "no board: the --compute-watts/--radio-watts given, else 1 W (a relative scale)"
    return board, Power(compute, radio), what


def run_plan(args) -> int:
    from tierlite.partition import (DEFAULT_OVERHEAD_BYTES, Link, Tiers, choose, format_table, predict_all,
                                    predict_all_two_cuts)

    board, power, power_note = _plan_power(args)
    runtime = "tflm" if board is not None and board.is_mcu else "litert"
    prof = load_profile(args.profile, args.device_slowdown, runtime)
    link = Link(args.bandwidth, args.rtt_ms / 1000.0,
                DEFAULT_OVERHEAD_BYTES if args.overhead_bytes is None else args.overhead_bytes, args.burst_bytes)
    if args.tiers == 3:
        if args.cloud_bandwidth is None:
            raise ConfigError("--tiers 3 needs --cloud-bandwidth (the edge's uplink to the cloud)")
        cloud_link = Link(args.cloud_bandwidth, args.cloud_rtt_ms / 1000.0, link.overhead_bytes)
        rows = predict_all_two_cuts(prof, link, Tiers(cloud_link, args.edge_slowdown, args.cloud_slowdown), power)
    else:
        rows = predict_all(prof, link, power)
    best = choose(rows, args.objective, args.min_accuracy)
    print(f"{prof.model}: link {args.bandwidth / 1e6:g} Mbit/s, RTT {args.rtt_ms:g} ms, objective {args.objective}"
          + (f", accuracy >= {args.min_accuracy}" if args.min_accuracy is not None else "")
          + (f"; edge -> cloud {args.cloud_bandwidth / 1e6:g} Mbit/s" if args.tiers == 3 else ""))
    print(f"device times: {'TFLite Micro reference kernels' if runtime == 'tflm' else 'LiteRT'} measured on the "
          f"profiling host x {args.device_slowdown:g}; power: {power_note}")
    print(format_table(rows, best))
    acc = "unknown" if best.accuracy is None else f"{best.accuracy:.4f}"
    print(f"chosen: cut {best.cuts}, {best.operating_point}: p50 {best.p50_s * 1e3:.2f} ms, "
          f"p99 {best.p99_s * 1e3:.2f} ms, {best.device_energy_j * 1e3:.3f} mJ/frame, accuracy {acc}")
    plan = {"profile": str(args.profile), "link": vars(link), "tiers": args.tiers, "objective": args.objective,
            "min_accuracy": args.min_accuracy, "board": args.board, "device_runtime": runtime,
            "device_slowdown": args.device_slowdown, "power_w": vars(power), "chosen": best.to_json()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**plan, "table": [r.to_json() for r in rows]}, indent=2) + "\n")
    if args.export_points:
        export_operating_points(args.export_points, prof)
        print(f"operating points written to {args.export_points}/manifest.json")
    if args.export:
        workdir = args.workdir or prof.notes.get("workdir")
        if not workdir:
            raise ConfigError(f"{args.profile} names no checkpoint; pass --workdir")
        export_plan(Path(workdir), best, prof, args.export, plan)
        print(f"bundle: {args.export} (tierlite inspect {args.export})")
    return 0


def export_plan(workdir: Path, best, prof, out: Path, plan: dict | None = None) -> Path:
    """Re-cut the checkpoint's unsplit model at the chosen cut(s) into a bundle at `out`."""
    from tierlite.converters.datasets import checkpoint_splits, representative_frames
    from tierlite.converters.train import load_checkpoint

    joint, meta = load_checkpoint(workdir)
    splits = checkpoint_splits(meta, workdir)
    rep = representative_frames(splits.train.images, int(meta["train"].get("calibration_frames", 300)), meta["seed"])
    return export_chosen(build_unsplit(joint, rep), list(meta["classes"]), best, prof, out,
                         splits.val.images[:BIT_EXACT_FRAMES], plan, name=f"{meta.get('preset', 'model')}-recut")


def export_chosen(unsplit: UnsplitModel, labels: list[str], best, prof, out: Path, check_frames: np.ndarray,
                  plan: dict | None = None, name: str | None = None) -> Path:
    """The planner's choice (a tierlite.partition.Prediction) as a bundle: segments re-cut at its
    cut(s) and checked bit-exact on `check_frames`, its operating point as the end threshold, the
    profile's points for the adaptive node, the plan in the manifest."""
    cuts = [best.candidate] + ([best.cloud_cut] if best.cloud_cut else [])
    points = [{"name": o.name, "thresholds": {"end": o.end_threshold}, "device_fraction": o.device_fraction,
               "accuracy": o.accuracy} for o in prof.operating_points]
    # "server-only" sends every frame up: an end threshold no entropy is at or below.
    end = best.end_threshold if best.end_threshold is not None else -1.0
    plan = dict(plan or {}, chosen=best.to_json())
    return write_recut_bundle(unsplit, cuts, labels, out, thresholds={"end": end}, operating_points=points,
                              check_frames=check_frames, plan=plan, name=name)


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
