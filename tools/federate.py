"""`tierlite federate server|site|export|keygen`: co-training across sites on Flower (docs/COTRAINING.md).

    tierlite federate server OUT --sites 2 --rounds 5 --calib-dir HELD_OUT [--proximal-mu 0.01]
                             [--personal end,edge] [--port 9092] [--insecure] [--export] [--site-keys DIR]
    tierlite federate site DATA_DIR --superlink HOST:PORT --name shop-1 --workdir W [--insecure] [--key K]
    tierlite federate export OUT --calib-dir HELD_OUT [--bundle B] [--version N]
    tierlite federate keygen DIR --site shop-1 [--site shop-2]    # DIR/<site>.key + DIR/<site>.pub

The server runs Flower's SuperLink with tierlite's ServerApp (cloud); each site runs a SuperNode
with tierlite's ClientApp (edge gateway) that trains on DATA_DIR. Only weights travel.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tierlite.converters.cli import parse_sets
from tierlite.errors import ConfigError


def configure_federate(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="role", metavar="ROLE", required=True)
    s = sub.add_parser("server", help="cloud: SuperLink + tierlite's ServerApp; runs the federation, reports, exports")
    s.add_argument("out", type=Path, help="output folder: report.json/.png, global.npz, bundle/")
    s.add_argument("--sites", type=int, default=2, help="wait for this many sites before round 1 (default 2)")
    s.add_argument("--min-sites", type=int, default=1,
                   help="a round goes on with at least this many answers; the others are failures (default 1)")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--classes", help="comma-separated class names (default: those of --calib-dir)")
    s.add_argument("--calib-dir", type=Path, help="held-out labelled frames the cloud holds: classes, calibration")
    s.add_argument("--preset", default="small")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="model/training override (all sites)")
    s.add_argument("--local-epochs", type=int, default=1)
    s.add_argument("--local-steps", type=int, help="local steps per round instead of --local-epochs epochs")
    s.add_argument("--lr", type=float, help="the sites' peak learning rate (default: the preset's)")
    s.add_argument("--lr-schedule", choices=("cycle", "const"), default="cycle",
                   help="cycle: one warm-up + cosine schedule across all rounds (default); const: --lr throughout")
    s.add_argument("--server-lr", type=float, default=1.0, help="the cloud's step on the sites' average (FedAvgM)")
    s.add_argument("--server-momentum", type=float, default=0.0, help="FedAvgM server momentum (0: FedAvg)")
    s.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx proximal term (0: FedAvg)")
    s.add_argument("--personal", default="", help="exit heads each site keeps, e.g. 'end,edge' (FedPer-style)")
    s.add_argument("--no-evaluate", action="store_true", help="skip the sites' evaluation after each round")
    s.add_argument("--secagg", action="store_true",
                   help="secure aggregation (Flower's SecAgg+): the cloud sees only the sum of masked weights")
    s.add_argument("--cloud-every", type=int, default=0, metavar="K",
                   help="hierarchical FedAvg (HierFAVG): average the sites of each region (`site --region`) "
                   "every round and the regions every K rounds and in the last (default 0: flat FedAvg)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--round-timeout", type=float, default=1800.0, help="seconds a round waits for answers")
    s.add_argument("--port", type=int, default=9092, help="SuperLink port (Fleet + Control APIs)")
    s.add_argument("--host", default="127.0.0.1", help="SuperLink address: loopback (default), or 0.0.0.0 "
                   "for sites on other machines (TLS only; other hosts reach the Fleet API and nothing else)")
    s.add_argument("--superlink", help="use a running SuperLink at HOST:PORT instead of starting one")
    s.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    s.add_argument("--certfile"); s.add_argument("--keyfile"); s.add_argument("--ca-certfile")
    s.add_argument("--site-keys", type=Path, metavar="DIR",
                   help="SuperNode authentication (TLS only): accept only sites whose public key <site>.pub is "
                   "in DIR (`federate keygen`); any other SuperNode is refused")
    s.add_argument("--init-from", help="checkpoint workdir of a pretrained model of the same architecture")
    s.add_argument("--export", action="store_true", help="export the aggregated model as a bundle (needs --calib-dir)")
    s.add_argument("--averaged-bn", action="store_true", help="export with the sites' averaged BatchNorm "
                   "statistics (default: recomputed on --calib-dir)")
    s.add_argument("--version", type=int, default=1, help="bundle version")
    c = sub.add_parser("site", help="edge gateway: SuperNode + tierlite's ClientApp training on DATA_DIR")
    c.add_argument("data_dir", type=Path, help="the site's labelled frames (<class>/*.jpg); they never leave")
    c.add_argument("--superlink", required=True, help="the cloud's SuperLink HOST:PORT")
    c.add_argument("--name", required=True)
    c.add_argument("--workdir", type=Path, help="cache, personal heads, last model (default federated-<name>)")
    c.add_argument("--port", type=int, default=9094, help="the SuperNode's local ClientApp API port")
    c.add_argument("--insecure", action="store_true")
    c.add_argument("--root-certificates", help="CA that signed the SuperLink's certificate")
    c.add_argument("--key", type=Path, help="this site's private key (`federate keygen`), for a SuperLink that "
                   "authenticates its sites (`server --site-keys`)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="this site's model deviations (refused if they change shapes)")
    c.add_argument("--limit", type=int, help="use at most this many frames")
    c.add_argument("--region", help="this site's region, for a hierarchical federation (server --cloud-every; "
                   "default: the site's own name)")
    k = sub.add_parser("keygen", help="a key pair per site for SuperNode authentication (server --site-keys, "
                       "site --key)")
    k.add_argument("dir", type=Path, help="writes <site>.key (private, 0600: to that site only) and <site>.pub "
                   "(to the cloud's --site-keys folder)")
    k.add_argument("--site", action="append", required=True, help="site name (repeatable); the .pub's name is "
                   "the name the cloud registers it under")
    e = sub.add_parser("export", help="aggregated model -> int8 bundle calibrated on a held-out folder")
    e.add_argument("out", type=Path, help="the server's output folder")
    e.add_argument("--calib-dir", type=Path, required=True)
    e.add_argument("--bundle", type=Path)
    e.add_argument("--version", type=int, default=1)
    e.add_argument("--averaged-bn", action="store_true", help="keep the sites' averaged BatchNorm statistics "
                   "(default: recomputed on --calib-dir)")
    e.add_argument("--weights", type=Path, help="another named-weights file of the federation's model, e.g. a "
                   "personalised site's <workdir>/site-model.npz (default OUT/global.npz)")
    e.add_argument("--site", help="the --weights are this site's personalised model: the manifest says so and "
                   "`tierlite publish` sends the bundle to that site's nodes only (--site there too)")


def run_federate(args) -> int:
    if args.role == "keygen":
        from tierlite.federated import generate_site_key
        for name in args.site:
            key, pub = generate_site_key(args.dir, name)
            print(f"site {name}: private key {key} (keep at the site: federate site --key), "
                  f"public key {pub} (to the cloud: federate server --site-keys {args.dir})")
        return 0
    if args.role == "site":
        from tierlite.edge.federated import run_site
        if not args.insecure and not args.root_certificates:
            raise ConfigError("a site needs --root-certificates (TLS) or --insecure (loopback tests)")
        return run_site(args.superlink, args.data_dir, args.name, args.workdir or Path(f"federated-{args.name}"),
                        args.port, args.insecure, args.root_certificates, parse_sets(args.set) or None, args.limit,
                        region=args.region, key=args.key)
    from tierlite.cloud.federated.server import export_global, run_federation
    if args.role == "export":
        b = export_global(args.out, args.calib_dir, args.bundle, weights_file=args.weights, version=args.version,
                          recompute_bn=not args.averaged_bn, site=args.site)
        print(f"bundle {b}")
        return 0
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    elif args.calib_dir:
        from tierlite.data import list_image_folder
        classes = list_image_folder(args.calib_dir)[2]
    else:
        raise ConfigError("give --classes or --calib-dir (the federation's class names)")
    if args.export and not args.calib_dir:
        raise ConfigError("--export needs --calib-dir (held-out frames to calibrate the exits on)")
    if not args.insecure and not (args.superlink or (args.certfile and args.keyfile)):
        raise ConfigError("the SuperLink needs --certfile/--keyfile (TLS) or --insecure (loopback tests)")
    report = run_federation(args.out, classes=classes, sites=args.sites, rounds=args.rounds, preset=args.preset,
                            overrides=parse_sets(args.set), local_epochs=args.local_epochs,
                            local_steps=args.local_steps, lr=args.lr,
                            lr_schedule=args.lr_schedule, server_lr=args.server_lr,
                            server_momentum=args.server_momentum,
                            proximal_mu=args.proximal_mu, personal=args.personal, seed=args.seed,
                            min_sites=args.min_sites, round_timeout=args.round_timeout,
                            evaluate=not args.no_evaluate, port=args.port, superlink=args.superlink,
                            insecure=args.insecure, certfile=args.certfile, keyfile=args.keyfile,
                            ca_certfile=args.ca_certfile, init_from=args.init_from, secagg=args.secagg,
                            cloud_every=args.cloud_every, site_keys=args.site_keys, host=args.host)
    for r in report["rounds"]:
        a = r.get("aggregate") or {}
        print(f"round {r['round']}: {r['clients']} site(s), loss {a.get('loss', float('nan')):.3f}, val acc "
              f"end/edge/cloud {a.get('val-acc-end', 0):.3f}/{a.get('val-acc-edge', 0):.3f}/{a.get('val-acc-cloud', 0):.3f}, "
              f"bytes per site down {r['bytes_down_per_site']:,} up "
              + ", ".join(f"{s['site']} {s['bytes_up']:,}" for s in r["sites"])
              + "".join(f"\n  {line}" for line in r.get("refused", [])))
    if "registered_sites" in report:
        print(f"sites authenticated by key: {', '.join(report['registered_sites'])} (any other SuperNode was refused)")
    print(f"report {args.out / 'report.json'} (+ report.png), global model {args.out / 'global.npz'}")
    if args.export:
        b = export_global(args.out, args.calib_dir, version=args.version, recompute_bn=not args.averaged_bn)
        print(f"bundle {b}")
    sys.stdout.flush()
    return 0


def split_sites(src: Path, dst: Path, sites: int, alpha: float | None = None, seed: int = 0,
                limit: int | None = None) -> list[Path]:
    """Split a labelled folder into `sites` site folders (symlinks): IID (alpha None) or non-IID,
    each class's frames spread over the sites by Dirichlet(alpha) proportions. Returns the folders."""
    import numpy as np

    from tierlite.data import list_image_folder

    paths, labels, classes = list_image_folder(src)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paths))
    if limit:
        order = order[:limit]
    out = [Path(dst) / f"site{i}" for i in range(sites)]
    for c, name in enumerate(classes):
        idx = [i for i in order if labels[i] == c]
        if alpha is None:
            parts = np.array_split(np.array(idx, dtype=int), sites)
        else:
            p = rng.dirichlet([alpha] * sites)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            parts = np.split(np.array(idx, dtype=int), cuts)
        for s, part in enumerate(parts):
            if not len(part):
                continue  # a site without this class: no folder for it
            d = out[s] / name
            d.mkdir(parents=True, exist_ok=True)
            for i in part:
                link = d / paths[i].name
                if not link.exists():
                    link.symlink_to(Path(paths[i]).resolve())
    return out
