"""The event loop's ordering guarantees that the trunks' write coalescing relies on."""

from __future__ import annotations

import socket

from anywhere.loop import READ, Loop


def test_call_at_end_runs_after_events_and_callbacks_of_the_same_pass():
    loop = Loop()
    a, b = socket.socketpair()
    order: list[str] = []
    try:
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
    finally:
        loop.unregister(a)
        a.close()
        b.close()
        loop.close()


def test_pending_end_callbacks_do_not_let_the_loop_sleep():
    loop = Loop()
    ran: list[int] = []
    try:
        loop.call_at_end(ran.append, 1)
        assert loop._next_timeout() == 0.0
        loop.run_once()  # would block forever if the pending callback did not count
        assert ran == [1]
    finally:
        loop.close()
