"""Fuzzing, with hypothesis, of what hostile peers can send a live anywhered, and of the codec.

* The admin API on its Unix socket: random bytes, random request lines, headers, methods and
  paths from a realistic alphabet, random JSON bodies for POST /v1/proxies (valid-shaped and
  malformed).  Each case is one new connection: send, half-close, read until the daemon closes.
  The answer must be well-formed HTTP/1.1 — status < 500, a JSON ``{"error": ...}`` body for
  every 4xx — or a plain close; never a 5xx, never a hang.
* The agent port: random frames after a valid mutual-TLS handshake (a certificate of its own,
  agent-fuzz): the server answers or closes that connection, and a real agent's session and a
  connection through it are untouched.
* The codec (anywhere.wire): FrameDecoder and ChunkDecoder against a model of the format, fed in
  random splits.

After each live run: the daemon is alive, answers GET /v1/status, has no "Traceback" in its log
and its descriptor count is back near its start.

Scale: ANYWHERE_FUZZ_EXAMPLES (default 2000) cases per admin and codec test, a quarter of that on
the agent port (each case is a TLS handshake).  No shrinking: the daemon is stateful and the raw
failing input is printed as generated.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import struct
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from anywhere import wire
from anywhere.wire import ABORT, END, MAX_CHUNK, MAX_FRAME, ChunkDecoder, FrameDecoder, ProtocolError
from conftest import TargetServer, World, echo_handler, free_port
from handpeer import HandPeer, client_ctx
from procstat import fd_count, fd_kinds
from streams import EchoStream, one_shot

EXAMPLES = int(os.environ.get("ANYWHERE_FUZZ_EXAMPLES", "2000"))
AGENT_PORT_EXAMPLES = max(50, EXAMPLES // 4)
LIVE = settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=list(HealthCheck), print_blob=True)
CODEC = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CASE_TIMEOUT = 5.0  # seconds a single case may take before it counts as a hang
FD_MARGIN = 5

FIGURES = {"admin_cases": 0, "agent_port_cases": 0, "codec_cases": 0}


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    print(f"\nfuzz figures: {FIGURES['admin_cases']} admin API cases, {FIGURES['agent_port_cases']} agent-port "
          f"cases, {FIGURES['codec_cases']} codec cases (ANYWHERE_FUZZ_EXAMPLES={EXAMPLES})")


def canonical(obj) -> str:
    """Comparable form of decoded JSON (NaN is not equal to itself)."""
    return json.dumps(obj, sort_keys=True, allow_nan=True)


# -- the live daemon ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(tmp_path_factory, creds):
    """anywhered with agent-1, a proxy to an echo target and a live connection through it."""
    world = World(tmp_path_factory.mktemp("fuzz"), creds)
    target = TargetServer(echo_handler)
    stream = None
    try:
        server = world.start_server()
        agent = world.start_agent("agent-1")
        agent.wait_log("connected to server")
        port = world.add_proxy(target.port)
        world.api("POST", "/v1/proxies", {"agent_id": "agent-2", "local_ip": "127.0.0.1", "local_port": target.port,
                                          "remote_port": free_port(), "name": "keep"})
        stream = EchoStream(socket.create_connection(("127.0.0.1", port), timeout=10), "live", pace=0.05).start()
        stream.wait_progress(64 * 1024, 10)
        spare_ports = [free_port() for _ in range(4)]
        yield {"world": world, "server": server, "agent": agent, "port": port, "stream": stream,
               "spare_ports": spare_ports, "session": session_of(world, "agent-1")}
    finally:
        if stream is not None and stream.thread.is_alive():
            stream.finish()
        world.stop_all()
        target.stop()


def session_of(world, agent_id: str) -> dict | None:
    return next((a for a in world.api("GET", "/v1/agents")["agents"] if a["agent_id"] == agent_id), None)


def settle_fds(pid: int, baseline: int, margin: int, timeout: float = 15.0) -> int:
    """Wait (bounded) for the fd count to come back within `margin` of `baseline`; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        now = fd_count(pid)
        if now <= baseline + margin or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def baseline(daemon) -> tuple[int, int]:
    """(fd count, log offset) of the daemon before a run."""
    server = daemon["server"]
    return fd_count(server.pid), len(server.log())


def assert_daemon_healthy(daemon, before: tuple[int, int]) -> None:
    world, server = daemon["world"], daemon["server"]
    fds_before, mark = before
    assert server.alive(), server.log()[-5000:]
    status = world.api("GET", "/v1/status")
    assert status["server_id"] == "anywhered"
    log = server.log()[mark:]
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
    fds = settle_fds(server.pid, fds_before, FD_MARGIN)
    assert fds <= fds_before + FD_MARGIN, f"anywhered has {fds} fds, {fds_before} before: {fd_kinds(server.pid)}"
    # the real agent's session and the connection through it were never touched
    assert session_of(world, "agent-1")["connected_since"] == daemon["session"]["connected_since"]
    daemon["stream"].wait_progress(16 * 1024, 10)
    assert one_shot("127.0.0.1", daemon["port"], 64 * 1024)["ok"]


# -- HTTP: sending one case and judging the answer ------------------------------------------------------
class BadAnswer(AssertionError):
    pass


def exchange(path: str, data: bytes, half_close: bool = True) -> tuple[bytes, bool]:
    """One connection: send `data`, half-close, read until the daemon closes (at most CASE_TIMEOUT).

    Returns (everything read, whether the connection ended by a reset)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CASE_TIMEOUT)
        s.connect(path)
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon closed early (e.g. 413 after the headers): judge what it said
        got = bytearray()
        deadline = time.monotonic() + CASE_TIMEOUT
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except (socket.timeout, TimeoutError):
                raise BadAnswer(f"no close within {CASE_TIMEOUT} s; got {bytes(got[:300])!r}") from None
            except ConnectionResetError:
                return bytes(got), True
            if not chunk:
                return bytes(got), False
            got += chunk


def parse_responses(data: bytes, head_request: bool) -> list[tuple[int, dict, bytes]]:
    """Strictly split `data` into HTTP/1.1 responses; BadAnswer for anything else."""
    out = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            raise BadAnswer(f"incomplete response head: {data[pos:pos + 300]!r}")
        lines = data[pos:end].decode("latin-1").split("\r\n")
        m = re.fullmatch(r"HTTP/1\.1 (\d{3})(?: .*)?", lines[0])
        if not m:
            raise BadAnswer(f"bad status line {lines[0]!r} in {data[:500]!r}")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise BadAnswer(f"bad header line {line!r}")
            headers[name.lower()] = value.strip()
        status = int(m.group(1))
        pos = end + 4
        # A response to HEAD has no body (RFC 9110 9.3.2) -- unless the server could not read the
        # request as one (a protocol error): then the body of its error follows.
        rest = data[pos:]
        if head_request and (not rest or rest.startswith(b"HTTP/1.1 ")):
            length = 0
        else:
            if "content-length" not in headers or not headers["content-length"].isdigit():
                raise BadAnswer(f"no valid Content-Length: {lines}")
            length = int(headers["content-length"])
        body = data[pos:pos + length]
        if len(body) < length:
            raise BadAnswer(f"body cut short: {len(body)} of {length} bytes")
        pos += length
        out.append((status, headers, body))
    return out


def judge(data: bytes, *, head_request: bool = False, max_responses: int = 1, must_answer: bool = False,
          path: str = "") -> list[int]:
    """The checks every case must pass; returns the statuses."""
    responses = parse_responses(data, head_request)
    assert len(responses) <= max_responses, f"{len(responses)} responses to {max_responses} request(s): {data[:800]!r}"
    if must_answer:
        assert responses, "a well-formed request got no answer, only a close"
    statuses = []
    for status, headers, body in responses:
        statuses.append(status)
        assert 200 <= status < 500, f"status {status}: {body[:500]!r}"
        ctype = headers.get("content-type", "")
        if head_request:
            continue
        if ctype == "application/json":
            obj = json.loads(body)
            if status >= 400:
                assert isinstance(obj, dict) and isinstance(obj.get("error"), str) and obj["error"], obj
        else:
            assert status == 200 and ctype.startswith("text/plain") and path.rstrip("/") in ("/metrics", ""), \
                f"status {status} with Content-Type {ctype!r}"
    return statuses


# -- HTTP strategies ------------------------------------------------------------------------------------
SEGMENTS = ["v1", "v2", "proxies", "agents", "connections", "status", "metrics", "reload", "enable", "disable",
            "disconnect", "keep", "agent-2", "nosuch", "1", "0", "65535", "99999999999999999999",
            "..", ".", "", "%2F", "%00", "%20", "%", "%zz", "%C2%B2", "%E0%A5%A7", "%F0%9F%98%80", "[", "]", "[::1]",
            "a" * 80, "-1", "1e3", "agent-1:8080", "x.y_z-1", ";", "@", "~", "*"]
QUERIES = ["", "?proxy=keep", "?proxy=", "?proxy=nosuch", "?proxy=%C2%B2", "?a=1&a=2", "?=", "?&&", "?proxy=keep#x",
           "#frag", "?x=%zz"]
METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "get", "Post", "FOO", "M-SEARCH"]


@st.composite
def targets(draw) -> str:
    segs = draw(st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=5))
    if draw(st.integers(0, 3)):  # mostly realistic: /v1/RESOURCE[/NAME[/VERB]]
        segs = ["v1", draw(st.sampled_from(["proxies", "agents", "connections", "status", "reload"]))] + segs[:2]
    lead = draw(st.sampled_from(["/", "/", "/", "//", "http://x/", "", "*"]))
    target = lead + "/".join(segs) + draw(st.sampled_from(QUERIES))
    if draw(st.integers(0, 9)) == 0:
        target = draw(st.sampled_from(["/metrics", "/metrics/", "/", "*", "//[x", "http://[::1/v1/status", "/v1/status"]))
    return target


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                             max_size=3), max_leaves=8)


@st.composite
def proxy_bodies(draw, spare_ports: list[int]) -> dict | list | str | int | None:
    """POST /v1/proxies bodies: mostly proxy-shaped with valid and invalid field values."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_JSON)
    body: dict = {}
    choices = {
        "agent_id": st.sampled_from(["agent-1", "agent-2", "agent-fuzz", "x", "", "a" * 65, "bad id", "../x", "ä",
                                     "agent-1\n"]) | _SCALARS,
        "local_ip": st.sampled_from(["127.0.0.1", "::1", "localhost", "example.test", "999.1.1.1", "", "a b", "::",
                                     "fe80::1%lo", "-x", "a" * 300]) | _SCALARS,
        "local_port": st.sampled_from([1, 80, 65535, 0, -1, 65536, "80", "08", "x", "", 1.5, True, 2**64]) | _SCALARS,
        "remote_port": st.sampled_from([*spare_ports, 0, -1, 65536, "abc", True, 2.0, "", str(spare_ports[0]), 2**64])
        | _SCALARS,
        "whitelist": st.sampled_from([None, [], ["127.0.0.1"], "127.0.0.1,::1", ["300.1.1.1"], [5], "x", {}, [""],
                                      ["10.0.0.0/33"], ["::/0"], " , "]) | _JSON,
        "name": st.sampled_from(["n1", "fuzz.proxy", "", "1234", "a" * 65, "bad name", "ok.name:1", "keep", "-x",
                                 "n\n"]) | _SCALARS,
        "enabled": st.sampled_from([True, False, "yes", 1, 0, None]),
        "extra": _SCALARS,
    }
    if draw(st.booleans()):  # a valid proxy with a few fields changed
        body = {"agent_id": draw(st.sampled_from(["agent-1", "agent-2", "agent-fuzz"])),
                "local_ip": draw(st.sampled_from(["127.0.0.1", "::1", "localhost"])),
                "local_port": draw(st.integers(1, 65535)), "remote_port": draw(st.sampled_from(spare_ports))}
        for key in draw(st.lists(st.sampled_from(sorted(choices)), max_size=2, unique=True)):
            if draw(st.integers(0, 4)) == 0:
                body.pop(key, None)
            else:
                body[key] = draw(choices[key])
        return body
    for key, strategy in choices.items():
        required = key in ("agent_id", "local_ip", "local_port", "remote_port")
        if draw(st.integers(0, 9)) < (9 if required else 3):
            body[key] = draw(strategy)
    return body


@st.composite
def http_requests(draw, spare_ports: list[int]) -> dict:
    """One request, usually well-formed; `well_formed` says if the daemon owes an answer."""
    method = draw(st.sampled_from(METHODS) | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-_!", min_size=1, max_size=8))
    target = draw(targets())
    version = draw(st.sampled_from(["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "HTTP/9.9", "", "http/1.1"]))
    body = b""
    if method == "POST" and target.startswith("/v1/proxies") and draw(st.integers(0, 3)):
        obj = draw(proxy_bodies(spare_ports))
        body = json.dumps(obj, allow_nan=True).encode() if draw(st.integers(0, 7)) else json.dumps(obj)[:-1].encode()
    elif draw(st.integers(0, 5)) == 0:
        body = draw(st.sampled_from([b"{", b"[]", b"null", b"\xff\xfe", b"{\"a\": NaN}", b"1" * 100, b"[" * 5000,
                                     b"{\"agent_id\": \"agent-1\"}"]) | st.binary(max_size=200))
    headers: list[tuple[str, str]] = []
    host = draw(st.sampled_from(["normal", "normal", "none", "twice", "empty"]))
    if host == "normal":
        headers.append(("Host", "anywhered"))
    elif host == "twice":
        headers += [("Host", "a"), ("Host", "b")]
    elif host == "empty":
        headers.append(("Host", ""))
    framing = draw(st.sampled_from(["length"] * 6 + ["none", "wrong", "negative", "huge", "text", "twice", "chunked",
                                                      "bad-chunked"]))
    wire_body = body
    if framing == "length" and (body or method in ("POST", "PUT", "PATCH")):
        headers.append(("Content-Length", str(len(body))))
    elif framing == "wrong":
        headers.append(("Content-Length", str(len(body) + draw(st.integers(1, 50)))))
    elif framing == "negative":
        headers.append(("Content-Length", "-1"))
    elif framing == "huge":
        headers.append(("Content-Length", str(draw(st.integers(64 * 1024 + 1, 2**70)))))
    elif framing == "text":
        headers.append(("Content-Length", "ten"))
    elif framing == "twice":
        headers += [("Content-Length", str(len(body))), ("Content-Length", str(len(body) + 1))]
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        wire_body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    elif framing == "bad-chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        wire_body = b"zz\r\n" + body
    for name, value in draw(st.lists(st.tuples(
            st.sampled_from(["Connection", "Expect", "Accept", "X-Fuzz", "Authorization", "Content-Type",
                             "Transfer-Encoding", "Upgrade", "X" * 40]) | st.text(alphabet="abcXYZ-_:; \t", max_size=10),
            st.sampled_from(["close", "keep-alive", "100-continue", "application/json", "Bearer x", "h2c", "*/*",
                             "gzip, chunked"]) | st.text(alphabet="abc 019\t\"=,;", max_size=20)), max_size=4)):
        headers.append((name, value))
    if draw(st.integers(0, 49)) == 0:
        headers.append(("X-Big", "x" * draw(st.integers(8 * 1024, 20 * 1024))))
    line_end = draw(st.sampled_from(["\r\n"] * 9 + ["\n"]))
    head = f"{method} {target} {version}".rstrip(" ") + line_end
    head += "".join(f"{n}: {v}{line_end}" for n, v in headers) + line_end
    well_formed = (method in METHODS[:8] and version in ("HTTP/1.1", "HTTP/1.0") and host == "normal"
                   and framing == "length" and line_end == "\r\n" and not target.startswith(("*", "http://[")))
    raw = head.encode("utf-8", "surrogateescape") + wire_body
    # bytes sent beyond what the headers announce are a second (bad) request: a second answer is fine
    extra = framing not in ("length", "chunked") and bool(wire_body)
    return {"raw": raw, "method": method, "target": target, "well_formed": well_formed, "answers": 2 if extra else 1}


# -- the admin API, fuzzed ------------------------------------------------------------------------------
def clean_up_created(world, statuses_and_bodies) -> None:
    """Delete proxies a case created, so cases stay independent and ports are freed."""
    for status, body in statuses_and_bodies:
        if status == 201:
            name = json.loads(body)["proxy"]["name"]
            world.api("DELETE", f"/v1/proxies/{name}")


def run_admin_case(daemon, raw: bytes, method: str = "", target: str = "", well_formed: bool = False,
                   answers: int = 1) -> list[int]:
    FIGURES["admin_cases"] += 1
    world = daemon["world"]
    data, _reset = exchange(world.sock, raw)
    # HEAD: the server answers without a body if it read the request as a HEAD; whether a malformed
    # one still counts as HEAD is the server's call, so both forms are accepted (strictly parsed)
    head = method == "HEAD"
    # random bytes may hold several pipelined requests: at most one answer per line break
    most = answers if method else raw.count(b"\n") + 1
    statuses = judge(data, head_request=head, max_responses=most, must_answer=well_formed, path=target.split("?")[0])
    if not head:
        clean_up_created(world, [(s, b) for s, _h, b in parse_responses(data, False)])
    return statuses


def test_fuzz_admin_random_bytes(daemon):
    before = baseline(daemon)

    @LIVE
    @given(st.binary(max_size=600) | st.lists(st.sampled_from(
        [b"GET ", b"POST ", b"/v1/", b"proxies", b" HTTP/1.1", b"\r\n", b"\n", b"Host: x", b"Content-Length: 5",
         b"\r\n\r\n", b"{}", b"\x00", b"\xff", b" ", b":", b"Transfer-Encoding: chunked", b"0\r\n\r\n"]),
        max_size=20).map(b"".join))
    def case(raw):
        run_admin_case(daemon, raw)
    case()
    assert_daemon_healthy(daemon, before)


def test_fuzz_admin_requests(daemon):
    before = baseline(daemon)

    @LIVE
    @given(http_requests(daemon["spare_ports"]))
    def case(req):
        run_admin_case(daemon, req["raw"], req["method"], req["target"], req["well_formed"], req["answers"])
    case()
    assert_daemon_healthy(daemon, before)


def test_fuzz_admin_add_proxy_bodies(daemon):
    """POST /v1/proxies with well-formed HTTP and random bodies: 201 (then deleted again) or a 4xx."""
    before = baseline(daemon)
    seen: set[int] = set()

    @LIVE
    @given(proxy_bodies(daemon["spare_ports"]))
    def case(body):
        data = json.dumps(body, allow_nan=True).encode()
        raw = (b"POST /v1/proxies HTTP/1.1\r\nHost: anywhered\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        seen.update(run_admin_case(daemon, raw, "POST", "/v1/proxies", well_formed=True))
    case()
    assert 400 in seen and (201 in seen or EXAMPLES < 200), seen
    assert_daemon_healthy(daemon, before)


# Inputs found by the fuzzers above or by reading the handlers: each well-formed request must get one answer < 500.
KNOWN = {
    "bracket-in-authority": (b"GET //[x HTTP/1.1\r\nHost: x\r\n\r\n", False),
    "absolute-bad-ipv6": (b"GET http://[::1/v1/status HTTP/1.1\r\nHost: x\r\n\r\n", False),
    "deep-json-body": (b"POST /v1/proxies HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n" + b"[" * 60000, False),
    "superscript-digit-connection": (b"DELETE /v1/connections/%C2%B2 HTTP/1.1\r\nHost: x\r\n\r\n", False),
    "superscript-digit-proxy": (b"DELETE /v1/proxies/%C2%B2 HTTP/1.1\r\nHost: x\r\n\r\n", False),
    "head": (b"HEAD /v1/status HTTP/1.1\r\nHost: x\r\n\r\n", True),
}


@pytest.mark.parametrize("case", list(KNOWN))
def test_admin_known_hostile_requests(daemon, case):
    """One connection left open (no half-close): a well-formed request must get exactly one well-formed
    answer promptly, with status < 500, and leave no traceback in the daemon's log."""
    raw, head = KNOWN[case]
    server = daemon["server"]
    mark = len(server.log())
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect(daemon["world"].sock)
        s.sendall(raw)
        data = bytearray()
        try:
            while b"\r\n\r\n" not in data or not _complete(bytes(data), head):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, TimeoutError):
            raise AssertionError(f"no complete answer within 3 s; got {bytes(data)!r}") from None
        # anything more the daemon sends for this one request is a second (bogus) response
        s.settimeout(0.3)
        try:
            data += s.recv(65536)
        except (socket.timeout, TimeoutError):
            pass
    statuses = judge(bytes(data), head_request=head, must_answer=True)
    assert len(statuses) == 1
    assert "Traceback" not in server.log()[mark:], server.log()[mark:][-4000:]
    assert server.alive()


def _complete(data: bytes, head: bool) -> bool:
    end = data.find(b"\r\n\r\n")
    if head:
        return True
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data[:end])
    return m is not None and len(data) >= end + 4 + int(m.group(1))


# -- the agent port, fuzzed -------------------------------------------------------------------------------
_FIELDS = {int: st.integers(0, 2**63 - 1) | st.sampled_from([-1, 2**63, 2**64]),
           str: st.sampled_from(["agent-fuzz", "agent-1", "", "x" * 100, "ä"]) | st.text(max_size=12),
           (int, float): st.floats(allow_nan=False) | st.integers(-5, 5000)}


@st.composite
def frame_parts(draw) -> bytes:
    kind = draw(st.sampled_from(["message"] * 4 + ["json", "body", "header", "raw"]))
    if kind == "message":
        msg_type = draw(st.sampled_from(sorted(wire.MESSAGES)))
        fields = {}
        for name, kind_ in wire.MESSAGES[msg_type].items():
            if draw(st.integers(0, 19)):
                if name == "proto":
                    fields[name] = draw(st.sampled_from([wire.PROTO_VERSION] * 6 + [0, 2, 99]))
                elif name == "agent_id":
                    fields[name] = draw(st.sampled_from(["agent-fuzz"] * 6 + ["agent-1", "agent-2", ""]))
                else:
                    fields[name] = draw(_FIELDS[kind_] | _JSON)
        body = json.dumps({"type": msg_type, **fields}, allow_nan=True).encode()
        return struct.pack("!I", len(body)) + body
    if kind == "json":
        body = json.dumps(draw(_JSON), allow_nan=True).encode()
        return struct.pack("!I", len(body)) + body
    if kind == "body":
        body = draw(st.binary(max_size=100))
        return struct.pack("!I", len(body)) + body
    if kind == "header":
        return struct.pack("!I", draw(st.sampled_from([0, 1, MAX_FRAME, MAX_FRAME + 1, 2**31, 2**32 - 1])
                                      | st.integers(0, 2**32 - 1)))
    return draw(st.binary(max_size=64))


def expected_fate(blob: bytes) -> str:
    """What the server must do with `blob` as a connection's first bytes: "close" (malformed, or a
    first message it refuses), or "maybe" (valid so far: it may answer and keep the connection)."""
    dec = FrameDecoder()
    dec.receive_data(blob)
    msgs = []
    try:
        while (msg := dec.next_message()) is not None:
            msgs.append(msg)
    except ProtocolError:
        return "close"
    if not msgs:
        return "maybe"
    first = msgs[0]
    if first["type"] not in ("hello", "data", "pool") or first["proto"] != wire.PROTO_VERSION \
            or first["agent_id"] != "agent-fuzz" or first["type"] == "data":
        return "close"
    if first["type"] == "hello" and any(m["type"] not in ("ping", "pong", "fail") for m in msgs[1:]):
        return "close"
    if first["type"] == "pool" and msgs[1:]:
        return "close"  # nothing may come on an idle data connection (or: no session, closed anyway)
    return "maybe"


def test_fuzz_agent_port_frames(daemon, creds):
    world = daemon["world"]
    ctx = client_ctx(creds.ca, creds.agent("agent-fuzz"))
    before = baseline(daemon)
    fates = {"close": 0, "maybe": 0}

    @settings(LIVE, max_examples=AGENT_PORT_EXAMPLES)
    @given(st.lists(frame_parts(), min_size=1, max_size=5).map(b"".join))
    def case(blob):
        FIGURES["agent_port_cases"] += 1
        fate = expected_fate(blob)
        fates[fate] += 1
        peer = HandPeer(world.port, ctx, timeout=5)
        try:
            try:
                peer.send_raw(blob)
            except (BrokenPipeError, ConnectionResetError):
                pass
            data, closed = _read_tls(peer, 3.0 if fate == "close" else 0.2)
        finally:
            peer.close()
        if fate == "close":
            assert closed, f"the server kept the connection open after {blob[:200]!r}"
        dec = FrameDecoder()
        dec.receive_data(data)
        while (msg := dec.next_message()) is not None:  # whatever the server said is well-formed
            assert msg["type"] in ("welcome", "error", "ping", "pong"), msg
            if msg["type"] == "error":
                assert msg["reason"]
    case()
    assert fates["close"] and fates["maybe"], fates
    assert_daemon_healthy(daemon, before)
    assert session_of(world, "agent-1") is not None


def _read_tls(peer: HandPeer, wait: float) -> tuple[bytes, bool]:
    """Read for at most `wait` seconds; (bytes, whether the server closed)."""
    got = bytearray()
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(got), False
        peer.sock.settimeout(left)
        try:
            data = peer.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return bytes(got), False
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return bytes(got), True
        if not data:
            return bytes(got), True
        got += data


# -- the codec, fuzzed ----------------------------------------------------------------------------------
def frames_model(blob: bytes) -> tuple[list, str]:
    """The frame format read by a model: the JSON of each complete frame, then how the bytes end:
    "clean" (on a frame boundary), "partial" (inside a frame) or "oversize" (a header over MAX_FRAME)."""
    out, pos = [], 0
    while pos < len(blob):
        if len(blob) - pos < 4:
            return out, "partial"
        (length,) = struct.unpack_from("!I", blob, pos)
        if length > MAX_FRAME:
            return out, "oversize"
        if len(blob) - pos - 4 < length:
            return out, "partial"
        out.append(blob[pos + 4:pos + 4 + length])
        pos += 4 + length
    return out, "clean"


def decode_in_pieces(blob: bytes, cuts: list[int], eof: bool) -> tuple[list[dict], bool]:
    dec = FrameDecoder()
    msgs = []
    bounds = [0, *cuts, len(blob)]
    try:
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                dec.receive_data(blob[a:b])
                while (m := dec.next_message()) is not None:
                    msgs.append(m)
        if eof:
            dec.receive_data(b"")
            while (m := dec.next_message()) is not None:
                msgs.append(m)
    except ProtocolError:
        return msgs, True
    return msgs, False


@CODEC
@given(st.lists(frame_parts(), max_size=8).map(b"".join), st.data(), st.booleans())
def test_fuzz_frame_decoder_against_a_model(blob, data, eof):
    FIGURES["codec_cases"] += 1
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(blob)), max_size=10))))
    msgs, failed = decode_in_pieces(blob, cuts, eof)
    whole, whole_failed = decode_in_pieces(blob, [], eof)
    assert (canonical(msgs), failed) == (canonical(whole), whole_failed), "the result depends on how the bytes were split"
    bodies, ending = frames_model(blob)
    # every message is exactly the JSON of the model's frame at the same position
    assert len(msgs) <= len(bodies)
    for msg, body in zip(msgs, bodies):
        assert canonical(msg) == canonical(json.loads(body.decode("utf-8")))
    if not failed:
        assert len(msgs) == len(bodies)
        assert ending == "clean" or (ending == "partial" and not eof)
    elif len(msgs) == len(bodies):
        assert ending == "oversize" or (ending == "partial" and eof)


def chunk_model(blob: bytes, max_chunk: int) -> dict:
    """The chunk stream read by a model: payload bytes, the end (None/"end"/"abort"/"error") and where it ends."""
    payload, pos = bytearray(), 0
    while pos < len(blob):
        if len(blob) - pos < 4:
            return {"payload": bytes(payload), "end": None, "at": None}
        (length,) = struct.unpack_from("!I", blob, pos)
        pos += 4
        if length == END:
            return {"payload": bytes(payload), "end": "end", "at": pos}
        if length == ABORT:
            return {"payload": bytes(payload), "end": "abort", "at": pos}
        if length > max_chunk:
            return {"payload": bytes(payload), "end": "error", "at": pos}
        payload += blob[pos:pos + length]
        pos += length
    return {"payload": bytes(payload), "end": None, "at": None}


@CODEC
@given(st.data())
def test_fuzz_chunk_decoder_against_a_model(data):
    FIGURES["codec_cases"] += 1
    max_chunk = data.draw(st.sampled_from([MAX_CHUNK, 64, 1]))
    parts = data.draw(st.lists(st.one_of(
        st.binary(min_size=1, max_size=80).map(lambda p: struct.pack("!I", len(p)) + p),
        st.sampled_from([struct.pack("!I", END), struct.pack("!I", ABORT)]),
        st.integers(0, 2**32 - 1).map(lambda n: struct.pack("!I", n)),
        st.binary(max_size=30)), max_size=10))
    blob = b"".join(parts)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(blob)), max_size=10))))
    bounds = [0, *cuts, len(blob)]
    pieces = [(a, blob[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    model = chunk_model(blob, max_chunk)

    dec = ChunkDecoder(max_chunk=max_chunk)
    got = bytearray()
    error = False
    rest = b""
    for i, (start, piece) in enumerate(pieces):
        try:
            payloads, ended = dec.feed(memoryview(piece))
        except ProtocolError:
            error = True
            error_piece = (start, start + len(piece))
            break
        for p in payloads:
            got += p
        if ended:
            rest = dec.trailing + b"".join(p for _, p in pieces[i + 1:])
            break
    assert model["payload"].startswith(bytes(got))
    if model["end"] == "error":
        assert error and error_piece[0] < model["at"] <= error_piece[1]
    elif model["end"] == "abort":
        # an ABORT ends the stream; bytes after it in the same read are a protocol error
        if error:
            assert error_piece[0] < model["at"] < error_piece[1]
        else:
            assert dec.ended == "abort" and bytes(got) == model["payload"]
    elif model["end"] == "end":
        assert not error and dec.ended == "end" and bytes(got) == model["payload"]
        assert rest == blob[model["at"]:], "the bytes after END are not handed back whole"
    else:
        assert not error and dec.ended is None and bytes(got) == model["payload"]
        assert dec.mid_chunk == (len(blob) > 0 and _ends_mid_chunk(blob))


def _ends_mid_chunk(blob: bytes) -> bool:
    """Whether a stream without END/ABORT stops inside a chunk header or payload."""
    pos = 0
    while pos < len(blob):
        if len(blob) - pos < 4:
            return True
        (length,) = struct.unpack_from("!I", blob, pos)
        if pos + 4 + length > len(blob):
            return True
        pos += 4 + length
    return False
