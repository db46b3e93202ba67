"""The camera daemon in-process, without a broker: frame sources (image folder, video file, fps
cap), local fallback with one result per frame, and a model hot swap between frames."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest


def _device_config(tmp_path: Path, bundle: Path, frames: Path, **extra):
    from runtime_support import free_port

    from tierlite.config import DeviceConfig, config_from_dict

    return config_from_dict({
        "node_id": "local", "bundle": str(bundle), "source": {"uri": str(frames)},
        "broker": {"port": free_port()},  # nothing listens there
        "wait_for_broker": 0, "results_file": str(tmp_path / "results.jsonl"), **extra}, DeviceConfig, "node", tmp_path)


def test_frame_sources_folder_video_and_fps_cap(tmp_path, digits_dir):
    import cv2

    from tierlite.config import SourceConfig
    from tierlite.data import decode_image
    from tierlite.device.sources import FrameSource

    folder = tmp_path / "frames"
    src = sorted((digits_dir / "test" / "3").glob("*.jpg"))[:6]
    for p in src:
        (folder / "3").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, folder / "3" / p.name)
    (folder / "3" / "zz-broken.jpg").write_bytes(b"not a jpeg")
    frames = list(FrameSource(SourceConfig(uri=str(folder)), (32, 32)))
    assert [Path(f.ref).name for f in frames] == [p.name for p in src]  # sorted; the broken one skipped
    assert np.array_equal(frames[0].image, decode_image(src[0], (32, 32)))  # as training frames are prepared

    looped = FrameSource(SourceConfig(uri=str(folder), loop=True, limit=15, fps=50), (32, 32))
    t0 = time.monotonic()
    assert len(list(looped)) == 15 and looped.skipped == 2  # 6 + 6 + 3 frames: the broken file seen twice
    assert time.monotonic() - t0 >= 14 / 50 * 0.9  # the cap holds

    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(12):
        writer.write(np.full((48, 64, 3), i * 20, np.uint8))
    writer.release()
    clip = list(FrameSource(SourceConfig(uri=str(video)), (32, 32)))
    assert len(clip) == 12 and clip[0].image.shape == (32, 32, 3) and clip[0].ref is None


def test_offline_node_answers_every_frame_locally_and_swaps_models(tmp_path, digits_dir, small_bundle_dir,
                                                                  binary_bundle_dir):
    from tierlite.bundle import Bundle
    from tierlite.device.daemon import DeviceDaemon
    from tierlite.device.sources import FrameSource

    cfg = _device_config(tmp_path, small_bundle_dir, digits_dir / "test" / "5", threshold=0.0)
    daemon = DeviceDaemon(cfg)
    events = []
    daemon.add_result_listener(events.append)
    daemon.start()
    frames = list(FrameSource(cfg.source, daemon._model.size))[:20]
    for f in frames[:10]:
        daemon.process_frame(f.image, f.ref)
    new = Bundle.load(binary_bundle_dir)
    daemon.swap_bundle(new)  # between two frames
    for f in frames[10:]:
        daemon.process_frame(f.image, f.ref)
    with pytest.raises(Exception):
        daemon.swap_bundle(Bundle.load(tmp_path / "missing"))  # a bad update leaves the model running
    daemon.process_frame(frames[0].image, frames[0].ref)
    daemon.shutdown()
    assert [e["frame"] for e in events] == list(range(21))
    assert all(e["tier"] == "end" and e["fallback"] and e["reason"] == "offline" for e in events)
    assert {e["model"] for e in events[:10]} == {Bundle.load(small_bundle_dir).name}
    assert {e["model"] for e in events[10:]} == {new.name}
    lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert lines == events
    assert daemon.status()["frames"] == 21


def test_drift_alarm_lowers_the_camera_threshold_by_the_configured_scale(tmp_path, digits_dir, small_bundle_dir):
    """`drift.alarm_threshold_scale`: once the node's own drift monitor raises an alarm (a real
    one: the low-light corruption of the drift bench), the camera exit's threshold is scaled, so
    more frames go on to the deeper tiers; before the alarm, and at scale 1, nothing changes."""
    from tierlite.bundle import Bundle
    from tierlite.data import load_image_folder
    from tierlite.device.daemon import DeviceDaemon
    from tierlite.tools.bench.corruptions import corrupt

    frames = corrupt(load_image_folder(digits_dir / "test", (32, 32), limit=200, seed=4).images, "low_light", 3)
    threshold = Bundle.load(small_bundle_dir).thresholds["end"]
    runs = {}
    for scale in (1.0, 0.25):
        (tmp_path / str(scale)).mkdir()
        cfg = _device_config(tmp_path / str(scale), small_bundle_dir, digits_dir / "test",
                             drift={"alarm_threshold_scale": scale})
        daemon = DeviceDaemon(cfg)
        events, in_use = [], []
        daemon.add_result_listener(events.append)
        daemon.start()
        for img in frames:
            in_use.append((daemon.status()["drift"]["alarm"], daemon.threshold_in_use))
            daemon.process_frame(img)
        daemon.shutdown()
        runs[scale] = (events, in_use)
    (plain, plain_use), (scaled, scaled_use) = runs[1.0], runs[0.25]
    first = next(i for i, (alarm, _) in enumerate(scaled_use) if alarm)  # frames decided while in alarm
    assert 0 < first < 150, "the low-light stream raises the node's drift alarm"
    assert all(t == pytest.approx(threshold) for _, t in plain_use)
    assert all(t == pytest.approx(threshold * (0.25 if alarm else 1.0)) for alarm, t in scaled_use)
    sent_on = [sum(e["reason"] == "offline" for e in ev[first:]) for ev in (plain, scaled)]
    assert [e["reason"] for e in plain[:first]] == [e["reason"] for e in scaled[:first]]
    assert sent_on[1] > sent_on[0], sent_on  # frames that would have gone to the edge (offline here: answered locally)


def test_results_file_folder_is_made_and_an_unwritable_one_is_one_line(tmp_path, small_bundle_dir, digits_dir):
    from tierlite.device.daemon import DeviceDaemon
    from tierlite.errors import ConfigError

    cfg = _device_config(tmp_path, small_bundle_dir, digits_dir / "test" / "5")
    nested = tmp_path / "new" / "deeper" / "results.jsonl"
    daemon = DeviceDaemon(cfg.model_copy(update={"results_file": nested}))
    daemon.shutdown()
    assert nested.parent.is_dir()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="results_file .*: cannot append to it"):
        DeviceDaemon(cfg.model_copy(update={"results_file": tmp_path / "file" / "results.jsonl"}))
