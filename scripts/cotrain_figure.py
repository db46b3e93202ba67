"""Cloud-exit accuracy of the co-training arms, per pretrained body and split, as one PNG
(docs/COTRAINING.md, "How much of it is the body").

    python3 scripts/cotrain_figure.py docs/benchmarks/cotraining-cifar10/strong-body-inprocess.jsonl \
        docs/benchmarks/cotraining-cifar10/weaker-body-inprocess.jsonl --out docs/benchmarks/cotraining-cifar10/arms.png

Each input: the JSON lines `scripts/fedrecipe_cifar.py --json` appends (float, 10,000 test frames).
Per split: the body (`--rounds 0`), the mean of the local-only sites, the best federated arm and the
best centralised arm (best over the recipes and seeds run; the body and the centralised arm do not
depend on how the pool is split over the sites, so either split's runs count for both).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ARMS = ("body", "local-only (mean)", "federated (best)", "centralised (best)")


def summarise(path: Path) -> dict[str, dict[str, float]]:
    """{split: {arm: cloud-exit %}} from one JSON-lines file."""
    by_split: dict[str, dict[str, list[float]]] = {}
    local: dict[tuple[str, str], dict[str, float]] = {}  # (split, lr) -> {site: accuracy}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        a, cloud = r["args"], 100 * r["test_float"][2]
        split = "IID" if a["sites_dir"].rstrip("/").split("/")[-2].endswith("iid") else "non-IID"
        arms = by_split.setdefault(split, {k: [] for k in ARMS})
        if a["central"] == "True":
            arms["centralised (best)"].append(cloud)
        elif a["rounds"] == "0":
            arms["body"].append(cloud)
        elif a["only_site"] != "None":
            local.setdefault((split, a["lr"]), {})[a["only_site"]] = cloud
        else:
            arms["federated (best)"].append(cloud)
    for (split, _), sites in local.items():
        if len(sites) == max(len(s) for (sp, _), s in local.items() if sp == split):  # every site run
            by_split[split]["local-only (mean)"].append(sum(sites.values()) / len(sites))
    for arm in ("body", "centralised (best)"):  # the same model / the same pool of frames for either split
        pooled = [x for arms in by_split.values() for x in arms[arm]]
        for arms in by_split.values():
            arms[arm] = pooled
    return {split: {k: max(v) for k, v in arms.items() if v} for split, arms in by_split.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    try:
        summaries = {f: summarise(f) for f in args.jsonl}
    except OSError as e:
        p.error(f"cannot read {e.filename}: {e.strerror}")
    except (ValueError, KeyError, IndexError) as e:
        p.error(f"not `fedrecipe_cifar.py --json` lines ({type(e).__name__}: {e})")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f.stem, split, arms) for f, summary in summaries.items() for split, arms in sorted(summary.items())]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), sharey=True, squeeze=False)
    for ax, (name, split, arms) in zip(axes[0], panels):
        names = [k for k in ARMS if k in arms]
        bars = ax.bar(range(len(names)), [arms[k] for k in names], color=["#999", "#c66", "#36c", "#393"][:len(names)])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(names)), [k.replace(" (", "\n(") for k in names], fontsize=7)
        ax.set_title(f"{name}, {split}", fontsize=9)
    axes[0, 0].set_ylabel("cloud exit, top-1 % (float, 10,000 test frames)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    for name, split, arms in panels:
        print(name, split, {k: round(v, 2) for k, v in arms.items()})
    print(args.out)


if __name__ == "__main__":
    main()
