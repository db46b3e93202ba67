"""Judging a candidate: agreement with the teacher and escalation on held-out hard examples, clean
validation figures, thresholds moved to the middle of their gap, the boundary check, the verdict."""
from __future__ import annotations

from typing import Any

import numpy as np

from tierlite.cloud.retrain.options import RetrainOptions
from tierlite.errors import BundleError
from tierlite.policy import normalized_entropy, softmax


def escalation(logits: np.ndarray, threshold: float) -> float:
    return float((normalized_entropy(softmax(logits)) > threshold).mean()) if len(logits) else 0.0


def agreement(logits: np.ndarray, teacher: np.ndarray) -> float:
    return float((logits.argmax(1) == teacher.argmax(1)).mean()) if len(logits) else 0.0


def clean_figures(exits: list[np.ndarray], labels: np.ndarray, thresholds: dict, feature_bytes) -> dict[str, Any]:
    from tierlite.converters import evaluate

    op = evaluate(exits, labels, thresholds, feature_bytes)
    return {"end_accuracy": float((exits[0].argmax(1) == labels).mean()),
            "edge_accuracy": float((exits[1].argmax(1) == labels).mean()),
            "cloud_accuracy": float((exits[2].argmax(1) == labels).mean()),
            "system_accuracy": op.accuracy, "camera_fraction": op.fractions["end"], "fractions": op.fractions}


def gap_middle(thresholds: dict[str, float], exits: list[np.ndarray]) -> dict[str, float]:
    """Every threshold between two neighbouring validation entropies decides the validation frames
    alike; take the middle of that gap (the widest margin) rather than its lower end, so frames
    unlike the validation set (drift) are not escalated by an arbitrary tie-break."""
    out = {}
    for tier, logits in zip(("end", "edge"), exits):
        t = thresholds[tier]
        h = np.sort(normalized_entropy(softmax(logits)))
        above = h[h > t]
        below = h[h <= t]
        if t < 0 or not len(below):
            out[tier] = t  # -1: the exit never decides; keep it
        else:
            out[tier] = float((below[-1] + above[0]) / 2) if len(above) else float(min(1.0, (below[-1] + 1.0) / 2))
    return out


def check_boundary_identical(parent_out: dict, cand_out: dict) -> None:
    """The frozen trunk must give the very same boundary bytes, or unchanged tiers would misread them."""
    if not np.array_equal(parent_out["end_features"], cand_out["end_features"]):
        raise BundleError("retrained end segment changed the boundary feature; refusing to write it")
    if not np.allclose(parent_out["cloud_logits"], cand_out["cloud_logits"]):
        raise BundleError("retrained edge segment changed what the cloud receives; refusing to write it")


def verdict(holdout: dict, clean: dict, opts: RetrainOptions) -> tuple[bool, str]:
    if not holdout:
        return False, "no held-out hard examples to judge by"
    primary = "end" if "end" in holdout else "edge"
    h = holdout[primary]
    gain = (h["candidate_agreement"] - h["parent_agreement"]) * 100
    keys = ("end_accuracy", "edge_accuracy", "cloud_accuracy", "system_accuracy")  # edge/cloud: same unless
    drops = {k: (clean["parent"][k] - clean["candidate"][k]) * 100 for k in keys}  # the boundary moved
    worst = max(drops, key=drops.get)
    if drops[worst] > opts.max_clean_drop:
        return False, (f"clean {worst.replace('_', ' ')} drops {drops[worst]:.2f} pt "
                       f"(> {opts.max_clean_drop} pt allowed)")
    if gain < opts.margin:
        return False, f"held-out {primary}-exit agreement with the teacher up {gain:+.2f} pt, below the {opts.margin} pt margin"
    return True, (f"held-out {primary}-exit agreement with the teacher up {gain:+.2f} pt (margin {opts.margin} pt), "
                  f"clean drop at most {max(drops.values()):.2f} pt")
