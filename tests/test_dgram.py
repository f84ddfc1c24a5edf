"""The datagram framer (anywhere/dgram.py): whole, split, one byte at a time, fuzzed, oversize refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anywhere import dgram
from anywhere.wire import ProtocolError

SAMPLE = [b"", b"x", b"\x00" * 300, bytes(range(256)) * 31, b"q" * dgram.MAX_DATAGRAM]
WIRE = b"".join(dgram.encode(d) for d in SAMPLE)


def decode(chunks: list[bytes]) -> list[bytes]:
    dec = dgram.DatagramDecoder()
    out: list[bytes] = []
    for chunk in chunks:
        buf = bytearray(chunk)
        out += dec.feed(memoryview(buf))
        buf[:] = b"\xff" * len(buf)  # what the decoder kept must be its own copy
    assert dec.partial == 0
    return out


def test_whole():
    assert decode([WIRE]) == SAMPLE


def test_split_everywhere_near_the_boundaries():
    first = len(dgram.encode(SAMPLE[0])) + len(dgram.encode(SAMPLE[1]))
    for cut in range(0, first + 310):
        assert decode([WIRE[:cut], WIRE[cut:]]) == SAMPLE


def test_one_byte_at_a_time():
    small = b"".join(dgram.encode(d) for d in SAMPLE[:4])
    assert decode([small[i:i + 1] for i in range(len(small))]) == SAMPLE[:4]


def test_the_length_prefix():
    assert dgram.encode(b"abc") == b"\x00\x03abc"
    assert dgram.encode(b"a" * 8000)[:2] == (8000).to_bytes(2, "big")


def test_oversize_is_refused_both_ways():
    with pytest.raises(ValueError, match="datagram of 65508 bytes exceeds 65507"):
        dgram.encode(b"x" * (dgram.MAX_DATAGRAM + 1))
    dec = dgram.DatagramDecoder()
    with pytest.raises(ProtocolError, match="datagram of 65508 bytes exceeds 65507"):
        dec.feed((dgram.MAX_DATAGRAM + 1).to_bytes(2, "big"))
    dec = dgram.DatagramDecoder()
    with pytest.raises(ProtocolError, match="65535 bytes"):
        dec.feed(b"\xff")
        dec.feed(b"\xff")


def test_it_holds_at_most_one_datagram():
    dec = dgram.DatagramDecoder()
    assert dec.feed(dgram.encode(b"z" * 1000)[:-1]) == []
    assert dec.partial == 1001


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8), st.lists(st.integers(min_value=1, max_value=5000), max_size=20))
def test_fuzzed_splits(datagrams, cuts):
    wire = b"".join(dgram.encode(d) for d in datagrams)
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(wire[pos:pos + cut])
        pos += cut
    chunks.append(wire[pos:])
    assert decode(chunks) == datagrams


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_never_crashes(data):
    dec = dgram.DatagramDecoder()
    try:
        for d in dec.feed(data):
            assert len(d) <= dgram.MAX_DATAGRAM
    except ProtocolError:
        pass
    assert dec.partial <= dgram.MAX_FRAMED
