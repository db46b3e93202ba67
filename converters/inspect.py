"""`tierlite inspect`: what is in a bundle or in any .tflite file. No TensorFlow: LiteRT reads
the models (builtin kernels only, so the op list is the model's own, not the delegate's)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tierlite.bundle import TIERS, Bundle, FeatureEncoding, sha256_file
from tierlite.errors import BundleError, RuntimeUnavailable
from tierlite.wire import encoded_size


def _runtime(path: Path):
    from tierlite.runtimes.litert import InterpreterRuntime
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as e:
        raise RuntimeUnavailable(f"ai-edge-litert is not installed ({e}); pip install 'tierlite[device]'") from None
    try:
        interp = Interpreter(model_path=str(path),
                             experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        return InterpreterRuntime(path, interp)
    except (ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: not a loadable TFLite model ({e})") from None


def _tensor(t) -> dict[str, Any]:
    return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype.name, "scale": t.scale, "zero_point": t.zero_point}


def describe_tflite(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"file not found: {path}")
    rt = _runtime(path)
    ops = Counter(rt.op_names())
    weights = sum(_nbytes(d) for d in rt._interp.get_tensor_details() if _is_constant(rt._interp, d))
    return {"file": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "ops": dict(sorted(ops.items())), "parameter_bytes": weights,
            "inputs": [_tensor(t) for t in rt.inputs], "outputs": [_tensor(t) for t in rt.outputs],
            "quantization": _quant_kind(rt)}


def _nbytes(d) -> int:
    import numpy as np
    return int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize


def _is_constant(interp, d) -> bool:
    """Constant (weight) tensors are readable before any invoke and are not inputs/outputs/ops' outputs."""
    if not d["name"] or d["index"] in _activation_indices(interp):
        return False
    try:
        interp.get_tensor(d["index"])
        return True
    except ValueError:
        return False


def _activation_indices(interp) -> set[int]:
    cache = getattr(interp, "_tierlite_activations", None)
    if cache is None:
        cache = set()
        for op in interp._get_ops_details():
            cache.update(int(i) for i in op["outputs"])
        cache.update(d["index"] for d in interp.get_input_details())
        interp._tierlite_activations = cache
    return cache


def _quant_kind(rt) -> str:
    dtypes = {t.dtype.name for t in rt.inputs + rt.outputs}
    if dtypes <= {"int8", "uint8"}:
        return "full integer (" + "/".join(sorted(dtypes)) + " I/O)"
    if "float32" in dtypes and any(t.dtype.name in ("int8", "uint8") for t in rt.inputs + rt.outputs):
        return "mixed"
    return "float I/O (" + "/".join(sorted(dtypes)) + ")"


def describe(path: str | Path) -> dict[str, Any]:
    """A bundle (directory or archive) or a bare .tflite file."""
    path = Path(path)
    if path.suffix == ".tflite":
        return {"kind": "tflite", **describe_tflite(path)}
    b = Bundle.load(path)
    enc = b.feature_encoding
    segs = []
    for tier in TIERS:
        if tier not in b.segments:
            continue
        info = b.segment(tier)
        d = describe_tflite(b.segment_path(tier))
        feat = info.output("feature")
        segs.append({"tier": tier, "exit_index": info.exit_index, **d,
                     "test_time_augmentation": info.test_time_augmentation,
                     "manifest_inputs": [t.to_json() for t in info.inputs],
                     "manifest_outputs": [t.to_json() for t in info.outputs],
                     "feature_bytes": (encoded_size(feat.shape, enc if tier == "end" else FeatureEncoding.INT8)
                                       if feat is not None else 0)})
    m = b.manifest
    return {"kind": "bundle", "path": str(path), "name": b.name, "version": b.version,
            "parent_version": m.get("parent_version"), "labels": b.labels, "input": m["input"],
            "feature_encoding": enc, "thresholds": b.thresholds, "signed": "signature" in m,
            "calibration": m.get("calibration", {}), "segments": segs, "files": m.get("files", []),
            "bytes_per_escalated_frame": {
                "camera->edge": segs[0]["feature_bytes"],
                "edge->cloud": next((s["feature_bytes"] for s in segs if s["tier"] == "edge"), 0)}}


def _fmt_tensor(t: dict) -> str:
    q = f" q=({t['scale']:.6g}, {t['zero_point']})" if t["scale"] else ""
    role = f" [{t['role']} #{t['index']}]" if t.get("role") else ""
    return f"{t['name'] or '?'} {t['shape']} {t['dtype']}{q}{role}"


def _fmt_model(d: dict, indent: str) -> list[str]:
    lines = [f"{indent}bytes: {d['bytes']:,}   parameters: {d['parameter_bytes']:,} B   {d['quantization']}",
             f"{indent}ops: " + ", ".join(f"{k} x{v}" for k, v in d["ops"].items())]
    ins = d.get("manifest_inputs") or d["inputs"]
    outs = d.get("manifest_outputs") or d["outputs"]
    lines += [f"{indent}in:  {_fmt_tensor(t)}" for t in ins]
    lines += [f"{indent}out: {_fmt_tensor(t)}" for t in outs]
    return lines


def format_text(info: dict) -> str:
    if info["kind"] == "tflite":
        return "\n".join([f"{info['file']}  sha256 {info['sha256'][:16]}..."] + _fmt_model(info, "  "))
    enc = info["feature_encoding"]
    labels = info["labels"]
    parent = f" (parent v{info['parent_version']})" if info.get("parent_version") else ""
    levels = {"binary": f" (low {enc.get('low')}, high {enc.get('high')})",
              "uniform": f" ({enc.get('bits')} bits: {2 ** (enc.get('bits') or 0)} levels from {enc.get('low')} to "
                         f"{enc.get('high')})"}.get(enc["kind"], "")
    lines = [f"bundle {info['name']} v{info['version']}{parent}" + ("  signed" if info["signed"] else ""),
             f"  labels ({len(labels)}): {', '.join(labels[:12])}{' ...' if len(labels) > 12 else ''}",
             f"  input: {info['input'].get('shape')} {info['input'].get('dtype')} {info['input'].get('color', '')}",
             f"  boundary feature: {enc['kind']}{levels}",
             "  thresholds (normalized entropy): " + ", ".join(f"{k} {v:.4f}" for k, v in info["thresholds"].items())]
    for s in info["segments"]:
        tta = f"  (exit decides on the frame and its {s['test_time_augmentation']} image)" \
            if s.get("test_time_augmentation") not in (None, "none") else ""
        lines.append(f"  [{s['tier']}] {Path(s['file']).name} exit {s['exit_index']}{tta}")
        lines += _fmt_model(s, "      ")
    for e in info.get("files", []):  # Edge TPU-compiled segments, condition profiles
        kind = e.get("role") or f"{e.get('runtime', 'extra')} build"
        lines.append(f"  [{e.get('tier', '?')} {kind}] {e['file']}  sha256 {e['sha256'][:16]}...")
    bpf = info["bytes_per_escalated_frame"]
    lines.append(f"  bytes per escalated frame: camera->edge {bpf['camera->edge']} B, "
                 f"edge->cloud {bpf['edge->cloud']} B (feature payload, before the wire header)")
    cal = info.get("calibration") or {}
    if "system_accuracy" in cal:
        fr = cal.get("fractions", {})
        lines.append(f"  calibration ({cal.get('split', '?')}, {cal.get('frames', '?')} frames, max drop "
                     f"{cal.get('max_drop', 0) * 100:g} pt): system {cal['system_accuracy'] * 100:.2f}%, cloud-only "
                     f"{cal.get('cloud_only_accuracy', 0) * 100:.2f}%, camera {fr.get('end', 0) * 100:.1f}%"
                     + (f", {cal['camera_uplink_bytes_per_frame']:.1f} B/frame up"
                        if "camera_uplink_bytes_per_frame" in cal else ""))
    return "\n".join(lines)
