"""Board profiles (firmware_configs/*.yaml): every packaged file validates, the device daemon gets
what it needs from a profile, and a bad board file is one clear ConfigError naming file and field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tierlite.boards import board_names, list_boards, load_board, parse_board
from tierlite.errors import ConfigError

REQUIRED = ["pi4", "pi5", "pi-zero-2w", "coral-usb", "coral-devboard", "esp32s3-eye", "stm32h743-nucleo",
            "nrf52840-dk"]


def test_packaged_boards_cover_the_targets_and_validate():
    names = board_names()
    assert set(REQUIRED) <= set(names)
    boards = {b.name: b for b in list_boards()}
    assert sorted(boards) == names  # each file's name field matches its file name
    for b in boards.values():
        assert b.budget.model <= b.memory.flash and b.budget.arena > 0
        if b.is_mcu:
            assert (b.runtime, b.threads) == ("tflm", 1) and b.toolchain
        else:
            assert b.runtime in ("litert", "edgetpu") and 1 <= b.threads <= b.cores
    # The figures the profiles state for the chips (datasheet values).
    assert boards["esp32s3-eye"].memory.ram == 512 * 1024 and boards["esp32s3-eye"].memory.psram == 8 << 20
    assert boards["esp32s3-eye-psram"].budget.arena_in == "psram"
    assert boards["nrf52840-dk"].memory.ram == 256 * 1024 and boards["nrf52840-dk"].mqtt == "host"
    assert boards["stm32h743-nucleo"].memory.flash == 2 << 20
    assert boards["pi-zero-2w"].memory.ram == 512 << 20


def test_device_gets_runtime_threads_and_camera_from_a_profile(small_bundle_dir):
    from tierlite.bundle import Bundle
    from tierlite.errors import RuntimeUnavailable
    from tierlite.runtimes import open_runtime

    pi4 = load_board("pi4")
    assert (pi4.runtime, pi4.runtime_options()) == ("litert", {"threads": 4})
    assert (pi4.camera.width, pi4.camera.height, pi4.camera.format) == (640, 480, "rgb888")
    bundle = Bundle.load(small_bundle_dir)
    rt = open_runtime(bundle.model_file("end", pi4.runtime), pi4.runtime, pi4.runtime_options())
    assert rt.inputs[0].shape == bundle.input_shape
    coral = load_board("coral-usb")
    assert coral.runtime_options() == {"threads": 4, "device": "usb"}
    # No Edge TPU here: the plugin says so instead of crashing; the plain segment is what loads.
    assert bundle.model_file("end", "edgetpu") == bundle.segment_path("end")
    with pytest.raises(RuntimeUnavailable):
        open_runtime(bundle.segment_path("end"), coral.runtime, coral.runtime_options())


def test_load_board_by_path_and_sizes(tmp_path):
    data = yaml.safe_load((Path(__file__).parents[1] / "firmware_configs" / "esp32s3-eye.yaml").read_text())
    data.update(name="my-board")
    data["budget"]["arena"] = "100.5 KiB"
    data["memory"]["psram"] = 0
    f = tmp_path / "my-board.yaml"
    f.write_text(yaml.safe_dump(data))
    b = load_board(f)
    assert (b.name, b.budget.arena, b.memory.psram, b.source) == ("my-board", 102912, 0, str(f))


def _mutate(path: str, value):
    def apply(d):
        keys = path.split(".")
        for k in keys[:-1]:
            d = d[k]
        if value is KeyError:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value
    return apply


@pytest.mark.parametrize("change, field, words", [
    (_mutate("memory.ram", KeyError), "memory.ram", "missing"),
    (_mutate("runtime.threads", "four"), "runtime.threads", "expected int"),
    (_mutate("memory.flash", "8 MB"), "memory.flash", "KiB|MiB|GiB"),
    (_mutate("budget.arenna", 1024), "budget.arenna", "unknown field"),
    (_mutate("budget.arena", "1 MiB"), "budget.arena", "exceeds"),
    (_mutate("runtime.plugin", "litert"), "runtime.plugin", "must be one of tflm"),
    (_mutate("toolchain", KeyError), "toolchain", "missing"),
    (_mutate("camera.format", "h264"), "camera.format", "must be one of"),
    (_mutate("network", "wifi"), "network", "must be a mapping"),
    (_mutate("cores", 0), "cores", ">= 1"),
])
def test_bad_board_file_is_one_clear_error(tmp_path, change, field, words):
    data = yaml.safe_load((Path(__file__).parents[1] / "firmware_configs" / "esp32s3-eye.yaml").read_text())
    change(data)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_board(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{f}: {field}: ") and words in msg


def test_unreadable_and_unknown_boards(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: x\nkind: [mcu\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+ not valid YAML"):
        load_board(f)
    with pytest.raises(ConfigError, match="unknown board 'pi9'; choose one of .*pi4"):
        load_board("pi9")
    with pytest.raises(ConfigError, match="board file not found"):
        load_board(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level: must be a mapping"):
        parse_board(["not", "a", "mapping"], "list.yaml")
