"""The retraining verdict's evidence rules (issue 13): a gain on a small held-out set must be beyond
noise (one-sided exact McNemar test on paired outcomes), and operator labels decide in preference to
the teacher. Pure numpy on constructed outcomes: the runs on real frames are in
tests/test_update_retrain.py."""
from __future__ import annotations

import numpy as np
import pytest

from tierlite.cloud.retrain.judge import (EVIDENCE_LABELS, EVIDENCE_TEACHER, min_discordant, paired_test,
                                          verdict)
from tierlite.cloud.retrain.options import RetrainOptions

OPTS = RetrainOptions(store="unused", bundle="unused")  # margin 1.0 pt, significance 0.05, clean drop 0.5 pt
FIGS = {"end_accuracy": 0.9, "edge_accuracy": 0.9, "cloud_accuracy": 0.95, "system_accuracy": 0.94}
CLEAN = {"parent": FIGS, "candidate": FIGS}


def _holdout(parent_ok: np.ndarray, cand_ok: np.ndarray) -> dict:
    """Held-out hard examples as job._holdout reports them: per-frame agreement with the teacher."""
    return {"end": {"frames": len(parent_ok), "parent_agreement": float(parent_ok.mean()),
                    "candidate_agreement": float(cand_ok.mean()), "test": paired_test(parent_ok, cand_ok)}}


def _outcomes(both: int, cand_only: int, parent_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    parent = np.array([1] * both + [0] * cand_only + [1] * parent_only + [0] * neither, bool)
    cand = np.array([1] * both + [1] * cand_only + [0] * parent_only + [0] * neither, bool)
    return parent, cand


def test_paired_test_is_the_exact_binomial_tail():
    t = paired_test(*_outcomes(10, 3, 1, 6))
    assert (t["candidate_only"], t["parent_only"], t["frames"]) == (3, 1, 20)
    assert t["p_value"] == pytest.approx(5 / 16) and t["gain_pt"] == pytest.approx(10.0)
    assert paired_test(*_outcomes(0, 5, 0, 0))["p_value"] == pytest.approx(1 / 32)
    assert paired_test(*_outcomes(7, 0, 0, 3))["p_value"] == 1.0  # identical outcomes: no evidence
    assert min_discordant(0.05) == 5 and min_discordant(0.01) == 7
    stats = pytest.importorskip("scipy.stats")
    t = paired_test(*_outcomes(300, 41, 22, 37))
    assert t["p_value"] == pytest.approx(stats.binomtest(41, 63, 0.5, alternative="greater").pvalue)


def test_a_small_gain_within_noise_is_not_better():
    """20 held-out frames, +10 pt (3 frames gained, 1 lost): over the 1 pt margin, but p = 0.31."""
    better, reason, evidence = verdict(_holdout(*_outcomes(10, 3, 1, 6)), CLEAN, OPTS)
    assert not better and evidence == EVIDENCE_TEACHER
    assert "within noise" in reason and "p = 0.312" in reason and "at least 5 differing frames" in reason, reason


def test_a_real_gain_is_better():
    """400 held-out frames, 40 gained and 10 lost (+7.5 pt): p ~ 1e-5."""
    better, reason, evidence = verdict(_holdout(*_outcomes(230, 40, 10, 120)), CLEAN, OPTS)
    assert better and evidence == EVIDENCE_TEACHER and "McNemar p = " in reason, reason


def test_false_better_rate_is_bounded_when_parent_and_candidate_are_alike():
    """Parent and candidate equally good (each right on 70 % of 60 frames, independently): the
    verdict calls BETTER in at most about `significance` of draws; with a real gap (60 % vs 85 %)
    it calls it in nearly all."""
    rng = np.random.default_rng(0)
    alike = real = 0
    draws = 400
    for _ in range(draws):
        parent = rng.random(60) < 0.7
        alike += verdict(_holdout(parent, rng.random(60) < 0.7), CLEAN, OPTS)[0]
        real += verdict(_holdout(rng.random(100) < 0.6, rng.random(100) < 0.85), CLEAN, OPTS)[0]
    assert alike / draws <= 0.05, alike  # exact test: conservative; the margin alone passes ~45 %
    assert real / draws >= 0.95, real


def _labelled(parent_ok: np.ndarray, cand_ok: np.ndarray, sys_parent_ok=None, sys_cand_ok=None) -> dict:
    sp = parent_ok if sys_parent_ok is None else sys_parent_ok
    sc = cand_ok if sys_cand_ok is None else sys_cand_ok
    figs = lambda p, c: {"parent_accuracy": float(p.mean()), "candidate_accuracy": float(c.mean()),  # noqa: E731
                         "test": paired_test(p, c)}
    return {"path": "site-frames", "frames": len(parent_ok), "primary": "end", "end": figs(parent_ok, cand_ok),
            "edge": figs(parent_ok, parent_ok), "system": {**figs(sp, sc), "worse_test": paired_test(sc, sp)}}


def test_operator_labels_decide_over_the_teacher():
    """The teacher's agreement says the candidate is much better; 60 labelled frames say it is not
    (it gains 2 and loses 2): labels win, and the reason says so."""
    teacher_says = _holdout(*_outcomes(200, 80, 5, 115))
    assert verdict(teacher_says, CLEAN, OPTS)[0]
    better, reason, evidence = verdict(teacher_says, CLEAN, OPTS, labelled=_labelled(*_outcomes(40, 2, 2, 16)))
    assert not better and evidence == EVIDENCE_LABELS
    assert "on 60 operator-labelled frames" in reason and "below the 1.0 pt margin" in reason, reason
    # a real gain on the labels: accepted on them even with no teacher evidence at all
    better, reason, evidence = verdict({}, CLEAN, OPTS, labelled=_labelled(*_outcomes(25, 20, 1, 14)))
    assert better and evidence == EVIDENCE_LABELS and "end-exit accuracy 43.3 -> 75.0 %" in reason, reason
    # the end exit gains, but the cascade at the candidate's thresholds is significantly worse: refused
    sys_p, sys_c = _outcomes(30, 0, 12, 18)
    better, reason, _ = verdict({}, CLEAN, OPTS, labelled=_labelled(*_outcomes(25, 20, 1, 14), sys_p, sys_c))
    assert not better and "system accuracy falls" in reason, reason


def test_clean_drop_still_refuses_first():
    worse = {**FIGS, "end_accuracy": FIGS["end_accuracy"] - 0.01}
    better, reason, evidence = verdict({}, {"parent": FIGS, "candidate": worse}, OPTS,
                                       labelled=_labelled(*_outcomes(25, 20, 1, 14)))
    assert not better and "clean end accuracy drops 1.00 pt" in reason and evidence == "clean validation"


# -- the guard "teacher through the candidate's end back in distribution" (docs/DRIFT.md) -----------
K = 10
HARD = [3, 5]  # the classes the end confuses: on clean frames too, most of its escalations are these


def _chain(rng, classes, sure, answers=None, teacher=None) -> dict:
    """What a chain gives on these frames: an end exit sure (peaked logits) or not of `answers`
    (default: the true classes), the teacher (cloud exit) answering `teacher` (default: true)."""
    n = len(classes)
    end = rng.normal(0, 0.1, (n, K))
    end[np.arange(n), classes if answers is None else answers] += np.where(sure, 8.0, 0.5)
    cloud = rng.normal(0, 0.1, (n, K))
    cloud[np.arange(n), classes if teacher is None else teacher] += 6.0
    return {"end_logits": end, "cloud_logits": cloud, "end_features": rng.integers(-20, 20, (n, 2, 2, 4)).astype(np.int8)}


def _clean_reference(rng, threshold=0.5):
    """The teacher on the clean validation frames the end is sure of: 600 frames, the end unsure of
    most of HARD's and a few others."""
    from tierlite.cloud.retrain.judge import teacher_reference

    y = rng.integers(0, K, 600)
    unsure = (np.isin(y, HARD) & (rng.random(600) < 0.8)) | (rng.random(600) < 0.05)
    return teacher_reference(_chain(rng, y, ~unsure), threshold), y[~unsure]


def _drifted_teacher(rng, ref) -> dict:
    """The teacher's check on 40 audits through the parent's end: collapsed onto class 0 (drifted)."""
    from tierlite.cloud.retrain.judge import teacher_drift

    y = rng.integers(0, K, 40)
    audits = _chain(rng, y, np.ones(40, bool), teacher=np.zeros(40, int))
    check = teacher_drift(audits["end_features"], audits["cloud_logits"], ref)
    assert check["drifted"]
    return {"audits": 40, "check": check}


def _held_out(rng, sure_classes):
    """Held-out hard examples as a live round stores them: 30 audits (frames the end is sure of, the
    clean sure frames' class mix) and 40 escalations (frames it was unsure of: HARD classes)."""
    y = np.r_[rng.choice(sure_classes, 30), rng.choice(HARD, 40)]
    return y, np.r_[np.ones(30, bool), np.zeros(40, bool)]


def test_escalations_in_the_held_out_set_do_not_refuse_a_better_candidate():
    """The guard used to test the teacher on *all* held-out frames against a reference of frames the
    end is sure of: escalations (HARD classes) alone then make the teacher look drifted, through any
    end, and a real fix was refused. Tested on the frames the candidate's end is sure of, like the
    reference: accepted."""
    from tierlite.cloud.retrain.judge import EVIDENCE_THROUGH, teacher_drift, through_candidate

    rng = np.random.default_rng(0)
    ref, sure_classes = _clean_reference(rng)
    y, sure = _held_out(rng, sure_classes)
    cand = _chain(rng, y, sure)  # the candidate's end: right, sure of the audits; the teacher right through it
    parent_end = _chain(rng, y, np.ones(len(y), bool), answers=(y + 1) % K)["end_logits"]  # confidently wrong
    through = through_candidate(parent_end, cand, ref)
    # the old guard, all 70 frames against the sure-frame reference: "drifted" by the sampling alone
    assert teacher_drift(cand["end_features"], cand["cloud_logits"], ref, stats=("classes",))["drifted"]
    assert through["checked_frames"] == 30 and not through["teacher_drift"]["drifted"], through
    holdout = {"end": {"through_candidate": through}}
    better, reason, evidence = verdict(holdout, CLEAN, OPTS, _drifted_teacher(rng, ref))
    assert better and evidence == EVIDENCE_THROUGH, reason
    assert "in distribution again" in reason and "on 30 frames the candidate's end is sure of" in reason, reason


def test_a_candidate_whose_sure_frames_the_teacher_collapses_on_is_refused():
    """Through this candidate's end the teacher answers class 1 on most frames the end is sure of
    (and the end agrees with it): the guard, on those frames, still refuses it; and a candidate sure
    of too few held-out frames to check is refused too."""
    from tierlite.cloud.retrain.judge import EVIDENCE_NONE, through_candidate

    rng = np.random.default_rng(1)
    ref, sure_classes = _clean_reference(rng)
    y, sure = _held_out(rng, sure_classes)
    collapsed = np.where(rng.random(len(y)) < 0.8, 1, y)
    cand = _chain(rng, y, sure, answers=collapsed, teacher=collapsed)
    parent_end = _chain(rng, y, np.ones(len(y), bool), answers=(y + 1) % K)["end_logits"]
    through = through_candidate(parent_end, cand, ref)
    assert through["candidate_agreement"] > 0.9 and through["teacher_drift"]["drifted"], through
    better, reason, evidence = verdict({"end": {"through_candidate": through}}, CLEAN, OPTS, _drifted_teacher(rng, ref))
    assert not better and evidence == EVIDENCE_NONE and "drifted too" in reason, reason
    # sure of 6 held-out frames only: too few to check the teacher there
    few = _chain(rng, y, np.arange(len(y)) < 6)
    through = through_candidate(parent_end, few, ref)
    assert through["teacher_drift"] is None and through["checked_frames"] == 6
    better, reason, _ = verdict({"end": {"through_candidate": through}}, CLEAN, OPTS, _drifted_teacher(rng, ref))
    assert not better and "6 of 70 held-out frames" in reason and "too few" in reason, reason
