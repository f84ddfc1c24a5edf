"""Relay and trunk Stream both conform to carrier.Carrier, what the server's connection table reads."""

from __future__ import annotations

import socket

from anywhere.carrier import Carrier
from anywhere.loop import Loop
from anywhere.relay import Relay
from anywhere.trunk import Stream, Trunk


def test_a_relay_and_a_stream_are_carriers_and_a_trunk_is_not():
    loop = Loop()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        relay = Relay(loop, pairs[0][0], pairs[1][0], b_framed=True)
        trunk = Trunk(loop, pairs[2][0], b"", name="carrier")
        stream = Stream(trunk, trunk.new_stream_id())
        for carrier in (relay, stream):
            assert isinstance(carrier, Carrier), type(carrier).__name__
            assert carrier.bytes_a_to_b == 0 and carrier.bytes_b_to_a == 0
            assert carrier.first_byte_at is None and carrier.handoff is None
            assert carrier.last_active <= loop.time()
            carrier.close("test over")
            carrier.close("again")  # idempotent
        assert relay.reason == stream.reason == "test over"
        assert not isinstance(trunk, Carrier)
        trunk.close("test over")
    finally:
        loop.close()
        for a, b in pairs:
            a.close()
            b.close()
