"""YAML configs for the device, edge and cloud daemons: pydantic v2 models, validated once at start-up.

`load_config(path, DeviceConfig)` reads the YAML and raises one ConfigError listing every problem,
one line each, with its YAML path, the bad value and, for an unknown key, the nearest valid one:
    node.yaml.broker.port: must be 1..65535, got 70000
Relative paths resolve against the config file's folder. Examples: docs/RUNTIME.md, docs/examples/.
"""
from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError,
                      ValidationInfo, field_validator, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from tierlite.errors import ConfigError
from tierlite.topics import valid_node_id

__all__ = [
    "load_config", "config_from_dict", "RUNTIMES", "MAX_ARTIFACT_BYTES",
    "TLSConfig", "QoSConfig", "BrokerConfig", "UpdateConfig", "RetrainTriggerConfig", "SourceConfig", "DeviceConfig",
    "ListenerTLSConfig", "MosquittoConfig", "BridgeConfig", "CloudLinkConfig", "DiscoveryConfig", "EdgeConfig", "StoreConfig", "CloudConfig",
    "NodeBudgetConfig", "MetricsLabelsConfig", "HomeAssistantConfig",
]

RUNTIMES = ("litert", "tflite-runtime", "edgetpu", "tflm")
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024  # default cap on one update artifact


def _problem(message: str) -> PydanticCustomError:
    """A domain-check failure, worded as the user reads it (see _describe)."""
    return PydanticCustomError("config", "{message}", {"message": message})


def _check(ok: typing.Callable[[Any], bool], message: str) -> AfterValidator:
    """A field check: `message` is formatted with the value as {v}."""
    def check(value: Any) -> Any:
        if not ok(value):
            raise _problem(message.format(v=value))
        return value
    return AfterValidator(check)


def _resolve(value: str, base: Path, program: bool = False) -> str:
    """Relative paths are relative to the config file. URLs and camera indexes stay as they are,
    and so does a bare program name (looked up on PATH)."""
    p = Path(value).expanduser()
    if "://" in value or value.isdigit() or (program and "/" not in value):
        return value
    return str(p if p.is_absolute() else (base / p).resolve())


def _relative(program: bool = False) -> AfterValidator:
    def resolve(value: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base")
        return _resolve(value, base, program) if base is not None else value
    return AfterValidator(resolve)


def _prefix_ok(p: str) -> bool:
    return bool(p) and not any(c in p for c in "+#\0") and not p.startswith(("/", "$")) and not p.endswith("/")


# YAML reads `node_id: 7` as a number: string fields take numbers as their text.
Text = Annotated[str, Strict(False)]
RelPath = Annotated[Text, _relative()]
ExistingPath = Annotated[RelPath, _check(lambda v: Path(v).exists(), "not found: {v}")]
ExistingFile = Annotated[RelPath, _check(lambda v: Path(v).is_file(), "file not found: {v}")]
Port = Annotated[int, _check(lambda v: 1 <= v <= 65535, "must be 1..65535, got {v}")]
PortOrZero = Annotated[int, _check(lambda v: 0 <= v <= 65535, "must be 0..65535, got {v}")]
QoS = Annotated[int, _check(lambda v: v in (0, 1, 2), "QoS is 0, 1 or 2, got {v}")]
Threshold = Annotated[float, _check(lambda v: 0.0 <= v <= 1.0,
                                    "a normalized-entropy threshold is in [0, 1], got {v}")]
Share = Annotated[float, _check(lambda v: 0.0 <= v <= 1.0, "a share in [0, 1], got {v!r}")]
Runtime = Annotated[Text, _check(lambda v: v in RUNTIMES,
                                 "unknown runtime {v!r}; choose one of " + ", ".join(RUNTIMES))]
Prefix = Annotated[Text, _check(_prefix_ok,
                                "topic prefix {v!r} must be plain topic levels, e.g. 'tierlite' or 'site1/cams'")]
ShareGroup = Annotated[Text, _check(lambda v: bool(v) and not any(c in v for c in "/+#"),
                                    "a single topic level without + or #, got {v!r}")]
NodeId = Annotated[Text, _check(valid_node_id, "{v!r} must be 1-64 of [A-Za-z0-9_.-], not starting with '_' or '.', "
                                               "and not 'update'")]
EnvVar = Annotated[Text, _check(lambda v: v in os.environ, "environment variable {v} is not set")]
Positive = Annotated[float, Field(gt=0)]
AtLeastOne = Annotated[int, Field(ge=1)]
# YAML reads `protocol: 5` as a number.
MqttProtocol = Annotated[Literal["5", "3.1.1"], BeforeValidator(lambda v: str(v) if type(v) is int else v)]


class Section(BaseModel):
    """Base of every section: unknown keys refused, no type coercion (YAML `'1883'` is no port).

    Checks that involve several keys go in `cross_checks`, not in a pydantic after-validator:
    pydantic skips those as soon as any field fails, so a user fixing one line would meet the next
    problem only on the next run. `cross_checks` runs on the validated values, or on the raw ones
    (with the defaults) when a field failed, and every problem is one line of its own."""

    model_config = ConfigDict(extra="forbid", strict=True, coerce_numbers_to_str=True, frozen=True)

    @classmethod
    def cross_checks(cls, values: dict[str, Any]) -> list[tuple[str | None, str]]:
        """(key or None for the section, problem) pairs. `values` may be raw YAML: check types first."""
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _every_problem(cls, data: Any, handler: Any) -> Any:
        try:
            model, failed = handler(data), None
        except ValidationError as e:
            model, failed = None, e
        if model is not None:
            values = dict(model)
        elif isinstance(data, dict):
            values = {**{k: f.get_default(call_default_factory=True) for k, f in cls.model_fields.items()
                         if not f.is_required()}, **data}
        else:
            raise failed  # not a mapping: nothing more to check
        try:
            found = cls.cross_checks(values)
        except (KeyError, TypeError, ValueError):
            if failed is None:
                raise
            found = []  # raw values too broken to compare: their own field errors say why
        problems = [InitErrorDetails(type=_problem(msg), loc=(key,) if key else (), input=values.get(key, data))
                    for key, msg in found]
        if not problems:
            if failed is not None:
                raise failed
            return model
        raise ValidationError.from_exception_data(cls.__name__, [*_reraisable(failed), *problems])


def _reraisable(failed: ValidationError | None) -> list[InitErrorDetails]:
    """The errors of `failed`, rebuilt so they can be raised again together with more."""
    out = []
    for err in failed.errors(include_url=False) if failed is not None else ():
        ctx = err.get("ctx") or {}
        if err["type"] == "config":
            kind: Any = _problem(ctx["message"])
        else:
            kind = err["type"]
            try:  # a pydantic error type rebuilt from its context (keeps _describe's wording)
                ValidationError.from_exception_data("probe", [InitErrorDetails(type=kind, loc=(), input=None, ctx=ctx)])
            except (KeyError, TypeError, ValueError):
                kind = PydanticCustomError(err["type"], err["msg"].replace("{", "{{").replace("}", "}}"))
        detail = InitErrorDetails(type=kind, loc=tuple(err["loc"]), input=err.get("input"))
        if ctx and isinstance(kind, str):
            detail["ctx"] = ctx
        out.append(detail)
    return out


def _number(v: Any) -> float | None:
    """A raw YAML value as a number, or None (its own field reports the wrong type)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _get(section: Any, key: str) -> Any:
    """A key of a sub-section, validated (a model) or raw (a dict)."""
    return section.get(key) if isinstance(section, dict) else getattr(section, key, None)


# -- shared sections ---------------------------------------------------------------------------
class TLSConfig(Section):
    ca_file: ExistingFile | None = None  # CA bundle to verify the broker; None = system CAs
    cert_file: ExistingFile | None = None  # client certificate (mutual TLS)
    key_file: ExistingFile | None = None
    insecure: bool = False  # skip hostname verification (self-signed lab brokers only)

    @classmethod
    def cross_checks(cls, v: dict[str, Any]) -> list[tuple[str | None, str]]:
        return [(None, "cert_file and key_file go together")] if bool(v["cert_file"]) != bool(v["key_file"]) else []


MQTT_TLS_PORT = 8883  # IANA's MQTT-over-TLS port: plain MQTT to it hangs in the TLS handshake


def _tls_port_check(v: dict[str, Any]) -> list[tuple[str | None, str]]:
    if v.get("port") == MQTT_TLS_PORT and v.get("tls") is None:
        return [("port", f"port {MQTT_TLS_PORT} is MQTT over TLS: add a 'tls' section (ca_file: ... or {{}} for "
                         "the system CAs), or use the plain port 1883")]
    return []


class QoSConfig(Section):
    """MQTT QoS per topic kind. 0 by default on the data path: every escalation has a deadline and
    the node falls back on its own answer, so a broker-side retry queue only adds stale traffic."""

    feature: QoS = 0
    escalate: QoS = 0
    answer: QoS = 0
    result: QoS = 0
    status: QoS = 1


class BrokerConfig(Section):
    model_config = ConfigDict(frozen=False)  # the edge gateway points its workers at its own broker

    # a host name, an address, or "auto": find the gateway by zeroconf (_mqtt._tcp)
    host: Annotated[Text, _check(bool, "empty (a host name, an address, or 'auto')")] = "127.0.0.1"
    port: Port = 1883
    client_id: Text | None = None  # default: tierlite-<role>-<node or pid>
    username: Text | None = None
    password: Text | None = None
    password_env: EnvVar | None = None  # read the password from this environment variable
    tls: TLSConfig | None = None
    keepalive: Annotated[int, _check(lambda v: 5 <= v <= 65535, "seconds in 5..65535, got {v}")] = 30
    protocol: MqttProtocol = "5"  # 3.1.1 only for brokers without v5 (no shared subscriptions)
    reconnect_min: Positive = 0.2  # seconds; doubles after each failure up to reconnect_max
    reconnect_max: Positive = 10.0
    max_inflight: AtLeastOne = 1000  # QoS>0 messages awaiting acknowledgement (paho's default 20 throttles)
    max_queued: Annotated[int, Field(ge=0)] = 10000  # held while disconnected; beyond this publish() drops
    qos: QoSConfig = Field(default_factory=QoSConfig)
    discovery_timeout: Positive = 3.0  # `auto`: seconds per zeroconf browse attempt
    discovery_interfaces: list[Text] | None = None  # `auto`: e.g. ["127.0.0.1"]; None = all
    # `auto`: TXT records the gateway must have, e.g. {bundle: digits-small}
    discovery_match: dict[Text, Text] | None = None

    @property
    def auto(self) -> bool:
        return self.host == "auto"

    def resolved_password(self) -> str | None:
        if self.password_env:
            return os.environ.get(self.password_env)
        return self.password

    @classmethod
    def cross_checks(cls, v: dict[str, Any]) -> list[tuple[str | None, str]]:
        problems: list[tuple[str | None, str]] = []
        low, high = _number(v["reconnect_min"]), _number(v["reconnect_max"])
        if low is not None and high is not None and low > high:
            problems.append((None, f"need reconnect_min <= reconnect_max, got {low} > {high}"))
        if v["password"] and v["password_env"]:
            problems.append((None, "give password or password_env, not both"))
        return problems + _tls_port_check(v)


# -- updates ------------------------------------------------------------------------------------
def _public_keys(trusted_keys: str) -> list:
    from tierlite.update import load_public_key  # lazy: tierlite.update imports this module

    path = Path(trusted_keys)
    files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"no *.pub file in {path}")
    return [load_public_key(f) for f in files]


def _loads_keys(value: str) -> str:
    try:
        _public_keys(value)  # fail at start-up, not when the first update arrives
    except ConfigError as e:
        raise _problem(str(e)) from None
    return value


class UpdateConfig(Section):
    """The `update:` section of a device or edge config (docs/UPDATES.md).

        update:
          trusted_keys: keys/update.pub   # a public key, or a folder of *.pub (key rotation)
          state_dir: models/              # kept versions and state.json
    """
    trusted_keys: Annotated[RelPath, AfterValidator(_loads_keys)]
    state_dir: Annotated[RelPath, _check(lambda v: Path(v).is_dir() or not Path(v).exists(), "{v} is not a folder")]
    enabled: bool = True
    recent_frames: AtLeastOne = 64  # recent inputs kept for the shadow check
    # Top-1 agreement on recent frames the current model was sure of. Not higher: under drift the
    # current model is often sure and wrong, and the update exists to disagree there; a broken
    # or mislabelled model agrees on ~1/classes of them.
    min_agreement: Share = 0.5
    max_shadow_escalation_increase: Share = 0.25  # candidate's escalation rate on recent frames vs current
    watch_frames: AtLeastOne = 100  # frames served by a new version before it is confirmed
    watch_seconds: Positive = 120.0  # ... or this long, whichever comes first
    max_escalation_increase: Share = 0.15  # absolute, after the swap vs the frames before it
    max_error_rate: Share = 0.05
    max_artifact_bytes: AtLeastOne = MAX_ARTIFACT_BYTES
    chunk_timeout: Positive = 60.0  # seconds without the whole artifact: re-request its (retained) chunks
    # Privacy opt-in: upload the JPEG of frames the end model escalated, so the cloud may retrain
    # the end exit from them (off: only boundary features ever leave the node).
    share_frames: bool = False
    max_frame_uploads_per_minute: AtLeastOne = 120

    def public_keys(self) -> list:
        return _public_keys(self.trusted_keys)


class RetrainTriggerConfig(Section):
    """The cloud worker's `retrain:` section: when to run `tierlite retrain` on its hard-example
    store, and whether to keep the frames opted-in nodes upload (docs/UPDATES.md). every_examples
    and every_seconds both null: only collect frames; run `tierlite retrain` yourself."""

    # the labelled training folder (clean accuracy, thresholds)
    replay: Annotated[RelPath, _check(lambda v: Path(v).is_dir(), "labelled training folder not found: {v}")]
    every_examples: AtLeastOne | None = 500  # after this many new hard examples ...
    every_seconds: Positive | None = None  # ... or this long since the last run, whichever first
    collect_frames: bool = True
    frames_path: RelPath | None = None  # default: <store stem>.frames.sqlite beside the store
    args: list[Text] = Field(default_factory=list)  # more `tierlite retrain` options
    min_interval_seconds: float = 60.0  # never start two runs closer than this
    # A run asked for by a drift alarm or an agreement fall waits until the store holds the job's
    # `--min-examples` usable hard examples (a run on fewer stops and would spend the request); it
    # is dropped, with one warning, if they have not arrived this long after the request.
    request_expiry_seconds: Positive = 3600.0
    # ... and a requested run that still stops for too few examples puts the request back this often.
    request_retries: Annotated[int, Field(ge=0)] = 3


# -- device -----------------------------------------------------------------------------------
def _uri_ok(u: str) -> bool:
    return u.isdigit() or "://" in u or Path(u).exists()


class SourceConfig(Section):
    model_config = ConfigDict(frozen=False)  # `tierlite device --limit` overrides limit

    # camera index ("0"), video file, image folder, or rtsp:// / http:// URL
    uri: Annotated[RelPath, _check(_uri_ok, "{v!r} is not a camera index, URL, file or folder that exists")]
    fps: Positive | None = None  # cap; None = as fast as the source gives frames
    loop: bool = False  # restart a file/folder at its end
    limit: AtLeastOne | None = None  # stop after this many frames


class DriftConfig(Section):
    """The device's `drift:` section: label-free drift monitor against the bundle's reference
    statistics (`drift_reference` in the manifest; none there = no monitor). docs/DRIFT.md."""
    enabled: bool = True
    window: AtLeastOne | None = None  # frames per window (default: the reference's)
    step: AtLeastOne = 25  # score the window every this many frames
    clear_checks: AtLeastOne = 4  # checks in a row below every threshold before an alarm clears
    threshold_scale: Positive = 1.0  # x the reference's thresholds
    alarm_audit_rate: Share = 0.25  # audit share of confident frames while in alarm
    # ... and while in alarm at least this share of all frames, as far as confident frames allow
    # (tierlite.drift.AuditSampler: the cloud needs audits to check its teacher; 0 = off)
    alarm_audit_floor: Share = 0.02
    # x the camera exit's threshold while in alarm: < 1 sends more frames on for the deeper tiers'
    # answer (bounded by max_pending and the edge's per-node budget); 1 = unchanged
    alarm_threshold_scale: Share = 1.0


class AdaptiveConfig(Section):
    """The device's `adaptive:` section: follow the link by moving the camera exit's threshold
    between the bundle's operating points (tierlite.linkstate, docs/PARTITIONING.md)."""
    enabled: bool = False
    target_ms: Positive = 100.0  # escalated frames' answer latency (window median) to stay under
    relax_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.5  # step back only below target x this (hysteresis)
    window: AtLeastOne = 20  # answers per decision
    min_dwell_s: Annotated[float, Field(ge=0)] = 2.0  # at least this long between two switches
    backlog_high: AtLeastOne = 32  # escalations in flight beyond this: step toward local


class HomeAssistantConfig(Section):
    """The device's `home_assistant:` section: MQTT discovery, a device per node with per-class
    entities (tierlite.homeassistant, docs/RUNTIME.md). `true` / `false` = on with these defaults / off."""

    enabled: bool = True
    discovery_prefix: Prefix = "homeassistant"  # Home Assistant's MQTT integration setting
    classes: list[Text] | None = None  # per-class "seen" and count entities for these labels; null = every label
    min_interval: Annotated[float, Field(ge=0)] = 1.0  # seconds between two state messages, however fast it flips
    heartbeat: Positive = 10.0  # a state message at least this often; entities expire after 2 missed
    off_delay: Positive = 15.0  # a "<class> seen" sensor turns off this long after the node goes silent

    @classmethod
    def cross_checks(cls, v: dict[str, Any]) -> list[tuple[str | None, str]]:
        beat, off, low = _number(v["heartbeat"]), _number(v["off_delay"]), _number(v["min_interval"])
        problems: list[tuple[str | None, str]] = []
        if beat is not None and off is not None and off <= beat:
            problems.append(("off_delay", f"must exceed heartbeat ({beat:g} s), or a class still in view "
                                          f"blinks off between two state messages; got {off:g}"))
        if beat is not None and low is not None and low > beat:
            problems.append(("min_interval", f"must not exceed heartbeat ({beat:g} s), got {low:g}"))
        return problems


def _on_off_or_options(value: Any) -> Any:
    if isinstance(value, bool):
        return {"enabled": value}
    if not isinstance(value, (dict, HomeAssistantConfig)):
        raise _problem(f"expected true or false, or a mapping of options, got {value!r}")
    return value


class DeviceConfig(Section):
    model_config = ConfigDict(frozen=False)

    node_id: NodeId
    bundle: ExistingPath  # bundle directory or .tar.gz
    source: SourceConfig
    prefix: Prefix = "tierlite"
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    runtime: Runtime = "litert"
    threads: AtLeastOne = 1
    threshold: Threshold | None = None  # override the bundle's end threshold (0 = escalate every frame)
    deadline_ms: Positive = 500.0  # wait this long for an answer, then use the end exit's
    # at start, seconds to wait for the broker before serving frames locally
    wait_for_broker: Annotated[float, Field(ge=0)] = 2.0
    max_pending: AtLeastOne = 256  # escalations in flight; beyond this a frame falls back at once
    results_file: RelPath | None = None  # also append every result event as one JSON line here
    # Home Assistant MQTT discovery: true, or a mapping of HomeAssistantConfig options
    home_assistant: Annotated[HomeAssistantConfig, BeforeValidator(_on_off_or_options)] = \
        Field(default_factory=lambda: HomeAssistantConfig(enabled=False))
    metrics_port: PortOrZero | None = None  # Prometheus /metrics of this node; null = off; 0 = any free port
    metrics_bind: Text = "127.0.0.1"
    board: Text | None = None  # board profile (tierlite.boards: pi4, pi5, coral-usb, ...); --board overrides
    update: UpdateConfig | None = None  # accept signed model updates (docs/UPDATES.md)
    # Audit sampling: this share of the frames the end exit is sure of also goes up the chain,
    # marked as audits (answered locally as usual); the cloud scores the node's agreement with it.
    audit_rate: Share = 0.02
    drift: DriftConfig = Field(default_factory=DriftConfig)
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig)


# -- edge ---------------------------------------------------------------------------------------
class ListenerTLSConfig(Section):
    """The managed Mosquitto's TLS listener: its server certificate, and the CA clients must chain to."""

    ca_file: ExistingFile  # the fleet CA (tierlite provision): client certificates must be signed by it
    cert_file: ExistingFile  # server certificate (SANs: every name/address nodes use for the gateway)
    key_file: ExistingFile
    require_certificate: bool = True  # mutual TLS: no client without a CA-signed certificate
    # revoked client certificates (`tierlite provision` writes broker/crl.pem, signed by the CA in
    # ca_file); checked against ca_file before use, re-read by Mosquitto on SIGHUP
    crl_file: ExistingFile | None = None


class MosquittoConfig(Section):
    managed: bool = True  # start and supervise Mosquitto; false = use `broker` as it is
    binary: Annotated[Text, _relative(program=True)] = "mosquitto"  # name on PATH or a path
    bind: Text = "127.0.0.1"  # listener address ("0.0.0.0" for a real site network)
    port: Port = 1883
    state_dir: RelPath | None = None  # generated config, pid and log; default a temp folder
    password_file: ExistingFile | None = None  # mosquitto_passwd file; none = anonymous access (loopback only)
    # Security (docs/SECURITY.md; `tierlite provision` writes these files). A bind beyond loopback
    # needs tls and acl_file: the generated config then refuses anonymous clients.
    tls: ListenerTLSConfig | None = None
    acl_file: ExistingFile | None = None  # Mosquitto ACL (pattern rules per node, topics per worker)
    persistence: bool = True  # retained update state survives a broker restart (in state_dir)
    max_queued_messages: int = 10000  # mosquitto's default 1000 overflows under bursts
    message_size_limit: int = 1048576
    restart_limit: int = 5  # restarts within 60 s before the gateway gives up


class BridgeConfig(Section):
    """The edge Mosquitto's bridge to a cloud broker: escalations go out, answers come in."""

    host: Text
    port: Port = 1883
    username: Text | None = None
    password: Text | None = None
    # keep the secret out of edge.yaml: a file (owner-only; first line) or an environment variable.
    # Mosquitto reads bridge credentials from its config only, so it still lands in the 0600 mosquitto.conf.
    password_file: ExistingFile | None = None
    password_env: EnvVar | None = None
    tls: TLSConfig | None = None
    keepalive: int = 30
    reconnect_max: AtLeastOne = 30  # seconds: the bridge's reconnect backoff starts at 1 s, doubles up to this
    client_id: Text | None = None
    qos: QoS = 0
    # Several sites into one cloud broker (docs/SCALING.md, "Several sites"): this site's id. Its
    # escalations go up as <cloud_prefix>/<site>/<node>/escalate and only its own answers come back,
    # so node ids need only be unique per site and one pool of cloud workers serves every site.
    site: NodeId | None = None
    cloud_prefix: Prefix | None = None  # the cloud broker's topic prefix; default the gateway's own

    def resolved_password(self) -> str | None:
        """The bridge password from `password`, `password_file` or `password_env` (ConfigError, one
        line, for a file others may read, or a password Mosquitto's config line cannot hold)."""
        password, where = self.password or None, "bridge.password"
        if self.password_file:
            mode = Path(self.password_file).stat().st_mode & 0o777
            if mode & 0o077:
                raise ConfigError(f"bridge.password_file {self.password_file} is open to group or others (mode "
                                  f"{oct(mode)}): chmod 600 it")
            lines = Path(self.password_file).read_text().splitlines()
            password, where = (lines[0] if lines else ""), f"bridge.password_file {self.password_file}"
        elif self.password_env:
            password, where = os.environ.get(self.password_env, ""), f"bridge.password_env {self.password_env}"
        if password is not None and (not password or any(c.isspace() or not c.isprintable() for c in password)):
            # one `remote_password` line of mosquitto.conf: a space ends it, a newline would add config lines
            raise ConfigError(f"{where}: empty, or holds whitespace or control characters (Mosquitto's config "
                              "cannot carry them)")
        return password

    @classmethod
    def cross_checks(cls, v: dict[str, Any]) -> list[tuple[str | None, str]]:
        given = [k for k in ("password", "password_file", "password_env") if v.get(k)]
        problems = [(None, f"give one of {', '.join(given)}, not several")] if len(given) > 1 else []
        return problems + _tls_port_check(v)


class CloudLinkConfig(Section):
    mode: Literal["local", "bridge"] = "local"  # local: the cloud worker uses the edge broker
    bridge: BridgeConfig | None = None

    @classmethod
    def cross_checks(cls, v: dict[str, Any]) -> list[tuple[str | None, str]]:
        if v["mode"] == "bridge" and v["bridge"] is None:
            return [(None, "mode 'bridge' needs a 'bridge' section (host, port, ...)")]
        return []


class DiscoveryConfig(Section):
    advertise: bool = True
    name: Text | None = None  # service instance name; default tierlite-<hostname>
    interfaces: list[Text] | None = None  # e.g. ["127.0.0.1"]; None = all interfaces
    address: Text | None = None  # address to advertise; default the listener's (or this host's)


class NodeBudgetConfig(Section):
    """Per-node escalation budget at the edge (a token bucket per node): features beyond it get a
    REJECT (reason `budget`) and the node answers with its own exit. The default is above any
    camera's frame rate, so an honest node that escalates every frame is never refused, while a
    flood (thousands/s) is cut to a few percent of one worker's capacity. Each edge worker keeps its
    own buckets (a worker that dies must not halve a node's budget), so with N workers a node may
    reach up to N x rate."""

    enabled: bool = True
    rate: Positive = 100.0  # escalations per second per node and worker, sustained
    burst: AtLeastOne = 300  # escalations a node may send at once after a quiet spell
    max_nodes: AtLeastOne = 10_000  # buckets kept (least recently seen forgotten first)


class MetricsLabelsConfig(Section):
    """Which nodes get their own `node` label in /metrics; any other node is counted under "other"
    (a fleet's label set stays bounded whatever node ids arrive)."""

    nodes: list[NodeId] | None = None  # the provisioned nodes; null: the first `max_nodes` seen
    max_nodes: Annotated[int, Field(ge=0)] = 256


class BatchConfig(Section):
    """A worker's `batch:` section: dynamic batching (tierlite.tierworker.MessageBatcher, docs/SCALING.md).
    Messages already waiting on the socket run as one batch; a lone message runs at once."""
    max_size: Annotated[int, Field(ge=1, le=256)] = 32  # 1 = off: one message at a time
    max_wait_ms: Annotated[float, Field(ge=0, le=1000)] = 2.0  # oldest message's wait while input keeps coming


class EdgeConfig(Section):
    model_config = ConfigDict(frozen=False)  # `tierlite edge --workers` overrides workers

    bundle: ExistingPath
    prefix: Prefix = "tierlite"
    gateway_id: NodeId = "edge"
    broker: BrokerConfig = Field(default_factory=BrokerConfig)  # how workers connect
    mosquitto: MosquittoConfig = Field(default_factory=MosquittoConfig)
    discovery: DiscoveryConfig = Field(default_factory=DiscoveryConfig)
    cloud: CloudLinkConfig = Field(default_factory=CloudLinkConfig)
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    share_group: ShareGroup = "tierlite-edge"
    runtime: Runtime = "litert"
    threads: AtLeastOne = 1
    threshold: Threshold | None = None  # override the bundle's edge threshold (1 = answer every frame)
    forward_end_feature: bool = True  # send the node's feature up too (hard-example store)
    metrics_port: PortOrZero | None = 9464  # Prometheus /metrics; null = off; 0 = any free port
    metrics_bind: Text = "127.0.0.1"
    metrics_labels: MetricsLabelsConfig = Field(default_factory=MetricsLabelsConfig)
    node_budget: NodeBudgetConfig = Field(default_factory=NodeBudgetConfig)
    update: UpdateConfig | None = None  # accept signed edge-segment updates (docs/UPDATES.md)
    batch: BatchConfig = Field(default_factory=BatchConfig)  # dynamic batching (issue 15)

    @classmethod
    def cross_checks(cls, v: dict[str, Any]) -> list[tuple[str | None, str]]:
        workers, protocol = _number(v["workers"]), _get(v["broker"], "protocol")
        if workers is not None and workers > 1 and protocol is not None and str(protocol) != "5":
            return [("workers", "several workers need MQTT 5 shared subscriptions (broker.protocol: '5')")]
        return []


# -- cloud --------------------------------------------------------------------------------------
class StoreConfig(Section):
    path: Annotated[RelPath, _check(lambda v: Path(v).parent.is_dir(), "the folder of {v} does not exist")] = \
        "hard_examples.sqlite"
    batch: AtLeastOne = 64  # rows per commit
    flush_interval: Positive = 0.5  # seconds; commit a partial batch after this long
    enabled: bool = True
    # Bounds (null = no bound): the oldest rows are evicted first, counted (tierlite_store_events_total).
    max_rows: AtLeastOne | None = 1_000_000
    max_bytes: AtLeastOne | None = 2 << 30  # pages in use, not the file size (SQLite reuses freed pages)
    max_age_days: Positive | None = 90.0
    max_pending: AtLeastOne = 10_000  # rows held in memory while writes fail (disk full); oldest dropped
    # Frame uploads of opted-in nodes (frames store): per node, uploads/s, burst and rows kept.
    frames_per_node_rate: Positive = 1.0
    frames_per_node_burst: AtLeastOne = 20
    frames_per_node_max_rows: AtLeastOne = 5_000
    frames_max_bytes: AtLeastOne | None = 1 << 30


class CloudConfig(Section):
    bundle: ExistingPath
    prefix: Prefix = "tierlite"
    worker_id: NodeId = "cloud"
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    share_group: ShareGroup = "tierlite-cloud"
    runtime: Runtime = "litert"
    threads: AtLeastOne = 1
    store: StoreConfig = Field(default_factory=StoreConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)  # dynamic batching (issue 15)
    metrics_port: PortOrZero | None = 9465
    metrics_bind: Text = "127.0.0.1"
    metrics_labels: MetricsLabelsConfig = Field(default_factory=MetricsLabelsConfig)
    retrain: RetrainTriggerConfig | None = None  # co-updating: scheduled `tierlite retrain` (docs/UPDATES.md)
    # Audits (issue 13): per-node agreement window; a drift alarm, or an agreement whose Wilson
    # upper bound falls below audit_min_agreement, asks the retraining scheduler for a run.
    audit_window: AtLeastOne = 200
    audit_min_agreement: Share = 0.8
    audit_min_frames: AtLeastOne = 30  # audits in the window before the agreement can ask for a run

    @classmethod
    def cross_checks(cls, v: dict[str, Any]) -> list[tuple[str | None, str]]:
        if v["retrain"] is not None and _get(v["store"], "enabled") is False:
            return [("retrain", "needs the hard-example store (store.enabled: true)")]
        return []


# -- loading ------------------------------------------------------------------------------------
T = typing.TypeVar("T", bound=BaseModel)


def load_config(path: str | Path, cls: type[T]) -> T:
    """Read and validate a YAML config; one ConfigError, one line per problem."""
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
    """Validate `data` as `cls`; relative paths resolve against `base` (default: the working folder)."""
    try:
        return cls.model_validate(data, context={"base": Path(base or Path.cwd())})
    except ValidationError as e:
        raise ConfigError("\n".join(_describe(err, cls, where) for err in e.errors(include_url=False))) from None


_MESSAGES = {  # pydantic error type -> our wording; {got} is the bad value, {kind} its type
    "missing": "required key missing",
    "int_type": "expected an integer, got {got}",
    "float_type": "expected a number, got {got}",
    "bool_type": "expected true or false, got {got}",
    "string_type": "expected a string, got {got}",
    "list_type": "expected a list, got {kind}",
    "dict_type": "expected a mapping, got {kind}",
    "model_type": "expected a mapping, got {kind}",
    "literal_error": "must be one of {expected}, got {got}",
    "greater_than": "must be > {gt}, got {got}",
    "greater_than_equal": "must be >= {ge}, got {got}",
    "less_than": "must be < {lt}, got {got}",
    "less_than_equal": "must be <= {le}, got {got}",
}


def _describe(err: Any, cls: type[BaseModel], where: str) -> str:
    """One pydantic error as one line: `<file>.<yaml path>: <problem>`."""
    loc, ctx, got = tuple(err["loc"]), err.get("ctx") or {}, err.get("input")
    if err["type"] == "extra_forbidden":
        loc, key = loc[:-1], str(loc[-1])
        known = list(_model_fields(cls, loc))
        near = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"known: {', '.join(known)}"
        message = f"unknown key '{key}' ({hint})"
    elif err["type"] == "config":
        message = ctx["message"]
    elif err["type"] in _MESSAGES:
        message = _MESSAGES[err["type"]].format(got=repr(got), kind=type(got).__name__, **ctx)
    else:
        message = err["msg"]
    path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    return f"{path.lstrip('.')}: {message}"


def _model_fields(cls: type[BaseModel], loc: tuple) -> dict[str, Any]:
    """The fields of the section at `loc` (for did-you-mean), or {} if loc is not a section."""
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return {}
        inner = [a for a in (field.annotation, *typing.get_args(field.annotation))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return {}
        cls = inner[0]
    return cls.model_fields
