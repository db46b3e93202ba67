"""The publisher's commands: `tierlite keygen`, `tierlite publish`, `tierlite retrain` (the cloud
side of co-updating).

TensorFlow is imported only by `retrain` (inside tierlite.cloud.retrain), so keygen and publish
run on any machine with the light install.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tierlite.cloud.retrain import END_SCOPES
from tierlite.errors import ConfigError

__all__ = ["configure_keygen", "configure_publish", "configure_retrain", "publish", "run_keygen", "run_publish",
           "run_retrain"]

log = logging.getLogger("tierlite.cloud.update")


# -- keygen -------------------------------------------------------------------------------------
def configure_keygen(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="keys", help="directory for the key files (default: keys/)")
    p.add_argument("--name", default="update", help="file stem: <out>/<name>.key and <out>/<name>.pub")
    p.add_argument("--force", action="store_true", help="replace existing key files")


def run_keygen(args) -> int:
    from tierlite.cloud.signing import generate_keypair

    priv, pub, kid = generate_keypair(Path(args.out) / f"{args.name}.key", Path(args.out) / f"{args.name}.pub",
                                      force=args.force)
    print(f"key id {kid}\n  private (keep secret, mode 0600): {priv}\n  public (give to every node):     {pub}")
    return 0


# -- publish ------------------------------------------------------------------------------------
def _add_publish_options(p: argparse.ArgumentParser, required_key: bool) -> None:
    g = p.add_argument_group("publishing")
    g.add_argument("--key", required=required_key, help="Ed25519 private key (from `tierlite keygen`)")
    g.add_argument("--broker", default="127.0.0.1:1883", help="MQTT broker host:port (default 127.0.0.1:1883)")
    g.add_argument("--broker-config", help="YAML with a `broker:` section (host, port, TLS, credentials), e.g. "
                   "fleet/publisher/publisher-security.yaml from `tierlite provision`; replaces --broker")
    g.add_argument("--prefix", default="tierlite", help="MQTT topic prefix (default tierlite)")
    g.add_argument("--site", help="publish to this site's nodes only (a site's personalised bundle), through the "
                   "cloud broker's site bridges; the site must be in the cloud broker's folder (--fleet)")
    g.add_argument("--fleet", help="the cloud broker's folder from `tierlite provision cloud` (its sites; default: "
                   "the folder above --broker-config's, when it holds one)")
    g.add_argument("--full", action="store_true", help="ship every file, not a delta against --parent")
    g.add_argument("--canary", type=float, default=0.0,
                   help="share of nodes (0-1) that get the update first; the rest after they confirm it")
    g.add_argument("--canary-nodes", default="", help="comma-separated node ids that are always in the canary")
    g.add_argument("--hold", type=float, default=120.0, help="seconds to wait for the canary's verdict")
    g.add_argument("--chunk-bytes", type=int, default=64 * 1024, help="MQTT payload size per chunk")
    g.add_argument("--artifact-out", help="also write the artifact to this file")


def configure_publish(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="the new bundle (directory)")
    p.add_argument("--parent", help="the bundle the fleet runs now: ship only what changed against it")
    p.add_argument("--dry-run", action="store_true", help="build and sign the artifact, report its size, publish nothing")
    p.add_argument("--json", help="write the rollout report here")
    _add_publish_options(p, required_key=True)


def run_publish(args) -> int:
    from tierlite.bundle import Bundle

    parent = Bundle.load(args.parent) if args.parent else None
    result = publish(args.bundle, parent, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["stage"] in ("published", "complete", "dry-run") else 1


def publish(bundle_dir, parent, args) -> dict:
    """Shared by publish and retrain --publish: dry run or staged rollout; prints the outcome."""
    from tierlite.cloud.publish import build_artifact
    from tierlite.cloud.signing import load_private_key

    key = load_private_key(args.key)
    site = _site(bundle_dir, args)
    if getattr(args, "dry_run", False):
        data, rep = build_artifact(bundle_dir, parent=parent, full=args.full, private_key=key)
        if args.artifact_out:
            Path(args.artifact_out).write_bytes(data)
        print(rep.summary())
        return {"stage": "dry-run", "artifact": rep.to_json()}
    from tierlite.cloud.rollout import connect, rollout

    nodes = [n for n in args.canary_nodes.split(",") if n]
    mqtt = connect(args.broker, broker_config=getattr(args, "broker_config", None))
    try:
        result = rollout(mqtt, bundle_dir, key, prefix=args.prefix, parent=parent, full=args.full,
                         canary=args.canary, canary_nodes=nodes, hold_s=args.hold, chunk_bytes=args.chunk_bytes,
                         artifact_out=args.artifact_out, site=site)
    finally:
        mqtt.stop()
    print(result.artifact.summary())
    print(f"rollout{f' to site {site}' if site else ''}: {result.stage}"
          + (f" ({result.reason})" if result.reason else ""))
    return {**result.to_json(), "site": site}


def _site(bundle_dir, args) -> str | None:
    """--site checked against the cloud broker's folder, and against a bundle personalised for one
    site (refused without --site or for another site); None: every site."""
    from tierlite.bundle import Bundle
    from tierlite.cloud.rollout import check_site, fleet_sites

    site = getattr(args, "site", None)
    fleet = getattr(args, "fleet", None)
    config = getattr(args, "broker_config", None)
    if site is not None and not fleet and config and (Path(config).resolve().parent.parent / "fleet.json").is_file():
        fleet = Path(config).resolve().parent.parent  # fleet-cloud/publisher/publisher-security.yaml
    if site is not None and not fleet:
        raise ConfigError("--site needs the cloud broker's folder (its fleet.json lists the sites): --fleet DIR, "
                          "or --broker-config DIR/publisher/publisher-security.yaml from `tierlite provision cloud`")
    check_site(Bundle.load(bundle_dir), site, fleet_sites(fleet) if site is not None else None)
    return site


# -- retrain ------------------------------------------------------------------------------------
def configure_retrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="the cloud worker's hard-example store (SQLite file)")
    p.add_argument("--bundle", required=True, help="the bundle the fleet runs now (the parent version)")
    p.add_argument("--checkpoint", help="its trained Keras model, for --end-scope branch/segment (default: <bundle>-work)")
    p.add_argument("--out", help="directory for the candidate bundle (default: <bundle>-v<N+1> next to it)")
    p.add_argument("--replay", help="labelled training folder mixed in so clean accuracy holds "
                                    "(default: the checkpoint's training folder, if it still exists)")
    p.add_argument("--replay-frames", type=int, default=2000, help="replay frames used (default 2000)")
    p.add_argument("--privacy", default="",
                   help="YAML/JSON file: {default: features|raw, nodes: {node-id: features|raw}}; "
                        "raw lets that node's uploaded frames retrain the whole end exit")
    p.add_argument("--frames", help="frames uploaded by opted-in nodes (default: <store stem>.frames.sqlite)")
    p.add_argument("--temperature", type=float, default=3.0, help="distillation temperature (default 3)")
    p.add_argument("--hard-weight", type=float, default=1.0,
                   help="weight of the teacher's answer as a hard target beside the soft targets (default 1)")
    p.add_argument("--end-scope", choices=END_SCOPES, default="head",
                   help="with frames from opted-in nodes: refit the end exit head only (default; boundary "
                        "bit-identical), retrain the end layers past the boundary tap (branch), the whole end "
                        "segment (FitNets hint keeps the boundary close), or add a condition profile (the end "
                        "with statistics of the uploaded frames, chosen per frame on the node); all but head "
                        "need the Keras checkpoint and TensorFlow")
    p.add_argument("--hint-weight", type=float, default=1.0, help="weight of the boundary hint (--end-scope segment)")
    p.add_argument("--steps", type=int, default=300, help="full-batch optimizer steps per head (default 300)")
    p.add_argument("--min-examples", type=int, default=50, help="refuse to run on fewer hard examples")
    p.add_argument("--margin", type=float, default=1.0,
                   help="publish only if the candidate beats the parent by this many points on the "
                        "held-out store slice (default 1.0)")
    p.add_argument("--max-clean-drop", type=float, default=0.5,
                   help="refuse a candidate whose clean (replay validation) accuracy drops more (points)")
    p.add_argument("--holdout", type=float, default=0.25, help="share of the store held out for evaluation")
    p.add_argument("--labelled-holdout", metavar="DIR",
                   help="frames from the drifted site with their true classes (DIR/<class>/*.jpg): the verdict is "
                        "their accuracy, parent vs candidate, instead of agreement with the teacher")
    p.add_argument("--significance", type=float, default=0.05,
                   help="one-sided p-value a gain must reach, paired exact McNemar test (default 0.05)")
    p.add_argument("--since", type=float, default=None, help="only examples stored after this UNIX time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the retraining report here")
    p.add_argument("--publish", action="store_true", help="publish the candidate if it is better by --margin")
    _add_publish_options(p, required_key=False)


def run_retrain(args) -> int:
    from tierlite.cloud.retrain import RetrainOptions, retrain

    if args.publish and not args.key:
        raise ConfigError("--publish needs --key (the signing key from `tierlite keygen`)")
    opts = RetrainOptions.from_args(args)
    report = retrain(opts)
    print(report.summary())
    out = report.to_json()
    if args.publish and report.better:
        from tierlite.bundle import Bundle

        out["rollout"] = publish(report.bundle_dir, Bundle.load(args.bundle), args)
    elif args.publish:
        print("not published: the candidate is not better by the required margin")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0
