"""The retraining job on real int8 segments: a fleet's drifted hard examples (low light + noise,
written to the real stores the way the cloud worker and frame collector write them) distilled
into the exit heads, with the privacy policy deciding whose frames may be used."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tierlite.bundle import Bundle
from tierlite.tools.cli import main

pytestmark = pytest.mark.timeout(900)  # the fog round trains a profile in TensorFlow: minutes on a busy 2-core machine


@pytest.fixture(scope="module")
def fleet_store(tmp_path_factory, small_bundle_dir, digits_dir):
    from tierlite.tools.bench.drift import low_light, simulate_fleet
    from tierlite.bundle import write_manifest
    from tierlite.cloud.retrain import Chain
    from tierlite.converters.pipeline import default_workdir
    from tierlite.data import load_image_folder
    from tierlite.policy import normalized_entropy, softmax

    work = tmp_path_factory.mktemp("retrain")
    test = load_image_folder(digits_dir / "test", (32, 32))
    drifted, _ = low_light(test.images, gain=0.6, noise=6.0, seed=1)
    # The fleet runs the bundle with an end threshold that escalates half of the drifted frames
    # (how many a drift makes unsure depends on the model; the job under test is what follows).
    bundle = work / "fleet-bundle"
    shutil.copytree(small_bundle_dir, bundle)
    (bundle.parent / "fleet-bundle-work").symlink_to(default_workdir(small_bundle_dir).resolve())
    h = normalized_entropy(softmax(Chain(Bundle.load(bundle)).from_frames(drifted)["end_logits"]))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["thresholds"]["end"] = float(np.median(h))
    write_manifest(bundle, manifest)
    stats = simulate_fleet(bundle, drifted, ["cam-1", "cam-2"], work / "hard.sqlite", share_frames=True)
    assert 40 < stats["escalated_by_end"] < 60, stats
    (work / "privacy.yaml").write_text("default: features\nnodes:\n  cam-1: raw\n")
    return work, bundle


def test_retrain_distils_heads_keeps_boundary_and_honours_privacy(fleet_store, digits_dir, capsys):
    fleet_store, small_bundle_dir = fleet_store
    out = fleet_store / "candidate"
    code = main(["retrain", "--store", str(fleet_store / "hard.sqlite"), "--bundle", str(small_bundle_dir),
                 "--out", str(out), "--replay", str(digits_dir / "train"), "--privacy", str(fleet_store / "privacy.yaml"),
                 "--min-examples", "20", "--json", str(fleet_store / "report.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out end exit: teacher agreement" in printed and "verdict:" in printed
    report = json.loads((fleet_store / "report.json").read_text())
    parent, cand = Bundle.load(small_bundle_dir), Bundle.load(out)
    assert cand.version == parent.version + 1 and cand.manifest["parent_version"] == parent.version
    # privacy: only cam-1 opted in; cam-2's uploaded frames are never used
    assert report["data"]["frames_not_allowed"] > 0 and report["data"]["with_frames"] > 0
    assert report["candidate"]["heads"] == ["edge", "end"]
    # the heads learnt from the teacher on frames they never saw in training
    end = report["holdout"]["end"]
    assert end["candidate_agreement"] > end["parent_agreement"], end
    # frozen shared layers: same files where nothing was trained, same size and boundary elsewhere
    assert (out / "cloud.tflite").read_bytes() == (small_bundle_dir / "cloud.tflite").read_bytes()
    for tier in ("end", "edge"):
        new, old = (out / f"{tier}.tflite").read_bytes(), (small_bundle_dir / f"{tier}.tflite").read_bytes()
        assert len(new) == len(old) and new != old
        assert cand.segment(tier).outputs == parent.segment(tier).outputs  # same tensors, same quantization
    for t, v in cand.thresholds.items():
        assert 0.0 <= v <= 1.0 or v == -1.0, (t, v)
    # the candidate runs on the device runtime and speaks the same boundary as the parent
    from tierlite.segment import Segment

    frame = np.full((1, 32, 32, 3), 128, np.uint8)
    assert np.array_equal(Segment(cand, "end").run(frame).feature, Segment(parent, "end").run(frame).feature)
    # what it costs to ship: two small XOR patches
    from tierlite.cloud.publish import build_artifact

    _, art = build_artifact(out, parent=parent)
    assert art.patched == ["edge.tflite", "end.tflite"] and art.artifact_bytes < 8000, art


def test_retrain_refuses_without_enough_examples(fleet_store, digits_dir, capsys):
    fleet_store, small_bundle_dir = fleet_store
    code = main(["retrain", "--store", str(fleet_store / "hard.sqlite"), "--bundle", str(small_bundle_dir),
                 "--out", str(fleet_store / "never"), "--replay", str(digits_dir / "train"),
                 "--min-examples", "100000"])
    assert code == 2
    assert "need at least 100000 (--min-examples)" in capsys.readouterr().err
    assert not (fleet_store / "never").exists()


def test_retrain_end_branch_keeps_the_boundary(fleet_store, digits_dir):
    """--end-scope branch trains, in TensorFlow, only the end layers the boundary feature does not
    depend on; the re-exported end segment must speak the parent's boundary."""
    fleet_store, small_bundle_dir = fleet_store
    out = fleet_store / "candidate-branch"
    code = main(["retrain", "--store", str(fleet_store / "hard.sqlite"), "--bundle", str(small_bundle_dir),
                 "--out", str(out), "--replay", str(digits_dir / "train"), "--privacy", "raw",
                 "--end-scope", "branch", "--min-examples", "20", "--json", str(fleet_store / "branch.json")])
    assert code == 0
    end = json.loads((fleet_store / "branch.json").read_text())["heads"]["end"]
    assert end["retrained"] == "end branch past the boundary"
    # the small preset's exit branches off after the last end block: only its head trains
    assert "end_logits" in end["layers"] and set(end["layers"]) <= {"end_logits", "end_hidden"}, end
    # calibrated on the parent's own representative frames, the frozen layers quantize alike
    assert end["boundary_mean_abs_steps"] == 0.0, end
    parent, cand = Bundle.load(small_bundle_dir), Bundle.load(out)
    assert cand.segment("end").outputs == parent.segment("end").outputs
    assert (out / "end.tflite").read_bytes() != (small_bundle_dir / "end.tflite").read_bytes()


def test_replay_defaults_to_the_checkpoints_training_folder(small_bundle_dir, digits_dir):
    """`tierlite retrain` without --replay takes the folder its checkpoint was trained on."""
    from tierlite.bundle import Bundle
    from tierlite.cloud.retrain.data import replay_and_val
    from tierlite.cloud.retrain.options import RetrainOptions

    bundle = Bundle.load(small_bundle_dir)
    x, y, vx, vy = replay_and_val(RetrainOptions(bundle=str(small_bundle_dir), store="unused", replay=None), bundle)
    given = replay_and_val(RetrainOptions(bundle=str(small_bundle_dir), store="unused",
                                          replay=digits_dir / "train"), bundle)
    assert len(x) > 0 and len(vx) > 0
    assert len(vx) == len(given[2]) and (vy == given[3]).all()  # the same validation split as the training's


# -- issue 13: the verdict under a drift that fools the teacher too ------------------------------
@pytest.fixture(scope="module")
def fog_round(tmp_path_factory, small_bundle_dir, digits_dir):
    """Fog, severity 5: the camera and the cloud teacher both collapse (docs/DRIFT.md). Half the
    test frames are the fleet's (every confident frame audited, frames uploaded), half are kept
    with their labels to say which candidate is really better. The job runs with --end-scope
    profile, as a live round started by a drift alarm would."""
    from tierlite.tools.bench.corruptions import corrupt
    from tierlite.tools.bench.drift import simulate_fleet
    from tierlite.converters.pipeline import default_workdir
    from tierlite.data import load_image_folder

    work = tmp_path_factory.mktemp("fog")
    test = load_image_folder(digits_dir / "test", (32, 32))
    order = np.random.default_rng(0).permutation(len(test.labels))
    fleet, held = order[: len(order) // 2], order[len(order) // 2:]
    fogged = corrupt(test.images, "fog", 5, seed=3)
    bundle = work / "bundle"
    shutil.copytree(small_bundle_dir, bundle)
    (work / "bundle-work").symlink_to(default_workdir(small_bundle_dir).resolve())
    stats = simulate_fleet(bundle, fogged[fleet], ["cam-1", "cam-2"], work / "hard.sqlite", share_frames=True,
                           audit_rate=1.0)
    assert stats["audits"] > 100 and stats["escalated_to_cloud"] < 10, stats  # the camera is sure: audits only
    out = work / "candidate"
    assert main(["retrain", "--store", str(work / "hard.sqlite"), "--bundle", str(bundle), "--out", str(out),
                 "--replay", str(digits_dir / "train"), "--privacy", "raw", "--end-scope", "profile",
                 "--json", str(work / "report.json")]) == 0
    return {"work": work, "bundle": bundle, "candidate": out, "report": json.loads((work / "report.json").read_text()),
            "x": fogged[held], "y": test.labels[held], "clean": test.images[held]}


def _end_accuracy(bundle_dir, x, y) -> float:
    from tierlite.cloud.retrain import Chain

    return float((Chain(Bundle.load(bundle_dir)).from_frames(x)["end_logits"].argmax(1) == y).mean())


def test_verdict_accepts_a_label_free_fix_when_the_teacher_is_drifted(fog_round):
    r = fog_round
    report = r["report"]
    # The teacher failed its own drift check on the audits, so nothing was distilled from it ...
    check = report["teacher"]["check"]
    assert report["teacher"]["audits"] > 100 and check["drifted"] and "classes" in check["triggered"], check
    assert "edge" not in report["heads"] and report["heads"]["end"]["retrained"].startswith("condition profile")
    # ... and the old criterion (agreement with that teacher) would have refused the candidate.
    end = report["holdout"]["end"]
    assert end["candidate_agreement"] < end["parent_agreement"], end
    # Judged through the candidate's end, where the teacher is back in distribution: accepted.
    through = end["through_candidate"]
    assert not through["teacher_drift"]["drifted"] and through["candidate_agreement"] > through["parent_agreement"]
    assert report["better"], report["reason"]
    assert "teacher drifted on the audits" in report["reason"] and "in distribution again" in report["reason"]
    # Right to: on labelled fogged frames nobody trained or judged on, the end exit really is better.
    before, after = _end_accuracy(r["bundle"], r["x"], r["y"]), _end_accuracy(r["candidate"], r["x"], r["y"])
    assert after > before + 0.10, (before, after)
    assert _end_accuracy(r["candidate"], r["clean"], r["y"]) >= _end_accuracy(r["bundle"], r["clean"], r["y"]) - 0.005


def _shuffled_candidate(r) -> Path:
    """The fog round's candidate with its variant exit's classes permuted (made once per module)."""
    from tierlite.bundle import write_manifest
    from tierlite.cloud.retrain import Head
    from tierlite.conditions import ROLE

    bad = r["work"] / "candidate-shuffled"
    if bad.is_dir():
        return bad
    shutil.copytree(r["candidate"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    variant = bad / next(e["file"] for e in manifest["files"] if e.get("role") == ROLE)
    head = Head(variant.read_bytes(), "end")
    perm = np.roll(np.arange(head.b.size), 3)
    variant.write_bytes(head.patched(head.W[:, perm], head.b[perm]))
    write_manifest(bad, manifest)
    return bad


def _judge_options(r, digits_dir, **extra):
    from tierlite.cloud.retrain import PrivacyPolicy, RetrainOptions

    return RetrainOptions(store=r["work"] / "hard.sqlite", bundle=r["bundle"], replay=digits_dir / "train",
                          privacy=PrivacyPolicy(default="raw"), frames=r["work"] / "hard.frames.sqlite", **extra)


def test_verdict_refuses_a_candidate_with_shuffled_labels_under_the_same_drift(fog_round, digits_dir):
    """The same profile with its exit's classes permuted (what training it on shuffled labels
    gives): the clean check cannot see it (the variant runs on fogged frames only), the teacher
    through its boundary is as healthy as for the good one, and the end exit disagrees with it."""
    from tierlite.cloud.retrain import judge_candidate

    r = fog_round
    bad = _shuffled_candidate(r)
    opts = _judge_options(r, digits_dir)
    good = judge_candidate(opts, r["candidate"])
    assert good["better"] and good["reason"] == r["report"]["reason"]  # the same judgement as the run's
    verdict = judge_candidate(opts, bad)
    assert not verdict["better"], verdict["reason"]
    assert "teacher drifted on the audits" in verdict["reason"] and "below the 1.0 pt margin" in verdict["reason"]
    assert _end_accuracy(bad, r["x"], r["y"]) < _end_accuracy(r["bundle"], r["x"], r["y"]) + 0.05


def test_the_variant_carries_its_own_drift_reference(fog_round):
    """After the fog variant lands, the node's monitor scores fogged frames against the variant's
    reference: no alarm while the fog lasts (the bundle's clean reference alarms on them)."""
    from tierlite.conditions import ROLE
    from tierlite.drift import REFERENCE_KEY, ConditionDriftMonitor, DriftMonitor
    from tierlite.segment import Segment

    r = fog_round
    cand = Bundle.load(r["candidate"])
    entry = next(e for e in cand.manifest["files"] if e.get("role") == ROLE)
    assert entry[REFERENCE_KEY]["frames"] >= 20
    mon = DriftMonitor.from_bundle(cand.manifest)
    clean_only = DriftMonitor(cand.manifest[REFERENCE_KEY])
    assert isinstance(mon, ConditionDriftMonitor)
    seg = Segment(cand, "end")
    raised = []
    for x in list(r["x"][:150]) + list(r["clean"][:100]):
        out = seg.run(x[None])
        raised.append(mon.update(out.feature, out.logits, x))
        clean_only.update(out.feature, out.logits)
    assert clean_only.state.alarms >= 1  # the clean reference alone: fog is drift
    assert mon.state.alarms == 0 and True not in raised, mon.state.to_json()


def test_an_operator_labelled_holdout_decides_the_verdict(fog_round, digits_dir, tmp_path, capsys):
    """Issue 13: the operator hands the job a folder of labelled frames from the fogged site (real
    JPEGs, <class>/*.jpg). The verdict is then their accuracy, parent vs candidate, with the paired
    test, not agreement with the (drifted) teacher; the report says which evidence decided."""
    import cv2

    from tierlite.cloud.retrain import judge_candidate
    from tierlite.cloud.retrain.judge import EVIDENCE_LABELS

    r = fog_round
    labels = Bundle.load(r["bundle"]).labels
    site = tmp_path / "site-labelled"
    for i, (img, y) in enumerate(zip(r["x"][:80], r["y"][:80])):  # frames nobody trained or judged on
        d = site / labels[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.jpg").write_bytes(cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))[1].tobytes())
    opts = _judge_options(r, digits_dir, labelled_holdout=site)
    good = judge_candidate(opts, r["candidate"])
    lab = good["labelled"]
    assert lab["frames"] == 80 and lab["primary"] == "end"
    assert good["better"] and good["evidence"] == EVIDENCE_LABELS, good["reason"]
    assert lab["end"]["candidate_accuracy"] > lab["end"]["parent_accuracy"] + 0.10 and lab["end"]["test"]["p_value"] < 0.05
    assert "on 80 operator-labelled frames" in good["reason"] and "McNemar" in good["reason"], good["reason"]
    bad = judge_candidate(opts, _shuffled_candidate(r))
    assert not bad["better"] and bad["evidence"] == EVIDENCE_LABELS, bad["reason"]
    assert bad["labelled"]["end"]["candidate_accuracy"] < lab["end"]["candidate_accuracy"]
    # through the CLI: a missing folder is one clear line, nothing run
    code = main(["retrain", "--store", str(r["work"] / "hard.sqlite"), "--bundle", str(r["bundle"]),
                 "--labelled-holdout", str(tmp_path / "nowhere"), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert code == 2 and "--labelled-holdout: folder not found" in err and not (tmp_path / "never").exists(), err


def test_a_bad_labelled_holdout_fails_before_anything_is_read_or_trained(small_bundle_dir, digits_dir, tmp_path,
                                                                          capsys):
    """--labelled-holdout is read and checked first: a class folder the bundle does not know, an
    empty folder or a folder of one class is one clear line (exit 2), and nothing else ran. The store
    given here is not a database at all: had the job read it (or trained) first, that would fail."""
    import cv2

    not_a_store = tmp_path / "hard.sqlite"
    not_a_store.write_bytes(b"this is not a hard-example store")
    frame = cv2.imencode(".jpg", np.full((32, 32, 3), 128, np.uint8))[1].tobytes()

    def folder(name: str, classes: list[str]) -> Path:
        root = tmp_path / name
        root.mkdir()
        for c in classes:
            (root / c).mkdir()
            (root / c / "0.jpg").write_bytes(frame)
        return root

    cases = {folder("unknown", ["3", "7", "cat"]): "class folders ['cat'] are not classes of the bundle",
             folder("empty", []): "no images found",
             folder("one-class", ["3"]): "need at least 2 classes"}
    for site, why in cases.items():
        out = tmp_path / f"never-{site.name}"
        code = main(["retrain", "--store", str(not_a_store), "--bundle", str(small_bundle_dir),
                     "--replay", str(digits_dir / "train"), "--labelled-holdout", str(site), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and not out.exists(), err
        assert f"--labelled-holdout {site}" in err and why in err and len(err.splitlines()) == 1, err
    # the same store with a good folder: now the store is what fails (the holdout passed its check)
    good = folder("good", ["3", "7"])
    assert main(["retrain", "--store", str(not_a_store), "--bundle", str(small_bundle_dir),
                 "--replay", str(digits_dir / "train"), "--labelled-holdout", str(good)]) != 0
    assert "--labelled-holdout" not in capsys.readouterr().err
