"""`tierlite recover`: a trainable checkpoint rebuilt from the cached digits bundle's int8 segments,
checked against that bundle and against the checkpoint the bundle was really exported from."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tierlite.bundle import TIERS, Bundle
from tierlite.tools.cli import main

# Measured with this fixture on the 449 digits test frames (docs/CONVERTERS.md, "Recovering a checkpoint"):
# recovered float ~ int8 bundle 99.55 / 100 / 100 % (end / edge / cloud), exactly the original
# checkpoint's own float ~ int8 agreement; recovered ~ original float 100 % on every exit. The bounds
# allow 9 frames (2 %) against the bundle and 4 (1 pt) below the original, for a retrained fixture's
# borderline frames (the CIFAR-10 original's own float ~ int8 agreement is 98.4-99.2 %).
MIN_AGREEMENT_WITH_INT8 = 0.98
MAX_BELOW_ORIGINAL = 0.01
MIN_AGREEMENT_WITH_ORIGINAL = 0.98


@pytest.fixture(scope="module")
def recovered(small_bundle_dir, digits_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("recovered") / "work"
    assert main(["recover", str(small_bundle_dir), "--images", str(digits_dir / "train"), "--workdir", str(work)]) == 0
    return work


def test_recovered_checkpoint_agrees_with_the_int8_bundle_and_the_original(recovered, small_bundle_dir, digits_dir):
    from tierlite.converters.pipeline import default_workdir, run_chain
    from tierlite.converters.train import load_checkpoint, predict_logits
    from tierlite.data import load_image_folder

    test = load_image_folder(digits_dir / "test", (32, 32))
    x = test.images
    int8 = run_chain(small_bundle_dir, x, end_tta=None, encoding=None)
    model, meta = load_checkpoint(recovered)
    original, _ = load_checkpoint(default_workdir(small_bundle_dir))
    rec, orig = predict_logits(model, x), predict_logits(original, x)
    for tier, q, r, o in zip(TIERS, int8, rec, orig):
        with_int8 = (r.argmax(1) == q.argmax(1)).mean()
        original_with_int8 = (o.argmax(1) == q.argmax(1)).mean()
        assert with_int8 >= MIN_AGREEMENT_WITH_INT8, tier
        assert with_int8 >= original_with_int8 - MAX_BELOW_ORIGINAL, tier
        assert (r.argmax(1) == o.argmax(1)).mean() >= MIN_AGREEMENT_WITH_ORIGINAL, tier
    # The metadata regenerates the bundle's own split and names where the weights came from.
    from tierlite.converters.datasets import checkpoint_splits
    bundle = Bundle.load(small_bundle_dir)
    splits = checkpoint_splits(meta, recovered)
    training = bundle.manifest["training"]
    assert (len(splits.train.labels), len(splits.val.labels)) == (training["train_frames"], training["val_frames"])
    assert meta["recovered"]["sha256"] == {t: bundle.segment(t).sha256 for t in TIERS}
    report = json.loads((recovered / "recovery.json").read_text())
    assert report["re_export_end"]["feature"]["within_one_step"] > 0.95  # measured 98.9 %


def test_batchnorms_are_the_identity_on_clean_frames_and_re_estimate_to_it(recovered):
    """Every BatchNorm is x + folded bias in inference; re-estimating its statistics on the clean
    frames they were measured on (what a condition profile does with drifted ones) changes nothing."""
    import keras

    from tierlite.converters.datasets import checkpoint_splits
    from tierlite.converters.models import segments_of
    from tierlite.converters.train import load_checkpoint

    model, meta = load_checkpoint(recovered)
    end = segments_of(model)[0]
    norms = [l for l in end.layers if isinstance(l, keras.layers.BatchNormalization)]
    for bn in norms:
        gamma, _, _, var = bn.get_weights()
        np.testing.assert_allclose(gamma / np.sqrt(var + bn.epsilon), 1.0, rtol=1e-5)
    # The statistics sample is every training frame here (1,078 < 5,000), so one batch of them has
    # exactly the measured statistics.
    frames = checkpoint_splits(meta, recovered).train.images.astype(np.float32)
    before = [np.asarray(o) for o in end(frames, training=False)]
    stats = [bn.get_weights()[2:] for bn in norms]
    for bn in norms:
        bn.momentum = 0.0
    after = [np.asarray(o) for o in end(frames, training=True)]
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b, atol=1e-3 * float(np.abs(b).max()))
    for bn, (mean, var) in zip(norms, stats):
        np.testing.assert_allclose(bn.get_weights()[2], mean, atol=1e-4 * (1 + float(np.abs(mean).max())))
        np.testing.assert_allclose(bn.get_weights()[3], var, rtol=1e-3, atol=1e-6)


def test_bad_input_is_one_line(small_bundle_dir, digits_dir, tmp_path, capsys):
    def refused(*argv: str) -> str:
        assert main(["recover", *argv]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1  # log lines may come before it
        return errors[0]

    assert "bundle not found" in refused(str(tmp_path / "nope"), "--images", str(digits_dir / "train"),
                                 "--workdir", str(tmp_path / "w"))
    binary = tmp_path / "binary"
    shutil.copytree(small_bundle_dir, binary)
    manifest = json.loads((binary / "manifest.json").read_text())
    manifest["model"]["binarized"] = True
    (binary / "manifest.json").write_text(json.dumps(manifest))
    assert "binarized" in refused(str(binary), "--images", str(digits_dir / "train"), "--workdir", str(tmp_path / "w"))
    del manifest["training"]
    manifest["model"]["binarized"] = False
    (binary / "manifest.json").write_text(json.dumps(manifest))
    assert "cannot be rebuilt" in refused(str(binary), "--images", str(digits_dir / "train"),
                                          "--workdir", str(tmp_path / "w"))
    # Another folder than the one the bundle was trained on: its split cannot be the bundle's.
    assert "not the folder it was trained on" in refused(str(small_bundle_dir), "--images", str(digits_dir / "test"),
                                                         "--workdir", str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoint").exists()
