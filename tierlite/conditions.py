"""Condition variants: a second end segment for frames unlike the training set (night, glare, a
dirty lens), picked per frame on the node by a `Selector` on five cheap frame statistics.

Manifest: an entry of `files`: {file, sha256, tier: "end", role: "profile", selector: {...}}
(the role keeps its first name, which bundles in the wild carry). docs/UPDATES.md has the rest.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tierlite.errors import BundleError

__all__ = ["LEGACY_STATS", "ROLE", "STATS", "Selector", "end_variants", "frame_stats", "variant_entry"]

ROLE = "profile"  # the manifest role of a condition variant (its name on disk since the first bundles)
LEGACY_STATS = ("mean_r", "mean_g", "mean_b", "std_gray", "laplacian_gray")  # selectors before issue 13's rounds
# The logs make ratios linear for the selector (detail relative to contrast), and the noise floor
# (lower quartile of an edge-cancelling 3x3 response, Immerkaer 1996) sees sensor noise whatever the
# scene's texture. Measured on CIFAR-10 severity 3 at <= 1 % clean picks: noise picked 12.6 -> 98.1 %
# of frames, low light 52 -> 95 %, contrast 31 -> 50 % (docs/DRIFT.md).
STATS = LEGACY_STATS + ("log_std_gray", "log_laplacian_gray", "log_noise_floor_gray")
_LOG_EPS = 1e-3


def frame_stats(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, len(STATS)): channel means, grey-level spread, the mean absolute
    4-neighbour Laplacian (sensor noise and blur move it), all on a 0..1 scale; then the logs of the
    spread, of the Laplacian and of the noise floor. A selector uses the first len(w) of them."""
    x = images.reshape((-1,) + images.shape[-3:]).astype(np.float32) / 255.0
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = np.abs(4 * gray[:, 1:-1, 1:-1] - gray[:, :-2, 1:-1] - gray[:, 2:, 1:-1]
                 - gray[:, 1:-1, :-2] - gray[:, 1:-1, 2:])
    g = gray
    flat = np.abs(g[:, :-2, :-2] - 2 * g[:, :-2, 1:-1] + g[:, :-2, 2:] - 2 * g[:, 1:-1, :-2] + 4 * g[:, 1:-1, 1:-1]
                  - 2 * g[:, 1:-1, 2:] + g[:, 2:, :-2] - 2 * g[:, 2:, 1:-1] + g[:, 2:, 2:]).reshape(len(g), -1)
    std, lap_mean = gray.std(axis=(1, 2)), lap.mean(axis=(1, 2))
    return np.column_stack([x.mean(axis=(1, 2)), std, lap_mean, np.log(std + _LOG_EPS), np.log(lap_mean + _LOG_EPS),
                            np.log(np.quantile(flat, 0.25, axis=1) + _LOG_EPS)])


@dataclass
class Selector:
    """p(variant | frame) = sigmoid(w . (stats - mean) / scale + b); the variant runs when p > 0.5."""
    mean: list
    scale: list
    w: list
    b: float

    def __post_init__(self):  # arrays once: picks() runs on every camera frame
        self._mean, self._scale, self._w = (np.asarray(v, np.float64) for v in (self.mean, self.scale, self.w))

    @classmethod
    def fit(cls, condition_frames: np.ndarray, trained_frames: np.ndarray, l2: float = 1e-3,
            steps: int = 500, max_false_picks: float = 0.01) -> "Selector":
        """max_false_picks: the most of `trained_frames` the variant may take. Every clean frame it
        takes runs a model tuned for another condition, which is what a profile costs on clean
        frames (measured on CIFAR-10: 5.2 % picked cost the end exit 0.85 pt), so the decision
        threshold is raised until at most this share of them is picked."""
        xs = np.concatenate([frame_stats(condition_frames), frame_stats(trained_frames)]).astype(np.float64)
        ys = np.concatenate([np.ones(len(condition_frames)), np.zeros(len(trained_frames))])
        mean, scale = xs.mean(0), xs.std(0) + 1e-6
        z = (xs - mean) / scale
        weight = np.where(ys == 1, 0.5 / max(ys.sum(), 1), 0.5 / max((1 - ys).sum(), 1))  # balanced
        w, b = np.zeros(z.shape[1]), 0.0
        for _ in range(steps):  # Newton steps on a small convex problem (one weight per statistic): a few do
            p = 1 / (1 + np.exp(-(z @ w + b)))
            g = weight * (p - ys)
            grad = np.append(z.T @ g + l2 * w, g.sum())
            h = weight * p * (1 - p)
            za = np.column_stack([z, np.ones(len(z))])
            hess = za.T @ (za * h[:, None]) + l2 * np.eye(len(grad))
            delta = np.linalg.solve(hess, grad)
            w, b = w - delta[:-1], b - delta[-1]
            if np.abs(delta).max() < 1e-8:
                break
        trained_scores = z[ys == 0] @ w + b
        if len(trained_scores):
            margin = float(np.quantile(trained_scores, 1.0 - max_false_picks))
            b -= max(margin, 0.0)  # only ever stricter than the balanced fit
        return cls(mean.tolist(), scale.tolist(), w.tolist(), float(b))

    @classmethod
    def from_json(cls, d: Any, where: str) -> "Selector":
        try:
            sel = cls([float(v) for v in d["mean"]], [float(v) for v in d["scale"]],
                      [float(v) for v in d["w"]], float(d["b"]))
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{where}: bad profile selector ({e})") from None
        if not len(sel.mean) == len(sel.scale) == len(sel.w) in (len(LEGACY_STATS), len(STATS)) or min(sel.scale) <= 0:
            raise BundleError(f"{where}: profile selector needs {len(LEGACY_STATS)} or {len(STATS)} statistics "
                              "with positive scales")
        return sel

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "stats": list(STATS[:len(self.w)])}

    def picks(self, images: np.ndarray) -> np.ndarray:
        """Boolean per frame: True where the variant should run."""
        return (frame_stats(images)[:, :len(self._w)] - self._mean) / self._scale @ self._w + self.b > 0.0


def end_variants(manifest: dict[str, Any]) -> list[tuple[str, Selector]]:
    """(file, selector) of every end condition variant the manifest lists, in order."""
    out = []
    for i, e in enumerate(manifest.get("files", [])):
        if e.get("role") == ROLE and e.get("tier") == "end":
            out.append((str(e["file"]), Selector.from_json(e.get("selector"), f"manifest files[{i}]")))
    return out


def variant_entry(file: str, selector: Selector) -> dict[str, Any]:
    """The manifest `files` entry of an end condition variant (write_manifest fills in its sha256)."""
    return {"file": file, "sha256": "", "tier": "end", "role": ROLE, "selector": selector.to_json()}
