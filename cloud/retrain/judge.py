"""Judging a candidate: agreement with the teacher and escalation on held-out hard examples, clean
validation figures, thresholds moved to the middle of their gap, the boundary check, the verdict.

The teacher (the cloud exit) is not assumed right. Under a strong drift it collapses with the
camera (digits, fog 5: 11.6 % accurate, agreeing with the camera on 91 % of frames), so agreement
with it would refuse exactly the candidates that fix the drift. `teacher_drift` checks it first:
its class and entropy histograms on the audited frames (a random share of what the camera was sure
of) against its own on the clean validation frames the camera is sure of, with thresholds set like
the node's drift monitor (tierlite.drift: 2 x the worst of resampled clean windows of the same
size). A drifted teacher's labels are not used, neither to train the heads nor to judge; a
candidate that changes the end (a condition profile) is then judged against the teacher as it
answers *through the candidate's boundary feature* (what the fleet will run), and only where that
teacher passes the same test. docs/DRIFT.md has the measurements."""
from __future__ import annotations

from typing import Any

import numpy as np

from tierlite.cloud.retrain.options import RetrainOptions
from tierlite.drift import frame_stats, reference_stats, window_scores
from tierlite.errors import BundleError
from tierlite.policy import normalized_entropy, softmax


def escalation(logits: np.ndarray, threshold: float) -> float:
    return float((normalized_entropy(softmax(logits)) > threshold).mean()) if len(logits) else 0.0


def agreement(logits: np.ndarray, teacher: np.ndarray) -> float:
    return float((logits.argmax(1) == teacher.argmax(1)).mean()) if len(logits) else 0.0


TEACHER_MIN_FRAMES = 10  # fewer audited/held-out frames: the teacher is not checked (too few to tell)
# Which of the teacher's drift scores make it untrustworthy. To learn from (the audits): a shifted
# class histogram (collapse) or entropy histogram (unsure) -- either makes its labels poor targets.
# To judge by (through the candidate): the class histogram only. A teacher that is less sure but
# not collapsed is a noisy judge, which the margin absorbs; a collapsed one rewards collapse.
# "feature" (the boundary feature it reads) is reported, never decisive: the input of a drift moves.
TEACHER_STATS = ("classes", "entropy")
JUDGE_STATS = ("classes",)


def teacher_reference(val: dict[str, np.ndarray], end_threshold: float, min_frames: int = 30) -> dict[str, np.ndarray]:
    """The teacher on the clean validation frames the parent's end exit is sure of (audits are drawn
    from the frames the camera is sure of; all validation frames when fewer than `min_frames`)."""
    sure = normalized_entropy(softmax(val["end_logits"])) <= end_threshold
    pick = sure if sure.sum() >= min_frames else np.ones(len(sure), bool)
    return {"features": val["end_features"][pick], "logits": val["cloud_logits"][pick]}


def teacher_drift(features: np.ndarray, logits: np.ndarray, reference: dict[str, np.ndarray],
                  seed: int = 0, bootstrap: int = 500, stats: tuple[str, ...] = TEACHER_STATS) -> dict[str, Any] | None:
    """Is the teacher in distribution on these frames? Its scores (tierlite.drift.window_scores: the
    boundary feature it reads, its entropy and class histograms) against `reference`, with thresholds
    for a window of exactly this many frames. None when there are too few frames to tell."""
    n = len(logits)
    if n < TEACHER_MIN_FRAMES or not len(reference["logits"]):
        return None
    ref = reference_stats(reference["features"], reference["logits"], window=n, bootstrap=bootstrap, seed=seed,
                          windows=())
    scores = window_scores(ref, *frame_stats(features, logits))
    over = [k for k in stats if scores[k] > ref["thresholds"][k]]
    return {"frames": int(n), "scores": {k: round(v, 4) for k, v in scores.items()},
            "thresholds": {k: round(float(v), 4) for k, v in ref["thresholds"].items()},
            "decisive": list(stats), "drifted": bool(over), "triggered": over}


def _drift_text(d: dict[str, Any]) -> str:
    k = d["triggered"][0] if d["triggered"] else "classes"
    rel = ">" if d["drifted"] else "<="
    return f"{k} PSI {d['scores'][k]:.2f} {rel} {d['thresholds'][k]:.2f} on {d['frames']} frames"


def clean_figures(exits: list[np.ndarray], labels: np.ndarray, thresholds: dict, feature_bytes) -> dict[str, Any]:
    from tierlite.converters import evaluate

    op = evaluate(exits, labels, thresholds, feature_bytes)
    return {"end_accuracy": float((exits[0].argmax(1) == labels).mean()),
            "edge_accuracy": float((exits[1].argmax(1) == labels).mean()),
            "cloud_accuracy": float((exits[2].argmax(1) == labels).mean()),
            "system_accuracy": op.accuracy, "camera_fraction": op.fractions["end"], "fractions": op.fractions}


def gap_middle(thresholds: dict[str, float], exits: list[np.ndarray]) -> dict[str, float]:
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


def check_boundary_identical(parent_out: dict, cand_out: dict) -> None:
    """The frozen trunk must give the very same boundary bytes, or unchanged tiers would misread them."""
    if not np.array_equal(parent_out["end_features"], cand_out["end_features"]):
        raise BundleError("retrained end segment changed the boundary feature; refusing to write it")
    if not np.allclose(parent_out["cloud_logits"], cand_out["cloud_logits"]):
        raise BundleError("retrained edge segment changed what the cloud receives; refusing to write it")


def verdict(holdout: dict, clean: dict, opts: RetrainOptions, teacher: dict | None = None) -> tuple[bool, str]:
    """Accept or refuse, and why. Clean validation (labelled) must not drop more than
    max_clean_drop. Then the evidence on the held-out hard examples: agreement with the teacher
    when the teacher is in distribution on the audits (or was not checked: no audits stored);
    when it is drifted, agreement with the teacher through the candidate's end, provided that
    teacher passes the drift test there; no trustworthy teacher: refused."""
    if not holdout:
        return False, "no held-out hard examples to judge by"
    keys = ("end_accuracy", "edge_accuracy", "cloud_accuracy", "system_accuracy")  # edge/cloud: same unless
    drops = {k: (clean["parent"][k] - clean["candidate"][k]) * 100 for k in keys}  # the boundary moved
    worst = max(drops, key=drops.get)
    if drops[worst] > opts.max_clean_drop:
        return False, (f"clean {worst.replace('_', ' ')} drops {drops[worst]:.2f} pt "
                       f"(> {opts.max_clean_drop} pt allowed)")
    clean_note = f"clean drop at most {max(drops.values()):.2f} pt"
    check = (teacher or {}).get("check")
    through = (holdout.get("end") or {}).get("through_candidate")
    # The teacher's labels on the held-out frames come from the parent's boundary feature. When that
    # input has drifted (feature score over its clean threshold), they describe what the parent's end
    # makes of the condition, not what the fleet will run: judge through the candidate's end instead
    # (measured on CIFAR-10 fog 3: -0.65 pt by the parent's features, +16.7 pt through the candidate
    # for a profile that gained 14.5 pt on labelled frames).
    input_moved = bool(check) and check["scores"].get("feature", 0.0) > check["thresholds"].get("feature", np.inf)
    if (check is None or not check["drifted"]) and not (input_moved and through is not None):
        trust = (f"teacher in distribution on the audits ({_drift_text(check)})" if check else
                 f"teacher not checked ({(teacher or {}).get('audits', 0)} audited frames stored, "
                 f"{TEACHER_MIN_FRAMES} needed)")
        primary = "end" if "end" in holdout else "edge"
        gain = (holdout[primary]["candidate_agreement"] - holdout[primary]["parent_agreement"]) * 100
        if gain < opts.margin:
            return False, (f"{trust}; held-out {primary}-exit agreement with the teacher up {gain:+.2f} pt, "
                           f"below the {opts.margin} pt margin")
        return True, (f"{trust}; held-out {primary}-exit agreement with the teacher up {gain:+.2f} pt "
                      f"(margin {opts.margin} pt), {clean_note}")
    if check["drifted"]:
        distrust = f"teacher drifted on the audits ({_drift_text(check)}): its labels are not evidence"
    else:
        distrust = (f"teacher's input drifted on the audits (feature score {check['scores']['feature']:.2f} > "
                    f"{check['thresholds']['feature']:.2f} on {check['frames']} frames): its labels on the parent's "
                    "features are not evidence")
    if through is None:
        return False, f"{distrust}, and no frames were held out to judge the end exit without them"
    d = through["teacher_drift"]
    if d is None:
        return False, (f"{distrust}; {through['frames']} held-out frames are too few to check the teacher "
                       f"through the candidate ({TEACHER_MIN_FRAMES} needed)")
    if d["drifted"]:
        return False, (f"{distrust}; through the candidate's end it is drifted too ({_drift_text(d)}): "
                       "no trustworthy teacher to judge by (a condition profile, --end-scope profile, can adapt "
                       "without one)")
    gain = (through["candidate_agreement"] - through["parent_agreement"]) * 100
    basis = (f"{distrust}; through the candidate's end it is in distribution again ({_drift_text(d)}); "
             f"held-out end-exit agreement with it up {gain:+.2f} pt")
    if gain < opts.margin:
        return False, f"{basis}, below the {opts.margin} pt margin"
    return True, f"{basis} (margin {opts.margin} pt), {clean_note}"
