"""`tierlite demo [--data DIR] [--bundle DIR] [--workdir DIR]`: the whole system on this machine, in one command.

Trains a small bundle on the spot (scikit-learn's digits as JPEG frames, or --data DIR with
train/ and test/), starts the edge gateway (which starts Mosquitto and advertises it by zeroconf),
the cloud worker and a few camera nodes as real processes on 127.0.0.1, feeds the nodes the test
frames, stops everything cleanly and prints a report: frames per tier, accuracy, bytes on the wire
per frame, latency p50/p99 per tier. The bundle, configs, logs, results and report.json stay in
--workdir. Without Mosquitto an embedded Python broker (amqtt) stands in, with a warning.
Processes, broker and bundle come from tierlite.tools.stack.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tierlite.tools.stack import (Broker, TierProcess, free_port, prepare_bundle, quiet, read_jsonl, reference_bundle,
                                  wait_until, write_yaml)

NODES = 3


def configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="image folder with train/<class>/ and test/<class>/ (default: digits frames)")
    p.add_argument("--workdir", default="tierlite-demo", help="where bundle, configs, logs and report go (default ./tierlite-demo)")
    p.add_argument("--nodes", type=int, default=NODES, help=f"camera nodes (default {NODES})")
    p.add_argument("--frames", type=int, default=600, help="test frames to stream, split over the nodes (default 600)")
    p.add_argument("--fps", type=float, default=40.0, help="frame rate cap per node (default 40)")
    p.add_argument("--workers", type=int, default=2, help="edge worker processes (default 2)")
    p.add_argument("--bundle", help="run this trained bundle instead of training one (default with --data: "
                                    "models/cifar10 when present and its labels are --data's classes)")
    p.add_argument("--retrain", action="store_true", help="train a new bundle even if --workdir has one")
    p.add_argument("--operating-point", choices=["spread", "calibrated"], default="spread",
                   help="spread (default): exit thresholds set on training frames so that about 60%% of frames "
                        "exit on the camera, 20%% at the edge, 20%% in the cloud, to show every tier; "
                        "calibrated: the bundle's own thresholds (on digits nearly every frame exits on the camera)")


# -- the demo's operating point and report ----------------------------------------------------
def spread_thresholds(bundle, train_dir: Path, shares=(0.6, 0.5), frames: int = 300) -> tuple[float, float]:
    """Exit thresholds that send ~shares[0] of (training) frames out at the end exit and ~shares[1]
    of the rest out at the edge exit: an operating point that exercises every tier."""
    from tierlite.data import load_image_folder
    from tierlite.policy import normalized_entropy, softmax
    from tierlite.segment import Segment
    from tierlite.wire import decode_feature, encode_feature

    images = load_image_folder(train_dir, tuple(bundle.input_shape[1:3]), limit=frames, seed=1).images
    end, edge = Segment(bundle, "end"), Segment(bundle, "edge")
    enc = bundle.feature_encoding
    h_end, h_edge = [], []
    for img in images:
        o = end.run(img[None])
        h_end.append(normalized_entropy(softmax(o.logits)))
        q = decode_feature(encode_feature(o.feature, enc), o.feature.shape, enc)
        h_edge.append(normalized_entropy(softmax(edge.run(q).logits)))
    h_end, h_edge = np.array(h_end), np.array(h_edge)
    t_end = float(np.quantile(h_end, shares[0]))
    rest = h_edge[h_end > t_end]
    t_edge = float(np.quantile(rest, shares[1])) if len(rest) else 1.0
    return min(max(t_end, 0.0), 1.0), min(max(t_edge, 0.0), 1.0)


def percentiles(values, qs=(50, 99)) -> dict[str, float | None]:
    if len(values) == 0:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in qs}


# -- the demo ------------------------------------------------------------------------------------
def _split_frames(test_dir: Path, dest: Path, nodes: int, limit: int) -> list[Path]:
    """Stratified sample of the test frames, dealt round-robin into one folder per node."""
    from tierlite.data import list_image_folder, stratified_sample

    paths, labels, _ = list_image_folder(test_dir)
    idx = stratified_sample(labels, min(limit, len(paths)), seed=0)
    shutil.rmtree(dest, ignore_errors=True)
    folders = [dest / f"cam{i + 1}" for i in range(nodes)]
    for k, i in enumerate(idx):
        p = paths[i]
        out = folders[k % nodes] / p.parent.name / p.name
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, out)  # same file system: no copy
        except OSError:
            shutil.copyfile(p, out)
    return folders


def _given_bundle(bundle: str | None, data: Path | None) -> Path | None:
    """--bundle, else the reference bundle when --data holds its classes, else None (train one)."""
    from tierlite.bundle import Bundle
    from tierlite.data import list_image_folder

    if bundle:
        return Path(bundle).resolve()
    if data is None or reference_bundle() is None:
        return None
    reference = Bundle.load(reference_bundle())
    return Path(reference_bundle()) if list_image_folder(data / "test")[2] == reference.labels else None


def run_demo(args: argparse.Namespace) -> int:
    from tierlite.bundle import Bundle
    from tierlite.data import make_digits_folder
    from tierlite.errors import ConfigError, DataError
    from tierlite.metrics import scrape

    t_start = time.monotonic()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    if not 1 <= args.nodes <= 16 or args.frames < args.nodes or args.fps <= 0 or not 1 <= args.workers <= 8:
        raise ConfigError("--nodes 1..16, --frames >= nodes, --fps > 0, --workers 1..8")
    if args.data:
        data = Path(args.data).resolve()
        if not (data / "train").is_dir() or not (data / "test").is_dir():
            raise DataError(f"--data {data}: needs train/<class>/ and test/<class>/ folders")
    else:
        print("== data: scikit-learn digits as 32x32 JPEG frames")
        data = make_digits_folder(work / "digits")

    bundle_dir = _given_bundle(args.bundle, data if args.data else None)
    t0 = time.monotonic()
    if bundle_dir is None:
        print(f"== bundle: {'training a small bundle (a minute or two)' if args.retrain or not (work / 'bundle' / 'manifest.json').exists() else 'reusing'} {work / 'bundle'}")
        with quiet(logs / "train.log"):  # TensorFlow's export chatter goes to the log, progress here
            bundle_dir = prepare_bundle(data / "train", work / "bundle", retrain=args.retrain)
    else:
        print(f"== bundle: {bundle_dir}")
    bundle = Bundle.load(bundle_dir)
    train_s = time.monotonic() - t0
    print(f"   {bundle.name} v{bundle.version}: thresholds {bundle.thresholds}, feature "
          f"{bundle.segment('end').output('feature').shape} {bundle.feature_encoding['kind']} ({train_s:.0f}s)")

    thresholds = {"end": None, "edge": None}
    if args.operating_point == "spread":
        thresholds["end"], thresholds["edge"] = spread_thresholds(bundle, data / "train")
        print(f"   demo operating point (spread): end threshold {thresholds['end']:.3f}, edge {thresholds['edge']:.3f} "
              "(--operating-point calibrated uses the bundle's)")

    from tierlite.edge.broker import find_mosquitto

    gateway_id = f"demo{os.getpid()}"
    port, m_edge, m_cloud = free_port(), free_port(), free_port()
    external = None
    edge_cfg: dict[str, Any] = {"bundle": str(bundle_dir), "gateway_id": gateway_id, "workers": args.workers,
                                "metrics_port": m_edge, "threshold": thresholds["edge"],
                                "discovery": {"interfaces": ["127.0.0.1"], "name": f"tierlite-{gateway_id}"}}
    broker_cfg: dict[str, Any] = {"port": port}
    if find_mosquitto():
        edge_cfg["mosquitto"] = {"port": port, "state_dir": str(work / "mosquitto")}
        broker_desc = f"Mosquitto on 127.0.0.1:{port}, supervised by the gateway"
    else:
        external = Broker(work / "amqtt", port).start()
        broker_cfg["protocol"] = "3.1.1"
        edge_cfg.update(workers=1, mosquitto={"managed": False}, broker=broker_cfg)
        broker_desc = f"amqtt on 127.0.0.1:{port}"
    write_yaml(work / "edge.yaml", edge_cfg)
    write_yaml(work / "cloud.yaml", {"bundle": str(bundle_dir), "broker": broker_cfg, "metrics_port": m_cloud,
                                     "store": {"path": str(work / "hard_examples.sqlite")}})
    folders = _split_frames(data / "test", work / "frames", args.nodes, args.frames)
    results_files = []
    for i, folder in enumerate(folders):
        node = folder.name
        # the first node finds the gateway by zeroconf, like a camera that was given no address
        broker = ({"host": "auto", "discovery_interfaces": ["127.0.0.1"], "discovery_match": {"gateway": gateway_id},
                   **({"protocol": "3.1.1"} if external else {})} if i == 0 else broker_cfg)
        results = work / f"results-{node}.jsonl"
        results.unlink(missing_ok=True)
        results_files.append(results)
        write_yaml(work / f"{node}.yaml", {"node_id": node, "bundle": str(bundle_dir), "broker": broker,
                                           "source": {"uri": str(folder), "fps": args.fps},
                                           "threshold": thresholds["end"], "wait_for_broker": 15,
                                           "results_file": str(results)})

    print(f"== runtime: {broker_desc}; cloud worker; edge gateway with {edge_cfg['workers']} worker(s); "
          f"{args.nodes} camera node(s) at <= {args.fps:g} fps")
    procs: list[TierProcess] = []
    try:
        cloud = TierProcess("cloud", ["cloud", "--config", str(work / "cloud.yaml")], logs)
        edge = TierProcess("edge", ["edge", "--config", str(work / "edge.yaml")], logs)
        procs += [cloud, edge]
        wait_until(lambda: "gateway ready" in edge.log() or not edge.running(), 60, "the edge gateway")
        if not edge.running():
            raise ConfigError(f"the edge gateway exited; see {edge.log_path}")
        # the cloud worker retries with backoff until the gateway's broker is up: let it connect first
        wait_until(lambda: "mqtt: connected" in cloud.log() or not cloud.running(), 30, "the cloud worker")
        nodes = [TierProcess(f.name, ["device", "--config", str(work / f"{f.name}.yaml")], logs) for f in folders]
        procs += nodes
        t_run = time.monotonic()
        total = sum(1 for f in folders for p in f.rglob("*.jpg"))
        last = -1
        while any(n.running() for n in nodes) and time.monotonic() - t_run < 600:
            done = sum(len(read_jsonl(r)) for r in results_files)
            if done // 100 != last // 100:
                print(f"   {done}/{total} frames", flush=True)
                last = done
            time.sleep(0.5)
        codes = {n.name: n.wait(30) for n in nodes}
        run_s = time.monotonic() - t_run
        edge_metrics = scrape(f"http://127.0.0.1:{m_edge}/metrics")
        cloud_metrics = scrape(f"http://127.0.0.1:{m_cloud}/metrics")
    finally:
        for p in reversed(procs):
            codes_stop = p.stop()
            if codes_stop not in (0, None):
                print(f"warning: {p.name} exited with code {codes_stop}; see {p.log_path}", file=sys.stderr)
        if external is not None:
            external.stop()

    results = [r for f in results_files for r in read_jsonl(f)]
    report = build_report(results, bundle, edge_metrics, cloud_metrics)
    report.update(workdir=str(work), broker=broker_desc, nodes=args.nodes, edge_workers=edge_cfg["workers"],
                  node_exit_codes=codes, train_seconds=round(train_s, 1), run_seconds=round(run_s, 1),
                  total_seconds=round(time.monotonic() - t_start, 1))
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    return 0 if all(c == 0 for c in codes.values()) and report["frames"] == total else 1


def build_report(results: list[dict], bundle, edge_metrics: dict, cloud_metrics: dict) -> dict[str, Any]:
    labels = bundle.labels
    n = len(results)

    def truth(r: dict) -> int | None:
        cls = Path(r["source"]).parent.name if r.get("source") else None
        return labels.index(cls) if cls in labels else None

    correct = [r["label"] == truth(r) for r in results if truth(r) is not None]
    jpeg = [Path(r["source"]).stat().st_size for r in results if r.get("source")]
    tiers = {}
    for t in ("end", "edge", "cloud"):
        rows = [r for r in results if r["tier"] == t]
        tiers[t] = {"frames": len(rows), "share": round(len(rows) / n, 4) if n else 0.0,
                    "accuracy": round(float(np.mean([r["label"] == truth(r) for r in rows])), 4) if rows else None,
                    "latency_ms": percentiles([r["latency_ms"] for r in rows])}
    escalated = [r for r in results if r["bytes_up"] > 0]
    rejected = sum(v for k, v in {**edge_metrics, **cloud_metrics}.items() if k.startswith("tierlite_rejected_messages_total"))
    return {
        "bundle": f"{bundle.name} v{bundle.version}", "frames": n,
        "accuracy": round(float(np.mean(correct)), 4) if correct else None,
        "tiers": tiers,
        "fallbacks": sum(r["fallback"] for r in results),
        "camera_decision_ms": percentiles([r["decision_ms"] for r in results]),
        "bytes_per_frame": round(sum(r["bytes_up"] for r in results) / n, 1) if n else None,
        "bytes_per_escalated_frame": round(float(np.mean([r["bytes_up"] for r in escalated])), 1) if escalated else None,
        "jpeg_bytes_per_frame": round(float(np.mean(jpeg)), 1) if jpeg else None,
        "hard_examples_stored": int(cloud_metrics.get("tierlite_stored_examples_total", 0)),
        "rejected_messages": int(rejected),
    }


def print_report(r: dict[str, Any]) -> None:
    print(f"\n== report ({r['bundle']}, {r['frames']} frames from {r['nodes']} nodes, {r['run_seconds']}s of streaming)")
    print(f"   {'tier':6} {'frames':>7} {'share':>7} {'accuracy':>9} {'latency p50':>12} {'p99':>9}")
    for t, row in r["tiers"].items():
        acc = f"{100 * row['accuracy']:.1f} %" if row["accuracy"] is not None else "-"
        lat = row["latency_ms"]
        p50 = f"{lat['p50']:.2f} ms" if lat["p50"] is not None else "-"
        p99 = f"{lat['p99']:.2f} ms" if lat["p99"] is not None else "-"
        print(f"   {t:6} {row['frames']:>7} {100 * row['share']:>6.1f}% {acc:>9} {p50:>12} {p99:>9}")
    acc = f"{100 * r['accuracy']:.1f} %" if r["accuracy"] is not None else "-"
    print(f"   system accuracy {acc}; fallbacks {r['fallbacks']}; camera decision p50 {r['camera_decision_ms']['p50']} ms")
    print(f"   bytes on the wire per frame: {r['bytes_per_frame']} (per escalated frame {r['bytes_per_escalated_frame']}; "
          f"the JPEG frame is {r['jpeg_bytes_per_frame']})")
    print(f"   hard examples stored in the cloud: {r['hard_examples_stored']}; rejected messages: {r['rejected_messages']}")
    print(f"   total {r['total_seconds']}s; bundle, configs, logs and report.json in {r['workdir']}")
