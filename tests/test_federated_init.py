"""A federation started from a shared pretrained body (`tierlite federate server --init-from`):
the initial weights are the checkpoint's, the run records which checkpoint, and a checkpoint that
does not fit (other classes, other architecture) is refused with one line (docs/COTRAINING.md,
"A shared pretrained body")."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tierlite.errors import ConfigError
from tierlite.federated import ModelMismatch, loads

CLASSES = [f"c{i}" for i in range(10)]


def _checkpoint(workdir, seed: int, classes=CLASSES, **overrides):
    """A `tierlite train`-style checkpoint of the `small` preset (untrained: only its weights matter)."""
    from tierlite.converters import build_federated_model, model_weights
    from tierlite.converters.train import save_checkpoint

    model, arch, tc = build_federated_model("small", len(classes), seed, **overrides)
    save_checkpoint(model, workdir, arch, tc, classes, [], seed)
    return model_weights(model)


def test_initial_weights_are_the_checkpoints_and_the_run_records_it(tmp_path):
    from tierlite.cloud.federated.server import initial_weights

    pretrained = _checkpoint(tmp_path / "public", seed=7, flip=True)
    fresh = initial_weights(tmp_path / "scratch", "small", CLASSES, 0, {"flip": True})
    started = initial_weights(tmp_path / "out", "small", CLASSES, 0, {"flip": True}, init_from=tmp_path / "public")

    assert set(started) == set(pretrained)
    for k in pretrained:
        np.testing.assert_array_equal(started[k], pretrained[k])
    # the seed-0 initialisation differs from the checkpoint's (seed 7): the weights came from the checkpoint
    assert any(not np.array_equal(fresh[k], pretrained[k]) for k in pretrained if k.endswith("kernel"))
    on_disk = loads((tmp_path / "out" / "initial.npz").read_bytes())
    assert all(np.array_equal(on_disk[k], pretrained[k]) for k in pretrained)
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["init_from"] == str((tmp_path / "public").resolve())
    assert json.loads((tmp_path / "scratch" / "model.json").read_text())["init_from"] is None


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(tmp_path):
    from tierlite.cloud.federated.server import initial_weights

    _checkpoint(tmp_path / "other-classes", seed=1, classes=CLASSES[:9] + ["zebra"])
    with pytest.raises(ConfigError, match="checkpoint classes") as e:
        initial_weights(tmp_path / "a", "small", CLASSES, 0, {}, init_from=tmp_path / "other-classes")
    assert "\n" not in str(e.value)

    _checkpoint(tmp_path / "wider", seed=1, stem=16)  # the same classes, another architecture
    with pytest.raises(ModelMismatch) as e:
        initial_weights(tmp_path / "b", "small", CLASSES, 0, {}, init_from=tmp_path / "wider")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "b" / "initial.npz").exists()


def test_export_of_a_folder_that_is_no_federation_is_one_line(tmp_path):
    from tierlite.cloud.federated.server import export_global

    with pytest.raises(ConfigError, match="not a federation's output folder") as e:
        export_global(tmp_path / "missing", tmp_path / "calib")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "missing" / "bundle").exists()
