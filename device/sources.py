"""Frame sources for the camera daemon, all through OpenCV: a camera index, a video file, an image
folder (or one image) and RTSP/HTTP streams. Frames come out as RGB uint8 at the bundle's input
size, prepared exactly as tierlite.data.decode_image prepares training and test frames."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from tierlite.config import SourceConfig
from tierlite.data import IMAGE_SUFFIXES, decode_image
from tierlite.errors import DataError

log = logging.getLogger("tierlite.device.source")


@dataclass
class Frame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    ref: str | None  # the file a frame came from (image folders), else None


def _bgr_to_input(bgr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    if bgr.shape[:2] != size:
        bgr = cv2.resize(bgr, (size[1], size[0]), interpolation=cv2.INTER_AREA)  # as decode_image does
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class FrameSource:
    """Iterate frames with an optional fps cap, a frame limit and loop-at-end; stops when `stop` is set."""

    def __init__(self, config: SourceConfig, size: tuple[int, int], stop: threading.Event | None = None):
        self.config, self.size = config, size
        self.stop = stop or threading.Event()
        self.skipped = 0
        uri = config.uri
        self.kind = ("camera" if uri.isdigit() else "stream" if "://" in uri
                     else "folder" if Path(uri).is_dir()
                     else "image" if Path(uri).suffix.lower() in IMAGE_SUFFIXES else "video")

    def describe(self) -> str:
        return f"{self.kind} {self.config.uri}"

    def __iter__(self) -> Iterator[Frame]:
        raw = self._images() if self.kind in ("folder", "image") else self._capture()
        interval = 1.0 / self.config.fps if self.config.fps else 0.0
        next_at = time.monotonic()
        for n, frame in enumerate(raw):
            if self.stop.is_set() or (self.config.limit is not None and n >= self.config.limit):
                return
            if interval:  # fps cap: sleep until this frame's slot (and never burst to catch up)
                delay = next_at - time.monotonic()
                if delay > 0 and self.stop.wait(delay):
                    return
                next_at = max(next_at + interval, time.monotonic())
            yield frame

    # -- image folders ------------------------------------------------------------------------
    def _images(self) -> Iterator[Frame]:
        root = Path(self.config.uri)
        paths = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DataError(f"no images (.jpg/.png/.bmp) under {root}")
        while True:
            good = 0
            for p in paths:
                if self.stop.is_set():
                    return
                try:
                    image = decode_image(p, self.size)
                except DataError as e:
                    self.skipped += 1
                    if self.skipped <= 5:
                        log.warning("skipping unreadable frame %s: %s", p, e)
                    continue
                good += 1
                yield Frame(image, str(p))
            if not self.config.loop or good == 0:
                return

    # -- cameras, video files, streams ----------------------------------------------------------
    def _open(self):
        import cv2

        uri = self.config.uri
        cap = cv2.VideoCapture(int(uri)) if uri.isdigit() else cv2.VideoCapture(uri)
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def _capture(self) -> Iterator[Frame]:
        live = self.kind in ("camera", "stream")
        cap, backoff, frames_since_open = self._open(), 0.5, 0
        if cap is None and not live:
            raise DataError(f"OpenCV cannot open video {self.config.uri}")
        try:
            while not self.stop.is_set():
                if cap is None:  # a camera or stream that is not there (yet): retry with backoff
                    log.warning("cannot open %s; retrying in %.1fs", self.describe(), backoff)
                    if self.stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, 30.0)
                    cap, frames_since_open = self._open(), 0
                    continue
                ok, bgr = cap.read()
                if ok and bgr is not None and bgr.ndim == 3:
                    backoff, frames_since_open = 0.5, frames_since_open + 1
                    yield Frame(_bgr_to_input(bgr, self.size), None)
                    continue
                if live:  # stream dropped: reopen
                    log.warning("%s stopped delivering frames; reopening", self.describe())
                    cap.release()
                    cap = None
                elif self.config.loop and frames_since_open:
                    cap.release()
                    cap, frames_since_open = self._open(), 0
                    if cap is None:
                        return
                else:
                    return
        finally:
            if cap is not None:
                cap.release()
