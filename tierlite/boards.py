"""Board profiles: one YAML per target in firmware_configs/ (package tierlite.firmware_configs).

A profile says what a camera node is made of (CPU, accelerator, memory, camera, network) and what
tierlite may use of it: a flash budget for the model and a RAM budget for the tensor arena, the
runtime plugin and its threads. `tierlite firmware` checks a model against the budgets;
`tierlite device --board NAME` takes the runtime plugin, its threads and options from it (the
camera block states the capture the budgets assume).

    board = load_board("pi4")               # a packaged profile, or a path to your own YAML
    open_runtime(model, board.runtime, board.runtime_options())

Sizes in YAML are integers (bytes) or "<n> KiB|MiB|GiB" (binary units, as chip datasheets mean them).
Every error is a ConfigError naming the file and the field.
"""
from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tierlite.errors import ConfigError

PACKAGE = "tierlite.firmware_configs"
KINDS = ("mcu", "linux")  # mcu: TFLite Micro firmware; linux: tierlite device daemon
MCU_RUNTIMES = ("tflm",)
LINUX_RUNTIMES = ("litert", "tflite-runtime", "edgetpu")
TOOLCHAINS = ("esp-idf", "stm32cube", "zephyr")
ARENA_PLACES = ("sram", "psram", "sdram", "ram")
CAMERA_FORMATS = ("rgb888", "bgr888", "rgb565", "yuyv", "yuv420", "jpeg", "mjpeg", "grayscale")
MQTT_MODES = ("self", "host")  # self: the board speaks MQTT itself; host: a gateway relays for it
# Where a power figure comes from: a datasheet's typical figure, a measurement (say by whom, how),
# or an upper bound (a supply or absolute-maximum rating) where no typical figure is documented.
POWER_BASES = ("datasheet", "measured", "upper-bound")
_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


@dataclass(frozen=True)
class Memory:
    flash: int  # on-chip or module flash (Linux boards: the storage the model files live on)
    ram: int  # on-chip SRAM (Linux boards: DRAM)
    psram: int = 0  # external PSRAM/SDRAM the firmware can map, 0 if none


@dataclass(frozen=True)
class Budget:
    model: int  # bytes of flash/storage the model may take
    arena: int  # bytes of RAM for the tensor arena (Linux: the interpreter's working memory)
    arena_in: str = "ram"  # where the arena lives: sram, psram, sdram, ram


@dataclass(frozen=True)
class Camera:
    sensor: str
    interface: str
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class PowerFigure:
    """The node's power draw for the planner's device-energy objective (tierlite plan --board)."""

    active_w: float  # while computing
    basis: str  # one of POWER_BASES
    source: str  # document and table, or who measured it and how
    radio_w: float | None = None  # while sending, if documented apart; else active_w applies

    @property
    def sending_w(self) -> float:
        return self.active_w if self.radio_w is None else self.radio_w


@dataclass(frozen=True)
class Board:
    name: str
    title: str
    kind: str
    module: str
    cpu: str
    cores: int
    accelerator: str  # "none" when the CPU does the work
    memory: Memory
    budget: Budget
    runtime: str  # runtime plugin key (tierlite.runtimes.PLUGINS)
    threads: int
    camera: Camera
    mqtt: str  # "self" or "host"
    link: str  # wifi, ethernet, ble, ...
    toolchain: str = ""  # mcu only: esp-idf, stm32cube, zephyr
    options: dict[str, Any] = field(default_factory=dict)  # extra runtime plugin options
    notes: str = ""
    source: str = ""  # the YAML file it came from
    power: PowerFigure | None = None  # None: no figure documented for this board

    @property
    def is_mcu(self) -> bool:
        return self.kind == "mcu"

    def runtime_options(self) -> dict[str, Any]:
        """Options for open_runtime(path, board.runtime, options): threads plus plugin extras."""
        return {"threads": self.threads, **self.options}


def board_names() -> list[str]:
    """Names of the packaged profiles."""
    root = importlib.resources.files(PACKAGE)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def list_boards() -> list[Board]:
    return [load_board(n) for n in board_names()]


def load_board(name_or_path: str | Path) -> Board:
    """A packaged profile by name ("pi4", "esp32s3-eye", ...) or any board YAML by path."""
    text, where = _read(str(name_or_path))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}:{at} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    return parse_board(data, where)


def _read(name_or_path: str) -> tuple[str, str]:
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.parent != Path("."):
        if not path.is_file():
            raise ConfigError(f"board file not found: {path}")
        return path.read_text(), str(path)
    resource = importlib.resources.files(PACKAGE) / f"{name_or_path}.yaml"
    if not resource.is_file():
        raise ConfigError(f"unknown board {name_or_path!r}; choose one of {', '.join(board_names())} "
                          "or give a path to a board YAML")
    return resource.read_text(), f"firmware_configs/{name_or_path}.yaml"


# -- validation ---------------------------------------------------------------------------------
class _Fields:
    """Reads one YAML mapping, naming file and dotted field in every error; rejects unknown keys."""

    def __init__(self, data: Any, where: str, prefix: str = ""):
        self.where, self.prefix = where, prefix
        if not isinstance(data, dict):
            raise self.error("", f"must be a mapping, got {type(data).__name__}")
        self.data = data
        self.used: set[str] = set()

    def error(self, key: str, msg: str) -> ConfigError:
        name = f"{self.prefix}{key}" if key else (self.prefix.rstrip(".") or "top level")
        return ConfigError(f"{self.where}: {name}: {msg}")

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = ...) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self.error(key, "missing")
            return default
        value = self.data[key]
        if not isinstance(value, typ) or (isinstance(value, bool) and bool not in (typ, object)):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise self.error(key, f"expected {names}, got {value!r}")
        return value

    def text(self, key: str, default: Any = ..., choices: tuple[str, ...] | None = None) -> str:
        value = self.get(key, str, default)
        if choices and value not in choices and (default is ... or value != default):
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def watts(self, key: str, default: Any = ...) -> float | None:
        value = self.get(key, (int, float), default)
        if value is not None and not value > 0:
            raise self.error(key, f"must be > 0 watts, got {value!r}")
        return None if value is None else float(value)

    def positive(self, key: str, default: Any = ...) -> int:
        value = self.get(key, int, default)
        if value < 1:
            raise self.error(key, f"must be >= 1, got {value}")
        return value

    def size(self, key: str, default: Any = ...) -> int:
        value = self.get(key, (int, str), default)
        if isinstance(value, int):
            n = value
        else:
            m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]iB|B)?\s*", value, flags=re.IGNORECASE)
            if not m:
                raise self.error(key, f"expected bytes as an integer or '<n> KiB|MiB|GiB', got {value!r}")
            n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
        if n < 0:
            raise self.error(key, f"must be >= 0, got {value!r}")
        return n

    def sub(self, key: str) -> "_Fields":
        value = self.get(key, object)
        if not isinstance(value, dict):
            raise self.error(key, f"must be a mapping, got {value!r}")
        return _Fields(value, self.where, f"{self.prefix}{key}.")

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown field (typo?)")


def parse_board(data: Any, where: str = "board.yaml") -> Board:
    """Validate one board mapping. Raises ConfigError('<file>: <field>: <problem>')."""
    top = _Fields(data, where)
    name = top.text("name")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise top.error("name", f"use lowercase letters, digits and '-', got {name!r}")
    kind = top.text("kind", choices=KINDS)

    mem = top.sub("memory")
    memory = Memory(flash=mem.size("flash"), ram=mem.size("ram"), psram=mem.size("psram", 0))
    mem.done()

    bud = top.sub("budget")
    budget = Budget(model=bud.size("model"), arena=bud.size("arena"),
                    arena_in=bud.text("arena_in", "ram", ARENA_PLACES))
    bud.done()
    if budget.model > memory.flash:
        raise bud.error("model", f"{budget.model} bytes exceeds memory.flash ({memory.flash} bytes)")
    arena_pool = memory.psram if budget.arena_in in ("psram", "sdram") else memory.ram
    if budget.arena > arena_pool:
        raise bud.error("arena", f"{budget.arena} bytes exceeds the {budget.arena_in} it lives in "
                                 f"({arena_pool} bytes)")

    rt = top.sub("runtime")
    runtime = rt.text("plugin", choices=MCU_RUNTIMES if kind == "mcu" else LINUX_RUNTIMES)
    threads = rt.positive("threads", 1)
    options = rt.get("options", dict, {})
    rt.done()

    cam = top.sub("camera")
    camera = Camera(sensor=cam.text("sensor"), interface=cam.text("interface"), width=cam.positive("width"),
                    height=cam.positive("height"), format=cam.text("format", choices=CAMERA_FORMATS))
    cam.done()

    net = top.sub("network")
    mqtt, link = net.text("mqtt", choices=MQTT_MODES), net.text("link")
    net.done()

    power = None
    if top.data.get("power") is not None:
        pw = top.sub("power")
        power = PowerFigure(active_w=pw.watts("active_w"), basis=pw.text("basis", choices=POWER_BASES),
                            source=pw.text("source").strip(), radio_w=pw.watts("radio_w", None))
        pw.done()
        if not power.source:
            raise pw.error("source", "say where the figure comes from (datasheet and table, or who measured it)")
    else:
        top.used.add("power")

    toolchain = top.text("toolchain", "", TOOLCHAINS if kind == "mcu" else None)
    if kind == "mcu" and not toolchain:
        raise top.error("toolchain", f"missing (a microcontroller board needs one of {', '.join(TOOLCHAINS)})")
    cores = top.positive("cores")
    if threads > cores:
        raise rt.error("threads", f"{threads} threads on a {cores}-core CPU")
    board = Board(
        name=name, title=top.text("title"), kind=kind, module=top.text("module"), cpu=top.text("cpu"),
        cores=cores, accelerator=top.text("accelerator", "none"), memory=memory, budget=budget,
        runtime=runtime, threads=threads, camera=camera, mqtt=mqtt, link=link, toolchain=toolchain,
        options=options, notes=top.text("notes", "").strip(), source=where, power=power,
    )
    top.done()
    stem = Path(where).stem
    if where.startswith("firmware_configs/") and stem != name:
        raise top.error("name", f"{name!r} differs from the file name {stem!r}")
    return board


def format_bytes(n: int) -> str:
    """Human-readable size in binary units: 98496 -> '96.2 KiB'."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"

