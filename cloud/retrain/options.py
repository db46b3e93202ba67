"""What a retraining run is given and what it reports: the privacy policy (whose frames may be
used), RetrainOptions (the `tierlite retrain` flags) and RetrainReport."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierlite.errors import ConfigError

PRIVACY_MODES = ("features", "raw")


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
    # condition profile (tierlite.conditions): the end with statistics of the uploaded frames.
    end_scope: str = "head"
    checkpoint: Path | None = None  # the parent's Keras checkpoint (every end_scope but "head")
    hint_weight: float = 1.0  # weight of the boundary-feature hint (end_scope "segment")
    end_epochs: int = 8
    steps: int = 300
    lr: float = 0.01
    l2: float = 1e-3
    margin: float = 1.0  # points
    significance: float = 0.05  # one-sided p-value a gain must reach (paired test, judge.py)
    # A folder <class>/*.jpg of frames from the drifted site with their true classes: when given, the
    # verdict is their accuracy, parent vs candidate, rather than agreement with the teacher.
    labelled_holdout: Path | None = None
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
                   checkpoint=Path(args.checkpoint) if args.checkpoint else None, hint_weight=args.hint_weight,
                   significance=getattr(args, "significance", 0.05),
                   labelled_holdout=Path(args.labelled_holdout) if getattr(args, "labelled_holdout", None) else None)
        opts.check()
        return opts

    def check(self) -> None:
        if self.temperature <= 0 or self.steps < 1 or self.replay_frames < 0:
            raise ConfigError("--temperature > 0, --steps >= 1 and --replay-frames >= 0")
        if not 0.0 < self.holdout < 0.9:
            raise ConfigError(f"--holdout must be in (0, 0.9), got {self.holdout}")
        if not self.store.is_file():
            raise ConfigError(f"--store: hard-example store not found: {self.store}")
        if not 0.0 < self.significance < 1.0:
            raise ConfigError(f"--significance must be in (0, 1), got {self.significance}")
        if self.labelled_holdout is not None and not Path(self.labelled_holdout).is_dir():
            raise ConfigError(f"--labelled-holdout: folder not found: {self.labelled_holdout} (expected <class>/*.jpg)")
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
    teacher: dict[str, Any] = field(default_factory=dict)  # the teacher's drift check on the audits
    evidence: str = ""  # what decided the verdict (judge.EVIDENCE_*)
    labelled: dict[str, Any] | None = None  # accuracy on the operator-labelled holdout, when given

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
        check = (self.teacher or {}).get("check")
        if check is not None:
            lines.append(f"  teacher on {check['frames']} audited frames: "
                         + ", ".join(f"{k} {check['scores'][k]:.2f} (clean threshold {check['thresholds'][k]:.2f})"
                                     for k in ("classes", "entropy", "feature"))
                         + (" -> DRIFTED: its labels not used, heads not distilled" if check["drifted"] else ""))
        through = (self.holdout.get("end") or {}).get("through_candidate")
        if through is not None:
            d, dp = through["teacher_drift"], self.holdout["end"].get("teacher_drift")
            psi = ", ".join(f"{w} {x['scores']['classes']:.2f} (threshold {x['thresholds']['classes']:.2f}, {x['frames']} frames)"
                            for w, x in (("parent", dp), ("candidate", d)) if x)
            lines.append(f"  held-out end exit vs the teacher through the candidate's end: agreement "
                         f"{through['parent_agreement'] * 100:.1f} -> {through['candidate_agreement'] * 100:.1f} % "
                         f"({through['frames']} frames; teacher classes PSI on the frames each end is sure of: "
                         f"{psi or '-'})")
        lab = self.labelled
        if lab:
            lines.append(f"  operator-labelled holdout {lab['path']}: {lab['frames']} frames; "
                         + ", ".join(f"{k} {lab[k]['parent_accuracy'] * 100:.1f} -> {lab[k]['candidate_accuracy'] * 100:.1f} %"
                                     for k in ("end", "edge", "system"))
                         + f" (primary: {lab['primary']} exit)")
        lines.append(f"  thresholds {self.parent['thresholds']} -> {self.candidate['thresholds']}")
        lines.append(f"  verdict: {'BETTER' if self.better else 'not better'} ({self.reason})")
        if self.evidence:
            lines.append(f"  evidence that decided: {self.evidence}")
        return "\n".join(lines)
