"""Run a federation from the cloud: Flower SuperLink + tierlite's ServerApp, then export.

    run_federation(out_dir, classes=..., sites=2, rounds=2, ...)   # blocks until the run ends

1. the initial model (converters' joint model, seeded, or a checkpoint's) -> <out>/initial.npz;
2. a Flower app directory <out>/app (pyproject.toml: components are tierlite's installed modules,
   `tierlite.cloud.federated.app:app` and `tierlite.edge.federated:app`; the run config);
3. `flower-superlink` (unless an address of a running one is given); with site keys it accepts
   only the SuperNodes whose public keys it was given (`register_sites`); then `flwr run <out>/app`;
   the ServerApp writes <out>/report.json every round and <out>/global.npz at the end;
4. export_global: the aggregated weights -> converters' int8 export, boundary check, calibration
   on a held-out folder the cloud holds -> <out>/bundle (versioned; signing and rollout are the
   update tools' job: `tierlite publish`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tierlite.errors import ConfigError, TierliteError

log = logging.getLogger("tierlite.cloud.federated")


def _exe(name: str) -> str:
    p = Path(sys.executable).with_name(name)
    return str(p) if p.exists() else (shutil.which(name) or name)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_app(out: Path, run_config: dict, secagg: bool = False) -> Path:
    """The Flower app directory `flwr run` packages (a FAB): only a pyproject.toml, whose components
    are tierlite's installed modules; dependencies are installed beforehand (`[federated]` extra).
    secagg: the SecAgg+ ServerApp and ClientApp (cloud/federated/secagg.py) instead of plain FedAvg's."""
    app = out / "app"
    app.mkdir(parents=True, exist_ok=True)
    lines = ['[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', '',
             '[project]', 'name = "tierlite-federation"', 'version = "1.0.0"',
             'description = "tierlite co-training: ServerApp and ClientApp from the installed tierlite"',
             'license = "Apache-2.0"', 'dependencies = []', '',
             '[tool.flwr.app]', 'publisher = "tierlite"', '',
             '[tool.flwr.app.components]',
             f'serverapp = "tierlite.cloud.federated.{"secagg" if secagg else "app"}:app"',
             f'clientapp = "tierlite.edge.federated:{"secagg_app" if secagg else "app"}"', '',
             '[tool.flwr.app.config]']
    lines += [f"{k} = {_toml(v)}" for k, v in run_config.items() if v is not None]
    (app / "pyproject.toml").write_text("\n".join(lines) + "\n")
    (app / "README.md").write_text("Written by `tierlite federate server`; see docs/COTRAINING.md.\n")
    return app


def write_flwr_home(out: Path, superlink: str, insecure: bool, root_certificates: str | None) -> Path:
    home = out / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    conn = [f'address = "{superlink}"']
    conn.append("insecure = true" if insecure else f'root-certificates = {_toml(str(root_certificates or ""))}')
    (home / "config.toml").write_text('[superlink]\ndefault = "tierlite"\n\n[superlink.tierlite]\n' + "\n".join(conn) + "\n")
    return home


def initial_weights(out: Path, preset: str, classes: list[str], seed: int, overrides: dict,
                    init_from: str | Path | None = None) -> dict[str, np.ndarray]:
    from tierlite.converters import build_federated_model, load_checkpoint, model_weights, set_model_weights
    from tierlite.federated import dumps

    model, arch, tc = build_federated_model(preset, len(classes), seed, **overrides)
    if init_from:  # a shared pretrained body (same architecture), e.g. `tierlite train` on public data
        src, meta = load_checkpoint(init_from)
        if meta.get("classes") != classes:
            raise ConfigError(f"{init_from}: checkpoint classes {meta.get('classes')} differ from {classes}")
        set_model_weights(model, model_weights(src), who=str(init_from))
    weights = model_weights(model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "initial.npz").write_bytes(dumps(weights))
    (out / "model.json").write_text(json.dumps({"preset": preset, "arch": arch.to_json(), "classes": classes,
                                                "seed": seed, "overrides": overrides, "preset_lr": tc.lr,
                                                # provenance: which pretrained body the federation started from
                                                "init_from": str(Path(init_from).resolve()) if init_from else None},
                                               indent=2) + "\n")
    return weights


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, what: str) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise TierliteError(f"{what} exited with status {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TierliteError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def check_superlink_host(host: str, insecure: bool, superlink: str | None = None) -> None:
    """One line for a --host the SuperLink cannot serve safely or at all."""
    from tierlite.federated import SUPERLINK_WILDCARD_HOSTS, is_loopback

    if is_loopback(host):
        return
    if host not in SUPERLINK_WILDCARD_HOSTS:
        raise ConfigError(f"--host {host}: give a loopback address, or 0.0.0.0 for sites on other machines "
                          "(the ServerApp and the key registration reach the SuperLink on 127.0.0.1)")
    if superlink is not None:
        raise ConfigError("--host applies to the SuperLink this command starts, not to a running one (--superlink)")
    if insecure:
        raise ConfigError(f"--host {host} with --insecure: the sites' weights would cross the network in plain "
                          "HTTP; give --certfile, --keyfile and --ca-certfile")


def start_superlink(out: Path, port: int, insecure: bool = True, certfile: str | None = None,
                    keyfile: str | None = None, ca_certfile: str | None = None, host: str = "127.0.0.1",
                    node_auth: bool = False):
    """flower-superlink (Fleet + Control APIs on host:port; clients on other hosts reach only the
    Fleet API, tierlite.federated.FleetOnlyForRemoteClients); its log in <out>/superlink.log.
    node_auth: it activates only SuperNodes whose public keys are registered (`register_sites`).

    It ends with this process, even when this process is SIGKILLed (`with_parent`); a SuperLink
    an earlier run left in <out>/superlink.pid (one started before that, or whose parent the
    kernel did not signal) is stopped first."""
    from tierlite.federated import flower_command

    stop_stale_superlink(out)
    # flower-superlink, run with tierlite's longer ServerApp claim window (tierlite.federated.run_flower)
    cmd = flower_command("flwr.superlink.cli:flower_superlink", "flower-superlink", with_parent=True) + [
        "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if insecure:
        cmd.append("--insecure")
    else:
        if not (certfile and keyfile):
            raise ConfigError("a SuperLink with TLS needs --certfile and --keyfile (or --insecure on loopback)")
        cmd += ["--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile)]
        if ca_certfile:
            cmd += ["--ssl-ca-certfile", str(ca_certfile)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    logf = open(out / "superlink.log", "ab")
    home = out / "flwr-home-superlink"  # the apps it installs and their state stay in the output folder
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FLWR_HOME": str(home)},
                            start_new_session=True)
    from tierlite.federated import process_start_tick

    (out / SUPERLINK_PID_FILE).write_text(json.dumps({"pid": proc.pid, "start_tick": process_start_tick(proc.pid),
                                                      "port": port}) + "\n")
    _wait_port(port, 180, proc, "flower-superlink")  # slow to start on a loaded machine
    return proc


# <out>/superlink.pid: the SuperLink a run started (pid, start tick, port), removed when it stops.
SUPERLINK_PID_FILE = "superlink.pid"


def _kill_launched(port: int) -> None:
    """SIGKILL the SuperLink's SuperExec and ServerApp: they run detached (their own sessions) and,
    starved of CPU, outlive it for minutes; found by the SuperLink's address on their command line."""
    import signal

    from tierlite.federated import flower_processes

    for _, pid in flower_processes(f"--runtime-api-address\x00127.0.0.1:{port}\x00".encode()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_stale_superlink(out: Path) -> bool:
    """Stop the SuperLink recorded in <out>/superlink.pid if that very process (same pid and start
    tick) still runs, and what it launched. True when one was stopped."""
    import signal

    from tierlite.federated import process_start_tick

    record_file = out / SUPERLINK_PID_FILE
    try:
        record = json.loads(record_file.read_text())
        pid, tick, port = int(record["pid"]), int(record["start_tick"]), int(record["port"])
    except FileNotFoundError:
        return False
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable (%s); ignored", record_file, e)
        record_file.unlink(missing_ok=True)
        return False
    stopped = False
    if process_start_tick(pid) == tick:
        log.warning("stopping the SuperLink an earlier run left running (pid %d, port %d)", pid, port)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        for _ in range(100):
            if process_start_tick(pid) != tick:
                break
            time.sleep(0.2)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stopped = True
    _kill_launched(port)
    record_file.unlink(missing_ok=True)
    return stopped


def stop_superlink(proc: subprocess.Popen, port: int, out: Path | None = None) -> None:
    """Stop the SuperLink and what it launched (its SuperExec and ServerApp)."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    _kill_launched(port)
    if out is not None:
        (out / SUPERLINK_PID_FILE).unlink(missing_ok=True)


def register_sites(keys: dict[str, Path], env: dict) -> list[str]:
    """Register each site's public key at the SuperLink of the connection in env's FLWR_HOME
    (`flwr supernode register`, over its Control API); the names registered, in order."""
    for name, pub in keys.items():
        r = subprocess.run([_exe("flwr"), "supernode", "register", str(pub), "tierlite", "--name", name],
                           env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            why = [l.strip() for l in (r.stdout + r.stderr).splitlines() if l.strip()]
            raise TierliteError(f"site {name}: the SuperLink did not register {pub} (flwr supernode register "
                                f"status {r.returncode}): {why[-1] if why else 'no output'}")
        log.info("site %s: public key %s registered at the SuperLink", name, pub)
    return list(keys)


def _flwr_run(cmd: list[str], env: dict, log_path: Path, timeout: float | None) -> int:
    """`flwr run --stream`: every line to log_path, the ServerApp's "[tierlite]" progress lines
    (one per round and site: accuracy, loss, bytes, clients, refusals) to this process's log."""
    deadline = time.monotonic() + timeout if timeout else None
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        for raw in proc.stdout:
            logf.write(raw)
            logf.flush()
            line = raw.decode(errors="replace")
            if "[tierlite]" in line:
                log.info("%s", line.split("[tierlite]", 1)[1].strip())
            if deadline and time.monotonic() > deadline:
                proc.kill()
                break
        return proc.wait()


def run_federation(out_dir: str | Path, *, classes: list[str], sites: int = 2, rounds: int = 2,
                   preset: str = "small", overrides: dict | None = None, local_epochs: int = 1,
                   local_steps: int | None = None,
                   lr: float | None = None, lr_schedule: str = "cycle", server_lr: float = 1.0,
                   server_momentum: float = 0.0, proximal_mu: float = 0.0, personal: str = "", seed: int = 0,
                   min_sites: int | None = None, round_timeout: float = 600.0, evaluate: bool = True,
                   port: int = 9092, superlink: str | None = None, insecure: bool = True,
                   certfile: str | None = None, keyfile: str | None = None, ca_certfile: str | None = None,
                   init_from: str | Path | None = None, timeout: float | None = None,
                   secagg: bool = False, cloud_every: int = 0, site_keys: str | Path | None = None,
                   host: str = "127.0.0.1") -> dict:
    """Start (or join) a SuperLink, run the federation to the end; returns the report dict.

    lr: the sites' peak rate (default: the preset's); lr_schedule "cycle": the converters'
    one-cycle schedule laid across all rounds (each site places its local steps in it), "const":
    `lr` throughout. server_lr/server_momentum: the cloud's FedAvgM step (1/0: plain FedAvg).
    local_steps: each site trains this many steps per round instead of local_epochs epochs.
    secagg: Flower's SecAgg+ (the cloud sees only the sum of the sites' masked weights; secagg.py).
    cloud_every: hierarchical FedAvg (HierFAVG): the sites' regions (`federate site --region`) are
    averaged every round, the regions by the cloud every `cloud_every` rounds and in the last (0:
    flat FedAvg).
    site_keys: a folder of the sites' public keys (<site>.pub, `tierlite federate keygen`): the
    SuperLink (TLS only) accepts only SuperNodes holding one of their private keys.
    host: where the SuperLink listens: loopback, or 0.0.0.0 for sites on other machines (TLS
    only; other hosts then reach its Fleet API and nothing else)."""
    if lr_schedule not in ("cycle", "const"):
        raise ConfigError(f"lr schedule must be 'cycle' or 'const', got {lr_schedule!r}")
    if server_lr <= 0 or not 0 <= server_momentum < 1:
        raise ConfigError(f"server lr must be > 0 and server momentum in [0, 1), got {server_lr}, {server_momentum}")
    if cloud_every < 0 or (cloud_every and secagg):
        raise ConfigError("--cloud-every must be >= 1 (0: flat FedAvg)" if cloud_every < 0 else
                          "--cloud-every with --secagg: hierarchical aggregation needs each region's sum, "
                          "SecAgg+ gives the cloud only the sum of every site (not built)")
    check_superlink_host(host, insecure, superlink)
    keys = None
    if site_keys is not None:  # checked before anything starts
        from tierlite.federated import site_public_keys
        if insecure or not (certfile and keyfile and ca_certfile):
            raise ConfigError("--site-keys needs TLS: Flower authenticates SuperNodes only over TLS (give "
                              "--certfile, --keyfile and --ca-certfile, not --insecure)")
        if superlink is not None:
            raise ConfigError("--site-keys registers the sites at the SuperLink this command starts; register "
                              "them at a running one (--superlink) with `flwr supernode register`")
        keys = site_public_keys(site_keys)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("report.json", "global.npz"):
        (out / stale).unlink(missing_ok=True)
    overrides = dict(overrides or {})
    initial_weights(out, preset, classes, seed, overrides, init_from)
    if lr is None:  # the preset's peak rate
        lr = json.loads((out / "model.json").read_text())["preset_lr"]
    run_config = {"num-server-rounds": int(rounds), "preset": preset, "arch-set": json.dumps(overrides),
                  "classes": json.dumps(classes), "local-epochs": int(local_epochs),
                  "local-steps": int(local_steps or 0), "lr": float(lr),
                  "lr-schedule": lr_schedule, "server-lr": float(server_lr), "server-momentum": float(server_momentum),
                  "proximal-mu": float(proximal_mu), "personal": personal, "seed": int(seed),
                  "out-dir": str(out), "wait-sites": int(sites), "min-sites": int(min_sites or 1),
                  "round-timeout": float(round_timeout), "evaluate": bool(evaluate), "wait-timeout": 600.0,
                  "cloud-every": int(cloud_every)}
    app = write_app(out, run_config, secagg)
    proc = None
    if superlink is None:
        proc = start_superlink(out, port, insecure, certfile, keyfile, ca_certfile, host, node_auth=keys is not None)
        superlink = f"127.0.0.1:{port}"
    home = write_flwr_home(out, superlink, insecure, ca_certfile)
    env = {**os.environ, "FLWR_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.monotonic()
    try:
        registered = register_sites(keys, env) if keys else None
        rc = _flwr_run([_exe("flwr"), "run", str(app), "tierlite", "--stream"], env, out / "flwr-run.log", timeout)
    finally:
        if proc is not None:
            stop_superlink(proc, port, out)
    report_file = out / "report.json"
    if rc != 0 or not (out / "global.npz").is_file():
        tail = (out / "flwr-run.log").read_text(errors="replace").strip().splitlines()[-5:]
        raise TierliteError(f"federation did not finish (flwr run status {rc}); {out / 'flwr-run.log'}: "
                            + " | ".join(tail))
    report = json.loads(report_file.read_text())
    report["wall_seconds"] = round(time.monotonic() - t0, 1)
    if registered is not None:  # who could join: a SuperNode with any other key was refused
        report["registered_sites"] = registered
    report_file.write_text(json.dumps(report, indent=2) + "\n")
    plot_report(report, out / "report.png")
    return report


def plot_report(report: dict, path: Path) -> Path | None:
    """Per round: aggregated validation accuracy per exit, and bytes per site each way."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rounds = [r for r in report.get("rounds", []) if r.get("aggregate")]
    if not rounds:
        return None
    xs = [r["round"] for r in rounds]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for t in ("end", "edge", "cloud"):
        a.plot(xs, [r["aggregate"].get(f"val-acc-{t}", np.nan) for r in rounds], marker="o", label=f"{t} exit")
        ev = [(r["round"], r.get("evaluate", {}).get("sites", [])) for r in rounds]
        ev = [(x, sum(e[f"global-acc-{t}"] * e["num-examples"] for e in es) / sum(e["num-examples"] for e in es))
              for x, es in ev if es and all(f"global-acc-{t}" in e for e in es)]
        if ev:
            a.plot(*zip(*ev), linestyle="--", marker="x", label=f"{t} exit, global model")
    a.set_xlabel("round"); a.set_ylabel("sites' validation accuracy (weighted)")
    a.set_title("solid: after local training; dashed: aggregate", fontsize=9)
    a.legend(fontsize=8); a.grid(alpha=.3)
    b.plot(xs, [r["bytes_down_per_site"] for r in rounds], marker="o", label="down, per site")
    b.plot(xs, [np.mean([s["bytes_up"] for s in r["sites"]]) for r in rounds], marker="s", label="up, per site (mean)")
    b.set_xlabel("round"); b.set_ylabel("bytes"); b.legend(); b.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def export_global(out_dir: str | Path, calib_dir: str | Path, bundle_dir: str | Path | None = None,
                  weights_file: str | Path | None = None, version: int = 1, name: str | None = None,
                  max_drop: float = 0.005, recompute_bn: bool = True, site: str | None = None) -> Path:
    """The aggregated model (<out>/global.npz) -> int8 bundle, calibrated on `calib_dir` (labelled
    frames the cloud holds, never a site's). Returns the bundle directory.

    recompute_bn: BatchNorm statistics recomputed on the calibration frames first: the sites'
    averaged statistics are not those of the averaged weights (docs/COTRAINING.md: +0.75 to +3.5 pt
    on the cloud exit of four Flower runs' models). site: the bundle is that site's personalised
    model (`weights_file` = the global body + its heads): the manifest says so (training.personalised_for),
    and `tierlite publish` sends it to that site's nodes only."""
    from tierlite.converters import (build_federated_model, export_bundle, load_folder_cached,
                                     recompute_batchnorm, representative_frames, set_model_weights)
    from tierlite.federated import loads

    out = Path(out_dir)
    if site is not None and weights_file is None:
        raise ConfigError(f"a bundle for site {site} needs that site's weights (--weights: the global body "
                          "with its personal heads)")
    if not (out / "model.json").is_file():
        raise ConfigError(f"{out}: not a federation's output folder (no model.json: `tierlite federate server OUT` writes it)")
    meta = json.loads((out / "model.json").read_text())
    model, arch, tc = build_federated_model(meta["preset"], len(meta["classes"]), meta["seed"], **meta["overrides"])
    weights = loads(Path(weights_file or out / "global.npz").read_bytes())
    set_model_weights(model, weights, who="aggregated model")
    calib = load_folder_cached(calib_dir, arch.input_size, out / "cache")
    if calib.classes != meta["classes"]:
        raise ConfigError(f"{calib_dir}: classes {calib.classes} differ from the federation's {meta['classes']}")
    if recompute_bn:
        recompute_batchnorm(model, calib.images)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    rounds = report.get("rounds", [])
    bundle = Path(bundle_dir or out / "bundle")
    export_bundle(model, bundle, arch=arch, classes=meta["classes"], calib_images=calib.images,
                  calib_labels=calib.labels, representative=representative_frames(calib.images, tc.calibration_frames,
                                                                                  meta["seed"]),
                  name=name or f"federated-{meta['preset']}", version=version, max_drop=max_drop, report_dir=out,
                  extra={"training": {"federated": True, "preset": meta["preset"], "rounds": len(rounds),
                                      "sites": sorted({s["site"] for r in rounds for s in r.get("sites", [])}),
                                      "examples_last_round": (rounds[-1].get("aggregate") or {}).get("examples")
                                      if rounds else None,
                                      "calibration_folder": str(Path(calib_dir).resolve()),
                                      "batchnorm_statistics": "calibration folder" if recompute_bn
                                      else "sites' average",
                                      "init_from": meta.get("init_from"),
                                      **({"personalised_for": site} if site else {})}})
    return bundle
