"""Image corruptions for the drift benchmarks, in the spirit of CIFAR-10-C (Hendrycks & Dietterich,
2019) but our own code: one function per family, severity 1..5, uint8 RGB NHWC in and out, every
frame re-encoded as JPEG (quality 85) as a camera would. Families: noise (Gaussian sensor noise),
blur (defocus, a disk kernel), fog (haze: contrast down, a smooth bright veil up), low_light (the
drift bench's gain + noise), contrast (digital)."""
from __future__ import annotations

import numpy as np

__all__ = ["FAMILIES", "corrupt"]

# per family, per severity 1..5
_NOISE = (4.0, 8.0, 14.0, 22.0, 32.0)  # sigma, pixel units
_BLUR = (0.6, 1.0, 1.5, 2.0, 2.6)  # disk radius, pixels at 32x32 (scaled with the frame size)
_FOG = ((0.8, 0.15), (0.65, 0.25), (0.5, 0.35), (0.4, 0.45), (0.3, 0.55))  # (contrast kept, veil strength)
_LOW = ((0.7, 4.0), (0.6, 6.0), (0.5, 8.0), (0.4, 10.0), (0.3, 12.0))  # (gain, noise sigma)
_CONTRAST = (0.7, 0.55, 0.4, 0.3, 0.2)

FAMILIES = ("noise", "blur", "fog", "low_light", "contrast")


def _jpeg(img: np.ndarray, quality: int = 85) -> np.ndarray:
    import cv2

    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.cvtColor(cv2.imdecode(jpg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _disk(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    k = ((x * x + y * y) <= radius * radius + 0.5).astype(np.float32)
    return k / k.sum()


def corrupt(images: np.ndarray, family: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupted copies of `images` (uint8 NHWC), JPEG round-tripped."""
    import cv2

    if family not in FAMILIES or not 1 <= severity <= 5:
        raise ValueError(f"unknown corruption {family!r} severity {severity}")
    s = severity - 1
    rng = np.random.default_rng(seed)
    scale = images.shape[1] / 32.0
    out = np.empty_like(images)
    for i, img in enumerate(images):
        x = img.astype(np.float32)
        if family == "noise":
            x = x + rng.normal(0, _NOISE[s], x.shape)
        elif family == "blur":
            x = cv2.filter2D(x, -1, _disk(_BLUR[s] * scale), borderType=cv2.BORDER_REFLECT)
        elif family == "fog":
            keep, veil = _FOG[s]
            h, w = x.shape[:2]
            coarse = rng.random((4, 4)).astype(np.float32)
            haze = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
            m = x.mean()
            x = (x - m) * keep + m + veil * 255.0 * (0.6 + 0.4 * haze)
        elif family == "low_light":
            gain, sigma = _LOW[s]
            x = x * gain + rng.normal(0, sigma, x.shape)
        elif family == "contrast":
            m = x.mean(axis=(0, 1), keepdims=True)
            x = (x - m) * _CONTRAST[s] + m
        out[i] = _jpeg(np.clip(x, 0, 255).astype(np.uint8))
    return out
