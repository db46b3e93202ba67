"""Co-training math shared by the cloud (aggregator) and the sites (edge gateways): numpy only.

Orchestration (who trains when, over which transport) lives in `tierlite.cloud.federated`
(Flower ServerApp + strategy) and `tierlite.edge.federated` (Flower ClientApp); this module holds
what both sides must agree on, kept apart from Flower the way Flower keeps its strategies'
orchestration apart from `aggregate.py`:

- named weights: a model is an ordered mapping name -> float32 array (Keras variable paths);
- which names are *personal* (the exit heads a site keeps, FedPer-style) and which are shared;
- `check_arrays`: the federation's model against a site's, refused with one clear line;
- `weighted_average`: FedAvg's example-weighted mean (float64 accumulation);
- `region_averages` / `cloud_average`: hierarchical FedAvg (HierFAVG, client-edge-cloud): sites
  averaged per region every round, the regions averaged by the cloud every few rounds;
- `proximal_term`: FedProx's mu/2 ||w - w_global||^2 (reference; the training loop has its own);
- (de)serialisation of a named model to .npz bytes, and payload sizes;
- the sites' authentication keys (Flower SuperNode authentication): `generate_site_key`, the
  cloud's `site_public_keys`, the site's `check_site_key` (files checked before any process starts);
- the Flower processes both sides run: a longer task-claim window (`run_flower`) and finding the
  ClientApp/ServerApp processes Flower launched (`flower_processes`, from /proc), for supervision.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tierlite.errors import TierliteError

# Layers whose weights form an exit head (converters/models.py `_exit_head`): "<tier>_logits",
# "<tier>_hidden". A weight belongs to a head when its path starts with one of these layer names.
HEAD_LAYER_SUFFIXES = ("_logits", "_hidden")
TIERS = ("end", "edge", "cloud")

Named = dict[str, np.ndarray]


class ModelMismatch(TierliteError):
    """A site's model does not have the federation's weights (names or shapes)."""


def head_layers(tiers: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{t}{s}" for t in tiers for s in HEAD_LAYER_SUFFIXES)


def is_personal(name: str, personal_tiers: Sequence[str]) -> bool:
    """True when weight `name` (e.g. "end_logits/kernel") is in an exit head of `personal_tiers`."""
    layer = name.split("/", 1)[0]
    return layer in head_layers(personal_tiers)


def split_personal(weights: Mapping[str, np.ndarray], personal_tiers: Sequence[str]) -> tuple[Named, Named]:
    """(shared, personal) parts of a named model."""
    shared, personal = {}, {}
    for k, v in weights.items():
        (personal if is_personal(k, personal_tiers) else shared)[k] = v
    return shared, personal


def spec_of(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in weights.items()}


def check_arrays(expected: Mapping[str, Sequence[int]], got: Mapping[str, np.ndarray], who: str = "site") -> None:
    """Raise ModelMismatch (one line) unless `got` has exactly the names and shapes of `expected`."""
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} array(s), e.g. {missing[0]!r}")
        if extra:
            parts.append(f"{len(extra)} unknown array(s), e.g. {extra[0]!r}")
        raise ModelMismatch(f"{who}: model does not match the federation's ({'; '.join(parts)})")
    for k, shape in expected.items():
        s = tuple(np.shape(got[k]))
        if s != tuple(shape):
            raise ModelMismatch(f"{who}: model does not match the federation's: {k!r} has shape {s}, "
                                f"the federation's {tuple(shape)}")


def weighted_average(models: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Named:
    """sum_i w_i x_i / sum_i w_i per named array (FedAvg), accumulated in float64, cast to float32.

    Every model must have the same names and shapes (check_arrays first)."""
    if not models:
        raise ValueError("weighted_average of no models")
    if len(models) != len(weights):
        raise ValueError("one weight per model")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    w = w / w.sum()
    out: Named = {}
    for name in models[0]:
        acc = np.zeros(np.shape(models[0][name]), dtype=np.float64)
        for wi, m in zip(w, models):
            acc += wi * np.asarray(m[name], dtype=np.float64)
        out[name] = acc.astype(np.float32)
    return out


# HierFAVG (Liu et al. 2020, "Client-Edge-Cloud Hierarchical Federated Learning"): sites (the
# clients) are grouped in regions (the edge aggregators). Every round each region averages its
# own sites and sends that back to them; every few rounds the cloud averages the regions. Between
# two cloud rounds the regions train apart, which is what makes this differ from flat FedAvg (a
# cloud average of regions averaged over the same round *is* FedAvg of all their sites).
Regional = dict[str, tuple[Named, float]]  # region -> (its model, its examples)


def region_averages(models: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
                    regions: Sequence[str]) -> Regional:
    """The regions' step: per region, the example-weighted average of its sites' models, and the
    region's examples (its weight in the cloud's step)."""
    if not len(models) == len(weights) == len(regions):
        raise ValueError("one weight and one region per model")
    groups: dict[str, list[int]] = {}
    for i, region in enumerate(regions):
        groups.setdefault(region, []).append(i)
    return {r: (weighted_average([models[i] for i in idx], [weights[i] for i in idx]),
                float(sum(weights[i] for i in idx))) for r, idx in groups.items()}


def cloud_average(regional: Mapping[str, tuple[Mapping[str, np.ndarray], float]]) -> Named:
    """The cloud's step: the regions' models weighted by their examples."""
    return weighted_average([m for m, _ in regional.values()], [n for _, n in regional.values()])


# BatchNorm running statistics are estimates of the data, not parameters a gradient moved: the
# server takes their plain average and never extrapolates them with momentum.
STATISTIC_SUFFIXES = ("moving_mean", "moving_variance")


def is_statistic(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(STATISTIC_SUFFIXES)


# FedBN (Li et al. 2021): a site keeps its BatchNorm layers (scale, shift and statistics) and
# loads only the rest from the federation, so its normalisation follows its own data.
BATCHNORM_SUFFIXES = ("gamma", "beta") + STATISTIC_SUFFIXES


def is_batchnorm(name: str) -> bool:
    return name.rsplit("/", 1)[-1].startswith(BATCHNORM_SUFFIXES)


def server_step(current: Mapping[str, np.ndarray], average: Mapping[str, np.ndarray],
                velocity: Mapping[str, np.ndarray] | None, lr: float = 1.0, momentum: float = 0.0
                ) -> tuple[Named, Named | None]:
    """The cloud's update from the sites' average (FedAvgM, Hsu et al. 2019):
    v <- momentum * v + (average - current); new = current + lr * v. lr 1, momentum 0 is FedAvg
    (new = average). BatchNorm statistics always take the average. Returns (new model, velocity)."""
    if lr == 1.0 and momentum == 0.0:
        return {k: np.asarray(v, np.float32) for k, v in average.items()}, None
    new: Named = {}
    vel: Named = {}
    for k, avg in average.items():
        if is_statistic(k):
            new[k] = np.asarray(avg, np.float32)
            continue
        delta = np.asarray(avg, np.float64) - np.asarray(current[k], np.float64)
        v = momentum * np.asarray(velocity[k], np.float64) + delta if velocity is not None and k in velocity else delta
        vel[k] = v.astype(np.float32)
        new[k] = (np.asarray(current[k], np.float64) + lr * v).astype(np.float32)
    return new, vel


def proximal_term(weights: Mapping[str, np.ndarray], anchor: Mapping[str, np.ndarray], mu: float) -> float:
    """FedProx: mu/2 * sum ||w - w_global||^2 over the names both hold."""
    total = sum(float(np.sum((np.asarray(weights[k], np.float64) - np.asarray(anchor[k], np.float64)) ** 2))
                for k in weights if k in anchor)
    return 0.5 * mu * total


def payload_bytes(weights: Mapping[str, np.ndarray]) -> int:
    """Raw bytes of the arrays (what an ArrayRecord carries, less its small per-array headers)."""
    return int(sum(np.asarray(v).nbytes for v in weights.values()))


def dumps(weights: Mapping[str, np.ndarray]) -> bytes:
    """A named model as .npz bytes (order kept in the `__order__` entry)."""
    buf = io.BytesIO()
    names = list(weights)
    np.savez(buf, __order__=np.array(names), **{f"a{i}": np.asarray(weights[n]) for i, n in enumerate(names)})
    return buf.getvalue()


def loads(data: bytes) -> Named:
    z = np.load(io.BytesIO(data), allow_pickle=False)
    names = [str(n) for n in z["__order__"]]
    return {n: z[f"a{i}"] for i, n in enumerate(names)}


# -- SuperNode authentication (the sites' keys) -------------------------------------------------
# Flower 1.42: a SuperLink started with --enable-supernode-auth (TLS only) activates a SuperNode
# only if its public key was registered (`flwr supernode register`), and checks every Fleet request
# is signed by the matching private key. Keys are EC on a NIST curve, in OpenSSH format (what
# `ssh-keygen -t ecdsa -b 384` writes too): a site keeps <name>.key, the cloud holds <name>.pub.
SITE_KEY_SUFFIX, SITE_PUB_SUFFIX = ".key", ".pub"


class SiteKeyError(TierliteError):
    """A site key file is missing, unreadable or not an OpenSSH EC key on a NIST curve."""


def _nist_ec(key) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return False
    try:  # the very check the SuperLink applies when a key is registered
        from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve
    except ImportError:  # pragma: no cover - flwr absent: the curves it accepts
        return key.curve.name in ("secp192r1", "secp224r1", "secp256r1", "secp384r1", "secp521r1")
    return uses_nist_ec_curve(key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise SiteKeyError(f"{path}: no such {what} file") from None
    except OSError as e:
        raise SiteKeyError(f"{path}: cannot read the {what} ({e.strerror})") from None


def generate_site_key(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """A new P-384 key pair for site `name`: <out_dir>/<name>.key (private, mode 0600, stays at the
    site) and <name>.pub (its public key, for the cloud's --site-keys folder). Existing files are
    never overwritten (a key the cloud registered would silently stop working)."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or "/" in name or name.startswith("."):
        raise SiteKeyError(f"site name {name!r}: give a plain name (it names the key files)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{name}{SITE_KEY_SUFFIX}", out / f"{name}{SITE_PUB_SUFFIX}"
    for p in (key_path, pub_path):
        if p.exists():
            raise SiteKeyError(f"{p}: already exists; not overwritten (delete it first to replace the key)")
    key = ec.generate_private_key(ec.SECP384R1())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH, ser.NoEncryption()))
    pub_path.write_bytes(key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
                         + f" tierlite-site-{name}\n".encode())
    return key_path, pub_path


def check_site_key(path: str | Path) -> Path:
    """The site's private key file, checked as the SuperNode will read it (OpenSSH, EC, NIST
    curve, no passphrase); SiteKeyError (one line) otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization as ser

    data = _read_key_file(Path(path), "site key")
    try:
        key = ser.load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if key is None or not _nist_ec(key):
        raise SiteKeyError(f"{path}: not an OpenSSH EC private key on a NIST curve without passphrase "
                           "(`tierlite federate keygen` writes one)")
    return Path(path)


def site_public_keys(folder: str | Path) -> dict[str, Path]:
    """site name -> its public key file, for every <name>.pub in `folder`, each checked (OpenSSH,
    EC, NIST curve) and no key listed twice; SiteKeyError (one line) otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization as ser

    folder = Path(folder)
    if not folder.is_dir():
        raise SiteKeyError(f"{folder}: no such folder of site public keys")
    keys: dict[str, Path] = {}
    seen: dict[bytes, str] = {}
    for path in sorted(folder.glob(f"*{SITE_PUB_SUFFIX}")):
        data = _read_key_file(path, "site public key")
        try:
            key = ser.load_ssh_public_key(data.strip().split(b"\n")[0])
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if key is None or not _nist_ec(key):
            raise SiteKeyError(f"{path}: not an OpenSSH EC public key on a NIST curve "
                               "(`tierlite federate keygen` writes one)")
        raw = key.public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
        if raw in seen:
            raise SiteKeyError(f"{path}: the same key as {seen[raw]}{SITE_PUB_SUFFIX}; each site needs its own")
        seen[raw] = path.stem
        keys[path.stem] = path
    if not keys:
        raise SiteKeyError(f"{folder}: no site public keys (<site>{SITE_PUB_SUFFIX}) in it "
                           "(`tierlite federate keygen` writes them)")
    return keys


# -- Flower processes (the cloud's SuperLink, the sites' SuperNodes) ---------------------------
# A ServerApp/ClientApp process Flower launches must claim its task within this many seconds or
# Flower hands the task to a new process (flwr 1.42: HEARTBEAT_DEFAULT_INTERVAL, 30 s). On a
# CPU-starved machine a Python start takes longer, every launch is superseded and they pile up.
# The SuperLink and SuperNodes run with this window (it also lengthens the silence after which a
# running app counts as crashed, to twice this).
FLOWER_CLAIM_SECONDS = 120


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux prctl
    PR_SET_PDEATHSIG), even by SIGKILL, which the parent cannot forward; exit at once if the
    parent (`parent_pid`) is already gone. Elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the prctl: nobody would signal us
        raise SystemExit(f"parent process {parent_pid} is gone")


# What a SuperNode calls on the SuperLink (flwr 1.42 supernode/fleet_http_client.py). The same
# HTTP port also serves the Control API (`flwr run`, `flwr supernode register`) and the ServerApp's
# runtime API, without account authentication in open-source Flower: other hosts get only this.
FLEET_API_PREFIX = "/v1/fleet/"
SUPERLINK_WILDCARD_HOSTS = ("0.0.0.0",)  # "::" binds IPv6 only here: 127.0.0.1 (the ServerApp) is refused


def is_loopback(host: str | None) -> bool:
    """Whether a client address is this machine's loopback (IPv4-mapped IPv6 included)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address((host or "").split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class FleetOnlyForRemoteClients:
    """ASGI middleware for the SuperLink: a client not on this machine reaches the Fleet API (what
    SuperNodes use) and nothing else; every other path answers 403. The cloud's own processes (the
    ServerApp, key registration) connect over loopback and are not affected."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].startswith(FLEET_API_PREFIX):
            client = scope.get("client")
            if not is_loopback(client[0] if client else None):
                body = b"tierlite: only the Fleet API (/v1/fleet/) is served to other hosts\n"
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _limit_superlink_to_fleet_for_remote_clients() -> None:
    """Install FleetOnlyForRemoteClients through Flower's extension-middleware hook
    (flwr.superlink.extensions.get_middleware, read when the SuperLink builds its app)."""
    from flwr.superlink import extensions
    from starlette.middleware import Middleware

    extensions.get_middleware = lambda: (Middleware(FleetOnlyForRemoteClients),)


def run_flower(entry: str, argv0: str, parent_pid: int | None = None) -> None:
    """Run a Flower command-line entry point ("module:function") in this process with the longer
    claim window. Used as `python -c "...run_flower(...)" ARGS` in place of the Flower script.
    parent_pid: end with that parent, however it ends (`die_with_parent`). A SuperLink serves
    other hosts its Fleet API only (`FleetOnlyForRemoteClients`)."""
    import importlib
    import sys

    if parent_pid is not None:
        die_with_parent(parent_pid)
    if entry.startswith("flwr.superlink."):
        _limit_superlink_to_fleet_for_remote_clients()
    from flwr.supercore.corestate import in_memory_corestate

    if hasattr(in_memory_corestate, "HEARTBEAT_DEFAULT_INTERVAL"):
        in_memory_corestate.HEARTBEAT_DEFAULT_INTERVAL = FLOWER_CLAIM_SECONDS
    module, func = entry.split(":")
    sys.argv[0] = argv0
    getattr(importlib.import_module(module), func)()


def flower_command(entry: str, argv0: str, with_parent: bool = False) -> list[str]:
    """The argv prefix that runs `entry` through run_flower (append the Flower arguments).
    with_parent: the process ends when the one building this command (its parent) ends."""
    import sys

    parent = os.getpid() if with_parent else None
    return [sys.executable, "-c",
            f"from tierlite.federated import run_flower; run_flower({entry!r}, {argv0!r}, {parent!r})"]


def _live_stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after "pid (comm) " (state, ppid, pgrp, ...; field 19: start tick), None
    for a process that is gone or a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        int(fields[19])
    except (OSError, ValueError, IndexError):
        return None
    return None if fields[0] == "Z" else fields


def process_start_tick(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live process, None if gone or a zombie; with
    the pid it names one process (pids are reused, start ticks with them are not)."""
    fields = _live_stat(pid)
    return int(fields[19]) if fields else None


def flower_processes(marker: bytes, pgid: int | None = None) -> list[tuple[int, int]]:
    """(start tick, pid) of live processes whose command line holds `marker` (and, if given, in
    process group `pgid`), oldest first; read from /proc (Linux)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        fields = _live_stat(d.name)
        if fields is None or (pgid is not None and int(fields[2]) != pgid):
            continue
        try:
            if marker in (d / "cmdline").read_bytes():
                found.append((int(fields[19]), int(d.name)))
        except OSError:
            continue  # gone meanwhile
    return sorted(found)
