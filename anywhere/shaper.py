"""Bandwidth limits (issue 19): a token bucket per proxy and direction, applied by pausing reads.

Theory of operation
-------------------
A proxy with ``bandwidth = RATE`` (bits a second) has a `Shaper`: two `Gate`s, ``up`` (client →
target) and ``down`` (target → client), each a `TokenBucket` of RATE / 8 bytes a second shared
by every connection of the proxy, the streams waiting for it, and at most one timer.  What is
counted is payload reaching the other side; nothing is ever dropped, only not read yet:

  * up: a stream reads its client at most as many bytes as the gate has tokens, and spends what
    it read; with none left it stops reading (READ leaves its interest mask) and waits;
  * down: a stream writes to its client at most as many bytes as the gate has tokens; what the
    agent sent beyond that stays in the stream's outbuf (bounded by its receive window), and the
    stream returns window credit only for what its client took (trunk.py `_credit`), so the agent
    stops sending and stops reading its target: backpressure end to end.

Rules:
  1. Tokens accrue at the rate up to `burst` = max(`MIN_BURST`, rate × `BURST_TIME`): 50 ms of
     the rate covers a loop pass or a timer that is late by a few milliseconds without losing
     tokens, yet is no burst a queue would notice; 16 KiB at least so that a low rate still moves
     a TLS record's worth at a time instead of many small reads.
  2. A gate whose bucket is empty keeps its waiting streams in order (a dict, oldest first) and
     one timer, due when the bucket holds `wake` = min(burst, max(`MIN_WAKE`, rate × `WAKE_TIME`))
     again; then the waiting streams go in turn, oldest first, until fewer than `wake` are left;
     a stream moves data only with `wake` tokens or all it has to move (`Gate.grant`), never the
     few bytes that accrue in a microsecond, which cost a record and a loop pass each; those
     that got no turn keep their place ahead of the ones that just went (round robin, as the
     trunk's `_resume`).  A stream that closes leaves its gates; so what a gate holds is bounded
     by the proxy's live connections, and it arms no timer while nothing waits.
  3. A change of rate (a reload, or `anywherectl`) applies at once to the gates, so to every live
     connection of the proxy; tokens above the new burst are dropped.
  4. Unlimited proxies have no shaper and their streams none: the data path of a stream checks
     one attribute (`Stream.up` / `Stream.down`, class attributes None) and nothing else.

Not limited: the deprecated per-connection data path (relay.py, an agent with ``pool_size = 0``
and no trunks); such connections of a limited proxy go at full speed (documented in the README).

The bucket is sans-IO with an injectable clock (`TokenBucket`); `Gate` adds the loop's timer.
"""

from __future__ import annotations

import logging
from typing import Callable

from .loop import Loop, Timer

log = logging.getLogger("anywhere.shaper")

BURST_TIME = 0.05  # seconds of the rate a bucket holds at most (see rule 1)
MIN_BURST = 16 * 1024  # bytes
WAKE_TIME = 0.005  # seconds of the rate a waiting gate lets accrue before its streams go again
MIN_WAKE = 4 * 1024  # bytes


def burst_for(rate: float) -> float:
    """The most a bucket of `rate` bytes a second holds (rule 1)."""
    return max(float(MIN_BURST), rate * BURST_TIME)


class TokenBucket:
    """Bytes that may pass: `rate` a second, at most `burst` saved up.  Sans-IO: `clock()` says
    the time in seconds (the loop's monotonic clock; a test's own)."""

    def __init__(self, rate: float, clock: Callable[[], float], burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate {rate} must be more than 0")
        self.clock = clock
        self.rate = float(rate)
        self.burst = burst_for(self.rate) if burst is None else float(burst)
        self.tokens = self.burst  # a new proxy may send a burst at once
        self.stamp = clock()

    def _refill(self) -> float:
        now = self.clock()
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        self.tokens = tokens = tokens if tokens < self.burst else self.burst
        return tokens

    def available(self) -> int:
        """Whole bytes that may pass now (0 or more)."""
        tokens = self._refill()
        return int(tokens) if tokens > 0 else 0

    def spend(self, n: int) -> None:
        """`n` bytes passed (may take the bucket below 0: then it is owed first)."""
        self.tokens -= n

    def delay(self, level: float) -> float:
        """Seconds until the bucket holds `level` bytes (0 if it does)."""
        missing = min(level, self.burst) - self._refill()
        return missing / self.rate if missing > 0 else 0.0

    def set_rate(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate {rate} must be more than 0")
        self._refill()  # what accrued at the old rate
        self.rate = float(rate)
        self.burst = burst_for(self.rate)
        if self.tokens > self.burst:
            self.tokens = self.burst


class Gate:
    """One direction of one proxy: its bucket, the streams waiting for tokens (each by the callable
    that resumes it), and at most one timer (see rule 2)."""

    def __init__(self, loop: Loop, rate: float, what: str) -> None:
        self.loop = loop
        self.what = what
        self.bucket = TokenBucket(rate, loop.time)
        self.waiting: dict[Callable[[], None], None] = {}
        self.timer: Timer | None = None

    @property
    def wake(self) -> float:
        return min(self.bucket.burst, max(float(MIN_WAKE), self.bucket.rate * WAKE_TIME))

    def available(self) -> int:
        return self.bucket.available()

    def grant(self, want: int = 0) -> int:
        """What a stream may move now: every token, once there are `wake` of them or all it `want`s
        (0: unknown, a socket to read); else 0, and it waits.  Never a trickle: tokens accrue a few
        bytes a microsecond, and a stream that took each few as they came moved its data in
        records of tens of bytes (17,000 a second at 20 Mbit/s), too slow to keep the rate."""
        tokens = self.bucket.available()
        return tokens if tokens >= self.wake or (want and tokens >= want) else 0

    def spend(self, n: int) -> None:
        self.bucket.spend(n)

    def wait(self, resume: Callable[[], None]) -> None:
        """Call `resume` (in turn with the others) once tokens are back."""
        self.waiting[resume] = None
        if self.timer is None:
            self.timer = self.loop.call_later(self.bucket.delay(self.wake), self._fire)

    def leave(self, resume: Callable[[], None]) -> None:
        self.waiting.pop(resume, None)

    def _fire(self) -> None:
        self.timer = None
        waiting = list(self.waiting)
        self.waiting = {}
        for i, resume in enumerate(waiting):
            if not self.grant():  # those that got no turn go first next time
                rest = dict.fromkeys(waiting[i:])
                rest.update(self.waiting)
                self.waiting = rest
                break
            try:
                resume()
            except Exception:  # one stream's failure must not stall the others
                log.exception("%s: resuming a stream failed", self.what)
        if self.waiting and self.timer is None:
            self.timer = self.loop.call_later(self.bucket.delay(self.wake), self._fire)

    def set_rate(self, rate: float) -> None:
        self.bucket.set_rate(rate)
        if self.timer is not None:  # due at the new rate's time
            self.timer.cancel()
            self.timer = self.loop.call_later(self.bucket.delay(self.wake), self._fire)

    def release(self) -> list[Callable[[], None]]:
        """No limit any more: the timer cancelled, the waiting streams handed back (to resume)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiting, self.waiting = list(self.waiting), {}
        return waiting


class Shaper:
    """A proxy's bandwidth limit: `bandwidth` bits a second each way (see the module's docstring)."""

    def __init__(self, loop: Loop, bandwidth: int, name: str) -> None:
        self.bandwidth = bandwidth
        self.up = Gate(loop, bandwidth / 8, f"proxy {name} client → target")
        self.down = Gate(loop, bandwidth / 8, f"proxy {name} target → client")

    def set_bandwidth(self, bandwidth: int) -> None:
        if bandwidth != self.bandwidth:
            self.bandwidth = bandwidth
            self.up.set_rate(bandwidth / 8)
            self.down.set_rate(bandwidth / 8)
