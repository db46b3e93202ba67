"""Small bounded helpers against floods: token buckets (one per key, in a bounded table) and a log
throttle (one line per reason per interval, with the count of lines it held back).

Used by the edge's per-node escalation budget, the cloud's frame-upload limit and the refusal
logs of the workers and the update manager. Time is `time.monotonic()` unless a clock is given.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable, Hashable

__all__ = ["KeyedBuckets", "LogThrottle", "TokenBucket"]


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; take() spends one when there is one."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float, n: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class KeyedBuckets:
    """One TokenBucket per key (a node id), at most `max_keys` of them: the least recently used key
    is forgotten first (it starts again with a full bucket, which is the generous side)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate > 0, burst >= 1 and max_keys >= 1")
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def allow(self, key: Hashable, n: float = 1.0) -> bool:
        now = self.clock()
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return b.take(now, n)

    def __len__(self) -> int:
        return len(self._buckets)


class LogThrottle:
    """`throttle.log(logger, level, reason, msg, *args)`: the first line per reason goes out at once,
    then at most one per `interval` seconds, saying how many were held back since the last one.
    At most `max_reasons` reasons are tracked (oldest forgotten)."""

    def __init__(self, interval: float = 10.0, max_reasons: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        self.interval, self.max_reasons, self.clock = interval, max_reasons, clock
        self._state: OrderedDict[Hashable, list] = OrderedDict()  # reason -> [last emit time, held back]
        self.suppressed = 0

    def log(self, logger: logging.Logger, level: int, reason: Hashable, msg: str, *args) -> bool:
        now = self.clock()
        st = self._state.get(reason)
        if st is not None and now - st[0] < self.interval:
            st[1] += 1
            self.suppressed += 1
            return False
        held = st[1] if st is not None else 0
        self._state[reason] = [now, 0]
        self._state.move_to_end(reason)
        if len(self._state) > self.max_reasons:
            self._state.popitem(last=False)
        if held:
            msg = msg + " (%d more like this in the last %.0f s)"
            args = (*args, held, self.interval)
        logger.log(level, msg, *args)
        return True
