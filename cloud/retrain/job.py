"""The retraining job: distil what the fleet escalated into the exit heads (the cloud exit as the
teacher), re-calibrate the thresholds, judge the candidate and write it as version N+1. Shared
layers stay frozen, so boundary tensors and unchanged tiers keep working. docs/UPDATES.md."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.bundle import TIERS, Bundle, FeatureEncoding, write_manifest
from tierlite.conditions import ROLE, variant_entry
from tierlite.cloud.retrain.chain import Chain
from tierlite.cloud.retrain.data import load_hard_examples, load_labelled_holdout, replay_and_val, workdir
from tierlite.cloud.retrain.distill import fit_head
from tierlite.cloud.retrain.end_segment import build_end_profile, retrain_end_segment
from tierlite.cloud.retrain.judge import (agreement, check_boundary_identical, clean_figures, escalation,
                                          gap_middle, paired_test, teacher_drift, teacher_reference,
                                          teacher_where_sure, through_candidate, verdict)
from tierlite.cloud.retrain.options import RetrainOptions, RetrainReport
from tierlite.errors import ConfigError, DataError

log = logging.getLogger("tierlite.cloud.retrain")  # one logger for the whole job


@dataclass
class HardSet:
    """The hard examples through the parent's int8 chain. Edge arrays hold the stored features'
    examples first, then the frames'; a frame is held out for both heads or for neither."""

    hard: dict[str, Any]  # load_hard_examples()
    f_out: dict[str, np.ndarray] | None  # chain outputs of the stored end features
    r_out: dict[str, np.ndarray] | None  # chain outputs of the opted-in frames
    edge_x: np.ndarray  # edge head inputs
    edge_t: np.ndarray  # teacher (cloud) logits
    edge_parent: np.ndarray  # the parent's edge logits
    hold_edge: np.ndarray
    hold_end: np.ndarray
    teacher: dict[str, Any] = field(default_factory=dict)  # its drift check on the audits (judge.py)

    @property
    def n_feat(self) -> int:
        return len(self.hard["nodes"])

    @property
    def n_frames(self) -> int:
        return len(self.hard["frame_nodes"])


@dataclass
class Refit:
    """What the run changed: new dense weights per head, or a re-exported end, or a profile."""

    heads: dict[str, Any] = field(default_factory=dict)  # per tier, for the report
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    new_end: bytes | None = None
    profile: tuple[bytes, Any] | None = None  # (model, selector)


def retrain(opts: RetrainOptions) -> RetrainReport:
    """One run: the hard examples through the parent's int8 chain, the refit, the candidate staged
    in <out>.tmp, judged on held-out hard examples and clean validation, then renamed to <out>."""
    t0 = time.monotonic()
    parent = _load_parent(opts)
    labelled_frames = _read_labelled(opts, parent)  # before anything is trained: a bad folder fails first
    log.info("retrain: parent %s v%d; reading hard examples from %s", parent.name, parent.version, opts.store)
    hard = load_hard_examples(opts, parent)
    n_feat, n_frames = len(hard["nodes"]), len(hard["frame_nodes"])
    if n_feat + n_frames < opts.min_examples:
        raise DataError(f"only {n_feat} stored hard examples and {n_frames} usable frames for {parent.name}; "
                        f"need at least {opts.min_examples} (--min-examples)")
    chain = Chain(parent)
    ex = _through_parent(opts, chain, hard)
    log.info("retrain: replay and validation frames from %s", opts.replay or "the checkpoint's training folder")
    rx, ry, vx, vy = replay_and_val(opts, parent)
    replay = chain.from_frames(rx)
    val = chain.from_frames(vx)
    teacher_ref = teacher_reference(val, parent.thresholds["end"])
    ex.teacher = _check_teacher(ex, teacher_ref, opts.seed)
    refit = _refit(opts, parent, chain, ex, replay, rx, ry)

    out, tmp, manifest = _stage_candidate(opts, parent, chain, refit)
    candidate = Chain(Bundle(tmp, manifest, parent.segments))  # same tensors: only weights differ
    if refit.profile is not None:
        _variant_reference(manifest, candidate, ex.hard["frames"][~ex.hold_end], refit)
    cand_val = candidate.from_frames(vx)
    _compare_boundary(val, cand_val, refit)
    parent_exits, cand_exits = _exits(val), _exits(cand_val)
    chosen, new_thr, fbytes = _calibrate(parent, cand_exits, vy)
    holdout = _holdout(parent, candidate, ex, new_thr, teacher_ref, teacher_reference(cand_val, new_thr["end"]),
                       opts.seed)
    clean = {"frames": int(len(vy)),
             "parent": clean_figures(parent_exits, vy, parent.thresholds, fbytes),
             "candidate": clean_figures(cand_exits, vy, new_thr, fbytes)}
    labelled = _labelled(opts, labelled_frames, parent, chain, candidate, new_thr)
    better, reason, evidence = verdict(holdout, clean, opts, ex.teacher, labelled)
    end_scope = opts.end_scope if "end" in refit.heads else "head"
    _finish_manifest(manifest, parent, new_thr, chosen, cand_exits, vy, retrained={
        "parent_version": parent.version, "heads": sorted(refit.heads), "teacher": "cloud exit",
        "end_scope": end_scope, "temperature": opts.temperature, "hard_examples": n_feat, "frames": n_frames,
        "holdout": holdout, "teacher_check": ex.teacher, "labelled_holdout": labelled, "better": better,
        "verdict": reason, "evidence": evidence,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    write_manifest(tmp, manifest)
    Bundle.load(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)

    report = RetrainReport(
        parent={"name": parent.name, "version": parent.version, "thresholds": parent.thresholds},
        candidate={"version": parent.version + 1, "thresholds": new_thr, "heads": sorted(refit.heads),
                   "end_scope": end_scope},
        data={"examples": n_feat + n_frames, "features": n_feat, "with_frames": n_frames,
              "frames_not_allowed": hard["refused_frames"], "holdout": int(ex.hold_edge.sum()),
              "replay": int(len(ry)), "val": int(len(vy))},
        heads=refit.heads, holdout=holdout, clean=clean, better=better, reason=reason, bundle_dir=str(out),
        teacher=ex.teacher, evidence=evidence, labelled=labelled,
        seconds=round(time.monotonic() - t0, 1))
    (out.parent / f"{out.name}.retrain.json").write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    return report


def judge_candidate(opts: RetrainOptions, candidate_dir: Path) -> dict[str, Any]:
    """Judge an existing candidate bundle against the parent (opts.bundle) exactly as retrain()
    does, on the same store and held-out draw (same --seed), with the candidate's own thresholds:
    for a candidate changed after its run, or judged again on a newer store. Returns
    {better, reason, evidence, holdout, clean, teacher, labelled}."""
    parent = _load_parent(opts)
    labelled_frames = _read_labelled(opts, parent)
    chain = Chain(parent)
    ex = _through_parent(opts, chain, load_hard_examples(opts, parent))
    _, _, vx, vy = replay_and_val(opts, parent)
    val = chain.from_frames(vx)
    teacher_ref = teacher_reference(val, parent.thresholds["end"])
    ex.teacher = _check_teacher(ex, teacher_ref, opts.seed)
    cand_bundle = Bundle.load(candidate_dir)
    candidate = Chain(cand_bundle)
    fbytes = _feature_bytes(parent)
    cand_val = candidate.from_frames(vx)
    holdout = _holdout(parent, candidate, ex, cand_bundle.thresholds, teacher_ref,
                       teacher_reference(cand_val, cand_bundle.thresholds["end"]), opts.seed)
    clean = {"frames": int(len(vy)),
             "parent": clean_figures(_exits(val), vy, parent.thresholds, fbytes),
             "candidate": clean_figures(_exits(cand_val), vy, cand_bundle.thresholds, fbytes)}
    labelled = _labelled(opts, labelled_frames, parent, chain, candidate, cand_bundle.thresholds)
    better, reason, evidence = verdict(holdout, clean, opts, ex.teacher, labelled)
    return {"better": better, "reason": reason, "evidence": evidence, "holdout": holdout, "clean": clean,
            "teacher": ex.teacher, "labelled": labelled}


def _load_parent(opts: RetrainOptions) -> Bundle:
    """The parent bundle with all three segments; a checkpoint when the end scope needs one, checked
    before any data is decoded."""
    parent = Bundle.load(opts.bundle)
    for t in TIERS:
        parent.segment(t)
    if opts.end_scope != "head":
        ck = Path(opts.checkpoint) if opts.checkpoint else workdir(parent, opts)
        if not ck.exists():
            raise ConfigError(f"--end-scope {opts.end_scope} needs the parent's Keras checkpoint: {ck} not found "
                              "(--checkpoint)")
    return parent


def _through_parent(opts: RetrainOptions, chain: Chain, hard: dict[str, Any]) -> HardSet:
    """Teacher and pooled features of every hard example from the deployed int8 chain, and the
    held-out draw (seeded by --seed)."""
    n_feat, n_frames = len(hard["nodes"]), len(hard["frame_nodes"])
    rng = np.random.default_rng(opts.seed)
    log.info("retrain: %d stored features, %d frames from opted-in nodes (%d frames not usable by policy); "
             "running the int8 chain", n_feat, n_frames, hard["refused_frames"])
    f_out = chain.from_end_features(hard["end_features"]) if n_feat else None
    r_out = chain.from_frames(hard["frames"]) if n_frames else None
    # Feature examples carry the cloud's answer as stored; frames get it from the chain here.
    edge_x = np.concatenate([a for a in (f_out and f_out["edge_pooled"], r_out and r_out["edge_pooled"]) if a is not None])
    edge_t = np.concatenate([a for a in (hard["teacher"], r_out and r_out["cloud_logits"]) if a is not None])
    edge_parent = np.concatenate([a for a in (f_out and f_out["edge_logits"], r_out and r_out["edge_logits"]) if a is not None])
    hold_edge = rng.random(len(edge_x)) < opts.holdout
    hold_end = hold_edge[n_feat:] if n_frames else np.zeros(0, bool)
    return HardSet(hard, f_out, r_out, edge_x, edge_t, edge_parent, hold_edge, hold_end)


def _check_teacher(ex: HardSet, reference: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    """The teacher's drift check on every stored audit (stored features and the cloud's logits as
    it answered them); audits, not escalations, because they are a random share of the frames the
    camera was sure of, like the reference. Logged: a drifted teacher changes what the run does."""
    audits = ex.hard["audits"]
    check = (teacher_drift(ex.hard["end_features"][audits], ex.hard["teacher"][audits], reference, seed)
             if audits.any() else None)
    out = {"audits": int(audits.sum()), "check": check}
    if check is not None and check["drifted"]:
        log.warning("retrain: the teacher is drifted on %d audited frames (%s over its clean thresholds): its "
                    "labels are not used; heads keep their weights", check["frames"], ", ".join(check["triggered"]))
    return out


def _refit(opts: RetrainOptions, parent: Bundle, chain: Chain, ex: HardSet, replay: dict[str, np.ndarray],
           rx: np.ndarray, ry: np.ndarray) -> Refit:
    """The edge head always; the end as --end-scope says when opted-in frames are left to train on:
    its head (distilled like the edge's), a retrained end segment, or a condition profile. A drifted
    teacher (ex.teacher) distils nothing: the heads keep the parent's weights."""
    refit = Refit()
    distil = not ((ex.teacher.get("check") or {}).get("drifted"))
    keep_edge, keep_end = ~ex.hold_edge, ~ex.hold_end
    plans = [("edge", ex.edge_x[keep_edge], ex.edge_t[keep_edge], replay["edge_pooled"])]
    if ex.n_frames and keep_end.sum():
        frames, teacher = ex.hard["frames"][keep_end], ex.r_out["cloud_logits"][keep_end]
        if opts.end_scope == "profile":
            profile_model, selector, refit.heads["end"] = build_end_profile(parent, opts, frames, rx)
            refit.profile = (profile_model, selector)
        elif opts.end_scope != "head":
            refit.new_end, refit.heads["end"] = retrain_end_segment(parent, opts, frames, teacher, rx, ry,
                                                                    branch_only=opts.end_scope == "branch")
        else:
            plans.insert(0, ("end", ex.r_out["end_pooled"][keep_end], teacher, replay["end_pooled"]))
    for tier, x_kd, t_kd, x_ce in plans if distil else []:
        h = chain.heads[tier]
        W, b = fit_head(h.W, h.b, x_kd, t_kd, x_ce, ry, opts.temperature, opts.steps, opts.lr, opts.l2, opts.hard_weight)
        refit.weights[tier] = (W, b)
        refit.heads[tier] = {"distilled_examples": int(len(x_kd)), "replay_frames": int(len(x_ce)),
                             "weight_change": float(np.linalg.norm(W - h.W) / max(np.linalg.norm(h.W), 1e-12))}
        log.info("retrain: %s head refitted on %d hard + %d replay examples", tier, len(x_kd), len(x_ce))
    return refit


def _stage_candidate(opts: RetrainOptions, parent: Bundle, chain: Chain,
                     refit: Refit) -> tuple[Path, Path, dict[str, Any]]:
    """The candidate's files in <out>.tmp: the parent's, with patched heads, the re-exported end or
    the new profile; returns (out, tmp, its manifest so far)."""
    out = opts.out or parent.root.with_name(f"{parent.root.name}-v{parent.version + 1}")
    if out.resolve() == parent.root.resolve():
        raise ConfigError("--out must differ from the parent bundle")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for rel in parent.file_hashes():
        shutil.copy2(parent.root / rel, tmp / rel)
    for tier, (W, b) in refit.weights.items():
        (tmp / parent.segment(tier).file).write_bytes(chain.heads[tier].patched(W, b))
    if refit.new_end is not None:
        (tmp / parent.segment("end").file).write_bytes(refit.new_end)
    manifest = json.loads(json.dumps(parent.manifest))
    if refit.profile is not None:  # one variant at a time: the new one replaces any the parent had
        for e in [e for e in manifest.get("files", []) if e.get("role") == ROLE]:
            (tmp / e["file"]).unlink(missing_ok=True)
        name = f"end-profile-v{parent.version + 1}.tflite"  # file name kept: bundles in the wild use it
        (tmp / name).write_bytes(refit.profile[0])
        manifest["files"] = [e for e in manifest.get("files", []) if e.get("role") != ROLE] + [
            variant_entry(name, refit.profile[1])]
    return out, tmp, manifest


VARIANT_REFERENCE_MIN_FRAMES = 20  # fewer frames for the variant: no reference of its own (node uses the bundle's)


def _variant_reference(manifest: dict[str, Any], candidate: Chain, frames: np.ndarray, refit: Refit) -> None:
    """The new condition variant's own drift reference (tierlite.drift), from the frames it was
    made from as it runs them, in its manifest entry: a node running it compares those frames with
    what the variant expects, not with the clean training set (which would keep the alarm up for as
    long as the condition lasts)."""
    from tierlite.drift import REFERENCE_KEY, reference_stats

    sel = refit.profile[1]
    picked = sel.picks(frames) if len(frames) else np.zeros(0, bool)
    entry = next(e for e in manifest["files"] if e.get("role") == ROLE)
    if picked.sum() < VARIANT_REFERENCE_MIN_FRAMES:
        log.info("retrain: only %d frames for the variant's drift reference (%d needed); nodes compare its "
                 "frames with the bundle's", int(picked.sum()), VARIANT_REFERENCE_MIN_FRAMES)
        return
    out = candidate.from_frames(frames[picked])
    entry[REFERENCE_KEY] = reference_stats(out["end_features"], out["end_logits"])
    refit.heads["end"]["drift_reference_frames"] = int(picked.sum())


def _compare_boundary(val: dict[str, np.ndarray], cand_val: dict[str, np.ndarray], refit: Refit) -> None:
    """Refitted heads must leave the boundary bit-identical; a re-exported end keeps it close
    (frozen or hinted), so there it is measured into the end's report."""
    if refit.new_end is None and refit.profile is None:
        check_boundary_identical(val, cand_val)
        return
    diff = np.abs(val["end_features"].astype(np.int16) - cand_val["end_features"].astype(np.int16))
    refit.heads["end"]["boundary_within_one_step"] = float((diff <= 1).mean())
    refit.heads["end"]["boundary_mean_abs_steps"] = float(diff.mean())


def _exits(out: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [out["end_logits"], out["edge_logits"], out["cloud_logits"]]


def _calibrate(parent: Bundle, exits: list[np.ndarray], labels: np.ndarray):
    """The candidate's thresholds on the validation split, at the parent's max drop: (the chosen
    operating point, thresholds moved to the middle of their gap, the boundary bytes per frame)."""
    from tierlite.converters import search_thresholds

    fbytes = _feature_bytes(parent)
    max_drop = float(parent.manifest.get("calibration", {}).get("max_drop", 0.005))
    chosen = search_thresholds(exits, labels, fbytes, max_drop)
    return chosen, gap_middle(chosen.thresholds, exits), fbytes


def _feature_bytes(parent: Bundle) -> tuple[int, int]:
    """Boundary bytes per escalated frame: end -> edge, edge -> cloud."""
    from tierlite.wire import encoded_size

    return (encoded_size(parent.segment("end").output("feature").shape, parent.feature_encoding),
            encoded_size(parent.segment("edge").output("feature").shape, FeatureEncoding.INT8))


def _holdout(parent: Bundle, candidate: Chain, ex: HardSet, new_thr: dict[str, float],
             teacher_ref: dict[str, Any], cand_ref: dict[str, Any], seed: int) -> dict[str, Any]:
    """Held-out hard examples through the candidate's int8 chain: agreement with the teacher and
    how many it would still escalate, parent vs candidate, per retrained exit. For held-out frames,
    also the teacher as it answers through the candidate's end (`through_candidate`): agreement of
    both end exits with it, and its drift check, beside the same check through the parent's end;
    each on the frames that end is sure of, against the teacher on the clean frames it is sure of
    (teacher_ref: the parent's, cand_ref: the candidate's; judge.teacher_where_sure)."""
    holdout: dict[str, Any] = {}
    hold_edge, hold_end, hard = ex.hold_edge, ex.hold_end, ex.hard
    feat_hold = hold_edge[:ex.n_feat]
    cand_f = candidate.from_end_features(hard["end_features"][feat_hold]) if feat_hold.any() else None
    cand_r = candidate.from_frames(hard["frames"][hold_end]) if hold_end.any() else None
    if hold_edge.any():
        cand = np.concatenate([a for a in (cand_f and cand_f["edge_logits"], cand_r and cand_r["edge_logits"])
                               if a is not None])
        ht, pl = ex.edge_t[hold_edge], ex.edge_parent[hold_edge]
        holdout["edge"] = _agreement_figures(pl, cand, ht, parent.thresholds["edge"], new_thr["edge"])
    if cand_r is not None:
        pl, pt = ex.r_out["end_logits"][hold_end], ex.r_out["cloud_logits"][hold_end]
        holdout["end"] = _agreement_figures(pl, cand_r["end_logits"], pt, parent.thresholds["end"], new_thr["end"])
        held_parent = {k: ex.r_out[k][hold_end] for k in ("end_logits", "end_features", "cloud_logits")}
        holdout["end"]["teacher_drift"], holdout["end"]["checked_frames"] = teacher_where_sure(
            held_parent, teacher_ref, seed)
        holdout["end"]["through_candidate"] = through_candidate(pl, cand_r, cand_ref, seed)
    return holdout


def _agreement_figures(parent_logits: np.ndarray, cand_logits: np.ndarray, teacher: np.ndarray,
                       parent_thr: float, cand_thr: float) -> dict[str, Any]:
    return {"frames": int(len(teacher)), "parent_agreement": agreement(parent_logits, teacher),
            "candidate_agreement": agreement(cand_logits, teacher),
            "parent_escalation": escalation(parent_logits, parent_thr),
            "candidate_escalation": escalation(cand_logits, cand_thr),
            "test": paired_test(parent_logits.argmax(1) == teacher.argmax(1), cand_logits.argmax(1) == teacher.argmax(1))}


def _read_labelled(opts: RetrainOptions, parent: Bundle) -> tuple[np.ndarray, np.ndarray] | None:
    """The operator-labelled holdout's frames and labels (--labelled-holdout), or None."""
    if opts.labelled_holdout is None:
        return None
    x, y = load_labelled_holdout(Path(opts.labelled_holdout), parent)
    log.info("retrain: %d operator-labelled frames in %d classes from %s", len(y), len(set(y.tolist())),
             opts.labelled_holdout)
    return x, y


def _labelled(opts: RetrainOptions, frames: tuple[np.ndarray, np.ndarray] | None, parent: Bundle, chain: Chain,
              candidate: Chain, new_thr: dict[str, float]) -> dict[str, Any] | None:
    """The operator-labelled holdout (`frames`, _read_labelled) through both chains: accuracy of each
    exit and of the cascade (each bundle at its own thresholds), parent vs candidate, with the paired
    test. The primary exit is the end when the candidate changed it on these frames, else the edge."""
    if frames is None:
        return None
    from tierlite.policy import chain_decisions

    x, y = frames
    p_out, c_out = chain.from_frames(x), candidate.from_frames(x)
    out: dict[str, Any] = {"path": str(opts.labelled_holdout), "frames": int(len(y))}
    for tier in ("end", "edge"):
        p_ok, c_ok = p_out[f"{tier}_logits"].argmax(1) == y, c_out[f"{tier}_logits"].argmax(1) == y
        out[tier] = {"parent_accuracy": float(p_ok.mean()), "candidate_accuracy": float(c_ok.mean()),
                     "test": paired_test(p_ok, c_ok)}
    p_sys = chain_decisions(_exits(p_out), [parent.thresholds["end"], parent.thresholds["edge"]])[1] == y
    c_sys = chain_decisions(_exits(c_out), [new_thr["end"], new_thr["edge"]])[1] == y
    out["system"] = {"parent_accuracy": float(p_sys.mean()), "candidate_accuracy": float(c_sys.mean()),
                     "test": paired_test(p_sys, c_sys), "worse_test": paired_test(c_sys, p_sys)}
    out["primary"] = "end" if not np.array_equal(p_out["end_logits"], c_out["end_logits"]) else "edge"
    log.info("retrain: %d operator-labelled frames: end exit %.1f -> %.1f %%, system %.1f -> %.1f %%", len(y),
             out["end"]["parent_accuracy"] * 100, out["end"]["candidate_accuracy"] * 100,
             out["system"]["parent_accuracy"] * 100, out["system"]["candidate_accuracy"] * 100)
    return out


def _finish_manifest(manifest: dict[str, Any], parent: Bundle, new_thr: dict[str, float], chosen,
                     cand_exits: list[np.ndarray], vy: np.ndarray, retrained: dict[str, Any]) -> None:
    """Version N+1, unsigned, with the new thresholds, the candidate's calibration figures and what
    was retrained."""
    manifest.pop("signature", None)
    manifest.update(version=parent.version + 1, parent_version=parent.version, thresholds=new_thr)
    exit_acc = {t: float((l.argmax(1) == vy).mean()) for t, l in zip(TIERS, cand_exits)}
    manifest.setdefault("calibration", {}).update(
        exit_accuracy_int8=exit_acc, system_accuracy=chosen.accuracy, cloud_only_accuracy=chosen.cloud_only_accuracy,
        fractions=chosen.fractions, camera_uplink_bytes_per_frame=chosen.camera_uplink_bytes, frames=int(len(vy)))
    manifest["retrain"] = retrained
