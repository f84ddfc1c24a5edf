"""FramedConn's timer slot (framed.py, Deadlines) over a real TLS pair on a socketpair, both ends on
one Loop whose clock is a ManualClock: the handshake timeout and the owner's deadline fire when
clock time says so, without sleeping; the handshake and the frames are real."""

from __future__ import annotations

import socket
import time

import pytest

from anywhere import tls
from anywhere.framed import FramedConn

from looptest import advance, manual_loop


class Ends:
    """A server-side and a client-side FramedConn on a socketpair, and what happened to them."""

    def __init__(self, creds, handshake_timeout: float = 10.0, client_speaks_tls: bool = True) -> None:
        self.loop, self.clock = manual_loop()
        self.closed: dict[str, str] = {}
        self.messages: list[dict] = []
        self.handshakes: list[str] = []
        a, self.b = socket.socketpair()
        server_ctx = tls.server_context(str(creds.ca), str(creds.server_cert), str(creds.server_key))
        self.server = FramedConn(self.loop, a, server_ctx, server_side=True, peer="client",
                                 on_message=lambda c, m: self.messages.append(m),
                                 on_close=lambda c, r: self.closed.setdefault("server", r),
                                 on_handshake=lambda c: self.handshakes.append("server"),
                                 handshake_timeout=handshake_timeout)
        self.client = None
        if client_speaks_tls:
            cert, key = creds.agent("agent-1")
            client_ctx = tls.client_context(str(creds.ca), str(cert), str(key))
            self.client = FramedConn(self.loop, self.b, client_ctx, server_side=False, peer="server",
                                     on_message=lambda c, m: None,
                                     on_close=lambda c, r: self.closed.setdefault("client", r),
                                     server_hostname="localhost", handshake_timeout=handshake_timeout)

    def run(self, until, what: str, seconds: float = 10.0) -> None:
        """Real passes (the handshake's bytes cross a real socketpair); the clock does not move."""
        deadline = time.monotonic() + seconds
        while not until():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.loop.run_once(max_wait=0.05)

    def close(self) -> None:
        for conn in (self.server, self.client):
            if conn is not None:
                conn.close("test over")
        self.b.close()
        self.loop.close()


@pytest.fixture
def ends(creds):
    made: list[Ends] = []

    def make(**kw) -> Ends:
        made.append(Ends(creds, **kw))
        return made[-1]
    yield make
    for e in made:
        e.close()


def test_a_peer_that_never_handshakes_is_closed_at_the_handshake_timeout(ends):
    e = ends(handshake_timeout=10.0, client_speaks_tls=False)
    e.loop.run_once(max_wait=0.05)
    advance(e.loop, e.clock, 9.9)
    assert e.server.state == "handshake" and "server" not in e.closed
    advance(e.loop, e.clock, 0.2)
    assert e.closed["server"] == "TLS handshake timed out"


def test_a_deadline_set_after_the_handshake_fires_unless_cleared(ends):
    e = ends()
    e.run(lambda: e.server.open and e.client.open, "both handshakes")
    assert e.server.identity == "agent-1"
    fired: list[FramedConn] = []
    e.server.set_deadline(5.0, fired.append)  # the server's "first frame within handshake_timeout"
    advance(e.loop, e.clock, 4.9)
    assert fired == [] and e.server.open
    advance(e.loop, e.clock, 0.2)
    assert fired == [e.server]  # called with the connection; closing it is the owner's choice
    assert e.server.open

    e.server.set_deadline(5.0, fired.append)
    e.client.send("hello", proto=1, agent_id="agent-1", version="test")
    e.run(lambda: e.messages, "the first frame")
    e.server.clear_deadline()  # as the owner does on the first frame
    e.server.clear_deadline()  # idempotent
    advance(e.loop, e.clock, 60)
    assert fired == [e.server] and e.server.open
    assert e.messages[0]["type"] == "hello"


def test_a_new_deadline_replaces_the_old_and_closing_cancels_it(ends):
    e = ends()
    e.run(lambda: e.server.open and e.client.open, "both handshakes")
    fired: list[str] = []
    e.server.set_deadline(1.0, lambda c: fired.append("first"))
    e.server.set_deadline(3.0, lambda c: fired.append("second"))
    advance(e.loop, e.clock, 2.0)
    assert fired == []
    advance(e.loop, e.clock, 1.5)
    assert fired == ["second"]
    e.server.set_deadline(1.0, lambda c: fired.append("after close"))
    e.server.close("done with it")
    advance(e.loop, e.clock, 5.0)
    assert fired == ["second"] and e.closed["server"] == "done with it"
    e.server.set_deadline(1.0, lambda c: fired.append("on a closed connection"))
    advance(e.loop, e.clock, 5.0)
    assert fired == ["second"]


def test_the_deadline_can_close_the_connection_like_the_servers_hello_timeout(ends):
    e = ends()
    e.run(lambda: e.server.open and e.client.open, "both handshakes")
    e.server.set_deadline(10.0, lambda c: c.close("hello timeout"))
    advance(e.loop, e.clock, 10.0)
    assert e.closed["server"] == "hello timeout"
    e.run(lambda: "client" in e.closed, "the client to see the close")
    assert e.closed["client"] == "connection closed by peer"
