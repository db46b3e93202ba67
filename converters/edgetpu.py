"""Edge TPU readiness of a TFLite model, and edgetpu_compiler when it is installed.

Ready means the Edge TPU compiler can map the whole graph: one subgraph, every activation tensor
8-bit (int8/uint8; int32 only for constant biases and shapes), int8/uint8 inputs and outputs, static
shapes, at most 3 non-unit dimensions per tensor, and only ops on Coral's supported-operations list
(coral.ai/docs/edgetpu/models-intro). The compiler itself runs only on x86-64 Linux; without it the
check still runs and says where to compile.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tierlite.errors import ConfigError

COMPILER = "edgetpu_compiler"
# Builtin ops the Edge TPU executes (Coral "Supported operations" table).
EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "UNIDIRECTIONAL_SEQUENCE_LSTM", "MAXIMUM",
    "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX",
    "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE",
    "STRIDED_SLICE", "SUB", "SUM", "SQUARED_DIFFERENCE", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})
EIGHT_BIT = ("INT8", "UINT8")


@dataclass
class EdgeTPUReport:
    ready: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    cpu_ops: list[str] = field(default_factory=list)  # ops the compiler would leave to the CPU
    compiled: str | None = None  # path of the *_edgetpu.tflite when compiled
    compiler_log: str = ""
    message: str = ""


def edgetpu_check(data: bytes, where: str = "model") -> EdgeTPUReport:
    from tierlite.converters.firmware import read_graph

    g = read_graph(data, where)
    problems: list[str] = []
    if g.subgraphs != 1:
        problems.append(f"{g.subgraphs} subgraphs (the Edge TPU maps one)")
    for role, ids in (("input", g.inputs), ("output", g.outputs)):
        for i in ids:
            t = g.tensors[i]
            if t["type"] not in EIGHT_BIT:
                problems.append(f"{role} {t['name']!r} is {t['type']} (needs int8/uint8)")
    float_tensors = [t["name"] for t in g.tensors if t["type"] in ("FLOAT32", "FLOAT16")]
    if float_tensors:
        problems.append(f"not fully integer-quantized: {len(float_tensors)} float tensors "
                        f"(first {float_tensors[0]!r})")
    wide = [t["name"] for t in g.tensors if not t["constant"] and t["type"] not in EIGHT_BIT + ("INT32",)]
    if wide and not float_tensors:
        problems.append(f"activation tensors of other types: {wide[0]!r}")
    dynamic = [t["name"] for t in g.tensors if t["dynamic"]]
    if dynamic:
        problems.append(f"dynamic tensor shapes, e.g. {dynamic[0]!r} (the Edge TPU needs every size fixed: "
                        "export with batch size 1)")
    too_deep = [t["name"] for t in g.tensors if not t["constant"] and sum(d > 1 for d in t["shape"][:-3]) > 0]
    if too_deep:
        problems.append(f"tensor {too_deep[0]!r} has a non-unit dimension beyond the innermost 3")
    cpu_ops = [op for op in g.ops if op not in EDGETPU_OPS] + g.custom_ops
    if cpu_ops:
        problems.append(f"ops the Edge TPU does not run (left on the CPU): {', '.join(cpu_ops)}")
    return EdgeTPUReport(ready=not problems, problems=problems, cpu_ops=cpu_ops)


def static_batch(data: bytes) -> tuple[bytes, int]:
    """The same model with a dynamic batch dimension (shape_signature -1, as Keras exports it)
    fixed to 1, which is all the Edge TPU compiler needs; returns (model, tensors changed)."""
    import flatbuffers
    from tflite_micro.python.tflite_micro import runtime as tflm

    model = tflm.convert_bytearray_to_object(bytearray(data))
    changed = 0
    for sg in model.subgraphs:
        for t in sg.tensors or []:
            sig = t.shapeSignature
            if sig is not None and len(sig) and int(sig[0]) == -1 and t.shape is not None and int(t.shape[0]) == 1:
                sig[0] = 1
                changed += 1
    if not changed:
        return data, 0
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), changed


def compiler_path() -> str | None:
    return shutil.which(COMPILER)


def compile_edgetpu(data: bytes, stem: str, out_dir: Path, timeout_s: float = 300) -> tuple[Path, str]:
    """Run edgetpu_compiler on `data` (named <stem>.tflite); returns <out_dir>/<stem>_edgetpu.tflite
    and the compiler's log."""
    import tempfile

    exe = compiler_path()
    if exe is None:
        raise ConfigError(f"{COMPILER} is not on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tierlite-edgetpu-"))
    model_path = work / f"{stem}.tflite"
    model_path.write_bytes(data)
    try:
        proc = subprocess.run([exe, "-s", "-o", str(out_dir), str(model_path)], capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{COMPILER} did not finish within {timeout_s:.0f} s on {stem}.tflite") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log = (proc.stdout + proc.stderr).strip()
    compiled = out_dir / f"{stem}_edgetpu.tflite"
    if proc.returncode != 0 or not compiled.is_file():
        last = log.splitlines()[-1] if log else f"exit code {proc.returncode}"
        raise ConfigError(f"{COMPILER} failed on {stem}.tflite: {last}")
    return compiled, log


def add_to_bundle(bundle_root: Path, compiled: Path, tier: str = "end") -> str:
    """Copy the compiled model into the bundle and list it in the manifest's `files`
    ({file, sha256, tier, runtime: "edgetpu"}); hashes are recomputed by write_manifest."""
    import json

    from tierlite.bundle import MANIFEST, write_manifest

    name = compiled.name
    if compiled.resolve() != (bundle_root / name).resolve():
        shutil.copyfile(compiled, bundle_root / name)
    manifest = json.loads((bundle_root / MANIFEST).read_text())
    files = [e for e in manifest.get("files", []) if e.get("file") != name]
    files.append({"file": name, "sha256": "", "tier": tier, "runtime": "edgetpu"})
    manifest["files"] = files
    manifest.pop("signature", None)  # the manifest changed: an old signature would no longer verify
    write_manifest(bundle_root, manifest)
    return name

