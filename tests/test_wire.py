"""The sans-IO codec of anywhere/wire.py: control frames and the chunk stream.

Every decoder is fed whole, split at every byte offset and one byte at a time, and fuzzed with
hypothesis: malformed input must only ever raise `ProtocolError`, never another exception.
"""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anywhere import wire
from anywhere.wire import ABORT, END, MAX_CHUNK, MAX_FRAME, ChunkDecoder, FrameDecoder, ProtocolError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# One valid example of every message type, with non-ASCII text where a string is allowed.
SAMPLES: dict[str, dict] = {
    "hello": {"proto": 1, "agent_id": "agent-1 ünïcødé ☃", "version": "0.1.0"},
    "welcome": {"proto": 1, "server_id": "srv", "heartbeat": 2.5, "pool": 8},
    "error": {"reason": "protocol version 2 is not 1"},
    "ping": {"seq": 0},
    "pong": {"seq": 2**63 - 1},
    "open": {"conn": 17, "host": "::1", "port": 65535},
    "fail": {"conn": 3, "reason": "connection refused"},
    "data": {"proto": 1, "agent_id": "agent-2", "conn": 12345678901},
    "ready": {"conn": 1},
    "pool": {"proto": 1, "agent_id": "agent-1"},
    "trunk": {"proto": 1, "agent_id": "agent-1"},
    "trunks": {"count": 2},
}


def frame(body: bytes) -> bytes:
    """A control frame with a correct length header around an arbitrary body."""
    return struct.pack("!I", len(body)) + body


def json_frame(obj) -> bytes:
    return frame(json.dumps(obj).encode())


def decode_all(data: bytes, splits: list[int] | None = None, eof: bool = False, limit: int = 10_000) -> list[dict]:
    """Feed `data` cut at `splits` (sorted offsets) into a FrameDecoder; collect every message."""
    dec = FrameDecoder()
    out: list[dict] = []
    cuts = [0, *(splits or []), len(data)]

    def drain() -> None:
        for _ in range(limit):
            msg = dec.next_message()
            if msg is None:
                return
            out.append(msg)
        raise AssertionError("decoder yielded more messages than the input can hold")

    for start, end in zip(cuts, cuts[1:]):
        if end > start:
            dec.receive_data(data[start:end])
            drain()
    if eof:
        dec.receive_data(b"")
        drain()
    return out


def test_every_message_type_has_a_sample():
    assert set(SAMPLES) == set(wire.MESSAGES)


# -- FrameDecoder: round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("msg_type", sorted(wire.MESSAGES))
def test_round_trip_whole(msg_type):
    data = wire.encode(msg_type, **SAMPLES[msg_type])
    (length,) = struct.unpack("!I", data[:4])
    assert length == len(data) - 4
    assert decode_all(data) == [{"type": msg_type, **SAMPLES[msg_type]}]


@pytest.mark.parametrize("msg_type", sorted(wire.MESSAGES))
def test_round_trip_split_at_every_offset(msg_type):
    data = wire.encode(msg_type, **SAMPLES[msg_type])
    expected = [{"type": msg_type, **SAMPLES[msg_type]}]
    for cut in range(1, len(data)):
        dec = FrameDecoder()
        dec.receive_data(data[:cut])
        assert dec.next_message() is None, f"a message came out of {cut} of {len(data)} bytes"
        dec.receive_data(data[cut:])
        assert [dec.next_message()] == expected
        assert dec.next_message() is None


@pytest.mark.parametrize("msg_type", sorted(wire.MESSAGES))
def test_round_trip_one_byte_at_a_time(msg_type):
    data = wire.encode(msg_type, **SAMPLES[msg_type])
    dec = FrameDecoder()
    got = []
    for i in range(len(data)):
        dec.receive_data(data[i:i + 1])
        msg = dec.next_message()
        if msg is not None:
            got.append((i, msg))
    assert got == [(len(data) - 1, {"type": msg_type, **SAMPLES[msg_type]})]
    dec.receive_data(b"")  # EOF at a frame boundary is clean
    assert dec.next_message() is None


def test_several_frames_in_one_buffer_come_out_in_order():
    msgs = [(t, SAMPLES[t]) for t in sorted(SAMPLES)] * 3
    data = b"".join(wire.encode(t, **f) for t, f in msgs)
    expected = [{"type": t, **f} for t, f in msgs]
    assert decode_all(data) == expected
    assert decode_all(data, splits=list(range(1, len(data), 7))) == expected
    assert decode_all(data, splits=list(range(1, len(data)))) == expected


def test_extra_fields_are_ignored_but_kept():
    data = json_frame({"type": "ping", "seq": 5, "future": [1, 2]})
    assert decode_all(data) == [{"type": "ping", "seq": 5, "future": [1, 2]}]


def test_frame_of_exactly_max_frame_is_accepted_one_more_is_not():
    data = wire.encode("error", reason="x" * 100)
    body_len = len(data) - 4
    dec = FrameDecoder(max_frame=body_len)
    dec.receive_data(data)
    assert dec.next_message() == {"type": "error", "reason": "x" * 100}
    dec = FrameDecoder(max_frame=body_len - 1)
    dec.receive_data(data)
    with pytest.raises(ProtocolError):
        dec.next_message()


# -- FrameDecoder: EOF, size limit, leftovers --------------------------------------------------------
@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 20])
def test_eof_in_the_middle_of_a_frame_is_a_protocol_error(cut):
    data = wire.encode("hello", **SAMPLES["hello"])
    assert cut < len(data)
    dec = FrameDecoder()
    dec.receive_data(data[:cut])
    assert dec.next_message() is None
    dec.receive_data(b"")
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_eof_after_complete_frames_is_clean():
    data = wire.encode("ping", seq=1) + wire.encode("pong", seq=1)
    assert decode_all(data, eof=True) == [{"type": "ping", "seq": 1}, {"type": "pong", "seq": 1}]


def test_data_after_eof_is_a_protocol_error():
    dec = FrameDecoder()
    dec.receive_data(b"")
    with pytest.raises(ProtocolError):
        dec.receive_data(wire.encode("ping", seq=1))


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 2**31, 2**32 - 1])
def test_oversized_length_is_refused_before_the_body_arrives(length):
    dec = FrameDecoder()
    dec.receive_data(struct.pack("!I", length))  # the header alone, not one byte of body
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_oversized_length_is_refused_when_the_header_arrives_byte_by_byte():
    dec = FrameDecoder()
    header = struct.pack("!I", MAX_FRAME + 1)
    for b in header[:-1]:
        dec.receive_data(bytes([b]))
        assert dec.next_message() is None
    dec.receive_data(header[-1:])
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_take_leftover_returns_the_bytes_after_the_last_frame():
    stream = wire.chunk_header(5) + b"hello" + wire.chunk_header(END)
    data = wire.encode("data", **SAMPLES["data"]) + wire.encode("ready", conn=1) + stream
    dec = FrameDecoder()
    dec.receive_data(data)
    assert dec.next_message()["type"] == "data"
    assert dec.next_message() == {"type": "ready", "conn": 1}
    assert dec.take_leftover() == stream
    assert dec.take_leftover() == b""


def test_take_leftover_of_a_partial_frame_and_of_nothing():
    dec = FrameDecoder()
    dec.receive_data(wire.encode("ready", conn=1) + b"\x00\x00")
    assert dec.next_message() == {"type": "ready", "conn": 1}
    assert dec.next_message() is None
    assert dec.take_leftover() == b"\x00\x00"
    dec = FrameDecoder()
    dec.receive_data(wire.encode("ready", conn=1))
    assert dec.next_message() == {"type": "ready", "conn": 1}
    assert dec.take_leftover() == b""


# -- FrameDecoder: malformed frames -------------------------------------------------------------------
def _bad_bodies() -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = [
        ("empty body", b""),
        ("not json", b"hello there"),
        ("truncated json", b'{"type": "ping", "seq": 1'),
        ("invalid utf-8", b'{"type": "error", "reason": "\xff\xfe"}'),
        ("json array", b'["ping", 1]'),
        ("json string", b'"ping"'),
        ("json number", b"42"),
        ("json null", b"null"),
        ("no type", b'{"seq": 1}'),
        ("unknown type", b'{"type": "launch", "seq": 1}'),
        ("type not a string", b'{"type": 5}'),
        ("type is a list", b'{"type": ["ping"], "seq": 1}'),
        ("float where int", b'{"type": "ping", "seq": 1.0}'),
        ("huge float where int", b'{"type": "ping", "seq": 1e400}'),
        ("string where int", b'{"type": "ping", "seq": "1"}'),
        ("null where int", b'{"type": "ping", "seq": null}'),
        ("int where string", b'{"type": "error", "reason": 7}'),
        ("list where string", b'{"type": "error", "reason": ["x"]}'),
        ("string where number", b'{"type": "welcome", "proto": 1, "server_id": "s", "heartbeat": "5", "pool": 8}'),
        ("bool seq", b'{"type": "ping", "seq": true}'),
        ("bool conn", b'{"type": "ready", "conn": false}'),
        ("bool proto", b'{"type": "hello", "proto": true, "agent_id": "a", "version": "1"}'),
        ("bool heartbeat", b'{"type": "welcome", "proto": 1, "server_id": "s", "heartbeat": true, "pool": 8}'),
        ("zero heartbeat", b'{"type": "welcome", "proto": 1, "server_id": "s", "heartbeat": 0, "pool": 8}'),
        ("NaN heartbeat", b'{"type": "welcome", "proto": 1, "server_id": "s", "heartbeat": NaN, "pool": 8}'),
        ("infinite heartbeat", b'{"type": "welcome", "proto": 1, "server_id": "s", "heartbeat": Infinity, "pool": 8}'),
        ("bool port", b'{"type": "open", "conn": 1, "host": "h", "port": true}'),
        ("port 0", b'{"type": "open", "conn": 1, "host": "h", "port": 0}'),
        ("port 65536", b'{"type": "open", "conn": 1, "host": "h", "port": 65536}'),
        ("port -1", b'{"type": "open", "conn": 1, "host": "h", "port": -1}'),
        ("negative conn", b'{"type": "ready", "conn": -1}'),
        ("conn 2**63", b'{"type": "ready", "conn": %d}' % 2**63),
        ("seq 2**63", b'{"type": "pong", "seq": %d}' % 2**63),
        ("count -1", b'{"type": "trunks", "count": -1}'),
        ("count 1025", b'{"type": "trunks", "count": 1025}'),
        ("bool count", b'{"type": "trunks", "count": true}'),
        ("very long integer", b'{"type": "ready", "conn": 1' + b"0" * 5000 + b"}"),
    ]
    # every required field of every type, missing
    for msg_type, fields in SAMPLES.items():
        for name in fields:
            body = {"type": msg_type, **{k: v for k, v in fields.items() if k != name}}
            cases.append((f"{msg_type} without {name}", json.dumps(body).encode()))
    return cases


BAD_BODIES = _bad_bodies()


@pytest.mark.parametrize("body", [b for _, b in BAD_BODIES], ids=[n for n, _ in BAD_BODIES])
def test_malformed_frame_is_a_protocol_error(body):
    dec = FrameDecoder()
    dec.receive_data(frame(body))
    with pytest.raises(ProtocolError):
        dec.next_message()


@pytest.mark.parametrize("body", [b for _, b in BAD_BODIES[:8]], ids=[n for n, _ in BAD_BODIES[:8]])
def test_malformed_frame_after_a_good_one_byte_by_byte(body):
    data = wire.encode("ping", seq=9) + frame(body)
    dec = FrameDecoder()
    got = []
    with pytest.raises(ProtocolError):
        for i in range(len(data)):
            dec.receive_data(data[i:i + 1])
            msg = dec.next_message()
            if msg is not None:
                got.append(msg)
    assert got == [{"type": "ping", "seq": 9}]


@pytest.mark.parametrize("opener", [b"[", b'{"a":'], ids=["arrays", "objects"])
def test_deeply_nested_json_is_a_protocol_error(opener):
    """A frame within MAX_FRAME whose JSON nests thousands deep must be refused as a ProtocolError
    (json.loads raises RecursionError for it, which callers such as framed.py do not catch)."""
    body = opener * (MAX_FRAME // len(opener))
    assert len(body) <= MAX_FRAME
    dec = FrameDecoder()
    dec.receive_data(frame(body))
    with pytest.raises(ProtocolError):
        dec.next_message()


# -- encode() refuses what it would refuse to receive ---------------------------------------------------
@pytest.mark.parametrize("msg_type, fields", [
    ("launch", {"seq": 1}),
    ("", {}),
    ("ping", {}),
    ("ping", {"seq": "1"}),
    ("ping", {"seq": True}),
    ("ping", {"seq": 1.5}),
    ("ping", {"seq": -1}),
    ("pong", {"seq": 2**63}),
    ("ready", {"conn": None}),
    ("open", {"conn": 1, "host": "h", "port": 0}),
    ("open", {"conn": 1, "host": "h", "port": 65536}),
    ("open", {"conn": 1, "host": "h", "port": False}),
    ("open", {"conn": 1, "host": 5, "port": 80}),
    ("hello", {"proto": 1, "agent_id": "a"}),
    ("welcome", {"proto": 1, "server_id": "s", "heartbeat": "5"}),
    ("error", {"reason": "x" * (MAX_FRAME + 1)}),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_encode_refuses_bad_messages_with_value_error(msg_type, fields):
    with pytest.raises(ValueError):
        wire.encode(msg_type, **fields)


# -- ChunkDecoder --------------------------------------------------------------------------------------
def chunks(*payloads: bytes, end: int | None = END) -> bytes:
    out = b"".join(wire.chunk_header(len(p)) + p for p in payloads)
    if end is not None:
        out += wire.chunk_header(end)
    return out


def feed_pieces(dec: ChunkDecoder, pieces) -> tuple[bytes, list[str | None]]:
    """Feed each piece through a reused bytearray (as the relay does) and copy the payloads out
    at once: views are only valid until the buffer is reused."""
    buf = bytearray(max((len(p) for p in pieces), default=0))
    got = bytearray()
    ends = []
    for piece in pieces:
        buf[:len(piece)] = piece
        payloads, end = dec.feed(memoryview(buf)[:len(piece)])
        for p in payloads:
            assert isinstance(p, memoryview)
            got += p
        ends.append(end)
        buf[:] = b"\xaa" * len(buf)  # scribble over the buffer, as the next read would
    return bytes(got), ends


PAYLOADS = [b"a", b"hello world", bytes(range(256)) * 3, b"\x00\x00\x00\x00", b"z" * 5000]
STREAM = chunks(*PAYLOADS)
JOINED = b"".join(PAYLOADS)


def test_chunks_whole():
    dec = ChunkDecoder()
    got, ends = feed_pieces(dec, [STREAM])
    assert got == JOINED
    assert ends == ["end"]
    assert dec.ended == "end"
    assert not dec.mid_chunk


def test_chunks_split_at_every_offset():
    for cut in range(len(STREAM) + 1):
        dec = ChunkDecoder()
        got, ends = feed_pieces(dec, [STREAM[:cut], STREAM[cut:]])
        assert got == JOINED, f"cut at {cut}"
        assert ends[-1] == "end"
        if cut < len(STREAM):
            assert ends[0] is None, f"ended early at cut {cut}"


def test_chunks_one_byte_at_a_time():
    dec = ChunkDecoder()
    got, ends = feed_pieces(dec, [STREAM[i:i + 1] for i in range(len(STREAM))])
    assert got == JOINED
    assert ends == [None] * (len(STREAM) - 1) + ["end"]


def test_chunk_payload_views_point_into_the_fed_buffer():
    data = bytearray(chunks(b"abcdef", end=None))
    payloads, end = ChunkDecoder().feed(memoryview(data))
    assert end is None and len(payloads) == 1
    data[4:10] = b"ABCDEF"  # the view is not a copy
    assert bytes(payloads[0]) == b"ABCDEF"


def test_mid_chunk_state():
    dec = ChunkDecoder()
    data = chunks(b"abc", end=None)
    dec.feed(memoryview(data[:2]))
    assert dec.mid_chunk  # half a header
    dec.feed(memoryview(data[2:5]))
    assert dec.mid_chunk  # header done, 2 of 3 payload bytes missing
    dec.feed(memoryview(data[5:]))
    assert not dec.mid_chunk and dec.ended is None


def test_no_chunks_then_end():
    dec = ChunkDecoder()
    got, ends = feed_pieces(dec, [wire.chunk_header(END)])
    assert got == b"" and ends == ["end"]


@pytest.mark.parametrize("split", [None, 1])
def test_abort_marker(split):
    data = chunks(b"partial", b"more", end=ABORT)
    pieces = [data] if split is None else [data[i:i + 1] for i in range(len(data))]
    dec = ChunkDecoder()
    got, ends = feed_pieces(dec, pieces)
    assert got == b"partialmore"
    assert ends[-1] == "abort" and dec.ended == "abort"
    assert all(e is None for e in ends[:-1])


@pytest.mark.parametrize("marker", [END, ABORT])
def test_data_after_the_end_marker_in_the_same_feed(marker):
    dec = ChunkDecoder()
    if marker == ABORT:
        with pytest.raises(ProtocolError):
            dec.feed(memoryview(chunks(b"x", end=marker) + b"\x00"))
        return
    # after END comes the next control frame of a reused connection: kept aside, not an error
    payloads, end = dec.feed(memoryview(chunks(b"x", end=marker) + b"\x00next"))
    assert [bytes(p) for p in payloads] == [b"x"] and end == "end"
    assert dec.trailing == b"\x00next"


@pytest.mark.parametrize("marker", [END, ABORT])
def test_data_after_the_end_marker_in_a_later_feed(marker):
    dec = ChunkDecoder()
    payloads, end = dec.feed(memoryview(chunks(b"x", end=marker)))
    assert [bytes(p) for p in payloads] == [b"x"]
    assert end == ("end" if marker == END else "abort")
    with pytest.raises(ProtocolError):
        dec.feed(memoryview(chunks(b"y")))


def test_chunk_longer_than_max_chunk_is_refused():
    dec = ChunkDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(memoryview(wire.chunk_header(MAX_CHUNK + 1)))
    dec = ChunkDecoder()
    payloads, end = dec.feed(memoryview(wire.chunk_header(MAX_CHUNK)))  # the maximum itself is fine
    assert payloads == [] and end is None and dec.mid_chunk


def test_small_max_chunk_refused_even_byte_by_byte():
    data = chunks(b"0123456789")
    dec = ChunkDecoder(max_chunk=10)
    got, ends = feed_pieces(dec, [data])
    assert got == b"0123456789" and ends == ["end"]
    dec = ChunkDecoder(max_chunk=9)
    with pytest.raises(ProtocolError):
        for i in range(len(data)):
            dec.feed(memoryview(data[i:i + 1]))
    assert i == 3  # refused as soon as the header is complete, before any payload


# -- hypothesis ----------------------------------------------------------------------------------------
_INT63 = st.integers(0, 2**63 - 1)
_FIELD = {
    int: _INT63,
    str: st.text(max_size=40),
    # the only number-or-float field is welcome.heartbeat: (0, 3600] seconds
    (int, float): st.one_of(st.integers(1, 3600), st.floats(0, 3600, exclude_min=True, allow_nan=False)),
}


@st.composite
def valid_messages(draw) -> dict:
    msg_type = draw(st.sampled_from(sorted(wire.MESSAGES)))
    msg = {"type": msg_type}
    for name, kind in wire.MESSAGES[msg_type].items():
        limits = {"port": st.integers(1, 65535), "pool": st.integers(0, 1024), "count": st.integers(0, 1024)}
        msg[name] = draw(limits.get(name, _FIELD[kind]))
    return msg


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def json_objects(draw) -> dict:
    """Objects that look like messages: a real type and random fields, or random fields only."""
    obj = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "msg_type"), _JSON, max_size=5))
    if draw(st.booleans()):
        msg_type = draw(st.sampled_from(sorted(wire.MESSAGES)))
        obj["type"] = msg_type
        for name in wire.MESSAGES[msg_type]:
            if draw(st.integers(0, 3)):
                obj[name] = draw(_JSON | _FIELD.get(wire.MESSAGES[msg_type][name], _INT63))
    return obj


def _frame_part(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "json", "body", "raw", "header"]))
    if kind == "valid":
        msg = draw(valid_messages())
        return wire.encode(msg.pop("type"), **msg)
    if kind == "json":
        return frame(json.dumps(draw(json_objects())).encode())
    if kind == "body":
        return frame(draw(st.binary(max_size=64)))
    if kind == "header":
        return struct.pack("!I", draw(st.integers(0, 2**32 - 1)))
    return draw(st.binary(max_size=64))


@st.composite
def split_points(draw, data: bytes) -> list[int]:
    return sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))


@FUZZ
@given(st.data())
def test_fuzz_frame_decoder_yields_valid_messages_or_protocol_error(data):
    blob = b"".join(_frame_part(data.draw) for _ in range(data.draw(st.integers(0, 6))))
    splits = data.draw(split_points(blob))
    eof = data.draw(st.booleans())
    try:
        msgs = decode_all(blob, splits, eof=eof)
    except ProtocolError:
        return
    for msg in msgs:
        assert isinstance(msg, dict)
        spec = wire.MESSAGES[msg["type"]]
        for name, kind in spec.items():
            assert isinstance(msg[name], kind) and not isinstance(msg[name], bool)
        # what came out can be sent back out
        fields = {k: v for k, v in msg.items() if k != "type"}
        assert decode_all(wire.encode(msg["type"], **fields)) == [msg]


@FUZZ
@given(st.data())
def test_fuzz_valid_messages_round_trip_in_any_split(data):
    msgs = data.draw(st.lists(valid_messages(), max_size=8))
    blob = b"".join(wire.encode(m["type"], **{k: v for k, v in m.items() if k != "type"}) for m in msgs)
    splits = data.draw(split_points(blob))
    assert decode_all(blob, splits, eof=True) == msgs


@FUZZ
@given(st.data())
def test_fuzz_chunks_round_trip_in_any_split(data):
    payloads = data.draw(st.lists(st.binary(min_size=1, max_size=300), max_size=10))
    stream = chunks(*payloads)
    splits = data.draw(split_points(stream))
    cuts = [0, *splits, len(stream)]
    dec = ChunkDecoder()
    pieces = [stream[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    got, ends = feed_pieces(dec, pieces)
    assert got == b"".join(payloads)
    assert ends[-1] == "end" and all(e is None for e in ends[:-1])
    assert dec.ended == "end" and not dec.mid_chunk


@FUZZ
@given(st.data())
def test_fuzz_chunk_decoder_only_raises_protocol_error(data):
    max_chunk = data.draw(st.sampled_from([MAX_CHUNK, 16, 1]))
    blob = data.draw(st.binary(max_size=400) | st.lists(
        st.one_of(st.binary(max_size=20), st.sampled_from([wire.chunk_header(END), wire.chunk_header(ABORT)]),
                  st.integers(0, 40).map(wire.chunk_header)), max_size=12).map(b"".join))
    splits = data.draw(split_points(blob))
    cuts = [0, *splits, len(blob)]
    dec = ChunkDecoder(max_chunk=max_chunk)
    total = 0
    try:
        for a, b in zip(cuts, cuts[1:]):
            payloads, end = dec.feed(memoryview(blob[a:b]))
            assert all(0 < len(p) <= max_chunk for p in payloads)
            total += sum(len(p) for p in payloads)
            assert end in (None, "end", "abort")
    except ProtocolError:
        return
    assert total <= len(blob)
