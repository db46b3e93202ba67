"""The retraining job: distil what the fleet escalated into the exit heads, with the cloud exit as
the teacher, re-calibrate the thresholds, evaluate, and write a candidate bundle (version N+1).

What is retrained follows each node's privacy policy and what the architecture allows:

- Every node (default, "features"): the fleet uploads only boundary features. The edge exit head
  takes its input from those (edge segment -> global pooling -> dense), so it is refitted from the
  stored end features of every hard example, with the cloud's stored logits as soft targets.
- Nodes that opt in ("raw": `update.share_frames: true` on the node and `raw` in the cloud's
  policy): their escalated frames are uploaded as JPEG, so the end exit head, which branches off
  the end trunk before the boundary bottleneck, is refitted from those frames too.

Everything shared stays frozen: the end trunk, the bottleneck that makes the boundary feature,
the edge trunk that feeds the cloud, and the cloud segment (the teacher). So the boundary
tensors are bit-identical and unchanged tiers, and nodes still on the parent version, keep
working. Heads are refitted on the deployed int8 chain's own pooled features (read from the
TFLite models), then the new weights are quantized into the parent's .tflite files in place;
no TensorFlow is needed.

Loss per head (Hinton et al.'s distillation, the cloud's answer standing in for the unknown label):
T^2 * KL(softmax(teacher/T) || softmax(student/T)) + w_hard * CE(teacher's answer, student) on the
hard examples, + cross-entropy on labelled replay frames from the training set (so the head does
not forget clean frames) + an L2 pull towards the parent weights. Full-batch Adam.

The candidate is evaluated on a held-out slice of the store (agreement with the teacher, and
how many of those hard frames it would still escalate) and on the clean validation split; it is
"better" only if the held-out agreement rises by --margin points and clean accuracy drops by no
more than --max-clean-drop points. The report says which, either way.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.bundle import TIERS, Bundle, write_manifest
from tierlite.errors import BundleError, ConfigError, DataError
from tierlite.policy import normalized_entropy, softmax

log = logging.getLogger("tierlite.cloud.retrain")

PRIVACY_MODES = ("features", "raw")


# -- options and report -------------------------------------------------------------------------
@dataclass
class PrivacyPolicy:
    """Which nodes' raw frames may be used: {default: features|raw, nodes: {id: features|raw}}."""
    default: str = "features"
    nodes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | None) -> "PrivacyPolicy":
        if not spec:
            return cls()
        if spec in PRIVACY_MODES:
            return cls(default=spec)
        import yaml

        try:
            data = yaml.safe_load(Path(spec).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"--privacy: cannot read {spec}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--privacy: {spec} is not valid YAML: {e}") from None
        if not isinstance(data, dict) or set(data) - {"default", "nodes"}:
            raise ConfigError(f"--privacy: {spec} must hold 'default' and/or 'nodes' only")
        policy = cls(default=str(data.get("default", "features")), nodes={str(k): str(v) for k, v in (data.get("nodes") or {}).items()})
        for who, mode in [("default", policy.default), *policy.nodes.items()]:
            if mode not in PRIVACY_MODES:
                raise ConfigError(f"--privacy: {who}: {mode!r} is not one of {PRIVACY_MODES}")
        return policy

    def allows_frames(self, node: str) -> bool:
        return self.nodes.get(node, self.default) == "raw"


END_SCOPES = ("head", "branch", "segment", "profile")
PROFILE_FRAMES = 2000  # uploaded frames a profile's statistics are estimated on (one batch)


@dataclass
class RetrainOptions:
    store: Path
    bundle: Path
    out: Path | None = None
    frames: Path | None = None  # uploaded JPEGs of opted-in nodes (default: <store>.frames.sqlite)
    replay: Path | None = None
    replay_frames: int = 2000
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    temperature: float = 3.0
    hard_weight: float = 1.0  # weight of CE on the teacher's answer beside the soft targets
    # With opted-in frames: "head" refits the end exit head in the int8 model; "branch" retrains (in
    # TensorFlow) every end layer the boundary feature does not depend on, so the boundary stays
    # put; "segment" retrains the whole end segment under a FitNets hint; "profile" adds a
    # condition profile (tierlite.profiles): the end with statistics of the uploaded frames.
    end_scope: str = "head"
    checkpoint: Path | None = None  # the parent's Keras checkpoint (every end_scope but "head")
    hint_weight: float = 1.0  # weight of the boundary-feature hint (end_scope "segment")
    end_epochs: int = 8
    steps: int = 300
    lr: float = 0.01
    l2: float = 1e-3
    margin: float = 1.0  # points
    max_clean_drop: float = 0.5  # points
    holdout: float = 0.25
    since: float | None = None
    min_examples: int = 50
    seed: int = 0
    cache_dir: Path | None = None

    @classmethod
    def from_args(cls, args) -> "RetrainOptions":
        store = Path(args.store)
        frames = Path(args.frames) if getattr(args, "frames", None) else default_frames_path(store)
        opts = cls(store=store, bundle=Path(args.bundle), out=Path(args.out) if args.out else None,
                   frames=frames, replay=Path(args.replay) if args.replay else None,
                   replay_frames=args.replay_frames, privacy=PrivacyPolicy.parse(args.privacy),
                   temperature=args.temperature, hard_weight=args.hard_weight, steps=args.steps, margin=args.margin,
                   max_clean_drop=args.max_clean_drop, holdout=args.holdout, since=args.since,
                   min_examples=args.min_examples, seed=args.seed, end_scope=args.end_scope,
                   checkpoint=Path(args.checkpoint) if args.checkpoint else None, hint_weight=args.hint_weight)
        opts.check()
        return opts

    def check(self) -> None:
        if self.temperature <= 0 or self.steps < 1 or self.replay_frames < 0:
            raise ConfigError("--temperature > 0, --steps >= 1 and --replay-frames >= 0")
        if not 0.0 < self.holdout < 0.9:
            raise ConfigError(f"--holdout must be in (0, 0.9), got {self.holdout}")
        if not self.store.is_file():
            raise ConfigError(f"--store: hard-example store not found: {self.store}")
        if self.end_scope not in END_SCOPES:
            raise ConfigError(f"--end-scope must be one of {', '.join(END_SCOPES)}, got {self.end_scope!r}")


def default_frames_path(store: Path) -> Path:
    return store.with_name(store.stem + ".frames.sqlite")


@dataclass
class RetrainReport:
    parent: dict[str, Any]
    candidate: dict[str, Any]
    data: dict[str, Any]
    heads: dict[str, Any]
    holdout: dict[str, Any]
    clean: dict[str, Any]
    better: bool
    reason: str
    bundle_dir: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        lines = [f"retrain {self.parent['name']} v{self.parent['version']} -> candidate v{self.candidate['version']} "
                 f"at {self.bundle_dir} ({self.seconds:.0f} s)",
                 f"  data: {self.data['examples']} hard examples ({self.data['with_frames']} with frames from opted-in "
                 f"nodes), {self.data['holdout']} held out; {self.data['replay']} replay + {self.data['val']} validation frames"]
        for tier, h in self.holdout.items():
            lines.append(f"  held-out {tier} exit: teacher agreement {h['parent_agreement'] * 100:.1f} -> "
                         f"{h['candidate_agreement'] * 100:.1f} %, escalated {h['parent_escalation'] * 100:.1f} -> "
                         f"{h['candidate_escalation'] * 100:.1f} % ({h['frames']} frames)")
        c = self.clean
        lines.append(f"  clean validation: end exit {c['parent']['end_accuracy'] * 100:.2f} -> "
                     f"{c['candidate']['end_accuracy'] * 100:.2f} %, system {c['parent']['system_accuracy'] * 100:.2f} -> "
                     f"{c['candidate']['system_accuracy'] * 100:.2f} %, on camera {c['parent']['camera_fraction'] * 100:.1f} -> "
                     f"{c['candidate']['camera_fraction'] * 100:.1f} %")
        end = self.heads.get("end", {})
        if "boundary_within_one_step" in end:
            lines.append(f"  {end['retrained']}: boundary feature (validation frames) within one int8 step of the "
                         f"parent's on {end['boundary_within_one_step'] * 100:.1f} % of values "
                         f"(mean {end['boundary_mean_abs_steps']:.2f} steps)")
        if "selector_picks_uploaded" in end:
            lines.append(f"  profile selector: picks {end['selector_picks_uploaded'] * 100:.1f} % of the uploaded frames, "
                         f"{end['selector_picks_replay'] * 100:.1f} % of the replay (training) frames")
        lines.append(f"  thresholds {self.parent['thresholds']} -> {self.candidate['thresholds']}")
        lines.append(f"  verdict: {'BETTER' if self.better else 'not better'} ({self.reason})")
        return "\n".join(lines)


# -- exit heads inside .tflite files ------------------------------------------------------------
def _fc(model):
    """(subgraph, the one FULLY_CONNECTED op) of a flatbuffer model: the exit head's dense layer."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools.flatbuffer_utils import get_builtin_code_from_operator_code

    sub = model.subgraphs[0]
    fcs = [op for op in sub.operators
           if get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex]) == fb.BuiltinOperator.FULLY_CONNECTED]
    if len(fcs) != 1:
        raise BundleError(f"segment has {len(fcs)} dense layers; retraining needs an exit head ending in exactly one")
    return sub, fcs[0]


def _quant(tensor) -> tuple[np.ndarray, np.ndarray]:
    q = tensor.quantization
    return np.asarray(q.scale, dtype=np.float64).reshape(-1), np.asarray(q.zeroPoint, dtype=np.int64).reshape(-1)


class Head:
    """A segment's .tflite with its exit head exposed: the dense layer's float weights, and a probe
    model whose extra output is that layer's input (the pooled feature the head sees)."""

    def __init__(self, model_bytes: bytes, tier: str):
        from ai_edge_litert.interpreter import Interpreter
        from ai_edge_litert.tools import flatbuffer_utils as fbu

        self.tier, self.model_bytes = tier, model_bytes
        model = fbu.read_model_from_bytearray(bytearray(model_bytes))
        sub, op = _fc(model)
        x_t, w_t, b_t = (sub.tensors[i] for i in op.inputs[:3])
        self.in_scale, in_zp = _quant(x_t)
        self.in_zp = int(in_zp[0])
        w_scale, _ = _quant(w_t)
        wq = np.frombuffer(bytes(model.buffers[w_t.buffer].data), dtype=np.int8).reshape(tuple(w_t.shape))
        bq = np.frombuffer(bytes(model.buffers[b_t.buffer].data), dtype=np.int32)
        per_channel = w_scale.size == wq.shape[0]
        self.W = (wq.astype(np.float64) * (w_scale[:, None] if per_channel else w_scale[0])).T  # (D, C)
        self.b = bq.astype(np.float64) * self.in_scale[0] * (w_scale if per_channel else w_scale[0])
        sub.outputs = list(sub.outputs) + [op.inputs[0]]  # probe: also output the head's input
        self._interp = Interpreter(model_content=bytes(fbu.convert_object_to_bytearray(model)))
        self._interp.allocate_tensors()
        self._in = self._interp.get_input_details()[0]
        self._outs = self._interp.get_output_details()

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(pooled head inputs (N, D) float, the segment's own outputs (N, ...) raw) for N inputs."""
        pooled, outs = [], [[] for _ in self._outs[:-1]]
        for x in inputs:
            self._interp.set_tensor(self._in["index"], x.reshape(self._in["shape"]).astype(self._in["dtype"]))
            self._interp.invoke()
            for k, d in enumerate(self._outs[:-1]):
                outs[k].append(self._interp.get_tensor(d["index"])[0])
            pooled.append(self._interp.get_tensor(self._outs[-1]["index"]).reshape(-1))
        q = np.stack(pooled).astype(np.float64)
        return (q - self.in_zp) * self.in_scale[0], [np.stack(o) for o in outs]

    def patched(self, W: np.ndarray, b: np.ndarray) -> bytes:
        """The same model with new dense weights (D, C) and bias (C,), quantized in its own scheme
        (int8 symmetric weights, per channel if it was; int32 bias at input x weight scale) and
        written over the old values in place: every other byte of the file is unchanged, so an
        update can ship the file as a tiny XOR delta. The logits' output quantization is kept,
        so every tier decodes carried logits as before."""
        from ai_edge_litert import schema_py_generated as fb
        from ai_edge_litert.tools.flatbuffer_utils import get_builtin_code_from_operator_code

        data = bytearray(self.model_bytes)
        model = fb.Model.GetRootAs(data, 0)
        sub = model.Subgraphs(0)
        ops = [sub.Operators(i) for i in range(sub.OperatorsLength())]
        op = next(o for o in ops if get_builtin_code_from_operator_code(model.OperatorCodes(o.OpcodeIndex()))
                  == fb.BuiltinOperator.FULLY_CONNECTED)
        w_t, b_t = sub.Tensors(op.Inputs(1)), sub.Tensors(op.Inputs(2))

        def view(tensor, dtype):  # a writable numpy view of a constant tensor's bytes in `data`
            buf = model.Buffers(tensor.Buffer())
            if buf.Offset():  # large models keep buffers after the flatbuffer
                return np.frombuffer(data, dtype=dtype, count=buf.Size() // np.dtype(dtype).itemsize, offset=buf.Offset())
            return buf.DataAsNumpy().view(dtype)

        w_scale_view, b_scale_view = w_t.Quantization().ScaleAsNumpy(), b_t.Quantization().ScaleAsNumpy()
        wt = np.asarray(W, dtype=np.float64).T  # (C, D) as TFLite stores it
        if w_scale_view.size == wt.shape[0]:
            scale = np.maximum(np.abs(wt).max(axis=1), 1e-12) / 127.0
            wq = np.clip(np.round(wt / scale[:, None]), -127, 127).astype(np.int8)
        else:
            scale = np.array([max(np.abs(wt).max(), 1e-12) / 127.0])
            wq = np.clip(np.round(wt / scale[0]), -127, 127).astype(np.int8)
        scale = scale.astype(np.float32)
        bias_scale = (np.float32(self.in_scale[0]) * scale).astype(np.float32)
        if b_scale_view.size != wt.shape[0]:
            raise BundleError(f"{self.tier} head: bias quantization has {b_scale_view.size} scales, expected {wt.shape[0]}")
        bias_scale_full = np.broadcast_to(bias_scale, (wt.shape[0],)) if bias_scale.size == 1 else bias_scale
        bq = np.clip(np.round(np.asarray(b, dtype=np.float64) / bias_scale_full), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        view(w_t, np.int8)[:] = wq.reshape(-1)
        view(b_t, np.int32)[:] = bq
        w_scale_view[:] = scale
        b_scale_view[:] = bias_scale_full
        return bytes(data)


def fit_head(W0: np.ndarray, b0: np.ndarray, x_kd: np.ndarray, teacher: np.ndarray, x_ce: np.ndarray,
             y_ce: np.ndarray, temperature: float, steps: int, lr: float, l2: float,
             hard_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Distil a linear head: T^2 * KL(teacher_T || student_T) on (x_kd, teacher logits)
    [+ hard_weight * CE on the teacher's answer] + CE on labelled (x_ce, y_ce) + l2 * |W - W0|^2,
    full-batch Adam from (W0, b0). numpy only."""
    W, b = W0.astype(np.float64).copy(), b0.astype(np.float64).copy()
    T = temperature
    pt = softmax(teacher / T) if len(x_kd) else None
    hard = np.eye(W.shape[1])[teacher.argmax(1)] if len(x_kd) and hard_weight else None
    onehot = np.eye(W.shape[1])[y_ce] if len(x_ce) else None
    m = [np.zeros_like(W), np.zeros_like(b)]
    v = [np.zeros_like(W), np.zeros_like(b)]
    for step in range(1, steps + 1):
        gW, gb = 2 * l2 * (W - W0), np.zeros_like(b)
        if pt is not None:  # d/ds of T^2 * CE(pt, softmax(s/T)) = T * (softmax(s/T) - pt)
            g = T * (softmax((x_kd @ W + b) / T) - pt) / len(x_kd)
            gW += x_kd.T @ g
            gb += g.sum(axis=0)
        if hard is not None:  # Hinton et al.'s hard-target term, with the teacher's answer as the label
            g = hard_weight * (softmax(x_kd @ W + b) - hard) / len(x_kd)
            gW += x_kd.T @ g
            gb += g.sum(axis=0)
        if onehot is not None:
            g = (softmax(x_ce @ W + b) - onehot) / len(x_ce)
            gW += x_ce.T @ g
            gb += g.sum(axis=0)
        for i, (p, g) in enumerate(((W, gW), (b, gb))):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            p -= lr * (m[i] / (1 - 0.9 ** step)) / (np.sqrt(v[i] / (1 - 0.999 ** step)) + 1e-8)
    return W, b


# -- running the deployed int8 chain ---------------------------------------------------------------
class Chain:
    """The parent bundle's int8 segments, heads exposed; feeds frames or stored end features."""

    def __init__(self, bundle: Bundle):
        from tierlite.segment import Segment

        from tierlite.profiles import end_profiles

        self.bundle = bundle
        self.heads = {t: Head(bundle.segment_path(t).read_bytes(), t) for t in ("end", "edge")}
        self.profiles = [(sel, Head((bundle.root / f).read_bytes(), "end")) for f, sel in end_profiles(bundle.manifest)]
        self.cloud = Segment(bundle, "cloud")
        self.info = {t: bundle.segment(t) for t in TIERS}

    def _logits(self, tier: str, raw: np.ndarray) -> np.ndarray:
        lo = self.info[tier].output("logits")
        return ((raw.astype(np.float64) - lo.zero_point) * lo.scale).reshape(len(raw), -1)

    def from_end_features(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        """Edge pooled features, edge logits and cloud logits for int8 end features (N, ...)."""
        pooled, outs = self.heads["edge"].run(feats)
        info = self.info["edge"]
        edge_logits = self._logits("edge", outs[info.output("logits").index])
        edge_feats = outs[info.output("feature").index]
        cloud = np.stack([self.cloud.run(f[None]).logits for f in edge_feats]) if len(feats) else np.zeros((0, 0))
        return {"edge_pooled": pooled, "edge_logits": edge_logits, "cloud_logits": cloud.astype(np.float64)}

    def from_frames(self, images: np.ndarray) -> dict[str, np.ndarray]:
        pooled, outs = self.heads["end"].run(images)
        for selector, head in self.profiles:  # as Segment does on the node: per frame
            picked = selector.picks(images) if len(images) else np.zeros(0, bool)
            if picked.any():
                p_pooled, p_outs = head.run(images[picked])
                pooled[picked] = p_pooled
                for o, po in zip(outs, p_outs):
                    o[picked] = po
        info = self.info["end"]
        feats = outs[info.output("feature").index]
        out = self.from_end_features(feats)
        out.update(end_pooled=pooled, end_logits=self._logits("end", outs[info.output("logits").index]),
                   end_features=feats)
        return out


# -- data ----------------------------------------------------------------------------------------
def load_hard_examples(opts: RetrainOptions, bundle: Bundle) -> dict[str, Any]:
    """Stored end features + teacher logits of every hard example, and the frames of opted-in nodes."""
    from tierlite.cloud.store import HardExampleStore

    feats, teacher, nodes = [], [], []
    with HardExampleStore.open_readonly(opts.store) as store:
        for ex in store.iter_examples(bundle_name=bundle.name):
            if opts.since is not None and ex.ts < opts.since:
                continue
            f = ex.end_feature_array()
            if f is None:
                continue  # the edge did not forward the node's feature (forward_end_feature: false)
            feats.append(f.reshape(bundle.segment("edge").inputs[0].shape[1:]))
            teacher.append(ex.logits["cloud"])
            nodes.append(ex.node)
    out = {"end_features": np.stack(feats) if feats else np.zeros((0,)), "teacher": np.stack(teacher) if teacher else None,
           "nodes": nodes, "frames": np.zeros((0, *bundle.input_shape[1:]), np.uint8), "frame_nodes": [],
           "refused_frames": 0}
    if opts.frames is not None and opts.frames.is_file():
        from tierlite.cloud.frames import FrameStore

        with FrameStore(opts.frames, readonly=True) as fs:
            images, frame_nodes, refused = [], [], 0
            for rec in fs.iter_frames(bundle.name, since=opts.since):
                if not opts.privacy.allows_frames(rec.node):
                    refused += 1  # uploaded, but this node is not opted in at the cloud: never used
                    continue
                try:
                    images.append(rec.image(bundle.input_shape[1:3]))
                    frame_nodes.append(rec.node)
                except DataError:
                    refused += 1
        if images:
            out["frames"], out["frame_nodes"] = np.stack(images), frame_nodes
        out["refused_frames"] = refused
    return out


def _workdir(bundle: Bundle, opts: RetrainOptions) -> Path:
    """The folder holding the bundle's checkpoint/ and cache/: the one --checkpoint points into,
    else the converters' default "<bundle>-work"."""
    from tierlite.converters.pipeline import default_workdir

    if opts.checkpoint is not None:
        ck = Path(opts.checkpoint)
        ck = ck.parent if ck.suffix == ".keras" else ck
        return ck.parent if ck.name == "checkpoint" else ck
    return default_workdir(bundle.root)


def _replay_and_val(opts: RetrainOptions, bundle: Bundle):
    """Labelled replay frames (training split) and the validation split of the training folder,
    split as the original training did (its seed and val_fraction, from the checkpoint's metadata)."""
    from tierlite.converters.datasets import load_splits

    if opts.replay is None:
        raise ConfigError("--replay: the labelled training folder is needed to keep clean accuracy and "
                          "to re-calibrate the thresholds")
    work = _workdir(bundle, opts)
    meta_file = work / "checkpoint" / "model.json"
    seed, val_fraction, limit = int(bundle.manifest.get("training", {}).get("seed", 0)), 0.1, None
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        seed, val_fraction, limit = meta.get("seed", seed), meta["train"]["val_fraction"], meta["train"].get("limit")
    cache = work / "cache" if (work / "cache").is_dir() else opts.cache_dir  # the training's decoded frames
    splits = load_splits(opts.replay, bundle.input_shape[1], val_fraction, seed, limit, cache)
    if splits.classes != bundle.labels:
        raise DataError(f"--replay {opts.replay}: classes {splits.classes} differ from the bundle's {bundle.labels}")
    rng = np.random.default_rng(opts.seed)
    n = min(opts.replay_frames, len(splits.train.labels))
    idx = rng.choice(len(splits.train.labels), n, replace=False)
    return splits.train.images[idx], splits.train.labels[idx], splits.val.images, splits.val.labels


# -- evaluation ------------------------------------------------------------------------------------
def _escalation(logits: np.ndarray, threshold: float) -> float:
    return float((normalized_entropy(softmax(logits)) > threshold).mean()) if len(logits) else 0.0


def _agreement(logits: np.ndarray, teacher: np.ndarray) -> float:
    return float((logits.argmax(1) == teacher.argmax(1)).mean()) if len(logits) else 0.0


def _clean_figures(exits: list[np.ndarray], labels: np.ndarray, thresholds: dict, feature_bytes) -> dict[str, Any]:
    from tierlite.converters import calibrate

    op = calibrate.evaluate(exits, labels, thresholds, feature_bytes)
    return {"end_accuracy": float((exits[0].argmax(1) == labels).mean()),
            "edge_accuracy": float((exits[1].argmax(1) == labels).mean()),
            "cloud_accuracy": float((exits[2].argmax(1) == labels).mean()),
            "system_accuracy": op.accuracy, "camera_fraction": op.fractions["end"], "fractions": op.fractions}


# -- the job ----------------------------------------------------------------------------------------
def retrain(opts: RetrainOptions) -> RetrainReport:
    from tierlite.converters import calibrate
    from tierlite.segment import encoded_size

    t0 = time.monotonic()
    parent = Bundle.load(opts.bundle)
    for t in TIERS:
        parent.segment(t)
    if opts.end_scope != "head":  # fail before decoding any data, not after
        ck = Path(opts.checkpoint) if opts.checkpoint else _workdir(parent, opts)
        if not ck.exists():
            raise ConfigError(f"--end-scope {opts.end_scope} needs the parent's Keras checkpoint: {ck} not found "
                              "(--checkpoint)")
    log.info("retrain: parent %s v%d; reading hard examples from %s", parent.name, parent.version, opts.store)
    hard = load_hard_examples(opts, parent)
    n_feat, n_frames = len(hard["nodes"]), len(hard["frame_nodes"])
    if n_feat + n_frames < opts.min_examples:
        raise DataError(f"only {n_feat} stored hard examples and {n_frames} usable frames for {parent.name}; "
                        f"need at least {opts.min_examples} (--min-examples)")
    chain = Chain(parent)
    rng = np.random.default_rng(opts.seed)

    # Teacher and pooled features of every hard example, from the deployed int8 chain.
    log.info("retrain: %d stored features, %d frames from opted-in nodes (%d frames not usable by policy); "
             "running the int8 chain", n_feat, n_frames, hard["refused_frames"])
    f_out = chain.from_end_features(hard["end_features"]) if n_feat else None
    r_out = chain.from_frames(hard["frames"]) if n_frames else None
    # Feature examples carry the cloud's answer as stored; frames get it from the chain here.
    edge_x = np.concatenate([a for a in (f_out and f_out["edge_pooled"], r_out and r_out["edge_pooled"]) if a is not None])
    edge_t = np.concatenate([a for a in (hard["teacher"], r_out and r_out["cloud_logits"]) if a is not None])
    edge_parent = np.concatenate([a for a in (f_out and f_out["edge_logits"], r_out and r_out["edge_logits"]) if a is not None])
    hold_edge = rng.random(len(edge_x)) < opts.holdout
    hold_end = hold_edge[n_feat:] if n_frames else np.zeros(0, bool)  # a frame is held out for both heads

    log.info("retrain: replay and validation frames from %s", opts.replay)
    rx, ry, vx, vy = _replay_and_val(opts, parent)
    replay = chain.from_frames(rx)
    val = chain.from_frames(vx)
    parent_val_exits = [val["end_logits"], val["edge_logits"], val["cloud_logits"]]

    heads: dict[str, Any] = {}
    new_W: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    plans = [("edge", edge_x[~hold_edge], edge_t[~hold_edge], replay["edge_pooled"])]
    new_end: bytes | None = None
    profile: tuple[bytes, Any] | None = None
    if n_frames and (~hold_end).sum() and opts.end_scope == "profile":
        profile_model, selector, heads["end"] = build_end_profile(parent, opts, hard["frames"][~hold_end], rx)
        profile = (profile_model, selector)
    elif n_frames and (~hold_end).sum() and opts.end_scope != "head":
        new_end, heads["end"] = retrain_end_segment(parent, opts, hard["frames"][~hold_end],
                                                    r_out["cloud_logits"][~hold_end], rx, ry,
                                                    branch_only=opts.end_scope == "branch")
    elif n_frames and (~hold_end).sum():
        plans.insert(0, ("end", r_out["end_pooled"][~hold_end], r_out["cloud_logits"][~hold_end], replay["end_pooled"]))
    for tier, x_kd, t_kd, x_ce in plans:
        h = chain.heads[tier]
        W, b = fit_head(h.W, h.b, x_kd, t_kd, x_ce, ry, opts.temperature, opts.steps, opts.lr, opts.l2, opts.hard_weight)
        new_W[tier] = (W, b)
        heads[tier] = {"distilled_examples": int(len(x_kd)), "replay_frames": int(len(x_ce)),
                       "weight_change": float(np.linalg.norm(W - h.W) / max(np.linalg.norm(h.W), 1e-12))}
        log.info("retrain: %s head refitted on %d hard + %d replay examples", tier, len(x_kd), len(x_ce))

    # Write the candidate bundle: the parent's files, patched heads, version + 1.
    out = opts.out or parent.root.with_name(f"{parent.root.name}-v{parent.version + 1}")
    if out.resolve() == parent.root.resolve():
        raise ConfigError("--out must differ from the parent bundle")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rel in parent.file_hashes():
        shutil.copy2(parent.root / rel, tmp / rel)
    for tier, (W, b) in new_W.items():
        (tmp / parent.segment(tier).file).write_bytes(chain.heads[tier].patched(W, b))
    if new_end is not None:
        (tmp / parent.segment("end").file).write_bytes(new_end)
    manifest = json.loads(json.dumps(parent.manifest))
    if profile is not None:  # one profile at a time: the new one replaces any the parent had
        for e in [e for e in manifest.get("files", []) if e.get("role") == "profile"]:
            (tmp / e["file"]).unlink(missing_ok=True)
        name = f"end-profile-v{parent.version + 1}.tflite"
        (tmp / name).write_bytes(profile[0])
        manifest["files"] = [e for e in manifest.get("files", []) if e.get("role") != "profile"] + [
            {"file": name, "sha256": "", "tier": "end", "role": "profile", "selector": profile[1].to_json()}]
    candidate_chain = Chain(Bundle(tmp, manifest, parent.segments))  # same tensors: only weights differ
    cand_val = candidate_chain.from_frames(vx)
    if new_end is None and profile is None:
        _check_boundary_identical(val, cand_val)
    else:  # a re-exported end keeps the boundary close (frozen or hinted), not bit-identical: measure it
        diff = np.abs(val["end_features"].astype(np.int16) - cand_val["end_features"].astype(np.int16))
        heads["end"]["boundary_within_one_step"] = float((diff <= 1).mean())
        heads["end"]["boundary_mean_abs_steps"] = float(diff.mean())
    cand_val_exits = [cand_val["end_logits"], cand_val["edge_logits"], cand_val["cloud_logits"]]

    enc = parent.feature_encoding
    fbytes = (encoded_size(parent.segment("end").output("feature").shape, enc),
              encoded_size(parent.segment("edge").output("feature").shape, {"kind": "int8"}))
    max_drop = float(parent.manifest.get("calibration", {}).get("max_drop", 0.005))
    chosen = calibrate.search_thresholds(cand_val_exits, vy, fbytes, max_drop)
    new_thr = _gap_middle(chosen.thresholds, cand_val_exits)

    # Held-out hard examples through the candidate's real int8 chain: agreement with the teacher,
    # and how many it would still escalate, parent vs candidate.
    holdout: dict[str, Any] = {}
    feat_hold = hold_edge[:n_feat]
    cand_f = candidate_chain.from_end_features(hard["end_features"][feat_hold]) if feat_hold.any() else None
    cand_r = candidate_chain.from_frames(hard["frames"][hold_end]) if hold_end.any() else None
    if hold_edge.any():
        cand = np.concatenate([a for a in (cand_f and cand_f["edge_logits"], cand_r and cand_r["edge_logits"])
                               if a is not None])
        ht, pl = edge_t[hold_edge], edge_parent[hold_edge]
        holdout["edge"] = {"frames": int(hold_edge.sum()), "parent_agreement": _agreement(pl, ht),
                           "candidate_agreement": _agreement(cand, ht),
                           "parent_escalation": _escalation(pl, parent.thresholds["edge"]),
                           "candidate_escalation": _escalation(cand, new_thr["edge"])}
    if cand_r is not None:
        pl, pt = r_out["end_logits"][hold_end], r_out["cloud_logits"][hold_end]
        holdout["end"] = {"frames": int(hold_end.sum()), "parent_agreement": _agreement(pl, pt),
                          "candidate_agreement": _agreement(cand_r["end_logits"], pt),
                          "parent_escalation": _escalation(pl, parent.thresholds["end"]),
                          "candidate_escalation": _escalation(cand_r["end_logits"], new_thr["end"])}

    clean = {"frames": int(len(vy)),
             "parent": _clean_figures(parent_val_exits, vy, parent.thresholds, fbytes),
             "candidate": _clean_figures(cand_val_exits, vy, new_thr, fbytes)}
    better, reason = _verdict(holdout, clean, opts)

    manifest.pop("signature", None)
    manifest.update(version=parent.version + 1, parent_version=parent.version, thresholds=new_thr)
    exit_acc = {t: float((l.argmax(1) == vy).mean()) for t, l in zip(TIERS, cand_val_exits)}
    manifest.setdefault("calibration", {}).update(
        exit_accuracy_int8=exit_acc, system_accuracy=chosen.accuracy, cloud_only_accuracy=chosen.cloud_only_accuracy,
        fractions=chosen.fractions, camera_uplink_bytes_per_frame=chosen.camera_uplink_bytes, frames=int(len(vy)))
    manifest["retrain"] = {"parent_version": parent.version, "heads": sorted(heads), "teacher": "cloud exit",
                           "end_scope": opts.end_scope if "end" in heads else "head",
                           "temperature": opts.temperature, "hard_examples": n_feat, "frames": n_frames,
                           "holdout": holdout, "better": better, "verdict": reason,
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_manifest(tmp, manifest)
    Bundle.load(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)

    report = RetrainReport(
        parent={"name": parent.name, "version": parent.version, "thresholds": parent.thresholds},
        candidate={"version": parent.version + 1, "thresholds": new_thr, "heads": sorted(heads),
                   "end_scope": opts.end_scope if "end" in heads else "head"},
        data={"examples": n_feat + n_frames, "features": n_feat, "with_frames": n_frames,
              "frames_not_allowed": hard["refused_frames"], "holdout": int(hold_edge.sum()),
              "replay": int(len(ry)), "val": int(len(vy))},
        heads=heads, holdout=holdout, clean=clean, better=better, reason=reason, bundle_dir=str(out),
        seconds=round(time.monotonic() - t0, 1))
    (out.parent / f"{out.name}.retrain.json").write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    return report


def retrain_end_segment(parent: Bundle, opts: RetrainOptions, frames: np.ndarray, teacher: np.ndarray,
                        replay_x: np.ndarray, replay_y: np.ndarray,
                        branch_only: bool = False) -> tuple[bytes, dict[str, Any]]:
    """Opted-in frames: retrain the end segment from the parent's Keras checkpoint with the same
    distillation loss as the heads, then export it to int8 with the parent's exact boundary and
    logits quantization. Needs TensorFlow.

    branch_only: only the layers that feed the camera's exit alone are trained (with an early cut,
    `boundary_after`, the end blocks past the tap and the head); the layers that make the boundary
    feature are frozen, so the edge, the cloud and nodes on the parent version read the same
    feature. Otherwise the whole segment trains under a FitNets-style hint, MSE between the new and
    the parent's boundary feature, which keeps it close."""
    import keras
    import tensorflow as tf

    from tierlite.converters.export import _pixel_representative, to_tflite
    from tierlite.converters.models import segments_of
    from tierlite.converters.train import load_checkpoint

    joint, meta = load_checkpoint(opts.checkpoint or _workdir(parent, opts))
    end = segments_of(joint)[0]
    if branch_only:
        shared = {layer.name for layer in keras.Model(end.inputs, end.outputs[0]).layers}
        for layer in end.layers:
            layer.trainable = layer.name not in shared
        if not end.trainable_variables:
            raise ConfigError("the end segment has no layers of its own past the boundary to retrain")
    f_parent = [np.asarray(end.predict(x.astype(np.float32), batch_size=256, verbose=0)[0]) for x in (frames, replay_x)]
    T, n = opts.temperature, len(frames)
    pt = tf.constant(softmax(teacher / T), tf.float32)
    hard_y = tf.constant(teacher.argmax(1), tf.int32)
    opt = tf.keras.optimizers.Adam(1e-3)
    rng = np.random.default_rng(opts.seed)
    batch = 64

    @tf.function
    def step(x, t, y, f0, rxb, ryb, rf0):
        with tf.GradientTape() as tape:
            f, s = end(x, training=False)  # BatchNorm statistics stay the parent's
            rf, rs = end(rxb, training=False)
            kd = T * T * tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(t, s / T))
            ce_hard = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, s))
            ce_replay = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(ryb, rs))
            hint = tf.reduce_mean(tf.square(f - f0)) + tf.reduce_mean(tf.square(rf - rf0))
            loss = kd + opts.hard_weight * ce_hard + ce_replay + opts.hint_weight * hint
        grads = tape.gradient(loss, end.trainable_variables)
        opt.apply_gradients(zip(grads, end.trainable_variables))
        return loss, hint

    trained = [layer.name for layer in end.layers if layer.trainable_weights]
    log.info("retrain: end %s on %d frames + %d replay, %d epochs (TensorFlow): %s", "branch" if branch_only else "segment",
             n, len(replay_x), opts.end_epochs, ", ".join(trained))
    for epoch in range(opts.end_epochs):
        order = rng.permutation(n)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            r = rng.integers(0, len(replay_x), len(idx))
            loss, hint = step(frames[idx].astype(np.float32), tf.gather(pt, idx), tf.gather(hard_y, idx),
                              f_parent[0][idx], replay_x[r].astype(np.float32), replay_y[r].astype(np.int32),
                              f_parent[1][r])
        log.info("retrain: end segment epoch %d/%d: loss %.3f, boundary hint %.4f", epoch + 1, opts.end_epochs,
                 float(loss), float(hint))
    rep = _parent_representative(meta, _workdir(parent, opts)) if branch_only else None
    if rep is None:  # the boundary moves anyway (segment scope) or the parent's frames are not at hand
        rep = np.concatenate([replay_x[: max(1, min(500, len(replay_x)))], frames[:200]])
    model = to_tflite(end, _pixel_representative(rep), uint8_input=True)
    model = _pin_quantization(model, parent, len(parent.labels))
    return model, {"retrained": "end branch past the boundary" if branch_only else "whole end segment",
                   "layers": trained, "frames": int(n), "replay_frames": int(len(replay_x)),
                   "epochs": opts.end_epochs, "hint_weight": opts.hint_weight, "final_hint_mse": float(hint)}


def build_end_profile(parent: Bundle, opts: RetrainOptions, frames: np.ndarray,
                      replay_x: np.ndarray) -> tuple[bytes, Any, dict[str, Any]]:
    """A condition profile (tierlite.profiles) from the opted-in nodes' uploaded frames: the parent's
    end segment with every BatchNorm's statistics re-estimated on those frames (no labels, no
    teacher), exported to int8 with the parent's exact boundary and logits quantization, and the
    selector that tells such frames from the training set's (the replay frames). Needs TensorFlow."""
    import keras

    from tierlite.converters.export import _pixel_representative, to_tflite
    from tierlite.converters.models import segments_of
    from tierlite.converters.train import load_checkpoint
    from tierlite.profiles import Selector

    joint, _ = load_checkpoint(opts.checkpoint or _workdir(parent, opts))
    end = segments_of(joint)[0]
    rng = np.random.default_rng(opts.seed)
    sample = frames[rng.permutation(len(frames))[:PROFILE_FRAMES]].astype(np.float32)
    norms = [layer for layer in end._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in norms:
        bn.momentum = 0.0  # the moving statistics become those of the one batch below
    end(sample, training=True)
    model = to_tflite(end, _pixel_representative(sample[:500]), uint8_input=True)
    model = _pin_quantization(model, parent, len(parent.labels))
    selector = Selector.fit(frames, replay_x)
    hit = float(selector.picks(frames).mean()) if len(frames) else 0.0
    false = float(selector.picks(replay_x).mean()) if len(replay_x) else 0.0
    log.info("retrain: end profile: statistics of %d uploaded frames in %d BatchNorm layers; selector picks "
             "%.1f %% of them and %.1f %% of the replay frames", len(sample), len(norms), hit * 100, false * 100)
    return model, selector, {"retrained": "condition profile: end statistics of the uploaded frames",
                             "frames": int(len(sample)), "batchnorm_layers": len(norms),
                             "selector_picks_uploaded": hit, "selector_picks_replay": false}


def _parent_representative(meta: dict, workdir: Path) -> np.ndarray | None:
    """The frames the parent's int8 export was calibrated on: calibrating the re-export on the
    same frames gives the frozen layers the same quantization, hence a bit-identical boundary."""
    from tierlite.converters.datasets import checkpoint_splits, representative_frames

    try:
        splits = checkpoint_splits(meta, workdir)
    except DataError as e:
        log.warning("retrain: %s; calibrating the re-export on replay frames (boundary close, not identical)", e)
        return None
    return representative_frames(splits.train.images, meta["train"]["calibration_frames"], meta["seed"])


def _pin_quantization(model: bytes, parent: Bundle, num_classes: int) -> bytes:
    """Give a re-exported end segment's outputs the parent's exact (scale, zero point): every other
    tier reads the boundary feature and carried logits with those. An output's quantization is
    read when the interpreter prepares the op producing it, so this is a requantization, not a
    relabelling. Values outside the parent's range saturate."""
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    from tierlite.converters.export import tensor_infos

    _, outs = tensor_infos(model, num_classes)
    fb = fbu.read_model_from_bytearray(bytearray(model))
    sub = fb.subgraphs[0]
    for o in outs:
        want = parent.segment("end").output(o.role)
        q = sub.tensors[sub.outputs[o.index]].quantization
        q.scale, q.zeroPoint = [float(want.scale)], [int(want.zero_point)]
    pinned = bytes(fbu.convert_object_to_bytearray(fb))
    _, outs = tensor_infos(pinned, num_classes)
    for o in outs:
        want = parent.segment("end").output(o.role)
        if (o.shape, o.dtype, o.zero_point) != (want.shape, want.dtype, want.zero_point) or not np.isclose(o.scale, want.scale):
            raise BundleError(f"re-exported end segment's {o.role} output {o} cannot match the parent's {want}")
    if [o.index for o in sorted(outs, key=lambda o: o.role)] != [parent.segment("end").output(r).index for r in ("feature", "logits")]:
        raise BundleError("re-exported end segment orders its outputs differently from the parent")
    return pinned


def _gap_middle(thresholds: dict[str, float], exits: list[np.ndarray]) -> dict[str, float]:
    """Every threshold between two neighbouring validation entropies decides the validation frames
    alike; take the middle of that gap (the widest margin) rather than its lower end, so frames
    unlike the validation set (drift) are not escalated by an arbitrary tie-break."""
    out = {}
    for tier, logits in zip(("end", "edge"), exits):
        t = thresholds[tier]
        h = np.sort(normalized_entropy(softmax(logits)))
        above = h[h > t]
        below = h[h <= t]
        if t < 0 or not len(below):
            out[tier] = t  # -1: the exit never decides; keep it
        else:
            out[tier] = float((below[-1] + above[0]) / 2) if len(above) else float(min(1.0, (below[-1] + 1.0) / 2))
    return out


def _check_boundary_identical(parent_out: dict, cand_out: dict) -> None:
    """The frozen trunk must give the very same boundary bytes, or unchanged tiers would misread them."""
    if not np.array_equal(parent_out["end_features"], cand_out["end_features"]):
        raise BundleError("retrained end segment changed the boundary feature; refusing to write it")
    if not np.allclose(parent_out["cloud_logits"], cand_out["cloud_logits"]):
        raise BundleError("retrained edge segment changed what the cloud receives; refusing to write it")


def _verdict(holdout: dict, clean: dict, opts: RetrainOptions) -> tuple[bool, str]:
    if not holdout:
        return False, "no held-out hard examples to judge by"
    primary = "end" if "end" in holdout else "edge"
    h = holdout[primary]
    gain = (h["candidate_agreement"] - h["parent_agreement"]) * 100
    keys = ("end_accuracy", "edge_accuracy", "cloud_accuracy", "system_accuracy")  # edge/cloud: same unless
    drops = {k: (clean["parent"][k] - clean["candidate"][k]) * 100 for k in keys}  # the boundary moved
    worst = max(drops, key=drops.get)
    if drops[worst] > opts.max_clean_drop:
        return False, (f"clean {worst.replace('_', ' ')} drops {drops[worst]:.2f} pt "
                       f"(> {opts.max_clean_drop} pt allowed)")
    if gain < opts.margin:
        return False, f"held-out {primary}-exit agreement with the teacher up {gain:+.2f} pt, below the {opts.margin} pt margin"
    return True, (f"held-out {primary}-exit agreement with the teacher up {gain:+.2f} pt (margin {opts.margin} pt), "
                  f"clean drop at most {max(drops.values()):.2f} pt")


# -- the cloud worker's trigger ----------------------------------------------------------------------
class RetrainScheduler:
    """Runs `tierlite retrain` as a child process when enough new hard examples have arrived or
    enough time has passed (the cloud worker calls tick() from its housekeeping loop), and keeps
    frames uploaded by opted-in nodes. The child process keeps TensorFlow-free numpy work and any
    publishing out of the worker, which goes on answering escalations meanwhile. The latest bundle
    it published becomes the parent of the next run (state in <store stem>.retrain.json)."""

    def __init__(self, config, mqtt):
        from tierlite.cloud.frames import FrameCollector, FrameStore

        self.config, self.trigger = config, config.retrain
        store = Path(config.store.path)
        self.frames_path = Path(self.trigger.frames_path) if self.trigger.frames_path else default_frames_path(store)
        self.collector = (FrameCollector(FrameStore(self.frames_path), mqtt, config.prefix)
                          if self.trigger.collect_frames else None)
        self.state_file = store.with_name(store.stem + ".retrain.json")
        self.state = {"parent": str(Path(config.bundle).resolve()), "runs": 0}
        if self.state_file.is_file():
            try:
                self.state.update(json.loads(self.state_file.read_text()))
            except ValueError:
                log.warning("retrain state %s unreadable; starting afresh", self.state_file)
        self._proc = None
        self._log_path: Path | None = None
        self._last = time.monotonic()
        self._base: int | None = None  # store.written at the last run (or at start)

    def tick(self, written: int) -> None:
        """written: hard examples this worker has stored since it started."""
        if self._proc is not None:
            if self._proc.poll() is not None:
                self._finished()
            return
        if self._base is None:
            self._base = written
        new, now = written - self._base, time.monotonic()
        if now - self._last < self.trigger.min_interval_seconds:
            return
        due_examples = self.trigger.every_examples is not None and new >= self.trigger.every_examples
        due_time = self.trigger.every_seconds is not None and now - self._last >= self.trigger.every_seconds
        if due_examples or due_time:
            self._base = written
            self._start(f"{new} new hard examples" if due_examples else "the retraining period elapsed")

    def _start(self, why: str) -> None:
        import subprocess
        import sys

        parent = Path(self.state["parent"])
        run = int(self.state["runs"]) + 1
        out = parent.with_name(f"{parent.name.split('-v')[0]}-retrain{run}")
        self._report = out.with_name(out.name + ".json")
        argv = [sys.executable, "-m", "tierlite", "retrain", "--store", str(self.config.store.path),
                "--bundle", str(parent), "--replay", self.trigger.replay, "--out", str(out),
                "--frames", str(self.frames_path), "--json", str(self._report), *self.trigger.args]
        if "--publish" in self.trigger.args and "--broker" not in self.trigger.args:
            b = self.config.broker
            argv += ["--broker", f"{b.host}:{b.port}", "--prefix", self.config.prefix]
        self._log_path = out.with_name(out.name + ".log")
        log.info("retrain: starting run %d (%s): %s", run, why, " ".join(argv[3:]))
        with open(self._log_path, "wb") as f:
            self._proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._out = out
        self._last = time.monotonic()
        self.state["runs"] = run

    def _finished(self) -> None:
        code, self._proc = self._proc.returncode, None
        try:
            report = json.loads(self._report.read_text())
        except (OSError, ValueError):
            report = None
        if code != 0 or report is None:
            tail = self._log_path.read_text(errors="replace").strip().splitlines()[-1:] if self._log_path else []
            log.error("retrain: run %d failed (exit %d): %s", self.state["runs"], code, tail[0] if tail else "no output")
        else:
            rollout = report.get("rollout", {})
            log.info("retrain: run %d: candidate v%s %s; %s", self.state["runs"], report["candidate"]["version"],
                     "better" if report["better"] else "not better", report["reason"])
            if rollout.get("stage") in ("published", "complete"):
                self.state["parent"] = str(self._out.resolve())  # the fleet runs it now
        self._save()

    def _save(self) -> None:
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            log.info("retrain: stopping the running job")
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except Exception:  # noqa: BLE001
                self._proc.kill()
        if self.collector is not None:
            self.collector.store.close()
        self._save()
