"""Co-training, site side: a Flower ClientApp that an edge gateway's SuperNode runs.

Each round the site receives the federation's weights (named float32 arrays), trains the joint
multi-exit model of the converters on its own labelled frames (`data-dir`, never sent anywhere),
and replies with its weights and metrics. Frames and features stay on the site; only weights
travel, and the bytes each way are measured and reported.

Personalisation (FedPer-style): the exit heads of the tiers named in the run's `personal` setting
are kept per site (`<workdir>/personal.npz`); the site loads the federation's body and its own
heads before training. Heads still travel up so the cloud can keep a global model for new sites.

The SuperNode is started by `tierlite federate site` (`run_site` below) with a node config:
  data-dir   the site's labelled image folder (<class>/*.jpg)
  site       its name (reports, logs)
  workdir    where its decoded-frame cache, personal heads and last model live
  arch-set   optional JSON object of model overrides: a site whose model differs (it is refused)
  limit      optional: use at most this many frames (quick runs)
  region     optional: its region in a hierarchical federation (`federate server --cloud-every`)

What the site received and sent in its last HISTORY_ROUNDS rounds stays in <workdir>/rounds/
(`round-<r>-received.npz`, `round-<r>-sent.npz`): what left the site, and what the cloud (or its
region) sent it.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("tierlite.edge.federated")

PERSONAL_FILE = "personal.npz"
MODEL_FILE = "site-model.npz"
HISTORY_DIR = "rounds"
HISTORY_ROUNDS = 3
# Error codes of refused replies (the reason is one line, logged by the cloud as it is).
ERR_MODEL_MISMATCH = 1001
ERR_DATA = 1002


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, values: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items() if v is not None))
    return path


def site_command(superlink: str, data_dir: str | Path, name: str, workdir: str | Path, port: int,
                 insecure: bool = False, root_certificates: str | Path | None = None,
                 arch_set: dict | None = None, limit: int | None = None, region: str | None = None,
                 key: str | Path | None = None) -> list[str]:
    """The flower-supernode command line of one site (node config written to <workdir>/node-config.toml).
    key: the site's private key (SuperNode authentication: the SuperLink knows its public key)."""
    workdir = Path(workdir).resolve()
    cfg = write_toml(workdir / "node-config.toml", {
        "data-dir": str(Path(data_dir).resolve()), "site": name, "workdir": str(workdir),
        "arch-set": json.dumps(arch_set) if arch_set else None, "limit": limit, "region": region})
    exe = Path(sys.executable).with_name("flower-supernode")
    cmd = [str(exe) if exe.exists() else "flower-supernode", "--superlink", superlink,
           "--node-config", str(cfg), "--port", str(port)]
    if insecure:
        cmd.append("--insecure")
    elif root_certificates:
        cmd += ["--root-certificates", str(root_certificates)]
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(key).resolve())]
    return cmd


# At most this many flwr-clientapp processes per site: older ones hold expired claims (Flower
# launched a newer one for the same task, see tierlite.federated.FLOWER_CLAIM_SECONDS): stopped.
MAX_CLIENTAPPS = 1
# A site with a key whose SuperNode exits (Flower's SuperNode gives up at once when the SuperLink
# does not know its key) starts it again this many times, this many seconds apart: the cloud
# registers the sites' keys just after its SuperLink comes up, and a site that reached it in
# between is refused once. A key the cloud never registered ends the site after the last try.
KEY_RETRIES, KEY_RETRY_SECONDS = 3, 10.0


def run_site(superlink: str, data_dir: str | Path, name: str, workdir: str | Path, port: int,
             insecure: bool = False, root_certificates: str | Path | None = None,
             arch_set: dict | None = None, limit: int | None = None, check_every: float = 2.0,
             region: str | None = None, key: str | Path | None = None) -> int:
    """Run the site's SuperNode and supervise it until it ends or this process is told to stop.
    key: the site's private key; the cloud's SuperLink (`federate server --site-keys`) accepts
    only sites whose public key it holds, and refuses this one otherwise (the SuperNode exits).

    This process leads a process group holding the SuperNode, its SuperExec and every ClientApp
    they launch: a signal to the group (or SIGTERM/SIGINT to this process) stops all of them,
    and older ClientApps beyond MAX_CLIENTAPPS are stopped as they appear."""
    import signal
    import subprocess
    import time

    if not Path(data_dir).is_dir():
        from tierlite.errors import DataError
        raise DataError(f"{data_dir}: no such image folder")
    if region is not None and not region.strip():
        from tierlite.errors import ConfigError
        raise ConfigError("--region: give a region name (or leave it out: the site is a region of its own)")
    if key is not None:
        if insecure:
            from tierlite.errors import ConfigError
            raise ConfigError("--key needs TLS (--root-certificates): Flower authenticates SuperNodes only over TLS")
        from tierlite.federated import check_site_key
        check_site_key(key)
    cmd = site_command(superlink, data_dir, name, workdir, port, insecure, root_certificates, arch_set, limit,
                       region, key)
    from tierlite.federated import flower_command, flower_processes

    # the SuperNode ends with this process, even when it is SIGKILLed alone
    cmd = flower_command("flwr.supernode.cli:flower_supernode", "flower-supernode", with_parent=True) + cmd[1:]
    log.info("site %s: flower-supernode %s", name, " ".join(cmd[3:]))
    home = Path(workdir).resolve() / "flwr-home"  # Flower's installed apps and state stay in the workdir
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if os.getpgrp() != os.getpid():
        os.setsid()  # our own group: stopping it never touches the caller's processes
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.Popen(cmd, env=env)
    retries = KEY_RETRIES if key is not None else 0
    try:
        while True:
            _supervise(proc, name, stop, check_every)
            if stop or not proc.returncode or retries <= 0:
                break
            log.warning("site %s: flower-supernode exited with status %d; starting it again in %.0f s (the cloud "
                        "may not have registered this site's key yet; %d more tries)", name, proc.returncode,
                        KEY_RETRY_SECONDS, retries)
            retries -= 1
            deadline = time.monotonic() + KEY_RETRY_SECONDS
            while not stop and time.monotonic() < deadline:
                time.sleep(0.2)
            if stop:
                break
            proc = subprocess.Popen(cmd, env=env)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            os.killpg(os.getpgrp(), signal.SIGTERM)  # the SuperNode, SuperExec and ClientApps
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        for _, pid in flower_processes(b"flwr-clientapp", os.getpgrp()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    if not stop and proc.returncode:
        log.error("site %s: flower-supernode exited with status %d%s", name, proc.returncode,
                  f" (refused by the SuperLink? the cloud must hold this site's public key: {Path(key).stem}.pub "
                  "in its --site-keys folder)" if key is not None else "")
    return 0 if stop else (proc.returncode or 0)


def _supervise(proc, name: str, stop: list, check_every: float) -> None:
    """Until the SuperNode ends or a stop signal came: stop ClientApps beyond MAX_CLIENTAPPS."""
    import signal
    import time

    from tierlite.federated import flower_processes

    stale = 0
    while proc.poll() is None and not stop:
        time.sleep(check_every)
        apps = flower_processes(b"flwr-clientapp", os.getpgrp())
        for _, pid in apps[:max(0, len(apps) - MAX_CLIENTAPPS)]:
            try:
                os.kill(pid, signal.SIGKILL)
                stale += 1
            except ProcessLookupError:
                pass
        if len(apps) > MAX_CLIENTAPPS:
            log.warning("site %s: stopped %d stale flwr-clientapp process(es) (%d so far): Flower "
                        "relaunched a task whose ClientApp had not started in time", name,
                        len(apps) - MAX_CLIENTAPPS, stale)


# ---------------------------------------------------------------------------------------------
# The ClientApp (loaded by the SuperNode's ClientApp process: `tierlite.edge.federated:app`)
# ---------------------------------------------------------------------------------------------
def _site_setup(run_cfg, node_cfg):
    """(model, arch, tc, splits, site name, workdir) for this site and this round's settings."""
    from tierlite.converters import build_federated_model, load_splits

    name = str(node_cfg.get("site", "site"))
    workdir = Path(str(node_cfg.get("workdir", f"federated-site-{name}")))
    data_dir = Path(str(node_cfg["data-dir"]))
    overrides = json.loads(str(run_cfg.get("arch-set", "{}")) or "{}")
    overrides.update(json.loads(str(node_cfg.get("arch-set", "{}")) or "{}"))  # the site's own model
    classes = json.loads(str(run_cfg["classes"]))
    seed = int(run_cfg.get("seed", 0))
    model, arch, tc = build_federated_model(str(run_cfg.get("preset", "small")), len(classes), seed, **overrides)
    limit = node_cfg.get("limit")
    splits = load_splits(data_dir, arch.input_size, tc.val_fraction, seed, int(limit) if limit else None,
                         workdir / "cache")
    unknown = [c for c in splits.classes if c not in classes]
    if unknown:
        from tierlite.errors import DataError
        raise DataError(f"site {name}: classes {unknown} are not the federation's ({', '.join(classes)})")
    if splits.classes != classes:  # a site may lack some classes (non-IID): federation's label indices
        index = np.array([classes.index(c) for c in splits.classes])
        for part in (splits.train, splits.val):
            part.labels = index[part.labels].astype(part.labels.dtype)
        splits.classes = list(classes)
    return model, arch, tc, splits, name, workdir


def _named(record) -> tuple[dict[str, np.ndarray], int]:
    arrays = {k: v.numpy() for k, v in record.items()}
    return arrays, int(sum(len(v.data) for v in record.values()))


def _array_record(weights: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def _personal_tiers(run_cfg) -> list[str]:
    return [t.strip() for t in str(run_cfg.get("personal", "")).split(",") if t.strip()]


def _prepare(msg, context):
    """Common start of train/evaluate: model with the federation's body and this site's heads."""
    global_w, bytes_down = _named(msg.content["arrays"])
    return _prepare_with(msg.content["config"], global_w, bytes_down, context)


def _prepare_with(run_cfg, global_w: dict, bytes_down: int, context):
    from tierlite.converters import set_model_weights
    from tierlite.federated import loads, split_personal

    model, arch, tc, splits, name, workdir = _site_setup(run_cfg, context.node_config)
    set_model_weights(model, global_w, who=f"site {name}")
    personal = _personal_tiers(run_cfg)
    own = workdir / PERSONAL_FILE
    own_heads = bool(personal) and own.is_file()
    if own_heads:  # the heads this site trained last round replace the federation's average
        heads = split_personal(loads(own.read_bytes()), personal)[1]
        set_model_weights(model, heads, who=f"site {name}", partial=True)
    return run_cfg, model, arch, tc, splits, name, workdir, global_w, bytes_down, personal, own_heads


def _refusal(msg, e: Exception):
    from flwr.app import Error, Message
    from tierlite.federated import ModelMismatch

    code = ERR_MODEL_MISMATCH if isinstance(e, ModelMismatch) else ERR_DATA
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    log.error("%s", reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _train(msg, context):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from tierlite.errors import TierliteError

    try:
        prepared = _prepare(msg, context)
    except TierliteError as e:
        return _refusal(msg, e)
    weights, metrics, name = _train_prepared(*prepared)
    arrays = _array_record(weights)
    metrics["bytes-up"] = int(sum(len(v.data) for v in arrays.values()))
    log.info("site %s round %d: %s", name, int(prepared[0].get("server-round", 0)), metrics)
    region = str(context.node_config.get("region", name))
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                                       "site": ConfigRecord({"name": name, "region": region})}), reply_to=msg)


def _keep_history(workdir: Path, rnd: int, received: dict, sent: dict) -> None:
    """<workdir>/rounds/round-<r>-{received,sent}.npz for the last HISTORY_ROUNDS rounds."""
    from tierlite.federated import dumps

    folder = workdir / HISTORY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"round-{rnd}-received.npz").write_bytes(dumps(received))
    (folder / f"round-{rnd}-sent.npz").write_bytes(dumps(sent))
    for old in folder.glob("round-*-*.npz"):
        if old.name.split("-")[1].isdigit() and int(old.name.split("-")[1]) <= rnd - HISTORY_ROUNDS:
            old.unlink(missing_ok=True)


def _train_prepared(run_cfg, model, arch, tc, splits, name, workdir, global_w, bytes_down, personal, own_heads):
    """Local training of a prepared site model: (weights to send, metrics, site name)."""
    from tierlite.converters import exit_accuracy, local_train, model_weights
    from tierlite.federated import dumps, split_personal

    rnd = int(run_cfg.get("server-round", 0))
    rounds = int(run_cfg.get("num-server-rounds", 0))
    cycle = str(run_cfg.get("lr-schedule", "const")) == "cycle" and 1 <= rnd <= rounds
    res = local_train(model, splits.train.images, splits.train.labels, tc, epochs=int(run_cfg.get("local-epochs", 1)),
                      steps=int(run_cfg.get("local-steps", 0)) or None,
                      lr=float(run_cfg.get("lr", tc.lr)), proximal_mu=float(run_cfg.get("proximal-mu", 0.0)),
                      seed=int(run_cfg.get("seed", 0)) * 1000 + rnd, schedule=(rnd, rounds) if cycle else None)
    weights = model_weights(model)
    workdir.mkdir(parents=True, exist_ok=True)
    if personal:
        (workdir / PERSONAL_FILE).write_bytes(dumps(split_personal(weights, personal)[1]))
    (workdir / MODEL_FILE).write_bytes(dumps(weights))
    _keep_history(workdir, rnd, global_w, weights)
    val = exit_accuracy(model, splits.val.images, splits.val.labels)
    bytes_up = int(sum(np.asarray(v).nbytes for v in weights.values()))
    metrics = {"num-examples": int(res["examples"]), "loss": float(res["loss"]),
               "train-acc-end": res["train_acc"][0], "train-acc-edge": res["train_acc"][1],
               "train-acc-cloud": res["train_acc"][2], "val-acc-end": val[0], "val-acc-edge": val[1],
               "val-acc-cloud": val[2], "bytes-down": bytes_down, "bytes-up": bytes_up,
               "train-seconds": float(res["seconds"]), "lr-first": res["lr"][0], "lr-last": res["lr"][1],
               "local-steps": int(res["steps"]),
               "own-heads": float(own_heads)}
    return weights, metrics, name


def _evaluate(msg, context):
    """The federation's model on this site's validation split; with personal heads, both."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from tierlite.converters import exit_accuracy, set_model_weights
    from tierlite.errors import TierliteError

    try:
        run_cfg, model, arch, tc, splits, name, workdir, global_w, bytes_down, personal, _ = _prepare(msg, context)
    except TierliteError as e:
        return _refusal(msg, e)
    metrics = {"num-examples": int(len(splits.val.labels)), "bytes-down": bytes_down}
    mine = exit_accuracy(model, splits.val.images, splits.val.labels)
    if personal:
        set_model_weights(model, global_w, who=f"site {name}")
        glob = exit_accuracy(model, splits.val.images, splits.val.labels)
        metrics.update({f"personal-acc-{t}": a for t, a in zip(("end", "edge", "cloud"), mine)})
    else:
        glob = mine
    metrics.update({f"global-acc-{t}": a for t, a in zip(("end", "edge", "cloud"), glob)})
    return Message(content=RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": name})}),
                   reply_to=msg)


# -- secure aggregation (Flower's SecAgg+, `tierlite federate server --secagg`) ----------------
# The cloud runs Flower's SecAggPlusWorkflow (legacy FitIns/FitRes messages); Flower's
# secaggplus_mod masks this site's weights before they leave, so the cloud only ever sees their
# sum. The weights travel as a list in the order of the federation's model (every site builds the
# same architecture, so the same order); a different count or shape is refused as in plain mode.
TRAFFIC_FILE = "traffic.jsonl"


def _secagg_train(msg, context):
    from flwr.app import Message
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from tierlite.converters import model_weights
    from tierlite.errors import TierliteError
    from tierlite.federated import ModelMismatch

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    run_cfg = dict(fitins.config)
    try:
        model, *_ = _site_setup(run_cfg, context.node_config)
        names = list(model_weights(model))
        if len(names) != len(arrays):
            raise ModelMismatch(f"site {context.node_config.get('site', 'site')}: model does not match the "
                                f"federation's ({len(arrays)} arrays, this site's model {len(names)})")
        global_w = dict(zip(names, arrays))
        prepared = _prepare_with(run_cfg, global_w, int(sum(a.nbytes for a in arrays)), context)
    except TierliteError as e:
        return _refusal(msg, e)
    weights, metrics, name = _train_prepared(*prepared)
    metrics["site"] = name
    res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([weights[k] for k in names]),
                 int(metrics["num-examples"]), metrics)
    return Message(content=compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def _traffic_mod(msg, context, call_next):
    """Bytes each way of every message this site handles (serialised protobuf of the content),
    one JSON line per message in <workdir>/traffic.jsonl: the cost of a protocol, stage by stage."""
    import time

    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.common.serde import recorddict_to_proto

    # read before call_next: secaggplus_mod pops the stage from the incoming configs
    secagg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = str(secagg.get(Key.STAGE, "")) if secagg is not None else ""
    bytes_down = int(recorddict_to_proto(msg.content).ByteSize())
    reply = call_next(msg, context)
    line = {"t": round(time.time(), 3), "type": str(msg.metadata.message_type), "stage": stage,
            "bytes_down": bytes_down,
            "bytes_up": int(recorddict_to_proto(reply.content).ByteSize()) if reply.has_content() else 0}
    workdir = Path(str(context.node_config.get("workdir", ".")))
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / TRAFFIC_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")
    return reply


def _make_app():
    from flwr.clientapp import ClientApp

    client = ClientApp(mods=[_traffic_mod])
    client.train()(_train)
    client.evaluate()(_evaluate)
    return client


def _make_secagg_app():
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    client = ClientApp(mods=[_traffic_mod, secaggplus_mod])
    client.train()(_secagg_train)
    return client


try:  # the SuperNode's ClientApp process loads `app`; elsewhere Flower may be absent
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app = _make_app()
except ImportError:  # pragma: no cover - flwr not installed (camera/edge installs without [federated])
    app = None
try:  # a Flower without the legacy SecAgg+ mod leaves the plain app working
    secagg_app = _make_secagg_app()
except ImportError:  # pragma: no cover
    secagg_app = None
