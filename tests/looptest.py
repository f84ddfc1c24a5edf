"""Driving a real Loop from a test, bounded in passes and time.

`drive()` runs passes until a condition holds.  `manual_loop()` and `advance()` run a loop's timers
on a `ManualClock`: time passes when the test says so, not by sleeping; the loop still waits on
its real descriptors (never longer than `max_wait`), only the timers' notion of time is the test's.
"""

from __future__ import annotations

import time
from typing import Callable

from anywhere.loop import Loop, ManualClock


def drive(loop: Loop, until: Callable[[], object], what: str, seconds: float = 10.0,
          feed: Callable[[], object] | None = None, max_passes: int = 100_000, max_wait: float = 0.005) -> None:
    """Run loop passes (calling `feed()` before each) until `until()` is true; AssertionError naming
    `what` after `seconds` or `max_passes` passes."""
    deadline = time.monotonic() + seconds
    for _ in range(max_passes):
        if feed is not None:
            feed()
        if until():
            return
        if time.monotonic() > deadline:
            break
        loop.run_once(max_wait=max_wait)
    raise AssertionError(f"timed out waiting for {what}")


def manual_loop() -> tuple[Loop, ManualClock]:
    clock = ManualClock()
    return Loop(clock=clock), clock


def advance(loop: Loop, clock: ManualClock, seconds: float, max_passes: int = 100_000) -> None:
    """Let `seconds` of clock time pass: the clock steps from one due timer to the next, and each
    step runs the loop once without waiting (a timer that reschedules itself fires once per
    interval, as it would in real time).  Bounded in passes."""
    end = clock() + seconds
    for _ in range(max_passes):
        deadline = loop.next_deadline()
        if deadline is None or deadline > end:
            break
        clock.advance(max(0.0, deadline - clock()))
        loop.run_once(max_wait=0)
    else:
        raise AssertionError(f"more than {max_passes} timers within {seconds} s")
    clock.advance(max(0.0, end - clock()))
    loop.run_once(max_wait=0)
