"""Converters without training: bad dataset folders, the training-data cache, the pure-numpy exit
calibration, presets and CLI argument errors."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from tierlite.errors import ConfigError, DataError


def _folder(root, classes: dict[str, int], src):
    """<root>/<class>/*.jpg copied from the digits frames."""
    jpgs = sorted((src / "train" / "0").glob("*.jpg"))
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shutil.copy(jpgs[i], root / name / f"{i}.jpg")
    return root


def test_bad_dataset_folders_give_clear_errors(tmp_path, digits_dir):
    from tierlite.converters.datasets import load_splits

    with pytest.raises(DataError, match="image folder not found"):
        load_splits(tmp_path / "missing", 32, 0.2)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_splits(tmp_path / "empty", 32, 0.2)
    one = _folder(tmp_path / "one", {"cat": 5}, digits_dir)
    with pytest.raises(DataError, match="only 1 class"):
        load_splits(one, 32, 0.2)


def test_corrupt_files_skipped_counted_and_cached(tmp_path, digits_dir):
    from tierlite.converters.datasets import load_folder_cached, load_splits

    root = _folder(tmp_path / "data", {"a": 10, "b": 10}, digits_dir)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "b" / "empty.jpg").write_bytes(b"")
    s = load_splits(root, 32, 0.2, cache_dir=tmp_path / "cache")
    assert len(s.skipped) == 2 and {p.rsplit("/", 1)[-1] for p, _ in s.skipped} == {"broken.jpg", "empty.jpg"}
    assert len(s.train.labels) + len(s.val.labels) == 20 and set(s.val.labels) == {0, 1}
    assert s.train.images.dtype == np.uint8 and s.train.images.shape[1:] == (32, 32, 3)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = load_folder_cached(root, 32, tmp_path / "cache")  # from the cache, same content
    assert len(again.skipped) == 2 and again.images.shape == (20, 32, 32, 3)


def test_cli_convert_reports_missing_folder(tmp_path, capsys):
    from tierlite.tools.cli import main

    assert main(["convert", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    assert "error: image folder not found" in capsys.readouterr().err
    assert main(["train", str(tmp_path), "--workdir", str(tmp_path / "w"), "--set", "bogus=1"]) == 2
    assert "unknown option 'bogus'" in capsys.readouterr().err


def test_presets_resolve_and_reject_bad_values():
    from tierlite.converters.presets import resolve

    arch, tc = resolve("small", epochs=2, boundary=4)
    assert (tc.epochs, arch.boundary) == (2, 4)
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve("huge")
    with pytest.raises(ConfigError, match="loss_weights"):
        resolve("small", loss_weights=[1, 1])
    with pytest.raises(ConfigError, match="family"):
        resolve("small", family="vgg")


# -- calibration (pure numpy) ----------------------------------------------------------------
def _synthetic(n=2000, c=10, seed=0):
    """Three exits: the end is right and confident on 'easy' frames, the cloud is best overall."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    difficulty = rng.random(n)

    def exit_logits(skill):
        correct = rng.random(n) < np.clip(skill - difficulty * 0.6 + 0.3, 0, 1)
        pred = np.where(correct, y, (y + rng.integers(1, c, n)) % c)
        confidence = 8.0 * (1.2 - difficulty) * (skill + 0.2) + rng.normal(0, 0.3, n)
        logits = rng.normal(0, 0.3, (n, c))
        logits[np.arange(n), pred] += confidence
        return logits

    return [exit_logits(0.55), exit_logits(0.7), exit_logits(0.9)], y


def test_calibration_respects_max_drop_and_maximizes_camera_exits():
    from tierlite.converters import calibrate
    from tierlite.policy import chain_decisions

    logits, y = _synthetic()
    fbytes = (256, 8192)
    cloud_only = (logits[2].argmax(1) == y).mean()
    table = calibrate.frontier(logits, y, fbytes, grid=101)
    for drop in (0.0, 0.005, 0.02):
        op = calibrate.search_thresholds(logits, y, fbytes, drop, table=table)
        assert op.accuracy >= cloud_only - drop - 1e-12
        # Same figures as the vectorised policy the tiers use.
        tier, pred = chain_decisions(logits, [op.thresholds["end"], op.thresholds["edge"]])
        assert np.isclose((pred == y).mean(), op.accuracy) and np.isclose((tier == 0).mean(), op.camera_fraction)
        assert np.isclose(op.camera_uplink_bytes, (1 - op.camera_fraction) * 256)
        # Nothing on the grid that meets the constraint keeps more frames on the camera.
        feasible = table["accuracy"] >= cloud_only - drop - 1e-12
        assert op.camera_fraction >= table["end"][feasible].max() - 1e-12
    loose = calibrate.search_thresholds(logits, y, fbytes, 0.05, table=table)
    strict = calibrate.search_thresholds(logits, y, fbytes, 0.0, table=table)
    assert loose.camera_fraction > strict.camera_fraction > 0.0


def test_camera_slack_trades_camera_share_for_fewer_uplink_bytes():
    from tierlite.converters import calibrate

    logits, y = _synthetic()
    fbytes = (256, 8192)
    table = calibrate.frontier(logits, y, fbytes, grid=101)
    total = table["camera_uplink_bytes"] + table["edge_uplink_bytes"]
    for drop in (0.005, 0.02):
        tight = calibrate.search_thresholds(logits, y, fbytes, drop, table=table)
        for slack in (0.01, 0.05):
            loose = calibrate.search_thresholds(logits, y, fbytes, drop, table=table, camera_slack=slack)
            assert loose.accuracy >= (logits[2].argmax(1) == y).mean() - drop - 1e-12
            assert tight.camera_fraction - slack - 1e-12 <= loose.camera_fraction <= tight.camera_fraction + 1e-12
            loose_bytes = loose.camera_uplink_bytes + loose.edge_uplink_bytes
            assert loose_bytes <= tight.camera_uplink_bytes + tight.edge_uplink_bytes + 1e-9
            # nothing feasible within the slack sends fewer bytes
            cloud_only = (logits[2].argmax(1) == y).mean()
            allowed = (table["accuracy"] >= cloud_only - drop - 1e-12) & (table["end"] >= tight.camera_fraction - slack - 1e-12)
            assert np.isclose(loose_bytes, total[allowed].min())
    assert calibrate.search_thresholds(logits, y, fbytes, 0.02, table=table, camera_slack=0.05).edge_uplink_bytes < \
        calibrate.search_thresholds(logits, y, fbytes, 0.02, table=table).edge_uplink_bytes


def test_calibration_frontier_matches_brute_force():
    from tierlite.converters import calibrate
    from tierlite.policy import chain_decisions

    logits, y = _synthetic(n=300, seed=3)
    table = calibrate.frontier(logits, y, (100, 1000), grid=11)
    for i in np.random.default_rng(0).choice(len(table["accuracy"]), 25, replace=False):
        tier, pred = chain_decisions(logits, [table["t_end"][i], table["t_edge"][i]])
        assert np.isclose((pred == y).mean(), table["accuracy"][i])
        assert np.isclose((tier == 1).mean(), table["edge"][i])


def test_calibration_report_and_plot(tmp_path):
    from tierlite.converters import calibrate

    logits, y = _synthetic(n=500)
    points, table = calibrate.sweep(logits, y, (256, 4096), drops=(0.0, 0.01, 0.05), grid=51)
    png = calibrate.plot(tmp_path / "cal.png", points, table, jpeg_bytes=900)
    rep = calibrate.write_report(tmp_path / "cal.json", {"sweep": [p.to_json() for p in points]})
    assert png.read_bytes()[:4] == b"\x89PNG" and rep.stat().st_size > 100
    assert [p.max_drop for p in points] == [0.0, 0.01, 0.05]
    assert points[0].camera_fraction <= points[1].camera_fraction <= points[2].camera_fraction


def test_calibrate_module_needs_no_tensorflow():
    import subprocess
    import sys

    code = "import sys, tierlite.converters.calibrate; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
