"""The trunk frame codec (anywhere/mux.py): whole, split, one byte at a time, fuzzed, malformed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anywhere import mux
from anywhere.wire import ProtocolError


def decode(chunks: list[bytes]) -> list[tuple[int, int, bytes]]:
    """Feed the pieces through one decoder, reusing (and scribbling over) one buffer as the relay does."""
    dec = mux.MuxDecoder()
    out: list[tuple[int, int, bytes]] = []
    for chunk in chunks:
        buf = bytearray(chunk)
        out += [(kind, stream, bytes(payload)) for kind, stream, payload in dec.feed(memoryview(buf))]
        buf[:] = b"\xff" * len(buf)
    assert not dec.mid_frame
    return join_data(out)


def join_data(items: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """DATA is a byte stream: consecutive DATA pieces of one stream are one run of bytes."""
    out: list[tuple[int, int, bytes]] = []
    for kind, stream, payload in items:
        if kind == mux.DATA and out and out[-1][0] == mux.DATA and out[-1][1] == stream:
            out[-1] = (kind, stream, out[-1][2] + payload)
        else:
            out.append((kind, stream, payload))
    return out


SAMPLE = [
    (mux.OPEN, 1, mux.open_frame(1, "db.internal", 5432)[8:]),
    (mux.READY, 1, b""),
    (mux.DATA, 1, b"hello"),
    (mux.WINDOW, 1, struct.pack("!I", 65536)),
    (mux.END, 1, b""),
    (mux.FAIL, 2, "connection refused ü".encode()),
    (mux.ABORT, 3, b"reset"),
]
WIRE = b"".join(mux.frame(k, s, p) for k, s, p in SAMPLE)


def test_whole():
    assert decode([WIRE]) == SAMPLE


@pytest.mark.parametrize("cut", range(1, len(WIRE)))
def test_split_at_every_offset(cut):
    assert decode([WIRE[:cut], WIRE[cut:]]) == SAMPLE


def test_one_byte_at_a_time():
    assert decode([WIRE[i:i + 1] for i in range(len(WIRE))]) == SAMPLE


def test_helpers():
    assert mux.parse_open(SAMPLE[0][2]) == ("db.internal", 5432)
    assert mux.parse_window(SAMPLE[3][2]) == 65536
    with pytest.raises(ValueError):
        mux.frame(mux.DATA, 0, b"x")
    with pytest.raises(ValueError):
        mux.frame(mux.DATA, 1, b"x" * (mux.MAX_PAYLOAD + 1))


def hdr(kind: int, length: int, stream: int) -> bytes:
    return struct.pack("!II", kind << 24 | length, stream)


def test_open_names_the_first_window_only_when_granted():
    plain = mux.MuxDecoder().feed(memoryview(mux.open_frame(3, "10.0.0.2", 80)))[0][2]
    granted = mux.MuxDecoder().feed(memoryview(mux.open_frame(3, "10.0.0.2", 80, 65536)))[0][2]
    assert mux.parse_open_window(plain) == ("10.0.0.2", 80, None)
    assert mux.parse_open_window(granted) == ("10.0.0.2", 80, 65536)
    assert mux.parse_open(granted) == ("10.0.0.2", 80)


def test_ping_and_pong_live_on_stream_0_only():
    ping = mux.ping_frame(mux.PING, b"12345678")
    assert mux.MuxDecoder().feed(memoryview(ping)) == [(mux.PING, 0, b"12345678")]
    for bad in (hdr(mux.PING, 8, 1) + b"12345678", hdr(mux.PONG, 4, 0) + b"1234", hdr(mux.DATA, 1, 0) + b"x"):
        with pytest.raises(ProtocolError):
            mux.MuxDecoder().feed(memoryview(bad))
    with pytest.raises(ValueError):
        mux.frame(mux.PING, 1, b"12345678")


@pytest.mark.parametrize("bad", [
    hdr(9, 0, 1),  # unknown type
    hdr(0, 0, 1),  # type 0
    hdr(mux.DATA, 0, 0),  # stream 0
    hdr(mux.DATA, mux.MAX_PAYLOAD + 1, 1),  # oversized DATA, refused before its body
    hdr(mux.READY, 1, 1) + b"x",  # READY with a payload
    hdr(mux.WINDOW, 3, 1) + b"abc",  # short credit
    hdr(mux.OPEN, 2000, 1),  # oversized control frame
])
def test_malformed_frames(bad):
    with pytest.raises(ProtocolError):
        mux.MuxDecoder().feed(memoryview(bad))


@pytest.mark.parametrize("payload", [b"not json", b"[]", b'{"host": "", "port": 1}', b'{"host": "h", "port": 0}',
                                     b'{"host": "h", "port": true}', b"[" * 5000,
                                     b'{"host": "h", "port": 1, "window": 0}', b'{"host": "h", "port": 1, "window": true}',
                                     b'{"host": "h", "port": 1, "window": 1048577}',
                                     b'{"host": "h", "port": 1, "window": "65536"}'])
def test_bad_open_payloads(payload):
    with pytest.raises(ProtocolError):
        mux.parse_open(payload)


frames_st = st.lists(st.tuples(
    st.sampled_from([mux.DATA, mux.END, mux.READY, mux.FAIL, mux.ABORT]),
    st.integers(1, 2**32 - 1), st.binary(max_size=300)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(frames_st, st.data())
def test_fuzz_round_trip_any_split(frames, data):
    frames = [(k, s, p if k in (mux.DATA, mux.FAIL, mux.ABORT) else b"") for k, s, p in frames]
    frames = [(k, s, p) for k, s, p in frames if not (k == mux.DATA and not p)]  # empty DATA carries nothing
    wire = b"".join(mux.frame(k, s, p) for k, s, p in frames)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(wire)), max_size=10))))
    pieces = [wire[a:b] for a, b in zip([0] + cuts, cuts + [len(wire)])]
    assert decode(pieces) == join_data(frames)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_garbage_only_protocol_errors(blob):
    dec = mux.MuxDecoder()
    try:
        dec.feed(memoryview(blob))
    except ProtocolError:
        pass
