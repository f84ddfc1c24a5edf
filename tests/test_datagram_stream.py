"""trunk.DatagramStream on two real trunks over a socketpair, on a real Loop: datagrams whole both
ways, a datagram that does not fit the window dropped and counted (never queued), credit returned
as datagrams are handed on, the budget's accounts back to zero when flows close."""

from __future__ import annotations

import socket

import pytest

from anywhere import mux, trunk
from anywhere.loop import Loop
from anywhere.trunk import DatagramStream, Trunk
from looptest import drive


@pytest.fixture
def pair():
    loop = Loop()
    a, b = socket.socketpair()
    server = Trunk(loop, a, b"", name="server")
    agent = Trunk(loop, b, b"", name="agent")
    yield loop, server, agent
    server.close("test over")
    agent.close("test over")
    loop.close()


def flow(loop: Loop, server: Trunk, agent: Trunk):
    got_server: list[bytes] = []
    got_agent: list[bytes] = []
    sid = server.new_stream_id()
    near = DatagramStream(server, sid, "udp client", None, got_server.append)
    far = DatagramStream(agent, sid, "udp target", None, got_agent.append)
    return near, far, got_server, got_agent


def test_datagrams_whole_both_ways(pair):
    loop, server, agent = pair
    near, far, got_server, got_agent = flow(loop, server, agent)
    sizes = [0, 1, 100, 8000, 65507, 3]
    for n in sizes:
        assert near.send_datagram(bytes([n % 251]) * n)
    drive(loop, lambda: len(got_agent) == len(sizes), "the datagrams to reach the agent's side")
    assert got_agent == [bytes([n % 251]) * n for n in sizes]
    for d in got_agent:
        far.send_datagram(d[::-1])
    drive(loop, lambda: len(got_server) == len(sizes), "the replies")
    assert got_server == [d[::-1] for d in got_agent]
    assert (near.nbytes_in, near.nbytes_out, near.datagrams_in, near.datagrams_out) == (sum(sizes), sum(sizes), 6, 6)
    with pytest.raises(TypeError):
        near.attach(socket.socket())


def test_a_datagram_beyond_the_window_is_dropped_and_counted_then_credit_comes_back(pair):
    loop, server, agent = pair
    near, far, _, got_agent = flow(loop, server, agent)
    sent = 0
    while near.send_datagram(b"x" * 60000):  # the whole window, then the first that does not fit
        sent += 1
    assert sent == mux.WINDOW_SIZE // 60002 and near.dropped == 1
    assert near.send_window < 60002 and server.out_bytes <= mux.WINDOW_SIZE + sent * mux.HEADER_SIZE
    drive(loop, lambda: len(got_agent) == sent and near.send_window > 60002, "delivery and credit")
    assert near.send_datagram(b"y" * 60000) and near.dropped == 1
    drive(loop, lambda: len(got_agent) == sent + 1, "the next datagram")


def test_closing_ends_both_sides_and_frees_the_accounts(pair):
    loop, server, agent = pair
    before = trunk.buffer_usage()
    near, far, _, got_agent = flow(loop, server, agent)
    near.send_datagram(b"ping")
    drive(loop, lambda: got_agent == [b"ping"], "a datagram")
    near.close("idle for 2 s")
    drive(loop, lambda: far.closed, "the ABORT to close the far side")
    assert far.reason == "aborted by peer: idle for 2 s"
    assert not server.streams and not agent.streams
    assert trunk.buffer_usage()["held"] == before["held"] and trunk.buffer_usage()["committed"] == before["committed"]
    assert not near.send_datagram(b"late") and near.dropped == 1
