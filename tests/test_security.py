"""Mutual TLS and hostile input against a running anywhered, on loopback.

The hostile peers are written by hand here (plain TCP, or TLS with `ssl` and the wire codec);
the well-behaved ones are real `anywhere` agent processes.  After every attack the server must
still serve: an agent session that was up before stays up, a tunneled connection opened before
keeps moving bytes, and new ones work.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import random
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest

from anywhere.wire import PROTO_VERSION, chunk_header, encode
from conftest import free_port, recv_all, wait_for
from handpeer import client_ctx, sock_name, until_closed

TEN_MB = 10 * 1024 * 1024


# -- hand-written peers: see handpeer.py ---------------------------------------------------------
# -- small checks --------------------------------------------------------------------------------------
def agent_ids(world) -> list[str]:
    return [a["agent_id"] for a in world.api("GET", "/v1/agents")["agents"]]


def session(world, agent_id: str) -> dict:
    return next(a for a in world.api("GET", "/v1/agents")["agents"] if a["agent_id"] == agent_id)


def round_trip(port: int, payload: bytes | None = None, host: str = "127.0.0.1") -> None:
    """A fresh client connection through the tunnel to the echo target: everything comes back."""
    payload = payload or os.urandom(100_000)
    with socket.create_connection((host, port), timeout=5) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c, 5) == payload


def echo_once(c: socket.socket, size: int = 50_000) -> None:
    """One exchange on a live tunneled connection to the echo target."""
    payload = os.urandom(size)
    c.sendall(payload)
    got = bytearray()
    c.settimeout(5)
    while len(got) < len(payload):
        data = c.recv(65536)
        assert data, "the live tunneled connection was closed"
        got += data
    assert bytes(got) == payload


def count(text: str, log: str) -> int:
    return log.count(text)


# -- identity: the id claimed must be the certificate's ---------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_spoofed_hello_is_refused(world, creds, peers, host):
    server = world.start_server()
    p = peers(world.port, client_ctx(creds.ca, creds.agent("agent-2")), host=host)
    p.send("hello", proto=PROTO_VERSION, agent_id="agent-1", version="0.1.0")
    msgs, _how = p.messages_until_closed(5)
    assert [m["type"] for m in msgs] == ["error"], msgs
    reason = msgs[0]["reason"]
    assert "does not match" in reason and "'agent-1'" in reason and "'agent-2'" in reason, reason
    server.wait_log(f"refusing hello from {p.peer}: agent id 'agent-1' does not match", 5)
    assert agent_ids(world) == []


def test_spoofed_data_connection_is_refused(world, creds, peers):
    server = world.start_server()
    p = peers(world.port, client_ctx(creds.ca, creds.agent("agent-2")))
    p.send("data", proto=PROTO_VERSION, agent_id="agent-1", conn=12345)
    msgs, _how = p.messages_until_closed(5)
    assert [m["type"] for m in msgs] == ["error"], msgs
    assert "does not match" in msgs[0]["reason"] and "'agent-2'" in msgs[0]["reason"], msgs
    server.wait_log(f"refusing data from {p.peer}: agent id 'agent-1' does not match", 5)
    assert agent_ids(world) == []


def test_spoofed_hello_does_not_replace_the_real_agents_session(world, creds, peers, echo_target):
    world.start_server()
    world.start_agent("agent-1")
    before = session(world, "agent-1")
    port = world.add_proxy(echo_target.port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as live:
        echo_once(live)
        p = peers(world.port, client_ctx(creds.ca, creds.agent("agent-2")))
        p.send("hello", proto=PROTO_VERSION, agent_id="agent-1", version="evil")
        msgs, _ = p.messages_until_closed(5)
        assert [m["type"] for m in msgs] == ["error"]
        world.server.wait_log(f"refusing hello from {p.peer}", 5)
        after = session(world, "agent-1")
        assert (after["address"], after["connected_since"]) == (before["address"], before["connected_since"])
        assert "replacing its session" not in world.server.log()
        echo_once(live)
    round_trip(port)


def test_data_connection_cannot_take_another_agents_client(world, creds, peers):
    """agent-2, with its own valid certificate, names a connection id that belongs to agent-1's client.

    It must get neither that client (data) nor close it (fail); agent-1 still gets it afterwards.
    """
    server = world.start_server()
    ctx1 = client_ctx(creds.ca, creds.agent("agent-1"))
    ctx2 = client_ctx(creds.ca, creds.agent("agent-2"))
    admin1 = peers(world.port, ctx1)
    admin1.send("hello", proto=PROTO_VERSION, agent_id="agent-1", version="hand")
    assert admin1.recv()["type"] == "welcome"
    admin2 = peers(world.port, ctx2)
    admin2.send("hello", proto=PROTO_VERSION, agent_id="agent-2", version="hand")
    assert admin2.recv()["type"] == "welcome"
    assert agent_ids(world) == ["agent-1", "agent-2"]
    port = world.add_proxy(9, agent_id="agent-1")  # the target is never dialled: agent-1 is hand-written
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        opened = admin1.recv()
        assert opened["type"] == "open" and opened["port"] == 9, opened
        conn_id = opened["conn"]

        # agent-2 reports a failure for it on its own admin connection: ignored
        admin2.send("fail", conn=conn_id, reason="hijack")
        admin2.send("ping", seq=7)
        assert admin2.recv() == {"type": "pong", "seq": 7}  # the fail was processed before this
        # agent-2 opens a data connection for it: refused
        thief = peers(world.port, ctx2)
        thief.send("data", proto=PROTO_VERSION, agent_id="agent-2", conn=conn_id)
        msgs, _ = thief.messages_until_closed(5)
        assert [m["type"] for m in msgs] == ["error"], msgs
        assert str(conn_id) in msgs[0]["reason"]
        server.wait_log(f"data connection from agent agent-2 ({thief.peer}): no client is waiting for connection {conn_id}", 5)

        # the client is still waiting, and agent-1 gets it
        data1 = peers(world.port, ctx1)
        data1.send("data", proto=PROTO_VERSION, agent_id="agent-1", conn=conn_id)
        assert data1.recv() == {"type": "ready", "conn": conn_id}
        client.sendall(b"hello")
        stream = data1.decoder.take_leftover()
        while len(stream) < 4 + 5:
            more = data1.sock.recv(65536)
            assert more, "data connection closed"
            stream += more
        assert stream == chunk_header(5) + b"hello"
        data1.send_raw(chunk_header(5) + b"world")
        client.settimeout(5)
        assert client.recv(100) == b"world"


def test_agent_refuses_to_start_with_an_id_its_certificate_does_not_carry(world, creds):
    world.start_server()
    proc = world.start_agent("agent-1", cert=creds.agent("agent-2"), wait=False)
    assert proc.popen.wait(10) == 2
    log = proc.log()
    assert "'agent-1' does not match" in log and "'agent-2'" in log, log
    assert agent_ids(world) == []
    assert "agent agent-1 connected" not in world.server.log()


# -- certificates from elsewhere ---------------------------------------------------------------------------
def test_agent_with_certificate_from_another_ca_never_connects(world, other_creds):
    """The whole credential set of another installation: each side refuses the other."""
    server = world.start_server()
    agent = world.start_agent("agent-1", cert=other_creds.agent("agent-1"), ca=other_creds.ca, wait=False)
    wait_for(lambda: count("closed before its hello: TLS handshake failed", server.log()) >= 2, 10,
             what=f"two refused handshakes in the server log:\n{server.log()}")
    assert agent.alive(), "the agent should keep retrying, not crash"
    assert "certificate verification failed" in agent.log()
    assert agent_ids(world) == []
    assert "agent agent-1 connected" not in server.log()


def test_server_refuses_client_certificate_from_another_ca(world, creds, other_creds):
    """The agent trusts the right CA, but its own certificate comes from another one."""
    server = world.start_server()
    agent = world.start_agent("agent-1", cert=other_creds.agent("agent-1"), ca=creds.ca, wait=False)
    wait_for(lambda: count("TLS handshake failed: certificate verification failed", server.log()) >= 2, 10,
             what=f"two refused client certificates in the server log:\n{server.log()}")
    assert agent.alive()
    assert agent_ids(world) == []
    assert "connected to server" not in agent.log()


def test_agent_refuses_server_certificate_from_another_ca(world, creds, other_creds):
    """The agent's certificate is good, but the CA it trusts did not sign the server's certificate."""
    server = world.start_server()
    agent = world.start_agent("agent-1", cert=creds.agent("agent-1"), ca=other_creds.ca, wait=False)
    agent.wait_log("certificate verification failed", 10)
    assert "unable to get local issuer certificate" in agent.log() or "self-signed" in agent.log(), agent.log()
    server.wait_log("closed before its hello: TLS handshake failed", 5)
    assert agent_ids(world) == []
    assert "connected to server" not in agent.log()


def test_server_certificate_name_is_checked(world):
    server = world.start_server()
    agent = world.start_agent("agent-1", "--server-name", "wrong.example", wait=False)
    agent.wait_log("certificate verification failed", 10)
    assert "hostname mismatch" in agent.log().lower() and "wrong.example" in agent.log(), agent.log()
    server.wait_log("closed before its hello: TLS handshake failed", 5)
    assert agent_ids(world) == []
    agent.stop()
    # the control: the same agent with a name the certificate carries connects
    world.start_agent("agent-1", "--server-name", "localhost")


def test_agent_refuses_a_server_presenting_an_agent_certificate(world, creds):
    """Whoever holds an agent's key cannot pose as the server: the agent demands serverAuth usage."""
    crt, key = creds.agent("agent-2")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(key))
    ctx.load_verify_locations(str(creds.ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    world.port = listener.getsockname()[1]
    got: list = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.settimeout(5)
                    got.append(s.recv(65536))
            except (OSError, ssl.SSLError) as exc:
                got.append(exc)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        # the agent certificate has no SAN, so its CN "agent-2" passes the name check: only its usage fails
        agent = world.start_agent("agent-1", "--server-name", "agent-2", wait=False)
        agent.wait_log("certificate verification failed", 10)
        assert "unsuitable certificate purpose" in agent.log(), agent.log()
        t.join(10)
        assert got and not isinstance(got[0], bytes), f"the agent sent {got!r} to an impostor"
    finally:
        listener.close()
        t.join(10)


def test_server_refuses_its_own_certificate_used_as_a_client_certificate(world, creds, peers):
    server = world.start_server()
    ctx = client_ctx(creds.ca, (creds.server_cert, creds.server_key))
    try:
        p = peers(world.port, ctx)
    except (ssl.SSLError, OSError):
        pass  # refused during the handshake (TLS 1.2)
    else:
        try:
            p.send("hello", proto=PROTO_VERSION, agent_id="localhost", version="x")
        except (ssl.SSLError, OSError):
            pass
        msgs, how = p.messages_until_closed(5)
        assert msgs == [], f"the server answered {msgs} ({how})"
    server.wait_log("TLS handshake failed: certificate verification failed: unsuitable certificate purpose", 5)
    assert agent_ids(world) == []


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_client_without_certificate_is_refused_and_server_keeps_serving(world, creds, peers, echo_target, version):
    server = world.start_server()
    ctx = client_ctx(creds.ca, None)
    ctx.maximum_version = version
    ctx.minimum_version = version
    peer_name = None
    try:
        p = peers(world.port, ctx)
    except (ssl.SSLError, ConnectionResetError):
        pass  # refused during the handshake (TLS 1.2: the server asks for the certificate before Finished)
    else:
        # TLS 1.3: the client's side of the handshake is done before the server has seen its (empty) certificate
        peer_name = p.peer
        try:
            p.send("hello", proto=PROTO_VERSION, agent_id="agent-1", version="x")
        except (ssl.SSLError, OSError):
            pass
        msgs, how = p.messages_until_closed(5)
        assert msgs == [], f"a client without a certificate got {msgs} ({how})"
    expected = "(no certificate) closed before its hello: TLS handshake failed"
    server.wait_log(f"connection from {peer_name} {expected}" if peer_name else expected, 5)
    assert agent_ids(world) == []
    # still serving
    world.start_agent("agent-1")
    round_trip(world.add_proxy(echo_target.port))


# -- garbage and silence on the agent port ----------------------------------------------------------------------
GARBAGE = {
    "random": random.Random(20240517).randbytes(4096),
    "http": b"GET / HTTP/1.1\r\nHost: anywhere.example\r\nUser-Agent: curl/8\r\n\r\n",
    "zeros": bytes(64 * 1024),
}


def test_garbage_on_the_agent_port_is_dropped_and_others_keep_working(world, echo_target):
    server = world.start_server()
    world.start_agent("agent-1")
    before = session(world, "agent-1")
    port = world.add_proxy(echo_target.port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as live:
        echo_once(live)
        for host in ("127.0.0.1", "::1"):
            for kind, garbage in GARBAGE.items():
                with socket.create_connection((host, world.port), timeout=5) as g:
                    name = sock_name(g)
                    try:
                        g.sendall(garbage)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the server closed before reading it all: fine
                    echo_once(live, 10_000)  # during
                    until_closed(g, 5)
                server.wait_log(f"connection from {name} (no certificate) closed before its hello: TLS handshake failed", 5)
                echo_once(live)  # after
        round_trip(port)
        after = session(world, "agent-1")
        assert (after["address"], after["connected_since"]) == (before["address"], before["connected_since"])
        assert server.alive()


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00"], ids=["silent", "half-client-hello"])
def test_handshake_timeout_closes_a_silent_tcp_client(world, sent):
    server = world.start_server("--handshake-timeout", "1")
    with socket.create_connection(("127.0.0.1", world.port), timeout=5) as s:
        name = sock_name(s)
        s.sendall(sent)
        start = time.monotonic()
        data, _how = until_closed(s, 5)
        elapsed = time.monotonic() - start
    assert 0.5 <= elapsed <= 3.0, f"closed after {elapsed:.2f} s"
    assert data == b""
    server.wait_log(f"connection from {name} (no certificate) closed before its hello: TLS handshake timed out", 5)


@pytest.mark.parametrize("sent", [b"", encode("hello", proto=PROTO_VERSION, agent_id="agent-1", version="x")[:10]],
                         ids=["nothing", "half-a-hello"])
def test_hello_timeout_closes_a_tls_client_that_never_says_hello(world, creds, peers, sent):
    server = world.start_server("--handshake-timeout", "1")
    p = peers(world.port, client_ctx(creds.ca, creds.agent("agent-1")))
    start = time.monotonic()
    if sent:
        p.send_raw(sent)
    msgs, _how = p.messages_until_closed(5)
    elapsed = time.monotonic() - start
    assert msgs == []
    assert 0.5 <= elapsed <= 3.0, f"closed after {elapsed:.2f} s"
    server.wait_log(f"connection from {p.peer} sent no hello within 1 s", 5)
    assert agent_ids(world) == []


def frame_of(obj) -> bytes:
    """A frame around any JSON value, bypassing the encoder's own checks."""
    body = json.dumps(obj).encode()
    return struct.pack("!I", len(body)) + body


# -- malformed frames ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("when", ["first-frame", "after-welcome"])
def test_oversized_frame_closes_the_connection(world, creds, peers, echo_target, when):
    server = world.start_server()
    world.start_agent("agent-1")
    port = world.add_proxy(echo_target.port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as live:
        echo_once(live)
        p = peers(world.port, client_ctx(creds.ca, creds.agent("agent-2")))
        if when == "after-welcome":
            p.send("hello", proto=PROTO_VERSION, agent_id="agent-2", version="x")
            assert p.recv()["type"] == "welcome"
            assert "agent-2" in agent_ids(world)
        try:
            p.send_raw(struct.pack("!I", TEN_MB) + b'{"type":"hello",' + b" " * 60_000)
        except (ssl.SSLError, OSError):
            pass
        msgs, _how = p.messages_until_closed(5)
        assert msgs == []
        server.wait_log(f"protocol error from {p.peer}: frame of {TEN_MB} bytes exceeds the maximum", 5)
        wait_for(lambda: agent_ids(world) == ["agent-1"], 5, what="only agent-1 to be listed")
        echo_once(live)
    round_trip(port)


@pytest.mark.parametrize("frame, logged", [
    (struct.pack("!I", 9) + b"not json!", "frame is not valid UTF-8 JSON"),
    (struct.pack("!I", 4) + b"\xff\xfe\xfd\xfc", "frame is not valid UTF-8 JSON"),
    (struct.pack("!I", 2) + b"[]", "frame is not a JSON object"),
    (struct.pack("!I", 17) + b'{"type":"launch"}', "unknown message type 'launch'"),
    (frame_of({"type": "hello", "proto": True, "agent_id": "agent-1", "version": "x"}), "hello: field 'proto' missing or not int"),
    (frame_of({"type": "hello", "proto": PROTO_VERSION, "version": "x"}), "hello: field 'agent_id' missing or not str"),
    (frame_of({"type": "data", "proto": PROTO_VERSION, "agent_id": "agent-1", "conn": -1}), "data: field 'conn' out of range"),
], ids=["not-json", "not-utf8", "array", "unknown-type", "bool-proto", "no-agent-id", "negative-conn"])
def test_malformed_first_frame_closes_the_connection(world, creds, peers, frame, logged):
    server = world.start_server()
    p = peers(world.port, client_ctx(creds.ca, creds.agent("agent-1")))
    p.send_raw(frame)
    msgs, _how = p.messages_until_closed(5)
    assert msgs == []
    server.wait_log(f"protocol error from {p.peer}: {logged}", 5)
    assert agent_ids(world) == []


@pytest.mark.parametrize("first, says", [
    (encode("hello", proto=PROTO_VERSION + 98, agent_id="agent-1", version="x"), f"this server speaks {PROTO_VERSION}"),
    (encode("ping", seq=1), "expected hello or data, got ping"),
    (encode("ready", conn=1), "expected hello or data, got ready"),
], ids=["other-proto", "ping", "ready"])
def test_wrong_first_message_gets_an_error_and_a_close(world, creds, peers, first, says):
    world.start_server()
    p = peers(world.port, client_ctx(creds.ca, creds.agent("agent-1")))
    p.send_raw(first)
    msgs, _how = p.messages_until_closed(5)
    assert [m["type"] for m in msgs] == ["error"], msgs
    assert says in msgs[0]["reason"], msgs
    assert agent_ids(world) == []


# -- the admin socket ------------------------------------------------------------------------------------------------
class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        super().__init__("anywhered", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def http(world, method: str, path: str, body: bytes | str | None = None) -> tuple[int, object]:
    """One request on its own connection; the status and the decoded JSON body (every answer is JSON)."""
    conn = UnixHTTPConnection(world.sock)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        assert resp.getheader("Content-Type") == "application/json", resp.getheaders()
        return resp.status, json.loads(data)
    finally:
        conn.close()


def admin_raw(world, data: bytes, shut: bool = False, timeout: float = 5.0) -> bytes:
    """Send raw bytes on a new admin connection; everything the server sends until it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(world.sock)
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        got, _how = until_closed(s, timeout)
        return got


def parse_response(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def assert_status_works(world) -> None:
    assert world.api("GET", "/v1/status")["server_id"] == "anywhered"


@pytest.mark.parametrize("garbage, shut", [
    (random.Random(7).randbytes(2000) + b"\r\n\r\n", False),
    (random.Random(8).randbytes(2000), True),
    (b"\x00" * 40_000, False),
    (b"GET /v1/status HTTP/9.9 extra\r\n\r\n", False),
    (b"BREW /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", False),
], ids=["random-then-blank-line", "random-then-eof", "40k-zeros-no-newline", "bad-request-line", "negative-length"])
def test_garbage_on_the_admin_socket(world, garbage, shut):
    world.start_server()
    raw = admin_raw(world, garbage, shut=shut)
    if raw:  # a close without an answer is also acceptable
        status, body = parse_response(raw)
        assert 400 <= status < 500 and "error" in body, raw
    assert_status_works(world)


def test_admin_request_with_10_mb_content_length_gets_413(world):
    world.start_server()
    raw = admin_raw(world, b"POST /v1/proxies HTTP/1.1\r\nHost: anywhered\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n{\"agent_id\": " % TEN_MB)
    status, body = parse_response(raw)
    assert status == 413, raw
    assert str(TEN_MB) in body["error"]
    assert_status_works(world)


def test_admin_chunked_body_over_the_limit_gets_413(world):
    world.start_server()
    chunk = b"%x\r\n%s\r\n" % (16384, b" " * 16384)
    raw = admin_raw(world, b"POST /v1/proxies HTTP/1.1\r\nHost: anywhered\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 8)
    status, body = parse_response(raw)
    assert status == 413, raw
    assert "exceeds" in body["error"]
    assert http(world, "GET", "/v1/proxies") == (200, {"proxies": []})


@pytest.mark.slow
def test_silent_admin_client_is_dropped_after_the_request_timeout(world):
    world.start_server()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(world.sock)
        start = time.monotonic()
        data, _how = until_closed(s, 15)
        elapsed = time.monotonic() - start
    assert data == b""
    assert 8.0 <= elapsed <= 12.5, f"closed after {elapsed:.1f} s"
    assert_status_works(world)


def test_admin_unknown_path_and_wrong_method(world):
    world.start_server()
    for path in ("/v1/nothing", "/", "/v2/status", "/v1/proxies/a/b"):
        status, body = http(world, "GET", path)
        assert status == 404 and isinstance(body, dict) and body.get("error"), (path, status, body)
    for method, path in (("PUT", "/v1/proxies"), ("DELETE", "/v1/status"), ("POST", "/v1/agents"), ("PATCH", "/v1/proxies")):
        status, body = http(world, method, path, body=b"{}" if method in ("PUT", "POST", "PATCH") else None)
        assert status == 405, (method, path, status, body)
        assert method in body["error"], body
    status, body = http(world, "DELETE", "/v1/proxies/nope")
    assert status == 404 and "nope" in body["error"]


def stored_ports(world) -> list[int]:
    file = Path(world.state_dir) / "proxies.json"
    if not file.exists():
        return []
    return [p["remote_port"] for p in json.loads(file.read_text())["proxies"]]


def listed_ports(world) -> list[int]:
    return [p["remote_port"] for p in world.api("GET", "/v1/proxies")["proxies"]]


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b'{"agent_id": "agent-1",'], ids=["broken", "empty", "not-utf8", "truncated"])
def test_admin_add_proxy_with_invalid_json_is_400(world, body):
    world.start_server()
    status, answer = http(world, "POST", "/v1/proxies", body=body)
    assert status == 400, answer
    assert answer["error"]
    assert listed_ports(world) == [] and stored_ports(world) == []


VALID = {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": 8080}


@pytest.mark.parametrize("change, field", [
    ({"agent_id": "bad id"}, "agent_id"),
    ({"agent_id": "agent-1\n", "name": "p1"}, "agent_id"),
    ({"agent_id": 5}, "agent_id"),
    ({"remote_port": 70000}, "remote_port"),
    ({"remote_port": 0}, "remote_port"),
    ({"remote_port": True}, "remote_port"),
    ({"local_port": "http"}, "local_port"),
    ({"local_ip": "no such host!"}, "local_ip"),
    ({"local_ip": "localhost\n"}, "local_ip"),
    ({"whitelist": ["not-an-ip"]}, "whitelist"),
    ({"whitelist": ["10.0.0.0/8", "300.1.1.1"]}, "whitelist"),
    ({"colour": "red"}, "colour"),
    ({"name": "has space"}, "name"),
    ({"name": "p1\n"}, "name"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_admin_add_proxy_with_bad_field_is_400_naming_it(world, change, field):
    world.start_server()
    remote = free_port()
    body = {**VALID, "remote_port": remote, **change}
    status, answer = http(world, "POST", "/v1/proxies", body=json.dumps(body))
    assert status == 400, (body, answer)
    assert field in answer["error"], answer
    assert listed_ports(world) == [] and stored_ports(world) == []
    # and nothing listens on the port
    with socket.create_server(("127.0.0.1", remote)):
        pass


def test_admin_add_proxy_port_conflicts_are_409_and_nothing_is_saved(world):
    world.start_server()
    first = free_port()
    status, _ = http(world, "POST", "/v1/proxies", body=json.dumps({**VALID, "remote_port": first}))
    assert status == 201
    assert listed_ports(world) == [first] and stored_ports(world) == [first]

    # the agent port
    status, answer = http(world, "POST", "/v1/proxies", body=json.dumps({**VALID, "remote_port": world.port}))
    assert status == 409 and "agent port" in answer["error"], answer
    # another proxy's port, another agent (so the default name differs)
    status, answer = http(world, "POST", "/v1/proxies", body=json.dumps({**VALID, "agent_id": "agent-2", "remote_port": first}))
    assert status == 409 and "agent-1:" in answer["error"], answer
    # the same proxy again
    status, answer = http(world, "POST", "/v1/proxies", body=json.dumps({**VALID, "remote_port": first}))
    assert status == 409 and "already exists" in answer["error"], answer
    # a port some other process holds
    taken = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        taken.bind(("::", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        status, answer = http(world, "POST", "/v1/proxies", body=json.dumps({**VALID, "remote_port": busy}))
        assert status == 409, answer
        assert os.strerror(errno.EADDRINUSE) in answer["error"] and str(busy) in answer["error"], answer
    finally:
        taken.close()
    assert listed_ports(world) == [first] and stored_ports(world) == [first]
    # once the port is free again the same request succeeds: nothing was left half-open
    status, answer = http(world, "POST", "/v1/proxies", body=json.dumps({**VALID, "remote_port": busy}))
    assert status == 201, answer
    assert sorted(stored_ports(world)) == sorted([first, busy])
