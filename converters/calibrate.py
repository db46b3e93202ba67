"""Exit calibration: choose the normalized-entropy thresholds of the end and edge exits.

Pure numpy (no TensorFlow), so the cloud retraining job can re-calibrate a retrained bundle:

    from tierlite.converters.calibrate import search_thresholds
    op = search_thresholds([end_logits, edge_logits, cloud_logits], labels,
                           feature_bytes=(end_feature_bytes, edge_feature_bytes), max_drop=0.005)
    op.thresholds  # {"end": ..., "edge": ...}

Rule: among all threshold pairs whose system accuracy is at most `max_drop` below cloud-only
accuracy, take the one deciding the most frames on the camera, then the one with the fewest
uplink bytes per frame, then the most accurate. A frame exits at a tier when the normalized
entropy of that exit's softmax is <= the tier's threshold (tierlite.policy).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tierlite.policy import chain_decisions, normalized_entropy, softmax

DEFAULT_DROPS = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1)


@dataclass
class OperatingPoint:
    thresholds: dict          # {"end": t1, "edge": t2}
    accuracy: float           # system (cascade) top-1
    cloud_only_accuracy: float
    fractions: dict           # share of frames decided at each tier
    camera_uplink_bytes: float  # mean bytes per frame camera -> edge (feature payloads)
    edge_uplink_bytes: float    # mean bytes per frame edge -> cloud
    max_drop: float | None = None
    frames: int = 0

    @property
    def camera_fraction(self) -> float:
        return self.fractions["end"]

    def to_json(self) -> dict:
        return asdict(self)


def _entropies(exit_logits: list[np.ndarray]) -> list[np.ndarray]:
    return [normalized_entropy(softmax(l)) for l in exit_logits]


def evaluate(exit_logits: list[np.ndarray], labels: np.ndarray, thresholds: dict,
             feature_bytes: tuple[int, int], max_drop: float | None = None) -> OperatingPoint:
    """Cascade figures for given thresholds (e.g. calibrated on validation, measured on test)."""
    labels = np.asarray(labels)
    tier, pred = chain_decisions(exit_logits, [thresholds["end"], thresholds["edge"]])
    n = len(labels)
    frac = {t: float((tier == i).mean()) for i, t in enumerate(("end", "edge", "cloud"))}
    return OperatingPoint(
        thresholds={k: float(v) for k, v in thresholds.items()},
        accuracy=float((pred == labels).mean()),
        cloud_only_accuracy=float((exit_logits[-1].argmax(1) == labels).mean()),
        fractions=frac,
        camera_uplink_bytes=float((1 - frac["end"]) * feature_bytes[0]),
        edge_uplink_bytes=float(frac["cloud"] * feature_bytes[1]),
        max_drop=max_drop, frames=n)


def _candidates(h: np.ndarray, grid: int) -> np.ndarray:
    """Thresholds worth trying: entropy quantiles, plus -1 (the exit never decides)."""
    q = np.unique(np.quantile(h, np.linspace(0.0, 1.0, grid)))
    return np.concatenate([[-1.0], q])


def frontier(exit_logits: list[np.ndarray], labels: np.ndarray, feature_bytes: tuple[int, int],
             grid: int = 201) -> dict[str, np.ndarray]:
    """Every (end, edge) threshold pair on a quantile grid with its accuracy and costs."""
    labels = np.asarray(labels)
    h_end, h_edge, _ = _entropies(exit_logits)
    correct = [l.argmax(1) == labels for l in exit_logits]
    return _frontier(h_end, h_edge, correct, np.ones(len(labels)), feature_bytes,
                     _candidates(h_end, grid), _candidates(h_edge, grid))


def _frontier(h_end: np.ndarray, h_edge: np.ndarray, correct: list[np.ndarray], weights: np.ndarray,
              feature_bytes: tuple[int, int], t_end: np.ndarray, t_edge: np.ndarray) -> dict[str, np.ndarray]:
    """The frontier over frames (or histogram cells) of these weights: for each end threshold,
    frames left to the edge are sorted by edge entropy, so all edge thresholds are scored with one
    cumulative sum (exact, O(grid * N log N))."""
    n = float(weights.sum())
    rows = {k: [] for k in ("t_end", "t_edge", "accuracy", "end", "edge", "cloud")}
    for te in t_end:
        at_end = h_end <= te
        rest = np.flatnonzero(~at_end)
        order = rest[np.argsort(h_edge[rest], kind="stable")]
        hs, w = h_edge[order], weights[order]
        c2 = np.concatenate([[0], np.cumsum(correct[1][order] * w)])
        c3 = np.concatenate([[0], np.cumsum(correct[2][order] * w)])
        cw = np.concatenate([[0], np.cumsum(w)])
        k = np.searchsorted(hs, t_edge, side="right")  # frames decided at the edge
        base = float((correct[0][at_end] * weights[at_end]).sum())
        at_end_w = float(weights[at_end].sum())
        rows["t_end"].append(np.full(len(t_edge), te))
        rows["t_edge"].append(t_edge)
        rows["accuracy"].append((base + c2[k] + c3[-1] - c3[k]) / n)  # rest after k: cloud
        rows["end"].append(np.full(len(t_edge), at_end_w / n))
        rows["edge"].append(cw[k] / n)
        rows["cloud"].append((cw[-1] - cw[k]) / n)
    out = {key: np.concatenate(v) for key, v in rows.items()}
    out["camera_uplink_bytes"] = (1 - out["end"]) * feature_bytes[0]
    out["edge_uplink_bytes"] = out["cloud"] * feature_bytes[1]
    return out


def _best(table: dict, cloud_only: float, max_drop: float, camera_slack: float) -> int:
    """The table row the rule picks (module docstring); camera_slack as in search_thresholds."""
    ok = table["accuracy"] >= cloud_only - max_drop - 1e-12
    if not ok.any():  # cannot happen: (-1, -1) is cloud-only; kept for safety
        raise ValueError("no threshold pair meets the accuracy constraint")
    idx = np.flatnonzero(ok)
    idx = idx[table["end"][idx] >= table["end"][idx].max() - camera_slack - 1e-12]
    total_bytes = table["camera_uplink_bytes"] + table["edge_uplink_bytes"]
    # lexsort: last key is primary -> fewest bytes among the camera shares allowed, then most on camera,
    # then most accurate (with no slack: the most on camera, then the fewest bytes).
    return int(idx[np.lexsort((-table["accuracy"][idx], -table["end"][idx], total_bytes[idx]))[0]])


def search_thresholds(exit_logits: list[np.ndarray], labels: np.ndarray, feature_bytes: tuple[int, int],
                      max_drop: float = 0.005, grid: int = 201, table: dict | None = None,
                      camera_slack: float = 0.0) -> OperatingPoint:
    """Best thresholds for a maximum accuracy drop (fraction, 0.005 = 0.5 pt) vs cloud-only: the
    most frames decided on the camera, then the fewest uplink bytes (camera->edge + edge->cloud).
    camera_slack (fraction of frames): give up at most this much of that camera share for fewer
    bytes; a hair more on the camera can otherwise send many more frames on to the cloud (measured
    on CIFAR-10: 1 pt of camera share halved the edge->cloud bytes)."""
    labels = np.asarray(labels)
    table = table if table is not None else frontier(exit_logits, labels, feature_bytes, grid)
    cloud_only = float((exit_logits[-1].argmax(1) == labels).mean())
    best = _best(table, cloud_only, max_drop, camera_slack)
    thresholds = {"end": float(table["t_end"][best]), "edge": float(table["t_edge"][best])}
    return evaluate(exit_logits, labels, thresholds, feature_bytes, max_drop)


# -- calibration from the sites' statistics (no frames leave a site) ---------------------------
# A site that may not ship frames reports, for its labelled validation frames through the bundle,
# only counts by (end entropy bin, edge entropy bin, which of the three exits is right): summable
# across sites, and exact for thresholds on the bin edges (a frame in bin i, entropy in
# [i/B, (i+1)/B), exits at every threshold >= (i+1)/B).
STATISTICS_KIND = "tierlite exit statistics"
STATISTICS_BINS = 200


def exit_statistics(exit_logits: list[np.ndarray], labels: np.ndarray, bins: int = STATISTICS_BINS,
                    **identity) -> dict:
    """The counts a site reports (JSON-ready); `identity`: what they were measured with (bundle,
    version, segment hashes, encoding, ...), checked when statistics are merged."""
    h_end, h_edge, _ = _entropies(exit_logits)
    labels = np.asarray(labels)
    right = [(l.argmax(1) == labels).astype(np.int64) for l in exit_logits]
    cells = np.zeros((bins, bins, 8), np.int64)
    np.add.at(cells, (_bin(h_end, bins), _bin(h_edge, bins), right[0] * 4 + right[1] * 2 + right[2]), 1)
    where = np.argwhere(cells)
    return {"kind": STATISTICS_KIND, "bins": bins, "frames": int(len(labels)), **identity,
            "cells": [[int(i), int(j), int(c), int(cells[i, j, c])] for i, j, c in where]}


def _bin(h: np.ndarray, bins: int) -> np.ndarray:
    return np.clip(np.floor(np.asarray(h) * bins).astype(np.int64), 0, bins - 1)


def merge_statistics(reports: list[dict], names: list[str] | None = None) -> dict:
    """Sum the sites' statistics; one-line ValueError for a report that is not one, or that was
    measured on another bundle, encoding or bin count than the first."""
    names = names or [f"report {i + 1}" for i in range(len(reports))]
    if not reports:
        raise ValueError("no site statistics given")
    first = reports[0]
    same = [k for k in first if k not in ("cells", "frames", "site")]
    total: dict[tuple[int, int, int], int] = {}
    for name, r in zip(names, reports):
        if not isinstance(r, dict) or r.get("kind") != STATISTICS_KIND or not isinstance(r.get("cells"), list):
            raise ValueError(f"{name}: not tierlite exit statistics (`tierlite calibrate ... --statistics-out`)")
        for k in same:
            if r.get(k) != first[k]:
                raise ValueError(f"{name}: measured with {k} {r.get(k)!r}, {names[0]} with {first[k]!r}")
        try:
            for i, j, c, count in r["cells"]:
                if not (0 <= i < r["bins"] and 0 <= j < r["bins"] and 0 <= c < 8 and count >= 0):
                    raise ValueError
                total[(i, j, c)] = total.get((i, j, c), 0) + int(count)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: a cell is not [end bin, edge bin, correctness code 0-7, count]") from None
    return {**{k: first[k] for k in same}, "frames": int(sum(total.values())),
            "sites": [r.get("site") or n for n, r in zip(names, reports)],
            "cells": [[i, j, c, n] for (i, j, c), n in sorted(total.items())]}


def search_thresholds_from_statistics(stats: dict, feature_bytes: tuple[int, int], max_drop: float = 0.005,
                                      camera_slack: float = 0.0) -> tuple[OperatingPoint, list[OperatingPoint]]:
    """search_thresholds on (merged) site statistics, thresholds on the bin edges; also the
    operating points of DEFAULT_DROPS (what `sweep` gives)."""
    cells = np.asarray(stats["cells"], np.int64).reshape(-1, 4)
    bins = int(stats["bins"])
    if not len(cells):
        raise ValueError("the site statistics hold no frames")
    h_end, h_edge = (cells[:, 0] + 1) / bins, (cells[:, 1] + 1) / bins  # a cell exits at its upper edge
    correct = [(cells[:, 2] >> s) & 1 for s in (2, 1, 0)]
    weights = cells[:, 3].astype(np.float64)
    edges = np.concatenate([[-1.0], np.arange(1, bins + 1) / bins])
    table = _frontier(h_end, h_edge, correct, weights, feature_bytes, edges, edges)
    cloud_only = float((correct[2] * weights).sum() / weights.sum())

    def point(drop: float) -> OperatingPoint:
        i = _best(table, cloud_only, drop, camera_slack)
        frac = {t: float(table[t][i]) for t in ("end", "edge", "cloud")}
        return OperatingPoint(thresholds={"end": float(table["t_end"][i]), "edge": float(table["t_edge"][i])},
                              accuracy=float(table["accuracy"][i]), cloud_only_accuracy=cloud_only,
                              fractions=frac, camera_uplink_bytes=float(table["camera_uplink_bytes"][i]),
                              edge_uplink_bytes=float(table["edge_uplink_bytes"][i]), max_drop=drop,
                              frames=int(weights.sum()))

    return point(max_drop), [point(d) for d in DEFAULT_DROPS]


def sweep(exit_logits: list[np.ndarray], labels: np.ndarray, feature_bytes: tuple[int, int],
          drops=DEFAULT_DROPS, grid: int = 201, camera_slack: float = 0.0) -> tuple[list[OperatingPoint], dict]:
    table = frontier(exit_logits, labels, feature_bytes, grid)
    return [search_thresholds(exit_logits, labels, feature_bytes, d, grid, table, camera_slack)
            for d in drops], table


def write_report(path: str | Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def _labelled_points(points: list[OperatingPoint], x) -> list[tuple[float, float, str]]:
    """One label per distinct point: on small data several max-drop budgets pick the same
    thresholds, and their labels would be drawn on top of each other."""
    groups: dict[tuple[float, float], list[float]] = {}
    for p in points:
        groups.setdefault((round(float(x(p)), 6), round(p.accuracy * 100, 6)), []).append(p.max_drop or 0.0)
    return [(cx, cy, "-" + "/".join(f"{d * 100:g}" for d in sorted(drops)) + "pt")
            for (cx, cy), drops in groups.items()]


def figure(points: list[OperatingPoint], table: dict, title: str = "", jpeg_bytes: float | None = None):
    """The calibration figure (matplotlib, Agg): accuracy vs camera-exit fraction (colour: camera
    uplink bytes/frame) and vs bytes/frame."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    # Every scored threshold pair (faint) and, per camera fraction, the most accurate one.
    ax1.scatter(table["end"] * 100, table["accuracy"] * 100, s=2, color="0.8")
    best: dict[float, int] = {}
    for i, (cam, acc_i) in enumerate(zip(table["end"], table["accuracy"])):
        if cam not in best or acc_i > table["accuracy"][best[cam]]:
            best[cam] = i
    idx = np.array(sorted(best.values(), key=lambda i: table["end"][i]))
    sc = ax1.scatter(table["end"][idx] * 100, table["accuracy"][idx] * 100, s=6,
                     c=table["camera_uplink_bytes"][idx], cmap="viridis")
    fig.colorbar(sc, ax=ax1, label="camera uplink bytes / frame")
    cam = [p.camera_fraction * 100 for p in points]
    acc = [p.accuracy * 100 for p in points]
    ax1.plot(cam, acc, "r.-", label="chosen per max drop")
    for x, y, text in _labelled_points(points, lambda p: p.camera_fraction * 100):
        ax1.annotate(text, (x, y), fontsize=7, xytext=(3, -8), textcoords="offset points")
    ax1.axhline(points[0].cloud_only_accuracy * 100, color="k", ls="--", lw=0.8, label="cloud only")
    ax1.set_xlabel("frames decided on the camera (%)")
    ax1.set_ylabel("system top-1 (%)")
    top = max(float(table["accuracy"].max()), points[0].cloud_only_accuracy) * 100
    ax1.set_ylim(max(0.0, min(acc) - 3), min(100.0, top + 1))
    ax1.legend(fontsize=8)
    # Every scored pair here too, so a sweep whose budgets all land on one point (small data: every
    # frame decided on the camera, 0 B/frame) still shows the trade-off it was chosen from.
    ax2.scatter(table["camera_uplink_bytes"], table["accuracy"] * 100, s=2, color="0.8", label="all threshold pairs")
    ax2.plot([p.camera_uplink_bytes for p in points], acc, "bo-", label="camera -> edge (chosen)")
    for x, y, text in _labelled_points(points, lambda p: p.camera_uplink_bytes):
        ax2.annotate(text, (x, y), fontsize=7, xytext=(3, -8), textcoords="offset points")
    if jpeg_bytes:
        ax2.axvline(jpeg_bytes, color="gray", ls=":", label=f"JPEG frame ({jpeg_bytes:.0f} B)")
    ax2.set_xlabel("uplink bytes / frame (mean)")
    ax2.set_ylabel("system top-1 (%)")
    ax2.set_ylim(ax1.get_ylim())
    ax2.legend(fontsize=8)
    fig.suptitle(title or "exit calibration sweep")
    fig.tight_layout()
    return fig


def plot(path: str | Path, points: list[OperatingPoint], table: dict, title: str = "",
         jpeg_bytes: float | None = None) -> Path:
    """Write the calibration figure (see `figure`) as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(points, table, title, jpeg_bytes)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
