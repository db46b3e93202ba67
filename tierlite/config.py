"""YAML configs for the device, edge and cloud daemons, validated once at start-up.

Each config is a small dataclass tree. `load_config(path, DeviceConfig)` reads the YAML, refuses
unknown keys (with a did-you-mean), wrong types and missing required keys, resolves relative
paths against the config file's folder and runs each section's checks (ports, files, ranges).
Every problem is a ConfigError naming the file and the key, e.g.
    node.yaml: broker.port: must be 1..65535, got 70000
Examples: docs/RUNTIME.md and examples/*.yaml.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tierlite.errors import ConfigError
from tierlite.update import RetrainTriggerConfig, UpdateConfig
from tierlite.wire import valid_node_id

RUNTIMES = ("litert", "tflite-runtime", "edgetpu", "tflm")


def _port(where: str, value: int | None, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if value is not None and not lo <= value <= 65535:
        raise ConfigError(f"{where}: must be {lo}..65535, got {value}")


def _existing_file(where: str, value: str | None) -> None:
    if value is not None and not Path(value).is_file():
        raise ConfigError(f"{where}: file not found: {value}")


def _threshold(where: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}: a normalized-entropy threshold is in [0, 1], got {value}")


# -- shared sections ---------------------------------------------------------------------------
@dataclass
class TLSConfig:
    ca_file: str | None = None  # CA bundle to verify the broker; None = system CAs
    cert_file: str | None = None  # client certificate (mutual TLS)
    key_file: str | None = None
    insecure: bool = False  # skip hostname verification (self-signed lab brokers only)

    _paths = ("ca_file", "cert_file", "key_file")

    def check(self, where: str) -> None:
        for name in self._paths:
            _existing_file(f"{where}.{name}", getattr(self, name))
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError(f"{where}: cert_file and key_file go together")


@dataclass
class QoSConfig:
    """MQTT QoS per topic kind. 0 by default on the data path: every escalation has a deadline and
    the node falls back on its own answer, so a broker-side retry queue only adds stale traffic."""

    feature: int = 0
    escalate: int = 0
    answer: int = 0
    result: int = 0
    status: int = 1

    def check(self, where: str) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) not in (0, 1, 2):
                raise ConfigError(f"{where}.{f.name}: QoS is 0, 1 or 2, got {getattr(self, f.name)}")


@dataclass
class BrokerConfig:
    host: str = "127.0.0.1"  # or "auto": find the gateway by zeroconf (_mqtt._tcp)
    port: int = 1883
    client_id: str | None = None  # default: tierlite-<role>-<node or pid>
    username: str | None = None
    password: str | None = None
    password_env: str | None = None  # read the password from this environment variable
    tls: TLSConfig | None = None
    keepalive: int = 30
    protocol: Literal["5", "3.1.1"] = "5"  # 3.1.1 only for brokers without v5 (no shared subscriptions)
    reconnect_min: float = 0.2  # seconds; doubles after each failure up to reconnect_max
    reconnect_max: float = 10.0
    max_inflight: int = 1000  # QoS>0 messages awaiting acknowledgement (paho's default 20 throttles)
    max_queued: int = 10000  # messages held while disconnected; beyond this publish() drops
    qos: QoSConfig = field(default_factory=QoSConfig)
    discovery_timeout: float = 3.0  # `auto`: seconds per zeroconf browse attempt
    discovery_interfaces: list[str] | None = None  # `auto`: e.g. ["127.0.0.1"]; None = all
    discovery_match: dict[str, str] | None = None  # `auto`: TXT records the gateway must have, e.g. {bundle: digits-small}

    @property
    def auto(self) -> bool:
        return self.host == "auto"

    def resolved_password(self) -> str | None:
        if self.password_env:
            return os.environ.get(self.password_env)
        return self.password

    def check(self, where: str) -> None:
        if not self.host:
            raise ConfigError(f"{where}.host: empty (a host name, an address, or 'auto')")
        _port(f"{where}.port", self.port)
        if not 5 <= self.keepalive <= 65535:
            raise ConfigError(f"{where}.keepalive: seconds in 5..65535, got {self.keepalive}")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError(f"{where}: need 0 < reconnect_min <= reconnect_max")
        if self.max_inflight < 1 or self.max_queued < 0:
            raise ConfigError(f"{where}: max_inflight >= 1 and max_queued >= 0")
        if self.password and self.password_env:
            raise ConfigError(f"{where}: give password or password_env, not both")
        if self.password_env and self.password_env not in os.environ:
            raise ConfigError(f"{where}.password_env: environment variable {self.password_env} is not set")
        if self.discovery_timeout <= 0:
            raise ConfigError(f"{where}.discovery_timeout: must be > 0")
        if self.tls:
            self.tls.check(f"{where}.tls")
        self.qos.check(f"{where}.qos")


def _check_prefix(where: str, prefix: str) -> None:
    if not prefix or any(c in prefix for c in "+#\0") or prefix.startswith(("/", "$")) or prefix.endswith("/"):
        raise ConfigError(f"{where}: topic prefix {prefix!r} must be plain topic levels, e.g. 'tierlite' or 'site1/cams'")


# -- device -----------------------------------------------------------------------------------
@dataclass
class SourceConfig:
    uri: str  # camera index ("0"), video file, image folder, or rtsp:// / http:// URL
    fps: float | None = None  # cap; None = as fast as the source gives frames
    loop: bool = False  # restart a file/folder at its end
    limit: int | None = None  # stop after this many frames

    _paths = ("uri",)

    def check(self, where: str) -> None:
        if self.fps is not None and self.fps <= 0:
            raise ConfigError(f"{where}.fps: must be > 0")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{where}.limit: must be >= 1")
        u = self.uri
        if not (u.isdigit() or "://" in u or Path(u).exists()):
            raise ConfigError(f"{where}.uri: {u!r} is not a camera index, URL, file or folder that exists")


@dataclass
class DeviceConfig:
    node_id: str
    bundle: str  # bundle directory or .tar.gz
    source: SourceConfig
    prefix: str = "tierlite"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    runtime: str = "litert"
    threads: int = 1
    threshold: float | None = None  # override the bundle's end threshold (0 = escalate every frame)
    deadline_ms: float = 500.0  # wait this long for an answer, then use the end exit's
    wait_for_broker: float = 2.0  # at start, seconds to wait for the broker before serving frames locally
    max_pending: int = 256  # escalations in flight; beyond this a frame falls back at once
    results_file: str | None = None  # also append every result event as one JSON line here
    home_assistant: bool = False  # publish a retained Home Assistant MQTT discovery config
    update: UpdateConfig | None = None  # accept signed model updates (docs/UPDATES.md)

    _paths = ("bundle", "results_file")

    def check(self, where: str) -> None:
        if not valid_node_id(self.node_id):
            raise ConfigError(f"{where}.node_id: {self.node_id!r} must be 1-64 of [A-Za-z0-9_.-], "
                              "not starting with '_' or '.', and not 'update'")
        _existing_path(f"{where}.bundle", self.bundle)
        _check_prefix(f"{where}.prefix", self.prefix)
        self.broker.check(f"{where}.broker")
        self.source.check(f"{where}.source")
        _runtime(f"{where}.runtime", self.runtime)
        _threshold(f"{where}.threshold", self.threshold)
        if self.threads < 1 or self.deadline_ms <= 0 or self.max_pending < 1 or self.wait_for_broker < 0:
            raise ConfigError(f"{where}: threads >= 1, deadline_ms > 0, max_pending >= 1 and wait_for_broker >= 0")
        if self.update is not None:
            self.update.check(f"{where}.update")


def _existing_path(where: str, value: str) -> None:
    if not Path(value).exists():
        raise ConfigError(f"{where}: not found: {value}")


def _runtime(where: str, value: str) -> None:
    if value not in RUNTIMES:
        raise ConfigError(f"{where}: unknown runtime {value!r}; choose one of {', '.join(RUNTIMES)}")


# -- edge ---------------------------------------------------------------------------------------
@dataclass
class MosquittoConfig:
    managed: bool = True  # start and supervise Mosquitto; false = use `broker` as it is
    binary: str = "mosquitto"  # name on PATH or a path
    bind: str = "127.0.0.1"  # listener address ("0.0.0.0" for a real site network)
    port: int = 1883
    state_dir: str | None = None  # generated config, pid and log; default a temp folder
    password_file: str | None = None  # mosquitto_passwd file; none = anonymous access
    max_queued_messages: int = 10000  # mosquitto's default 1000 overflows under bursts
    message_size_limit: int = 1048576
    restart_limit: int = 5  # restarts within 60 s before the gateway gives up

    _paths = ("binary", "state_dir", "password_file")

    def check(self, where: str) -> None:
        _port(f"{where}.port", self.port, allow_zero=False)
        _existing_file(f"{where}.password_file", self.password_file)


@dataclass
class BridgeConfig:
    """The edge Mosquitto's bridge to a cloud broker: escalations go out, answers come in."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: TLSConfig | None = None
    keepalive: int = 30
    client_id: str | None = None
    qos: int = 0

    def check(self, where: str) -> None:
        _port(f"{where}.port", self.port)
        if self.tls:
            self.tls.check(f"{where}.tls")
        if self.qos not in (0, 1, 2):
            raise ConfigError(f"{where}.qos: 0, 1 or 2")


@dataclass
class CloudLinkConfig:
    mode: Literal["local", "bridge"] = "local"  # local: the cloud worker uses the edge broker
    bridge: BridgeConfig | None = None

    def check(self, where: str) -> None:
        if self.mode == "bridge" and self.bridge is None:
            raise ConfigError(f"{where}: mode 'bridge' needs a 'bridge' section (host, port, ...)")
        if self.bridge:
            self.bridge.check(f"{where}.bridge")


@dataclass
class DiscoveryConfig:
    advertise: bool = True
    name: str | None = None  # service instance name; default tierlite-<hostname>
    interfaces: list[str] | None = None  # e.g. ["127.0.0.1"]; None = all interfaces
    address: str | None = None  # address to advertise; default the listener's (or this host's)


@dataclass
class EdgeConfig:
    bundle: str
    prefix: str = "tierlite"
    gateway_id: str = "edge"
    broker: BrokerConfig = field(default_factory=BrokerConfig)  # how workers connect
    mosquitto: MosquittoConfig = field(default_factory=MosquittoConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    cloud: CloudLinkConfig = field(default_factory=CloudLinkConfig)
    workers: int = 1
    share_group: str = "tierlite-edge"
    runtime: str = "litert"
    threads: int = 1
    threshold: float | None = None  # override the bundle's edge threshold (1 = answer every frame)
    forward_end_feature: bool = True  # send the node's feature up too (hard-example store)
    metrics_port: int | None = 9464  # Prometheus /metrics; null = off; 0 = any free port
    metrics_bind: str = "127.0.0.1"
    update: UpdateConfig | None = None  # accept signed edge-segment updates (docs/UPDATES.md)

    _paths = ("bundle",)

    def check(self, where: str) -> None:
        _existing_path(f"{where}.bundle", self.bundle)
        _check_prefix(f"{where}.prefix", self.prefix)
        self.broker.check(f"{where}.broker")
        self.mosquitto.check(f"{where}.mosquitto")
        self.cloud.check(f"{where}.cloud")
        _runtime(f"{where}.runtime", self.runtime)
        _threshold(f"{where}.threshold", self.threshold)
        _port(f"{where}.metrics_port", self.metrics_port, allow_zero=True)
        if not 1 <= self.workers <= 64:
            raise ConfigError(f"{where}.workers: 1..64, got {self.workers}")
        if self.workers > 1 and self.broker.protocol != "5":
            raise ConfigError(f"{where}.workers: several workers need MQTT 5 shared subscriptions (broker.protocol: '5')")
        if not self.share_group or any(c in self.share_group for c in "/+#"):
            raise ConfigError(f"{where}.share_group: a single topic level without + or #")
        if not valid_node_id(self.gateway_id):
            raise ConfigError(f"{where}.gateway_id: 1-64 of [A-Za-z0-9_.-]")
        if self.update is not None:
            self.update.check(f"{where}.update")


# -- cloud --------------------------------------------------------------------------------------
@dataclass
class StoreConfig:
    path: str = "hard_examples.sqlite"
    batch: int = 64  # rows per commit
    flush_interval: float = 0.5  # seconds; commit a partial batch after this long
    enabled: bool = True

    _paths = ("path",)

    def check(self, where: str) -> None:
        if self.batch < 1 or self.flush_interval <= 0:
            raise ConfigError(f"{where}: batch >= 1 and flush_interval > 0")
        parent = Path(self.path).parent
        if not parent.is_dir():
            raise ConfigError(f"{where}.path: folder {parent} does not exist")


@dataclass
class CloudConfig:
    bundle: str
    prefix: str = "tierlite"
    worker_id: str = "cloud"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    share_group: str = "tierlite-cloud"
    runtime: str = "litert"
    threads: int = 1
    store: StoreConfig = field(default_factory=StoreConfig)
    metrics_port: int | None = 9465
    metrics_bind: str = "127.0.0.1"
    retrain: RetrainTriggerConfig | None = None  # co-updating: scheduled `tierlite retrain` (docs/UPDATES.md)

    _paths = ("bundle",)

    def check(self, where: str) -> None:
        _existing_path(f"{where}.bundle", self.bundle)
        _check_prefix(f"{where}.prefix", self.prefix)
        self.broker.check(f"{where}.broker")
        _runtime(f"{where}.runtime", self.runtime)
        self.store.check(f"{where}.store")
        _port(f"{where}.metrics_port", self.metrics_port, allow_zero=True)
        if not self.share_group or any(c in self.share_group for c in "/+#"):
            raise ConfigError(f"{where}.share_group: a single topic level without + or #")
        if not valid_node_id(self.worker_id):
            raise ConfigError(f"{where}.worker_id: 1-64 of [A-Za-z0-9_.-]")
        if self.retrain is not None:
            self.retrain.check(f"{where}.retrain")
            if not self.store.enabled:
                raise ConfigError(f"{where}.retrain: needs the hard-example store (store.enabled: true)")


# -- loading ------------------------------------------------------------------------------------
T = typing.TypeVar("T")


def load_config(path: str | Path, cls: type[T]) -> T:
    """Read, type-check and validate a YAML config; ConfigError (one line) on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    return config_from_dict(data if data is not None else {}, cls, where=path.name, base=path.parent)


def config_from_dict(data: Any, cls: type[T], where: str = "config", base: Path | None = None) -> T:
    cfg = _build(cls, data, where, base or Path.cwd())
    cfg.check(where)  # type: ignore[attr-defined]
    return cfg


def _build(cls: type, data: Any, where: str, base: Path) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        at = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                raise ConfigError(f"{at}: required key missing")
            continue
        value = _coerce(hints[name], data[name], at, base)
        if value is not None and name in getattr(cls, "_paths", ()):
            value = _resolve(value, base, program=name == "binary")
        kwargs[name] = value
    return cls(**kwargs)


def _resolve(value: str, base: Path, program: bool = False) -> str:
    """Relative paths are relative to the config file. URLs and camera indexes stay as they are,
    and so does a bare program name (looked up on PATH)."""
    p = Path(value).expanduser()
    if "://" in value or value.isdigit() or (program and "/" not in value):
        return value
    return str(p if p.is_absolute() else (base / p).resolve())


def _coerce(tp: Any, value: Any, where: str, base: Path) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, base)
    if origin is Literal:
        value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {_coerce(args[0], k, f"{where} key", base): _coerce(args[1], v, f"{where}.{k}", base)
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{where}[{i}]", base) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, base)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value
