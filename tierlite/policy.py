"""Exit policy: normalized entropy of an exit's softmax against a per-exit threshold.

Normalized entropy (BranchyNet / DDNN): H(p) / log(C), in [0, 1]; 0 = one-hot, 1 = uniform.
A tier decides alone when H_norm <= its threshold; otherwise it escalates.
"""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def normalized_entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    n_classes = p.shape[axis]
    return -(p * np.log(p)).sum(axis=axis) / np.log(n_classes)


def decide(logits: np.ndarray, threshold: float | None) -> tuple[bool, int, float, float]:
    """One frame's exit decision: (confident, label, confidence, normalized entropy).

    threshold None means "last tier": always confident.
    """
    probs = softmax(np.asarray(logits).reshape(-1))
    entropy = float(normalized_entropy(probs))
    label = int(probs.argmax())
    confident = threshold is None or entropy <= threshold
    return confident, label, float(probs[label]), entropy


def chain_decisions(exit_logits: list[np.ndarray], thresholds: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised cascade over a batch: per frame, the tier index that answers and its label.

    exit_logits: one (N, C) array per exit, in tier order; thresholds: one per exit but the last.
    """
    n = exit_logits[0].shape[0]
    tier = np.full(n, len(exit_logits) - 1, dtype=np.int64)
    undecided = np.ones(n, dtype=bool)
    for i, thr in enumerate(thresholds):
        confident = normalized_entropy(softmax(exit_logits[i])) <= thr
        take = undecided & confident
        tier[take] = i
        undecided &= ~take
    labels = np.stack([l.argmax(axis=1) for l in exit_logits], axis=1)[np.arange(n), tier]
    return tier, labels
