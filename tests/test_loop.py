"""The event loop: the ordering guarantees that the trunks' write coalescing relies on, and the
registration rules of its own epoll set (what `selectors` did for it before)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from anywhere.loop import READ, WRITE, Loop, ManualClock

from looptest import advance, manual_loop


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()  # closes its epoll set: whatever is still registered goes with it


@pytest.fixture
def socketpairs():
    """socketpairs() makes a connected pair; every pair made is closed after the test."""
    made: list[tuple[socket.socket, socket.socket]] = []

    def make() -> tuple[socket.socket, socket.socket]:
        made.append(socket.socketpair())
        return made[-1]
    yield make
    for a, b in made:
        a.close()
        b.close()


def test_call_at_end_runs_after_events_and_callbacks_of_the_same_pass(loop, socketpairs):
    a, b = socketpairs()
    order: list[str] = []

    def on_read(_mask: int) -> None:
        a.recv(16)
        order.append("event")
        loop.call_at_end(order.append, "end-1")
        loop.call_soon(order.append, "soon")

    def end_then_more() -> None:
        order.append("end-2")
        loop.call_at_end(order.append, "end-3")  # scheduled while ending: still this pass

    loop.register(a, READ, on_read)
    loop.call_at_end(end_then_more)
    b.send(b"x")
    loop.run_once(max_wait=2.0)
    assert order == ["event", "soon", "end-2", "end-1", "end-3"]
    order.clear()
    loop.run_once(max_wait=0.05)  # nothing left over for the next pass
    assert order == []


def test_pending_end_callbacks_do_not_let_the_loop_sleep(loop):
    ran: list[int] = []
    loop.call_at_end(ran.append, 1)
    assert loop._next_timeout() == 0.0
    loop.run_once()  # would block forever if the pending callback did not count
    assert ran == [1]


def _drive(loop: Loop, until, seconds: float = 2.0) -> None:
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline:
        loop.run_once(max_wait=0.05)


def test_registration_rules_match_selectors(loop, socketpairs):
    a, b = socketpairs()
    with pytest.raises(KeyError):
        loop.modify(a, READ, print)  # not registered
    loop.register(a, READ, print)
    with pytest.raises(KeyError):
        loop.register(a, WRITE, print)  # twice
    with pytest.raises(KeyError):
        loop.register(a.fileno(), WRITE, print)  # the same descriptor by number
    loop.unregister(b)  # open but never registered: nothing happens, a stays
    loop.discard(b)
    assert a.fileno() in loop._fds
    loop.unregister(a)
    loop.unregister(a)  # idempotent
    loop.register(a, READ, print)
    a.close()
    loop.unregister(a)  # closed first: found by the object, then forgotten
    assert a not in [entry[2] for entry in loop._fds.values()]
    with pytest.raises(ValueError):
        loop.register(a, READ, print)  # a closed socket has no descriptor


def test_modify_changes_the_interest_and_the_callback(loop, socketpairs):
    a, b = socketpairs()
    seen: list[tuple[str, int]] = []
    loop.register(a, READ, lambda m: seen.append(("first", m)))
    loop.run_once(max_wait=0.05)
    assert seen == []  # nothing to read
    loop.modify(a, READ | WRITE, lambda m: seen.append(("second", m)))
    loop.run_once(max_wait=1.0)
    assert seen == [("second", WRITE)]  # writable, still nothing to read
    seen.clear()
    b.send(b"x")
    loop.modify(a, READ, lambda m: seen.append(("third", m)))
    loop.run_once(max_wait=1.0)
    assert seen == [("third", READ)]


def test_a_hang_up_wakes_every_interest(loop, socketpairs):
    a, b = socketpairs()
    seen: list[int] = []
    a.send(b"x" * 100)
    loop.register(a, READ | WRITE, seen.append)
    b.close()  # a's peer is gone: readable (EOF) and writable (EPIPE), EPOLLHUP among the events
    _drive(loop, lambda: bool(seen))
    assert seen and seen[0] == READ | WRITE
    loop.modify(a, READ, seen.append)
    seen.clear()
    loop.run_once(max_wait=1.0)
    assert seen == [READ]  # only what is asked for


def test_a_discarded_socket_closed_at_once_leaves_the_epoll_set_and_its_number_can_be_reused(loop, socketpairs, request):
    a, b = socketpairs()
    calls: list[str] = []
    b.send(b"x")  # a is readable and stays so: level-triggered, it would be reported every pass
    loop.register(a, READ, lambda m: calls.append("old"))
    fd = a.fileno()
    loop.discard(a)
    a.close()
    loop.run_once(max_wait=0.05)
    assert calls == []
    c, d = socketpairs()
    if c.fileno() != fd:  # the kernel hands out the lowest free number: normally the same
        os.dup2(c.fileno(), fd)
        c.close()  # closed again by the fixture: nothing happens
        c = socket.socket(fileno=fd)
        request.addfinalizer(c.close)
    loop.register(c, READ, lambda m: calls.append("new"))  # no stale entry in the way
    loop.run_once(max_wait=0.05)
    assert calls == []  # the old socket's readiness did not follow its number
    d.send(b"y")
    _drive(loop, lambda: bool(calls))
    assert calls == ["new"]


def test_an_event_for_a_socket_closed_earlier_in_the_same_pass_is_not_dispatched(loop, socketpairs):
    pairs = [socketpairs() for _ in range(2)]
    socks = [p[0] for p in pairs]
    calls: list[int] = []

    def on_event(i: int):
        def handler(_mask: int) -> None:
            calls.append(i)
            other = socks[1 - i]
            if other.fileno() >= 0:
                loop.discard(other)  # the connection ends both legs at once
                other.close()
        return handler

    for i, s in enumerate(socks):
        loop.register(s, READ, on_event(i))
    for p in pairs:
        p[1].send(b"x")  # both ready in one wait
    loop.run_once(max_wait=1.0)
    assert len(calls) == 1


def test_a_socket_discarded_but_left_open_does_not_keep_the_loop_busy(loop, socketpairs, caplog):
    a, b = socketpairs()
    calls: list[int] = []
    b.send(b"x")  # readable for good
    loop.register(a, READ, calls.append)
    loop.discard(a)  # the caller's promise to close it is broken
    loop.run_once(max_wait=1.0)  # the stale event comes once ...
    assert calls == []
    loop._epoll.register(a.fileno(), 1)  # ... and has taken it out of the epoll set (else FileExistsError)
    loop._epoll.unregister(a.fileno())
    assert "discarded from the loop but not closed" in caplog.text


# -- the clock -------------------------------------------------------------------------------------
def test_timers_run_on_the_injected_clock_without_sleeping(socketpairs):
    clock = ManualClock()
    loop = Loop(clock=clock)
    try:
        fired: list[tuple[str, float]] = []
        loop.call_later(3600, lambda: fired.append(("hour", loop.time())))
        loop.call_later(0.5, lambda: fired.append(("half", loop.time())))
        started = time.monotonic()
        loop.run_once(max_wait=0.05)  # nothing due: the wait is bounded by max_wait, not by the timers
        assert fired == []
        clock.advance(0.5)
        assert loop._next_timeout() == 0.0  # due: the loop does not wait
        loop.run_once()  # would block forever if a due timer did not count
        assert fired == [("half", clock())]
        advance(loop, clock, 3599.5)
        assert [name for name, _ in fired] == ["half", "hour"]
        assert loop.time() == clock() == 1000.0 + 3600
        assert time.monotonic() - started < 2  # an hour of timers, no hour of waiting
    finally:
        loop.close()


def test_a_manual_clock_still_waits_on_the_real_descriptors(socketpairs):
    clock = ManualClock()
    loop = Loop(clock=clock)
    a, b = socketpairs()
    seen: list[int] = []
    try:
        loop.register(a, READ, seen.append)
        loop.call_later(10, seen.append, -1)  # not due: waiting would not bring it nearer
        assert loop._next_timeout() is None
        b.send(b"x")
        loop.run_once(max_wait=2.0)  # the selector reports the socket at once
        assert seen == [READ]
        assert loop.now == clock()
        with pytest.raises(ValueError):
            clock.advance(-1)
    finally:
        loop.close()


def test_a_timer_that_reschedules_itself_fires_once_per_interval_of_clock_time():
    loop, clock = manual_loop()
    ticks: list[float] = []

    def tick() -> None:
        ticks.append(loop.time())
        loop.call_later(0.05, tick)
    try:
        loop.call_later(0.05, tick)
        advance(loop, clock, 1.0)
        assert len(ticks) == 20
        assert ticks[0] == pytest.approx(1000.05) and ticks[-1] == pytest.approx(1001.0)
    finally:
        loop.close()


def test_the_default_clock_is_monotonic():
    loop = Loop()
    try:
        before = time.monotonic()
        assert before <= loop.time() <= time.monotonic()
        fired: list[int] = []
        loop.call_later(0.01, fired.append, 1)
        _drive(loop, lambda: bool(fired))
        assert fired == [1]
    finally:
        loop.close()
