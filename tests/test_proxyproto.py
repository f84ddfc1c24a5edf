"""The PROXY protocol header (anywhere/proxyproto.py) and OPEN's PROXY fields (mux.py): v1 and v2
byte for byte, IPv4 and IPv6, a v4 client of a dual-stack listener as IPv4, malformed and fuzzed
fields (that stream fails, the trunk goes on).  Then the agent's side on socketpairs and a real
Loop: a Trunk answering a malformed OPEN with FAIL, and `Stream.lead` putting the header first
through a target socket that takes it in pieces.  Whole processes, nginx and HAProxy:
tests/test_proxy_protocol.py."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anywhere import mux, proxyproto, trunk
from anywhere.loop import Loop
from anywhere.proxyproto import origin
from anywhere.trunk import Stream, Trunk
from anywhere.wire import ProtocolError
from looptest import drive

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"


def test_v1_ipv4():
    assert proxyproto.header(origin(1, ("127.0.0.5", 50000), ("127.0.0.1", 8080))) == \
        b"PROXY TCP4 127.0.0.5 127.0.0.1 50000 8080\r\n"


def test_v1_ipv6():
    assert proxyproto.header(origin(1, ("::1", 40000, 0, 0), ("2001:db8::1", 443, 0, 0))) == \
        b"PROXY TCP6 ::1 2001:db8::1 40000 443\r\n"


def test_v1_a_v4_client_of_a_dual_stack_listener_is_ipv4():
    o = origin(1, ("::ffff:127.0.0.5", 50000, 0, 0), ("::ffff:127.0.0.1", 8080, 0, 0))
    assert proxyproto.header(o) == b"PROXY TCP4 127.0.0.5 127.0.0.1 50000 8080\r\n"


def test_v1_longest_line_is_within_the_spec():
    line = proxyproto.header(origin(1, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535),
                                    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)))
    assert len(line) <= proxyproto.V1_MAX == 107


def test_v2_ipv4_byte_exact():
    h = proxyproto.header(origin(2, ("::ffff:127.0.0.5", 50000, 0, 0), ("::ffff:127.0.0.1", 8080, 0, 0)))
    assert h == (SIG + b"\x21\x11\x00\x0c" + bytes([127, 0, 0, 5]) + bytes([127, 0, 0, 1])
                 + b"\xc3\x50" + b"\x1f\x90")
    assert len(h) == 16 + 12


def test_v2_ipv6_byte_exact():
    h = proxyproto.header(origin(2, ("2001:db8::5", 1, 0, 0), ("::1", 65535, 0, 0)))
    assert h[:16] == SIG + b"\x21\x21\x00\x24"
    assert h[16:32] == ipaddress.IPv6Address("2001:db8::5").packed
    assert h[32:48] == b"\x00" * 15 + b"\x01"
    assert h[48:] == b"\x00\x01\xff\xff"
    assert len(h) == 16 + 36


def test_a_scope_id_is_dropped():
    h = proxyproto.header(origin(1, ("fe80::1%lo", 5), ("fe80::2%lo", 6)))
    assert h == b"PROXY TCP6 fe80::1 fe80::2 5 6\r\n"


@pytest.mark.parametrize("src,dst,version", [
    (("127.0.0.1", 1), ("::1", 2), 1),  # mixed families
    (("127.0.0.1", 70000), ("127.0.0.1", 2), 1),
    (("127.0.0.1", 1), ("127.0.0.1", 2), 3),
    (("example.com", 1), ("127.0.0.1", 2), 1),
])
def test_origin_refuses(src, dst, version):
    with pytest.raises(ValueError):
        origin(version, src, dst)


@pytest.mark.parametrize("value,expected", [(None, None), ("off", None), ("v1", "v1"), ("v2", "v2")])
def test_parse_version(value, expected):
    assert proxyproto.parse_version(value) == expected


@pytest.mark.parametrize("value", ["V1", "1", 1, 2, True, "", "v3", [], {}])
def test_parse_version_refuses(value):
    with pytest.raises(ValueError, match="must be v1, v2 or off"):
        proxyproto.parse_version(value)


@settings(deadline=None)
@given(st.ip_addresses(v=4) | st.ip_addresses(v=6), st.integers(0, 65535), st.integers(0, 65535),
       st.sampled_from([1, 2]))
def test_open_fields_round_trip(ip, sport, dport, version):
    o = origin(version, (str(ip), sport), (str(ip), dport))
    frame = mux.open_frame(7, "db.internal", 5432, 65536, o)
    request = mux.parse_open_request(frame[mux.HEADER_SIZE:])
    assert request == ("db.internal", 5432, 65536, o, None, None)
    assert len(frame) - mux.HEADER_SIZE <= 1024  # OPEN's limit, with the longest host name it may carry
    assert proxyproto.header(request.origin) == proxyproto.header(o)


def test_open_without_pp_has_no_origin_and_is_what_it_was():
    payload = mux.open_frame(1, "10.0.0.2", 80)[mux.HEADER_SIZE:]
    assert payload == b'{"host":"10.0.0.2","port":80}'
    assert mux.parse_open_request(payload) == ("10.0.0.2", 80, None, None, None, None)


def test_open_with_pp_and_the_longest_host_fits_the_limit():
    o = origin(2, ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535), ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535))
    host = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 characters
    payload = mux.open_frame(1, host, 65535, mux.WINDOW_SIZE, o)[mux.HEADER_SIZE:]
    assert len(payload) <= 1024


def payload(**fields) -> bytes:
    return json.dumps({"host": "127.0.0.1", "port": 80, **fields}).encode()


@pytest.mark.parametrize("fields,problem", [
    ({"pp": 3, "src": ["127.0.0.1", 1], "dst": ["127.0.0.1", 2]}, "OPEN pp must be 1 or 2"),
    ({"pp": True, "src": ["127.0.0.1", 1], "dst": ["127.0.0.1", 2]}, "OPEN pp must be 1 or 2"),
    ({"pp": "1", "src": ["127.0.0.1", 1], "dst": ["127.0.0.1", 2]}, "OPEN pp must be 1 or 2"),
    ({"pp": 1, "dst": ["127.0.0.1", 2]}, "OPEN src must be [IP, PORT]"),
    ({"pp": 1, "src": ["127.0.0.1", 1, 3], "dst": ["127.0.0.1", 2]}, "OPEN src must be [IP, PORT]"),
    ({"pp": 1, "src": {"ip": "127.0.0.1"}, "dst": ["127.0.0.1", 2]}, "OPEN src must be [IP, PORT]"),
    ({"pp": 1, "src": ["localhost", 1], "dst": ["127.0.0.1", 2]}, "OPEN src address must be an IP address literal"),
    ({"pp": 1, "src": ["1" * 5000, 1], "dst": ["127.0.0.1", 2]}, "OPEN src address must be an IP address literal"),
    ({"pp": 1, "src": ["fe80::1%eth0", 1], "dst": ["::1", 2]}, "OPEN src address must be an IP address literal"),
    ({"pp": 1, "src": [17, 1], "dst": ["127.0.0.1", 2]}, "OPEN src address must be an IP address literal"),
    ({"pp": 1, "src": ["127.0.0.1", 65536], "dst": ["127.0.0.1", 2]}, "OPEN src port must be 0..65535"),
    ({"pp": 1, "src": ["127.0.0.1", -1], "dst": ["127.0.0.1", 2]}, "OPEN src port must be 0..65535"),
    ({"pp": 1, "src": ["127.0.0.1", False], "dst": ["127.0.0.1", 2]}, "OPEN src port must be 0..65535"),
    ({"pp": 1, "src": ["127.0.0.1", 1], "dst": ["127.0.0.1", 2.5]}, "OPEN dst port must be 0..65535"),
    ({"pp": 1, "src": ["127.0.0.1", 1], "dst": ["::1", 2]}, "not of one address family"),
    ({"src": ["127.0.0.1", 1]}, "OPEN has src/dst without pp"),
])
def test_malformed_pp_fields_fail_the_stream_not_the_trunk(fields, problem):
    request = mux.parse_open_request(payload(**fields))
    assert request.origin is None and problem in request.problem and len(request.problem) <= 200
    assert (request.host, request.port) == ("127.0.0.1", 80)


def test_a_bad_target_is_still_a_protocol_error():
    with pytest.raises(ProtocolError):
        mux.parse_open_request(json.dumps({"host": "", "port": 80, "pp": 1}).encode())
    with pytest.raises(ProtocolError):
        mux.parse_open_request(b"[1, 2]")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["pp", "src", "dst", "x"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=60)
                       | st.lists(st.integers() | st.text(max_size=50), max_size=3)))
def test_fuzzed_pp_fields_never_raise_past_the_stream(fields):
    request = mux.parse_open_request(payload(**fields))
    assert (request.origin is None) or request.problem is None
    if request.origin is not None:
        assert proxyproto.header(request.origin)


def test_v2_length_field_matches_what_follows():
    for o in (origin(2, ("10.1.2.3", 1), ("10.3.2.1", 2)), origin(2, ("::2", 1), ("::3", 2))):
        h = proxyproto.header(o)
        (length,) = struct.unpack("!H", h[14:16])
        assert length == len(h) - 16


# -- the agent's side on real sockets: a Trunk on a socketpair, frames by hand from the far end --------
def frames_from(far: socket.socket, decoder: mux.MuxDecoder, out: list) -> None:
    try:
        data = far.recv(65536)
    except BlockingIOError:
        return
    out += [(kind, sid, bytes(payload)) for kind, sid, payload in decoder.feed(memoryview(bytearray(data)))]


def test_a_malformed_open_fails_its_stream_and_the_trunk_goes_on():
    loop = Loop()
    near, far = socket.socketpair()
    far.setblocking(False)
    opened: list = []
    agent = Trunk(loop, near, b"", name="agent", on_open=lambda tr, sid, host, port, window, o:
                  opened.append((sid, host, port, window, o)))
    got: list = []
    decoder = mux.MuxDecoder()
    try:
        far.sendall(mux.frame(mux.OPEN, 1, payload(pp=9, src=["127.0.0.1", 1], dst=["127.0.0.1", 2])))
        o = origin(2, ("::1", 5), ("::1", 6))
        far.sendall(mux.open_frame(3, "127.0.0.1", 80, 4096, o))
        drive(loop, lambda: opened and got, "the FAIL and the good OPEN", feed=lambda: frames_from(far, decoder, got))
        assert got == [(mux.FAIL, 1, b"OPEN pp must be 1 or 2")]
        assert opened == [(3, "127.0.0.1", 80, 4096, o)] and not agent.closed
    finally:
        agent.close("test over")
        far.close()
        loop.close()


def test_lead_goes_first_even_when_the_target_takes_it_in_pieces_and_earns_no_credit():
    """The header waits in outbuf ahead of the client's early bytes; a target socket that takes
    nothing yet holds it back, and the target's own first words (a banner) are not read until all
    of it is written; the peer gets no credit for it and the budget's accounts come back to 0."""
    loop = Loop()
    near, far = socket.socketpair()
    far.setblocking(False)
    agent = Trunk(loop, near, b"", name="agent")
    stream = Stream(agent, 1, name="target")
    target_near, target = socket.socketpair()
    target_near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    target_near.setblocking(False)
    filler = bytearray()
    while True:  # the target's socket full: the header can only go in pieces, later
        try:
            filler += b"f" * target_near.send(b"f" * 4096)
        except BlockingIOError:
            break
    try:
        header = proxyproto.header(origin(1, ("127.0.0.1", 50000), ("127.0.0.1", 8080)))
        stream.lead(header)
        far.sendall(mux.frame(mux.DATA, 1, b"early"))
        drive(loop, lambda: stream.nbytes_out == 5, "the early bytes, held")
        target.sendall(b"banner")  # it speaks first
        stream.attach(target_near, read_now=False)
        for _ in range(20):
            loop.run_once(max_wait=0.005)
        assert stream.own > 0 and stream.nbytes_in == 0  # not all written yet: nothing read from the target
        received = bytearray()
        target.setblocking(False)

        def read_target() -> None:
            try:
                received.extend(target.recv(65536))
            except BlockingIOError:
                pass
        drive(loop, lambda: len(received) >= len(filler) + len(header) + 5 and stream.nbytes_in == 6,
              "the header, the early bytes, then the banner read", feed=read_target)
        assert bytes(received) == bytes(filler) + header + b"early"
        assert stream.own == 0 and stream.credit == 5  # credit for the peer's 5 bytes, none for the header
        assert trunk.buffer_usage()["held"] == 0
        with pytest.raises(RuntimeError):
            stream.lead(b"too late")
    finally:
        stream.close("test over", notify=False)
        agent.close("test over")
        for s in (far, target):
            s.close()
        loop.close()
    assert trunk.buffer_usage()["held"] == 0
