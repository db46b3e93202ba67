"""Exit policy: normalized entropy of an exit's softmax against a per-exit threshold.

Normalized entropy (BranchyNet / DDNN): H(p) / log(C), in [0, 1]; 0 = one-hot, 1 = uniform.
A tier decides alone when H_norm <= its threshold; otherwise it escalates.
"""
from __future__ import annotations

import math

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


def mirror(frames: np.ndarray) -> np.ndarray:
    """NHWC frames mirrored left-right: the test-time augmentation "hflip"."""
    return np.ascontiguousarray(frames[:, :, ::-1])


def mirror_average(logits: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """Logits whose softmax is the mean of the two softmaxes (flip test-time augmentation): the
    log of the averaged probabilities, so every consumer of logits (decide, calibration, drift
    statistics) sees the averaged prediction unchanged."""
    a, b = softmax(logits), softmax(mirrored)
    return np.log(np.maximum((a + b) / 2, 1e-30)).astype(np.float32)


def decide(logits: np.ndarray, threshold: float | None) -> tuple[bool, int, float, float]:
    """One frame's exit decision: (confident, label, confidence, normalized entropy).

    threshold None means "last tier": always confident.
    """
    # The camera's hot path (issue 15): a handful of classes in plain floats costs a third of the numpy
    # ufunc chain. Same quantities: with z = logits - max, s = sum(exp z), p = exp(z) / s,
    # H = -sum(p log p) = log s - sum(p z); confidence p[label] = 1 / s (exp 0 at the max).
    vals = np.asarray(logits, dtype=np.float64).reshape(-1).tolist()
    top = max(vals)
    label = vals.index(top)  # the first maximum, as argmax
    e = [math.exp(v - top) for v in vals]
    s = math.fsum(e)
    entropy = (math.log(s) - math.fsum([x * (v - top) for x, v in zip(e, vals)]) / s) / math.log(len(vals))
    entropy = min(max(entropy, 0.0), 1.0)
    confident = threshold is None or entropy <= threshold
    return confident, label, 1.0 / s, entropy


def decide_batch(logits: np.ndarray, threshold: float | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`decide` for N frames at once (logits (N, C)): arrays (confident, label, confidence,
    normalized entropy), each row equal to what `decide` gives for that frame."""
    probs = softmax(np.asarray(logits).reshape(len(logits), -1))
    entropy = np.clip(normalized_entropy(probs), 0.0, 1.0)  # as `decide`: rounding never passes 1
    label = probs.argmax(axis=1)
    confident = np.ones(len(label), dtype=bool) if threshold is None else entropy <= threshold
    return confident, label, probs[np.arange(len(label)), label], entropy


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
