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
teacher passes the same test on the held-out frames the candidate's end is sure of (the population
its clean reference describes: `teacher_where_sure`). docs/DRIFT.md has the measurements.

Two rules over all of that (issue 13): an operator-labelled holdout (frames from the drifted site
with their true classes, `--labelled-holdout DIR`) is the strongest evidence and decides in
preference to any teacher; and no gain counts unless it is beyond noise: every comparison is on the
same frames, parent vs candidate, so the verdict asks a one-sided exact McNemar test (a sign test on
the frames where exactly one of them is right, or agrees) for p <= `significance` besides the
`margin`. At 0.05 that needs at least 5 such frames, all in the candidate's favour."""
from __future__ import annotations

import math
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


def min_discordant(significance: float) -> int:
    """Fewest frames on which parent and candidate differ for the exact one-sided test to be able to
    reach `significance` at all (every one of them in the candidate's favour: p = 0.5^n)."""
    return max(1, math.ceil(math.log2(1.0 / significance)))


def paired_test(parent_ok: np.ndarray, cand_ok: np.ndarray) -> dict[str, Any]:
    """One-sided exact McNemar test that the candidate is right (or agrees with the teacher) on more of
    the same frames than the parent: of the n frames where exactly one of them is, the candidate's
    share b is Binomial(n, 1/2) when neither is better; p = P(X >= b)."""
    parent_ok, cand_ok = np.asarray(parent_ok, bool), np.asarray(cand_ok, bool)
    b, c = int((cand_ok & ~parent_ok).sum()), int((parent_ok & ~cand_ok).sum())
    n = b + c
    p = sum(math.comb(n, k) for k in range(b, n + 1)) / 2 ** n if n else 1.0
    frames = len(cand_ok)
    return {"frames": int(frames), "candidate_only": b, "parent_only": c, "p_value": float(p),
            "gain_pt": float((cand_ok.mean() - parent_ok.mean()) * 100) if frames else 0.0}


def _test_text(t: dict[str, Any]) -> str:
    return (f"one-sided exact McNemar p = {t['p_value']:.3g}: {t['candidate_only']} frames only the candidate got, "
            f"{t['parent_only']} only the parent, of {t['frames']}")


def _gain_decision(basis: str, gain: float, test: dict[str, Any] | None, opts: RetrainOptions,
                   clean_note: str) -> tuple[bool, str]:
    """Accept a gain only when it clears the margin and, where per-frame outcomes are known, the
    significance test."""
    if gain < opts.margin:
        return False, f"{basis}, below the {opts.margin} pt margin"
    if test is not None and test["p_value"] > opts.significance:
        need = min_discordant(opts.significance)
        return False, (f"{basis}, within noise ({_test_text(test)}; > {opts.significance}; at least {need} "
                       "differing frames needed)")
    sig = f"; {_test_text(test)}" if test is not None else ""
    return True, f"{basis} (margin {opts.margin} pt{sig}), {clean_note}"


def end_sure(end_logits: np.ndarray, threshold: float) -> np.ndarray:
    """The frames an end exit decides on its own at `threshold` (what a node does not escalate)."""
    return normalized_entropy(softmax(end_logits)) <= threshold if len(end_logits) else np.zeros(0, bool)


def teacher_reference(val: dict[str, np.ndarray], end_threshold: float, min_frames: int = 30) -> dict[str, Any]:
    """The teacher on the clean validation frames an end exit (the chain `val` came from) is sure of
    at `end_threshold`: audits are drawn from the frames the camera is sure of. All validation frames
    when fewer than `min_frames` are (`sure_only` False). `teacher_where_sure` picks its frames the
    same way, so the two describe the same population."""
    sure = end_sure(val["end_logits"], end_threshold)
    sure_only = bool(sure.sum() >= min_frames)
    pick = sure if sure_only else np.ones(len(sure), bool)
    return {"features": val["end_features"][pick], "logits": val["cloud_logits"][pick], "sure_only": sure_only,
            "end_threshold": float(end_threshold)}


def teacher_where_sure(out: dict[str, np.ndarray], reference: dict[str, Any], seed: int = 0,
                       stats: tuple[str, ...] = JUDGE_STATS) -> tuple[dict[str, Any] | None, int]:
    """The teacher's drift check on the frames of `out` (a chain's end_logits, end_features,
    cloud_logits) that its end exit is sure of at the reference's threshold: (check or None when
    fewer than TEACHER_MIN_FRAMES, how many frames were checked).

    Why only those: the reference is the teacher on clean frames the end is sure of, and the
    held-out hard examples include escalations (on CIFAR-10 most of them), frames the parent's end
    was *unsure* of. Those
    have another class mix even with no drift at all (the classes the end confuses), so testing all
    of them against that reference measures how they were sampled, not the teacher (CIFAR-10 noise
    3: PSI over threshold through parent and candidate alike, docs/DRIFT.md). Picking the frames
    the end is sure of, by the same rule as the reference, compares like with like. Comparing with
    the parent on the same frames instead would not do: here the parent's teacher is the drifted one,
    and "no worse than a collapsed teacher" does not make a teacher trustworthy."""
    pick = end_sure(out["end_logits"], reference["end_threshold"]) if reference.get("sure_only") else \
        np.ones(len(out["end_logits"]), bool)
    n = int(pick.sum())
    return teacher_drift(out["end_features"][pick], out["cloud_logits"][pick], reference, seed, stats=stats), n


def through_candidate(parent_end_logits: np.ndarray, cand_out: dict[str, np.ndarray], cand_ref: dict[str, Any],
                      seed: int = 0) -> dict[str, Any]:
    """Held-out frames judged by the teacher as it answers through the candidate's end (`cand_out`:
    the candidate chain's end_logits, end_features, cloud_logits on them): agreement of the parent's
    and the candidate's end exit with it, the paired test, and the guard (teacher_where_sure against
    `cand_ref`, the teacher on clean frames the candidate's end is sure of)."""
    ct, cl = cand_out["cloud_logits"], cand_out["end_logits"]
    d, checked = teacher_where_sure(cand_out, cand_ref, seed)
    return {"frames": int(len(ct)), "parent_agreement": agreement(parent_end_logits, ct),
            "candidate_agreement": agreement(cl, ct),
            "test": paired_test(parent_end_logits.argmax(1) == ct.argmax(1), cl.argmax(1) == ct.argmax(1)),
            "teacher_drift": d, "checked_frames": checked, "sure_only": bool(cand_ref.get("sure_only"))}


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


EVIDENCE_LABELS = "operator-labelled holdout"
EVIDENCE_TEACHER = "agreement with the teacher"
EVIDENCE_THROUGH = "agreement with the teacher through the candidate's end"
EVIDENCE_NONE = "none"


def labelled_verdict(labelled: dict[str, Any], opts: RetrainOptions, clean_note: str) -> tuple[bool, str]:
    """Real labels decide: the primary exit's accuracy, parent vs candidate, on the operator's frames,
    beyond the margin and noise; and the system (the whole cascade at each bundle's thresholds) not
    significantly worse on them."""
    primary = labelled["primary"]
    e, sys_ = labelled[primary], labelled["system"]
    where = f"on {labelled['frames']} operator-labelled frames"
    if sys_["worse_test"]["p_value"] <= opts.significance:
        return False, (f"{where}, system accuracy falls {sys_['parent_accuracy'] * 100:.1f} -> "
                       f"{sys_['candidate_accuracy'] * 100:.1f} % (one-sided exact McNemar p = "
                       f"{sys_['worse_test']['p_value']:.3g} that it is worse)")
    basis = (f"{where}, {primary}-exit accuracy {e['parent_accuracy'] * 100:.1f} -> {e['candidate_accuracy'] * 100:.1f} % "
             f"({e['test']['gain_pt']:+.2f} pt)")
    return _gain_decision(basis, e["test"]["gain_pt"], e["test"], opts, clean_note)


def verdict(holdout: dict, clean: dict, opts: RetrainOptions, teacher: dict | None = None,
            labelled: dict | None = None) -> tuple[bool, str, str]:
    """Accept or refuse, why, and which evidence decided (EVIDENCE_*). Clean validation (labelled)
    must not drop more than max_clean_drop. Then an operator-labelled holdout, when given, decides.
    Otherwise the held-out hard examples: agreement with the teacher when the teacher is in
    distribution on the audits (or was not checked: no audits stored); when it is drifted,
    agreement with the teacher through the candidate's end, provided that teacher passes the drift
    test there; no trustworthy teacher: refused. A gain must clear the margin and the paired test."""
    keys = ("end_accuracy", "edge_accuracy", "cloud_accuracy", "system_accuracy")  # edge/cloud: same unless
    drops = {k: (clean["parent"][k] - clean["candidate"][k]) * 100 for k in keys}  # the boundary moved
    worst = max(drops, key=drops.get)
    if drops[worst] > opts.max_clean_drop:
        return False, (f"clean {worst.replace('_', ' ')} drops {drops[worst]:.2f} pt "
                       f"(> {opts.max_clean_drop} pt allowed)"), "clean validation"
    clean_note = f"clean drop at most {max(drops.values()):.2f} pt"
    if labelled:
        return (*labelled_verdict(labelled, opts, clean_note), EVIDENCE_LABELS)
    if not holdout:
        return False, "no held-out hard examples to judge by", EVIDENCE_NONE
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
        basis = f"{trust}; held-out {primary}-exit agreement with the teacher up {gain:+.2f} pt"
        return (*_gain_decision(basis, gain, holdout[primary].get("test"), opts, clean_note), EVIDENCE_TEACHER)
    if check["drifted"]:
        distrust = f"teacher drifted on the audits ({_drift_text(check)}): its labels are not evidence"
    else:
        distrust = (f"teacher's input drifted on the audits (feature score {check['scores']['feature']:.2f} > "
                    f"{check['thresholds']['feature']:.2f} on {check['frames']} frames): its labels on the parent's "
                    "features are not evidence")
    if through is None:
        return (False, f"{distrust}, and no frames were held out to judge the end exit without them", EVIDENCE_NONE)
    d = through["teacher_drift"]
    sure = "the candidate's end is sure of" if through.get("sure_only", True) else "(all: no clean reference of sure frames)"
    if d is None:
        checked = through.get("checked_frames", through["frames"])
        return False, (f"{distrust}; {checked} of {through['frames']} held-out frames {sure} are too few to "
                       f"check the teacher through the candidate ({TEACHER_MIN_FRAMES} needed)"), EVIDENCE_NONE
    if d["drifted"]:
        return False, (f"{distrust}; through the candidate's end it is drifted too ({_drift_text(d)} {sure}): "
                       "no trustworthy teacher to judge by (a condition profile, --end-scope profile, can adapt "
                       "without one; an operator-labelled holdout, --labelled-holdout, can judge without one)"), EVIDENCE_NONE
    gain = (through["candidate_agreement"] - through["parent_agreement"]) * 100
    basis = (f"{distrust}; through the candidate's end it is in distribution again ({_drift_text(d)} {sure}); "
             f"held-out end-exit agreement with it up {gain:+.2f} pt on {through['frames']} frames")
    return (*_gain_decision(basis, gain, through.get("test"), opts, clean_note), EVIDENCE_THROUGH)
