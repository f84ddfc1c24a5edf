"""heartbeat.Heartbeat on real admin connections: two FramedConns, mutual TLS over a socketpair, one loop.

Intervals are short (50 ms) because the loop's clock is the real one; each test runs in well
under a second.
"""

from __future__ import annotations

import socket
import time

import pytest

from anywhere import tls
from anywhere.framed import FramedConn
from anywhere.heartbeat import MISSED, Heartbeat
from anywhere.loop import Loop

INTERVAL = 0.05


class End:
    """One end of the connection: its FramedConn, what it received, how it closed."""

    def __init__(self, loop: Loop, sock: socket.socket, ctx, *, server_side: bool, answer_pings: bool = True) -> None:
        self.loop = loop
        self.answer_pings = answer_pings
        self.received: list[dict] = []
        self.closed: str | None = None
        self.heartbeat: Heartbeat | None = None
        self.rtts: list[float | None] = []
        self.conn = FramedConn(loop, sock, ctx, server_side=server_side, peer="server" if not server_side else "agent",
                               server_hostname=None if server_side else "localhost",
                               on_message=self.on_message, on_close=self.on_close)

    def on_message(self, conn: FramedConn, msg: dict) -> None:
        self.received.append(msg)
        if msg["type"] == "ping" and self.answer_pings:
            conn.send("pong", seq=msg["seq"])
        elif msg["type"] == "pong" and self.heartbeat is not None:
            self.rtts.append(self.heartbeat.on_pong(msg["seq"]))

    def on_close(self, _conn: FramedConn, reason: str) -> None:
        self.closed = reason

    def pings(self) -> list[int]:
        return [m["seq"] for m in self.received if m["type"] == "ping"]


@pytest.fixture
def pair(creds):
    loop = Loop()
    a, b = socket.socketpair()
    crt, key = creds.agent("agent-1")
    server_ctx = tls.server_context(str(creds.ca), str(creds.server_cert), str(creds.server_key))
    client_ctx = tls.client_context(str(creds.ca), str(crt), str(key))

    def make(answer_pings: bool = True) -> tuple[End, End]:
        server = End(loop, a, server_ctx, server_side=True, answer_pings=answer_pings)
        agent = End(loop, b, client_ctx, server_side=False)
        run(loop, lambda: server.conn.open and agent.conn.open, 5)
        assert server.conn.open and agent.conn.open, (server.closed, agent.closed)
        return server, agent
    yield loop, make
    loop.close()
    a.close()
    b.close()


def run(loop: Loop, until, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        loop.run_once(0.01)


def test_both_ends_beat_measure_rtt_and_stay_up(pair):
    loop, make = pair
    server, agent = make()
    beats = []
    for end in (server, agent):
        end.heartbeat = Heartbeat(loop, end.conn, INTERVAL, on_timeout=lambda silence: beats.append(("timeout", silence)),
                                  after_beat=lambda end=end: beats.append(end))
    run(loop, lambda: len(server.pings()) >= 6 and len(agent.pings()) >= 6, 5)
    assert server.conn.open and agent.conn.open
    assert ("timeout", MISSED * INTERVAL) not in beats
    for this, peer in ((server, agent), (agent, server)):
        assert peer.pings() == list(range(1, len(peer.pings()) + 1))  # a sequence, one by one
        assert beats.count(this) >= len(peer.pings())  # after_beat once per ping sent
        measured = [rtt for rtt in this.rtts if rtt is not None]
        assert len(measured) >= 4 and all(0 <= rtt < 1 for rtt in measured)
        assert this.heartbeat.rtt == measured[-1]
    for end in (server, agent):
        end.heartbeat.stop()


def test_a_silent_peer_is_closed_after_three_intervals(pair):
    loop, make = pair
    server, agent = make(answer_pings=False)  # the server's end reads but never says anything
    timeouts: list[float] = []
    started = time.monotonic()
    agent.heartbeat = Heartbeat(loop, agent.conn, INTERVAL, on_timeout=timeouts.append)
    run(loop, lambda: agent.closed is not None, 5)
    assert agent.closed == "heartbeat timeout"
    assert timeouts == [MISSED * INTERVAL]
    assert time.monotonic() - started >= MISSED * INTERVAL
    assert len(server.pings()) >= MISSED - 1  # it did ping while it waited
    run(loop, lambda: server.closed is not None, 5)
    assert server.closed is not None  # the peer sees the close


def test_stop_ends_the_beats_and_stale_pongs_measure_nothing(pair):
    loop, make = pair
    server, agent = make()
    agent.heartbeat = Heartbeat(loop, agent.conn, INTERVAL, on_timeout=lambda silence: None)
    run(loop, lambda: len(server.pings()) >= 2, 5)
    seq = agent.heartbeat.seq
    assert agent.heartbeat.on_pong(seq + 1) is None  # answers no ping sent
    run(loop, lambda: agent.heartbeat.sent_at is None, 5)  # the real pong came back
    assert agent.heartbeat.on_pong(agent.heartbeat.seq) is None  # its pong again: already counted
    agent.heartbeat.stop()
    agent.heartbeat.stop()  # idempotent
    count = len(server.pings())
    run(loop, lambda: False, 4 * INTERVAL)
    assert len(server.pings()) == count
    assert agent.conn.open


def test_a_new_interval_applies_from_the_next_beat(pair):
    loop, make = pair
    server, agent = make()
    agent.heartbeat = Heartbeat(loop, agent.conn, INTERVAL, on_timeout=lambda silence: None)
    run(loop, lambda: len(server.pings()) >= 1, 5)
    agent.heartbeat.interval = 3600.0  # a reload
    run(loop, lambda: len(server.pings()) >= 2, 5)  # the beat already scheduled still comes
    count = len(server.pings())
    run(loop, lambda: False, 5 * INTERVAL)
    assert len(server.pings()) == count
    agent.heartbeat.stop()


def test_a_passive_end_pings_only_when_its_peer_is_quiet(pair):
    """The agent's heartbeat is passive: while the server pings every interval it sends no ping of
    its own (the server's pings are its sign of life); with a peer that only answers, it pings
    every other interval or so, and the connection stays up."""
    loop, make = pair
    server, agent = make()
    server.heartbeat = Heartbeat(loop, server.conn, INTERVAL, on_timeout=lambda silence: None)
    agent.heartbeat = Heartbeat(loop, agent.conn, INTERVAL, on_timeout=lambda silence: None, passive=True)
    run(loop, lambda: len(agent.pings()) >= 12, 5)
    assert len(agent.pings()) >= 12 and server.pings() == []  # 12 intervals, and the agent never pinged
    server.heartbeat.stop()  # the server stops pinging: the agent asks
    run(loop, lambda: len(server.pings()) >= 4, 5)
    assert server.pings() == [1, 2, 3, 4]
    assert agent.conn.open and server.conn.open  # the pongs keep it alive
    assert [rtt for rtt in agent.rtts if rtt is not None]
    agent.heartbeat.stop()


def test_a_passive_end_still_closes_a_silent_peer(pair):
    loop, make = pair
    server, agent = make(answer_pings=False)
    timeouts: list[float] = []
    agent.heartbeat = Heartbeat(loop, agent.conn, INTERVAL, on_timeout=timeouts.append, passive=True)
    run(loop, lambda: agent.closed is not None, 5)
    assert agent.closed == "heartbeat timeout" and timeouts == [MISSED * INTERVAL]
    assert len(server.pings()) >= 1  # it asked before giving up
