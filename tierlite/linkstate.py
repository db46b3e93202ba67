"""A node that follows its link: it measures how long escalated frames take to be answered (RTT +
uplink + the gateway's queue and compute) and how many are in flight, and moves the camera exit's
threshold between the bundle's operating points, with hysteresis (docs/PARTITIONING.md).

Operating points are ordered from the most accurate (lowest end threshold: most frames go up) to
the most local (highest threshold: the camera answers most frames itself). A window of answer
latencies whose median exceeds `target_ms`, a deadline miss, or a backlog above `backlog_high`
moves one step toward local; a window whose median is under `target_ms * relax_ratio` with a
small backlog moves one step back. A step needs `min_dwell_s` since the last one, and each
switch empties the window, so one slow burst moves one step, not all of them. Every switch is
logged and counted. The deadline fallback in the daemon stays the last line of defence.

Where the points come from: the manifest's `operating_points` (written by `tierlite plan
--export`), else its calibration sweep (`calibration.operating_points`, one per max drop).
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from tierlite.errors import BundleError

__all__ = ["LinkFollower", "OperatingPointRef", "bundle_operating_points"]

log = logging.getLogger("tierlite.linkstate")
HISTORY = 50  # switches kept for status


@dataclass(frozen=True)
class OperatingPointRef:
    name: str
    end_threshold: float


def bundle_operating_points(manifest: dict[str, Any]) -> list[OperatingPointRef]:
    """The manifest's operating points, most accurate first (ascending end threshold), duplicates
    of the same threshold merged."""
    entries = manifest.get("operating_points")
    if not entries:
        entries = [{"name": f"drop{float(p['max_drop']) * 100:g}%", "thresholds": p.get("thresholds", {})}
                   for p in (manifest.get("calibration") or {}).get("operating_points", [])]
    points: dict[float, OperatingPointRef] = {}
    for i, e in enumerate(entries):
        try:
            thr = float(e["thresholds"]["end"])
            name = str(e.get("name") or f"op{i}")
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"manifest operating point {i}: needs thresholds.end (a number)") from None
        if not 0.0 <= thr <= 1.0:
            raise BundleError(f"manifest operating point {name!r}: end threshold {thr} is not in [0, 1]")
        points.setdefault(round(thr, 9), OperatingPointRef(name, thr))
    return [points[k] for k in sorted(points)]


class LinkFollower:
    """Thread-safe: answers arrive on the MQTT thread, the frame loop reads `threshold`."""

    def __init__(self, points: list[OperatingPointRef], *, target_ms: float, relax_ratio: float = 0.5,
                 window: int = 20, min_dwell_s: float = 2.0, backlog_high: int = 32,
                 start_threshold: float | None = None, clock=time.monotonic):
        if not points:
            raise BundleError("adaptive exits need at least one operating point in the bundle")
        self.points = points
        self.target_s = target_ms / 1000.0
        self.relax_s = self.target_s * relax_ratio
        self.window: deque[float] = deque(maxlen=window)
        self.min_dwell_s = min_dwell_s
        self.backlog_high = backlog_high
        self._clock = clock
        self._lock = threading.Lock()
        start = 0 if start_threshold is None else min(
            range(len(points)), key=lambda i: abs(points[i].end_threshold - start_threshold))
        self.index = start
        self._last_switch = clock()
        self._backlog = 0
        self.switches = {"to_local": 0, "to_accurate": 0}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)

    @classmethod
    def for_bundle(cls, config, manifest: dict[str, Any], start_threshold: float | None) -> "LinkFollower | None":
        """From a DeviceConfig `adaptive` section (None or disabled: no follower)."""
        if config is None or not config.enabled:
            return None
        return cls(bundle_operating_points(manifest), target_ms=config.target_ms, relax_ratio=config.relax_ratio,
                   window=config.window, min_dwell_s=config.min_dwell_s, backlog_high=config.backlog_high,
                   start_threshold=start_threshold)

    @property
    def threshold(self) -> float:
        return self.points[self.index].end_threshold

    @property
    def point(self) -> OperatingPointRef:
        return self.points[self.index]

    # -- observations -----------------------------------------------------------------------------
    def observe_answer(self, latency_s: float) -> None:
        with self._lock:
            self.window.append(latency_s)
            if len(self.window) == self.window.maxlen:
                self._decide(statistics.median(self.window))

    def observe_deadline(self) -> None:
        """A missed deadline is the link at its worst: step toward local at once (dwell permitting)."""
        with self._lock:
            self._step(+1, "deadline missed")

    def observe_backlog(self, in_flight: int) -> None:
        with self._lock:
            self._backlog = in_flight
            if in_flight > self.backlog_high:
                self._step(+1, f"backlog {in_flight} > {self.backlog_high}")

    # -- decisions ------------------------------------------------------------------------------
    def _decide(self, median_s: float) -> None:
        if median_s > self.target_s:
            self._step(+1, f"answer p50 {median_s * 1e3:.1f} ms > target {self.target_s * 1e3:.0f} ms")
        elif median_s < self.relax_s and self._backlog <= self.backlog_high // 4:
            self._step(-1, f"answer p50 {median_s * 1e3:.1f} ms < {self.relax_s * 1e3:.0f} ms")

    def _step(self, direction: int, why: str) -> None:
        new = self.index + direction
        now = self._clock()
        if not 0 <= new < len(self.points) or now - self._last_switch < self.min_dwell_s:
            return
        old, self.index, self._last_switch = self.points[self.index], new, now
        self.window.clear()  # the next decision sees only answers given under the new point
        self.switches["to_local" if direction > 0 else "to_accurate"] += 1
        event = {"from": old.name, "to": self.points[new].name, "end_threshold": self.points[new].end_threshold,
                 "why": why, "ts": round(time.time(), 3)}
        self.history.append(event)
        log.info("operating point %s -> %s (end threshold %.4f): %s", old.name, self.points[new].name,
                 self.points[new].end_threshold, why)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"point": self.point.name, "end_threshold": self.threshold, "switches": dict(self.switches),
                    "last_switches": list(self.history)[-5:]}
