"""Converters: bundles trained on the spot (digits), reloaded, verified and run on LiteRT and TFLite
Micro; binarized end weights and boundary; tampering; CLI inspect; checkpoint reuse."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tierlite.bundle import TIERS, Bundle
from tierlite.errors import BundleError, ConfigError
from tierlite.segment import Segment
from tierlite.wire import decode_feature, encode_feature

N_FRAMES = 60  # frames pushed through every runtime chain (TFLM on the host is slow)


@pytest.fixture(scope="module")
def test_frames(digits_dir):
    from tierlite.data import load_image_folder
    s = load_image_folder(digits_dir / "test", (32, 32), limit=N_FRAMES, seed=1)
    return s.images, s.labels


def _chain(bundle, images, runtime):
    """Run end -> (wire codec) -> edge -> cloud per frame; per tier logits (N, C) and features."""
    segs = {t: Segment(bundle, t, runtime=runtime, fallback=False) for t in TIERS}
    enc = bundle.feature_encoding
    logits, feats = {t: [] for t in TIERS}, {t: [] for t in ("end", "edge")}
    for img in images:
        o1 = segs["end"].run(img[None])
        wire = encode_feature(o1.feature, enc)  # what the camera sends
        o2 = segs["edge"].run(decode_feature(wire, o1.feature.shape, enc))
        o3 = segs["cloud"].run(o2.feature)
        for t, o in zip(TIERS, (o1, o2, o3)):
            logits[t].append(o.logits)
        feats["end"].append(o1.feature)
        feats["edge"].append(o2.feature)
    return {t: np.stack(v) for t, v in logits.items()}, {t: np.stack(v) for t, v in feats.items()}


@pytest.mark.parametrize("which", ["small_bundle_dir", "binary_bundle_dir"])
def test_bundle_reloads_and_boundaries_match(request, which):
    b = Bundle.load(request.getfixturevalue(which))
    assert b.version == 1 and len(b.labels) == 10
    end_in = b.segment("end").inputs[0]
    assert end_in.dtype == "uint8" and end_in.shape == (1, 32, 32, 3) and (end_in.scale, end_in.zero_point) == (1.0, 0)
    for producer, consumer in (("end", "edge"), ("edge", "cloud")):
        out = b.segment(producer).output("feature")
        inp = b.segment(consumer).inputs[0]
        assert (out.shape, out.dtype, out.scale, out.zero_point) == (inp.shape, inp.dtype, inp.scale, inp.zero_point)
    assert b.segment("cloud").output("feature") is None
    assert set(b.thresholds) == {"end", "edge"} and all(0.0 <= v <= 1.0 or v == -1.0 for v in b.thresholds.values())
    # The runtime sees the same quantization as the manifest (Segment checks on open).
    for t in TIERS:
        Segment(b, t)


def test_int8_chain_accuracy_and_litert_vs_tflm(small_bundle_dir, test_frames):
    images, labels = test_frames
    b = Bundle.load(small_bundle_dir)
    lite, lite_f = _chain(b, images, "litert")
    micro, micro_f = _chain(b, images, "tflm")
    assert (lite["cloud"].argmax(1) == labels).mean() >= 0.85  # digits are easy; catches a broken chain
    # XNNPACK (LiteRT default) and TFLM round differently: decisions agree, features within a few steps.
    for t in TIERS:
        assert (lite[t].argmax(1) == micro[t].argmax(1)).mean() >= 0.95
    assert np.abs(lite_f["end"].astype(int) - micro_f["end"].astype(int)).max() <= 4


@pytest.mark.parametrize("which", ["small_bundle_dir", "binary_bundle_dir"])
def test_tflm_matches_litert_reference_kernels(request, which, test_frames):
    """TFLM against LiteRT's reference kernels, segment by segment on the same inputs: within 1 step."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from tierlite.runtimes.litert import InterpreterRuntime
    from tierlite.runtimes.tflm import TFLMRuntime

    b = Bundle.load(request.getfixturevalue(which))
    x = [img[None] for img in test_frames[0][:20]]
    for t in TIERS:
        path = b.segment_path(t)
        ref = InterpreterRuntime(path, Interpreter(model_path=str(path),
                                                   experimental_op_resolver_type=OpResolverType.BUILTIN_REF))
        micro = TFLMRuntime(path)
        feature = b.segment(t).output("feature")
        nxt = []
        for xi in x:
            r, m = ref.run([xi]), micro.run([xi])
            for a, c in zip(r, m):
                assert np.abs(a.astype(int) - c.astype(int)).max() <= 1
            if feature is not None:
                nxt.append(m[feature.index])
        x = nxt


def test_binarized_end_two_valued_weights_and_binary_boundary(binary_bundle_dir, test_frames):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    b = Bundle.load(binary_bundle_dir)
    enc = b.feature_encoding
    assert enc["kind"] == "binary" and enc["low"] != enc["high"]
    interp = Interpreter(model_path=str(b.segment_path("end")),
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    names = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    binary_convs = 0
    for op in interp._get_ops_details():
        if op["op_name"] != "CONV_2D" or "/end_bin" not in names[op["inputs"][1]]:
            continue  # the stem (real weights on pixels) is not binarized
        w = interp.get_tensor(op["inputs"][1])
        for channel in w:
            values = np.unique(channel)
            assert len(values) == 2 and values[0] == -values[1], f"{names[op['inputs'][1]]}: {values}"
        binary_convs += 1
    assert binary_convs >= 2
    # The boundary carries exactly the two levels on both runtimes, so bit-packing is lossless.
    images = test_frames[0][:30]
    for runtime in ("litert", "tflm"):
        end = Segment(b, "end", runtime=runtime, fallback=False)
        for img in images:
            q = end.run(img[None]).feature
            assert set(np.unique(q)) <= {enc["low"], enc["high"]}
            np.testing.assert_array_equal(decode_feature(encode_feature(q, enc), q.shape, enc), q)
    fbytes = len(encode_feature(q, enc))
    assert fbytes == (q.size + 7) // 8
    # And the binary chain still classifies.
    lite, _ = _chain(b, test_frames[0], "litert")
    assert (lite["cloud"].argmax(1) == test_frames[1]).mean() >= 0.7


def test_tampered_and_malformed_bundles_fail_clearly(small_bundle_dir, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(small_bundle_dir, good)
    archive = Bundle.load(good).archive(tmp_path / "b.tar.gz")
    assert Bundle.load(archive).name == Bundle.load(good).name
    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    blob = bytearray((tampered / "edge.tflite").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (tampered / "edge.tflite").write_bytes(bytes(blob))
    with pytest.raises(BundleError, match=r"sha256 mismatch for edge.tflite.*tampered"):
        Bundle.load(tampered)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(bad)
    m = json.loads((good / "manifest.json").read_text())
    del m["labels"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="'labels' missing"):
        Bundle.load(bad)


def test_cli_inspect_bundle_and_bare_tflite(small_bundle_dir, binary_bundle_dir, capsys):
    from tierlite.tools.cli import main

    assert main(["inspect", str(small_bundle_dir)]) == 0
    out = capsys.readouterr().out
    for text in ("[end]", "[edge]", "[cloud]", "CONV_2D", "bytes per escalated frame", "thresholds", "uint8 q=(1, 0)"):
        assert text in out
    assert main(["inspect", str(binary_bundle_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    end_feature = next(o for o in info["segments"][0]["manifest_outputs"] if o["role"] == "feature")
    assert info["bytes_per_escalated_frame"]["camera->edge"] == (int(np.prod(end_feature["shape"])) + 7) // 8
    assert main(["inspect", str(small_bundle_dir / "cloud.tflite")]) == 0
    out = capsys.readouterr().out
    assert "FULLY_CONNECTED" in out and "int8" in out
    assert main(["inspect", str(small_bundle_dir / "nope.tflite")]) == 2
    assert "error:" in capsys.readouterr().err


def test_checkpoint_reloads_and_reexports(small_bundle_dir, digits_dir, tmp_path):
    """What the cloud retraining job does: reload the trained model, export a version 2."""
    from tierlite.converters.pipeline import default_workdir, export_bundle, run_chain
    from tierlite.converters.train import load_checkpoint, predict_logits
    from tierlite.data import load_image_folder

    workdir = default_workdir(small_bundle_dir)
    model, meta = load_checkpoint(workdir)
    assert meta["arch"]["family"] == "resnet" and meta["classes"] == Bundle.load(small_bundle_dir).labels
    data = load_image_folder(digits_dir / "test", (32, 32), limit=120, seed=2)
    out = export_bundle(model, tmp_path / "v2", arch=meta["arch"], classes=meta["classes"],
                        calib_images=data.images, calib_labels=data.labels, name="digits-small",
                        version=2, parent_version=1, report_dir=tmp_path)
    b2 = Bundle.load(out)
    assert (b2.version, b2.manifest["parent_version"]) == (2, 1)
    assert (tmp_path / "calibration.json").is_file() and (tmp_path / "calibration.png").stat().st_size > 1000
    # The re-exported int8 chain agrees with the float model it came from.
    q = run_chain(out, data.images)
    f = predict_logits(model, data.images)
    for qi, fi in zip(q, f):
        assert (qi.argmax(1) == fi.argmax(1)).mean() >= 0.9


@pytest.mark.parametrize("binarized", [False, True])
def test_mobilenet_family_exports_at_96(tmp_path, binarized):
    """The depthwise-separable family at 96x96 converts and chains (untrained weights: structure only)."""
    from tierlite.converters.models import build_joint
    from tierlite.converters.pipeline import export_bundle
    from tierlite.converters.presets import resolve

    arch, _ = resolve("mobilenet-96", binarized=binarized, end=[[16, 2], [16, 1]], edge=[[32, 2]],
                      cloud=[[32, 1]], binary_end=[[16, 2], [16, 2]], stem=8)
    model = build_joint(arch)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (24, 96, 96, 3), dtype=np.uint8)
    out = export_bundle(model, tmp_path / "b", arch=arch, classes=[str(i) for i in range(10)],
                        calib_images=frames, calib_labels=rng.integers(0, 10, 24), report_dir=tmp_path)
    b = Bundle.load(out)
    assert b.input_shape == (1, 96, 96, 3) and b.feature_encoding["kind"] == ("binary" if binarized else "int8")
    f = Segment(b, "end").run(frames[0][None]).feature
    g = Segment(b, "edge").run(f).feature
    assert Segment(b, "cloud").run(g).logits.shape == (10,)


def test_boundary_can_be_cut_before_the_end_exit():
    """boundary_after: edge/cloud start from an earlier (higher-resolution) end block."""
    from tierlite.converters.models import build_segments
    from tierlite.converters.presets import resolve

    arch, _ = resolve("full", edge=[[64, 1], [128, 2]], cloud=[[256, 2]])
    end, edge, cloud = build_segments(arch)
    assert tuple(end.outputs[0].shape[1:]) == (16, 16, 4)      # feature after block 1
    assert end.get_layer("end_b2_out") is not None              # the camera exit still sees block 2
    # the edge squeezes its 8x8x128 trunk for the cloud hop; the cloud widens it back to 128
    assert tuple(edge.outputs[0].shape[1:]) == (8, 8, arch.edge_boundary) and tuple(cloud.outputs[0].shape[1:]) == (10,)
    assert cloud.get_layer("cloud_expand_conv").kernel.shape[-1] == 128


def test_cutout_hides_one_square_per_frame_and_is_validated():
    import tensorflow as tf
    from tierlite.converters.presets import TrainConfig
    from tierlite.converters.train import _augment
    frames = tf.zeros([32, 32, 32, 3])
    holes = tf.reduce_sum(tf.cast(_augment(frames, 0, False, tf.random.Generator.from_seed(1), 8)[..., 0] == 128,
                                  tf.int32), axis=[1, 2]).numpy()
    # one 8x8 square per frame, clipped at the border: never empty, never larger than 64 pixels
    assert holes.min() > 0 and holes.max() == 64
    untouched = _augment(frames, 0, False, tf.random.Generator.from_seed(1), 0)
    assert float(tf.reduce_max(untouched)) == 0.0
    with pytest.raises(ConfigError, match="cutout"):
        TrainConfig(cutout=-1).validate()


def test_end_exit_mirror_tta_calibrated_served_and_refused_where_unsupported(small_bundle_dir, digits_dir,
                                                                             tmp_path, capsys):
    """`tierlite calibrate --end-tta hflip --write`: the end exit decides on the mean of the frame's
    and its mirror image's softmax, in the runtime (Segment), the converters' chain and the drift
    reference alike; the escalated feature is the frame's own; firmware and bad manifests refuse."""
    from tierlite.tools.cli import main
    from tierlite.converters.firmware.model import load_end_model
    from tierlite.converters.pipeline import run_chain
    from tierlite.data import load_image_folder
    from tierlite.policy import mirror, mirror_average, softmax

    bundle = tmp_path / "tta"
    shutil.copytree(small_bundle_dir, bundle)
    plain_thresholds = Bundle.load(bundle).thresholds
    # --validation-split recovers the split `convert` held out (the small preset's 0.2): same thresholds.
    assert main(["calibrate", str(bundle), "--images", str(digits_dir / "train"), "--validation-split", "0.2",
                 "--report", str(tmp_path / "val")]) == 0
    chosen = json.loads((tmp_path / "val.json").read_text())["chosen"]["thresholds"]
    assert chosen == pytest.approx(plain_thresholds)
    capsys.readouterr()
    assert main(["calibrate", str(bundle), "--images", str(digits_dir / "train"), "--validation-split", "0.7"]) == 2
    assert "--validation-split is a fraction in (0, 0.5)" in capsys.readouterr().err
    assert main(["calibrate", str(bundle), "--images", str(digits_dir / "test"), "--end-tta", "hflip",
                 "--write", "--report", str(tmp_path / "cal")]) == 0
    assert "end exit with hflip test-time augmentation" in capsys.readouterr().out
    b = Bundle.load(bundle)
    assert b.segment("end").test_time_augmentation == "hflip" and b.thresholds != plain_thresholds
    # schema 2: a node older than this reads schema 1 only and refuses it (it would ignore the mirror)
    assert b.manifest["schema"] == 2 and Bundle.load(small_bundle_dir).manifest["schema"] == 1

    frames = load_image_folder(digits_dir / "test", (32, 32), limit=40, seed=3).images
    plain = Segment(Bundle.load(small_bundle_dir), "end")
    tta = Segment(b, "end")
    expected = mirror_average(plain.run_batch(frames).logits, plain.run_batch(mirror(frames)).logits)
    assert not np.allclose(expected, plain.run_batch(frames).logits)  # the mirror changes the prediction
    batch = tta.run_batch(frames)
    np.testing.assert_allclose(batch.logits, expected, atol=1e-5)
    np.testing.assert_allclose(softmax(batch.logits).sum(1), 1.0, atol=1e-5)
    one = tta.run(frames[:1])
    np.testing.assert_allclose(one.logits, expected[0], atol=1e-5)
    np.testing.assert_array_equal(one.feature, plain.run(frames[:1]).feature)  # the frame's own feature goes up
    np.testing.assert_allclose(run_chain(bundle, frames)[0], expected, atol=1e-5)
    np.testing.assert_allclose(run_chain(bundle, frames, None)[0], plain.run_batch(frames).logits, atol=1e-5)

    with pytest.raises(ConfigError, match="test-time augmentation, which the firmware does not run"):
        load_end_model(bundle)
    assert load_end_model(bundle, threshold=0.3).threshold == 0.3
    good = (bundle / "manifest.json").read_text()
    for tier, value, message in (("end", "vflip", "must be one of"), ("edge", "hflip", "is for the end segment")):
        m = json.loads(good)
        next(s for s in m["segments"] if s["tier"] == tier)["test_time_augmentation"] = value
        (bundle / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match=message):
            Bundle.load(bundle)


def test_thresholds_from_the_sites_statistics_without_their_frames(small_bundle_dir, digits_dir, tmp_path, capsys):
    """Calibration where the cloud holds no labelled frames (issue 14, "per-site validation
    statistics"): each site runs `calibrate --statistics-out` on its own frames and sends only
    counts by entropy bins; the cloud's `calibrate --site-stats` sums them. The thresholds it
    picks score on the sites' frames exactly what the statistics said (exact on bin edges), and
    close to calibrating on the union of the frames."""
    import json
    import shutil

    from tierlite.bundle import Bundle
    from tierlite.converters import calibrate
    from tierlite.converters.pipeline import run_chain
    from tierlite.data import load_image_folder
    from tierlite.tools.cli import main
    from tierlite.wire import encoded_size

    frames = sorted((digits_dir / "test").rglob("*.jpg"))
    for i, f in enumerate(frames):  # two sites, every other frame
        d = tmp_path / ("site-a" if i % 2 else "site-b") / f.parent.name
        d.mkdir(parents=True, exist_ok=True)
        (d / f.name).symlink_to(f)
    bundle = tmp_path / "bundle"
    shutil.copytree(small_bundle_dir, bundle)
    for site in "ab":
        assert main(["calibrate", str(bundle), "--images", str(tmp_path / f"site-{site}"), "--site", site,
                     "--statistics-out", str(tmp_path / f"{site}.json"), "--report", str(tmp_path / f"r{site}")]) == 0
    stats = [json.loads((tmp_path / f"{s}.json").read_text()) for s in "ab"]
    assert [s["site"] for s in stats] == ["a", "b"] and sum(s["frames"] for s in stats) == len(frames)
    assert all(len(c) == 4 for s in stats for c in s["cells"]) and "images" not in stats[0]  # counts only
    assert main(["calibrate", str(bundle), "--site-stats", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--write"]) == 0
    manifest = Bundle.load(bundle).manifest
    assert manifest["calibration"]["split"] == "site statistics (a, b)"
    assert manifest["calibration"]["frames"] == len(frames)

    union = load_image_folder(digits_dir / "test", (32, 32))
    logits = run_chain(small_bundle_dir, union.images)
    b = Bundle.load(bundle)
    fbytes = (encoded_size(b.segment("end").output("feature").shape, b.encoding),
              encoded_size(b.segment("edge").output("feature").shape, b.encoding))
    said = manifest["calibration"]
    measured = calibrate.evaluate(logits, union.labels, manifest["thresholds"], fbytes)
    assert measured.accuracy == pytest.approx(said["system_accuracy"], abs=1e-12)
    assert measured.fractions == pytest.approx(said["fractions"], abs=1e-12)
    on_frames = calibrate.search_thresholds(logits, union.labels, fbytes, 0.005)
    assert measured.accuracy >= measured.cloud_only_accuracy - 0.005 - 1e-12
    assert abs(measured.camera_fraction - on_frames.camera_fraction) <= 0.03, (measured, on_frames)

    # refused in one line: statistics of another bundle, not statistics, mixed bin counts
    other = dict(stats[0], segments=dict(stats[0]["segments"], end="0" * 64))
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "junk.json").write_text("[1, 2]")
    (tmp_path / "bins.json").write_text(json.dumps(dict(stats[1], bins=50)))
    for files, expected in [(["other.json"], "measured with segments"), (["junk.json"], "not tierlite exit statistics"),
                            (["a.json", "bins.json"], "measured with bins 50"), (["none.json"], "cannot read")]:
        capsys.readouterr()
        assert main(["calibrate", str(bundle), "--site-stats", *(str(tmp_path / f) for f in files)]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, err
