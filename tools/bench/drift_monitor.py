"""Drift monitor and audit benchmark (issue 13, docs/DRIFT.md), offline through the bundle's int8 chain
and the node's own code (tierlite.drift.DriftMonitor, the device's audit policy):

    python -m tierlite.tools.bench.drift_monitor --bundle <bundle> --data digits/test --replay digits/train

For every corruption family x severity (tierlite.tools.bench.corruptions): a node's stream of
`--clean-lead` clean held-out frames, then the drifted ones (shuffled, as a camera sees varied
scenes), through the monitor. Reported: end/cloud exit accuracy, the share of drifted frames
reaching the cloud before (escalations only) and now (escalations + audits at `--audit-rate`,
`--alarm-audit-rate` once the alarm is up), detection delay in frames after the drift starts, and
the end exit's agreement with the cloud exit on confident frames. False alarms: `--clean-streams`
shuffled streams of the clean held-out frames. A bundle without a reference gets one from its
own validation split (re-derived from --replay with the bundle's training seed), in a copy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np


def ensure_reference(bundle_dir: Path, replay: Path, work: Path) -> Path:
    """The bundle itself when its manifest has a drift reference, else a copy with one recorded
    from its validation split."""
    from tierlite.bundle import Bundle
    from tierlite.converters.datasets import load_splits
    from tierlite.converters.pipeline import add_drift_reference
    from tierlite.converters.presets import resolve

    b = Bundle.load(bundle_dir)
    if "drift_reference" in b.manifest:
        return bundle_dir
    tr = b.manifest.get("training", {})
    _, tc = resolve(tr.get("preset", "small"))
    dest = work / f"{bundle_dir.name}-ref"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(bundle_dir, dest)
    val = load_splits(replay, b.input_shape[1], tc.val_fraction, int(tr.get("seed", 0)), None, work / "cache").val
    add_drift_reference(dest, val.images)
    print(f"drift-monitor: recorded a drift reference from {len(val.labels)} validation frames in {dest}")
    return dest


WINDOW: int | None = None


def stream(ref: dict, feats: np.ndarray, logits: np.ndarray, **kw) -> tuple[list[int], object]:
    """Frame indices (1-based counts) where an alarm was raised, and the monitor."""
    from tierlite.drift import DriftMonitor

    mon = DriftMonitor(ref, window=WINDOW, **kw)
    raised = []
    for f, lg in zip(feats, logits):
        if mon.update(f[None], lg):
            raised.append(mon.frames)
    return raised, mon


def main(argv: list[str] | None = None) -> int:
    from tierlite.bundle import Bundle
    from tierlite.cloud.retrain import Chain
    from tierlite.data import load_image_folder
    from tierlite.drift import wilson
    from tierlite.policy import normalized_entropy, softmax
    from tierlite.tools.bench.corruptions import FAMILIES, corrupt

    p = argparse.ArgumentParser(prog="drift_monitor")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True, help="labelled held-out folder")
    p.add_argument("--replay", required=True, help="the bundle's training folder (for its validation split)")
    p.add_argument("--severities", default="1,2,3,4,5")
    p.add_argument("--clean-lead", type=int, default=300)
    p.add_argument("--clean-streams", type=int, default=100)
    p.add_argument("--audit-rate", type=float, default=0.02)
    p.add_argument("--alarm-audit-rate", type=float, default=0.25)
    p.add_argument("--out", default="bench-out/drift-monitor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=None, help="monitor window, frames (default: the reference's)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global WINDOW
    WINDOW = args.window
    bundle_dir = ensure_reference(Path(args.bundle).resolve(), Path(args.replay), out)
    b = Bundle.load(bundle_dir)
    ref, thr = b.manifest["drift_reference"], b.thresholds
    chain = Chain(b)
    data = load_image_folder(args.data, tuple(b.input_shape[1:3]))
    rng = np.random.default_rng(args.seed)
    X, y = data.images, data.labels
    clean = chain.from_frames(X)
    res: dict = {"bundle": str(bundle_dir), "frames": int(len(y)), "reference": {
        "frames": ref["frames"], "window": ref["window"], "thresholds": ref["thresholds"]}, "rows": []}

    # false alarms on clean held-out streams
    alarms = frames = 0
    for s in range(args.clean_streams):
        order = np.random.default_rng(10_000 + s).permutation(len(y))
        raised, _ = stream(ref, clean["end_features"][order], clean["end_logits"][order])
        alarms += len(raised)
        frames += len(order)
    res["clean_false_alarms"] = {"alarms": alarms, "frames": frames, "streams": args.clean_streams}
    print(f"clean held-out streams: {alarms} alarms in {frames:,} frames ({args.clean_streams} shuffled streams "
          f"of {len(y)})")

    def figures(name: str, sev: int, r: dict) -> dict:
        e, c = r["end_logits"], r["cloud_logits"]
        end_unsure = normalized_entropy(softmax(e)) > thr["end"]
        to_cloud = end_unsure & (normalized_entropy(softmax(r["edge_logits"])) > thr["edge"])
        order = rng.permutation(len(y))
        lead = np.random.default_rng(args.seed + 1).permutation(len(y))[:args.clean_lead]
        feats = np.concatenate([clean["end_features"][lead], r["end_features"][order]])
        logits = np.concatenate([clean["end_logits"][lead], e[order]])
        raised, mon = stream(ref, feats, logits)
        first = next((f for f in raised if f > args.clean_lead), None)
        delay = None if first is None else first - args.clean_lead
        # audits: each confident frame with probability rate (alarm_rate once the alarm is up)
        conf = ~end_unsure[order]
        rate = np.full(len(order), args.audit_rate)
        if first is not None:
            rate[first - args.clean_lead:] = max(args.audit_rate, args.alarm_audit_rate)
        audited = conf & (np.random.default_rng(args.seed + 2).random(len(order)) < rate)
        agree = (e.argmax(1) == c.argmax(1))[~end_unsure]
        k = int(agree.sum())
        row = {"family": name, "severity": sev, "end_accuracy": round(100 * float((e.argmax(1) == y).mean()), 1),
               "cloud_accuracy": round(100 * float((c.argmax(1) == y).mean()), 1),
               "escalated_by_end": round(100 * float(end_unsure.mean()), 1),
               "reach_cloud_before": int(to_cloud.sum()), "reach_cloud_now": int(to_cloud.sum() + audited.sum()),
               "audits": int(audited.sum()), "delay_frames": delay,
               "alarms_in_clean_lead": sum(1 for f in raised if f <= args.clean_lead),
               "triggered": list(mon.state.triggered),
               "agreement_confident": round(k / max(1, len(agree)), 3)}
        res["rows"].append(row)
        print(f"{name:10s} s{sev}  end {row['end_accuracy']:5.1f} %  cloud {row['cloud_accuracy']:5.1f} %  "
              f"escalated {row['escalated_by_end']:5.1f} %  reach cloud {row['reach_cloud_before']:3d} -> "
              f"{row['reach_cloud_now']:3d} of {len(y)}  delay {delay if delay is not None else '-':>4} frames  "
              f"agree {row['agreement_confident']:.2f}  {','.join(row['triggered'])}")
        return row

    figures("clean", 0, clean)
    for fam in FAMILIES:
        for sev in [int(s) for s in args.severities.split(",")]:
            imgs = corrupt(X, fam, sev, seed=args.seed + sev)
            figures(fam, sev, chain.from_frames(imgs))

    # audit rate: audits within 500 frames of a drift needed so that the Wilson upper bound of the
    # agreement falls below 0.8 at each row's agreement (expected count), and what each rate sends
    rates = (0.005, 0.01, 0.02, 0.05)
    table = []
    for r in rates:
        n = int(round(500 * r))
        flagged = [f"{row['family']}-{row['severity']}" for row in res["rows"]
                   if n and wilson(int(round(row["agreement_confident"] * n)), n)[1] < 0.8]
        table.append({"rate": r, "audits_per_500": n, "flagged_by_agreement": flagged})
        print(f"audit rate {r:.3f}: {n} audits per 500 frames; agreement CI below 0.8 for {', '.join(flagged) or 'none'}")
    res["audit_rates"] = table
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
