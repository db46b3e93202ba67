"""The distillation math, numpy only: a linear exit head fitted to the teacher's (the cloud
exit's) soft targets and answer, labelled replay frames and an L2 pull to the parent's weights
(Hinton et al.; docs/UPDATES.md)."""
from __future__ import annotations

import numpy as np

from tierlite.policy import softmax


def fit_head(W0: np.ndarray, b0: np.ndarray, x_kd: np.ndarray, teacher: np.ndarray, x_ce: np.ndarray,
             y_ce: np.ndarray, temperature: float, steps: int, lr: float, l2: float,
             hard_weight: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Distil a linear head: T^2 * KL(teacher_T || student_T) on (x_kd, teacher logits)
    [+ hard_weight * CE on the teacher's answer] + CE on labelled (x_ce, y_ce) + l2 * |W - W0|^2,
    full-batch Adam from (W0, b0). numpy only."""
    W, b = W0.astype(np.float64).copy(), b0.astype(np.float64).copy()
    T = temperature
    pt = softmax(teacher / T) if len(x_kd) else None
    hard = np.eye(W.shape[1])[teacher.argmax(1)] if len(x_kd) and hard_weight else None
    onehot = np.eye(W.shape[1])[y_ce] if len(x_ce) else None
    m = [np.zeros_like(W), np.zeros_like(b)]
    v = [np.zeros_like(W), np.zeros_like(b)]
    for step in range(1, steps + 1):
        gW, gb = 2 * l2 * (W - W0), np.zeros_like(b)
        if pt is not None:  # d/ds of T^2 * CE(pt, softmax(s/T)) = T * (softmax(s/T) - pt)
            g = T * (softmax((x_kd @ W + b) / T) - pt) / len(x_kd)
            gW += x_kd.T @ g
            gb += g.sum(axis=0)
        if hard is not None:  # Hinton et al.'s hard-target term, with the teacher's answer as the label
            g = hard_weight * (softmax(x_kd @ W + b) - hard) / len(x_kd)
            gW += x_kd.T @ g
            gb += g.sum(axis=0)
        if onehot is not None:
            g = (softmax(x_ce @ W + b) - onehot) / len(x_ce)
            gW += x_ce.T @ g
            gb += g.sum(axis=0)
        for i, (p, g) in enumerate(((W, gW), (b, gb))):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            p -= lr * (m[i] / (1 - 0.9 ** step)) / (np.sqrt(v[i] / (1 - 0.999 ** step)) + 1e-8)
    return W, b
