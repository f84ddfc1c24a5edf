"""Faults injected into a running tunnel: killed processes, a target that dies mid-stream, a cut
admin connection, slow peers (slowloris) and clients that stop reading.

Each test checks both halves of the promise: connections that should survive lose nothing (every
byte checked, clean EOF at the end), and those that cannot survive are closed promptly instead of
hanging.  Real anywhered / anywhere processes and real sockets, on loopback, or in network
namespaces this module creates (test_admin_connection_cut_...).  Every wait is bounded; every
process is ended by pid in teardown.

"Promptly" is PROMPT seconds: the kernel reports a dead peer at once, so the daemons need only
their own reaction time; the margin is for a loaded two-core machine.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import sys
import threading
import time

import pytest

from anywhere.wire import PROTO_VERSION, encode
from conftest import Proc, TargetServer, echo_handler, log_lines, wait_for, wait_log_line
from handpeer import client_ctx
import nshost
from nshost import AGENT_PORT, TGT_PORT, connect_in, run
from procstat import rss_kb
from streams import EchoStream, one_shot

V4 = "127.0.0.1"
PROMPT = 3.0  # seconds within which a connection that cannot survive must be closed
KB, MB = 1024, 1024 * 1024


# -- helpers ----------------------------------------------------------------------------------------


def agent_ids(world) -> list[str]:
    return sorted(a["agent_id"] for a in world.api("GET", "/v1/agents")["agents"])


def start_agent(world, agent_id: str) -> Proc:
    """An agent listed by the server that has also logged its session."""
    proc = world.start_agent(agent_id)
    proc.wait_log("connected to server")
    return proc


def streams_through(port: int, n: int, name: str, **kw) -> list[EchoStream]:
    return [EchoStream(socket.create_connection((V4, port), timeout=10), f"{name}-{i}", **kw).start()
            for i in range(n)]


def finish_all(streams: list[EchoStream]) -> None:
    for s in streams:
        s.finish()


def assert_survived(streams: list[EchoStream]) -> None:
    for s in streams:
        assert s.corrupt is None, s.corrupt
        assert s.ended is None, f"{s.name} ended: {s.ended}"
        assert s.clean_close, f"{s.name} was not closed cleanly"


def assert_no_traceback(*procs: Proc) -> None:
    for proc in procs:
        text = proc.log()
        assert "Traceback" not in text, f"{proc.log_path.name}:\n{text[-5000:]}"


def assert_ok(result: dict) -> None:
    assert result["ok"], result


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str, float]:
    """Read until EOF or reset; returns (bytes, how, monotonic time of the close).  Bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    got = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"still open after {timeout} s ({len(got)} bytes read)")
        sock.settimeout(left)
        try:
            data = sock.recv(256 * KB)
        except (socket.timeout, TimeoutError):
            continue
        except ConnectionResetError:
            return bytes(got), "reset", time.monotonic()
        if not data:
            return bytes(got), "eof", time.monotonic()
        got += data


def counting_echo():
    """An echo target that counts the connections it has open."""
    counts = {"open": 0, "closed": 0}
    lock = threading.Lock()

    def handler(conn: socket.socket) -> None:
        with lock:
            counts["open"] += 1
        try:
            echo_handler(conn)
        finally:
            with lock:
                counts["closed"] += 1
    return TargetServer(handler), counts


# -- agent SIGKILL mid-transfer ---------------------------------------------------------------------
def test_agent_sigkill_mid_transfer(world, echo_target):
    """Kill agent-1 while six connections move data: its three clients are closed within PROMPT,
    the server logs the loss and forgets its connections, agent-2's three keep moving every byte;
    a restarted agent-1 serves again."""
    server = world.start_server()
    a1 = start_agent(world, "agent-1")
    a2 = start_agent(world, "agent-2")
    p1 = world.add_proxy(echo_target.port, agent_id="agent-1")
    p2 = world.add_proxy(echo_target.port, agent_id="agent-2")
    doomed = streams_through(p1, 3, "via-agent-1")
    spared = streams_through(p2, 3, "via-agent-2")
    try:
        for s in doomed + spared:
            s.wait_progress(256 * KB, 15)
        assert len(world.api("GET", "/v1/connections")["connections"]) == 6
        mark = len(server.log())
        a1.kill()
        killed_at = time.monotonic()

        for s in doomed:
            wait_for(lambda s=s: s.ended, PROMPT + 1, what=f"{s.name} to be closed after its agent died")
            assert s.ended_at - killed_at < PROMPT, f"{s.name} closed {s.ended_at - killed_at:.2f} s after the kill"
            assert s.corrupt is None, s.corrupt
        wait_for(lambda: agent_ids(world) == ["agent-2"], PROMPT, what="the server to drop agent-1's session")
        line = wait_log_line(server, "agent agent-1", "disconnected", start=mark, timeout=PROMPT)
        assert "connection closed by peer" in line or "failed" in line, line
        conns = world.api("GET", "/v1/connections")["connections"]
        assert sorted(c["agent_id"] for c in conns) == ["agent-2"] * 3, conns

        # agent-2's connections never noticed
        for s in spared:
            s.wait_progress(512 * KB, 15)
        # a new client for the dead agent is closed at once, without data
        with socket.create_connection((V4, p1), timeout=5) as c:
            data, _how, _ = read_until_closed(c, PROMPT)
            assert data == b""
        wait_log_line(server, "agent agent-1 offline", start=mark)

        # agent-1 comes back and serves again
        start_agent(world, "agent-1")
        assert_ok(one_shot(V4, p1, 300 * KB))
        assert_ok(one_shot(V4, p2, 300 * KB))
    finally:
        finish_all(spared + doomed)
    assert_survived(spared)
    checked = sum(s.bytes_checked for s in spared + doomed)
    print(f"\nagent SIGKILL: 1 fault, 3 connections closed as expected, 3 survived, {checked} bytes checked")
    assert_no_traceback(server, a2)


# -- server SIGKILL and restart -----------------------------------------------------------------------
AGENT_BACK_BOUND = 15.0  # seconds from the restart: after one failure the agent's backoff is at most 2 s


def test_server_sigkill_and_restart(world):
    """SIGKILL anywhered while data flows: every client and every target connection is closed
    within PROMPT; restarted on the same port and state directory it restores the proxies (a
    disabled one stays disabled), replaces the stale admin socket, both agents are back within
    AGENT_BACK_BOUND seconds of the restart, and new tunneled connections work."""
    target, counts = counting_echo()
    try:
        first = world.start_server()
        a1 = start_agent(world, "agent-1")
        a2 = start_agent(world, "agent-2")
        p1 = world.add_proxy(target.port, agent_id="agent-1")
        p2 = world.add_proxy(target.port, agent_id="agent-2")
        p3 = world.add_proxy(target.port, agent_id="agent-1")
        world.api("POST", f"/v1/proxies/agent-1:{p3}/disable")
        before = world.api("GET", "/v1/proxies")["proxies"]
        streams = streams_through(p1, 2, "via-agent-1") + streams_through(p2, 2, "via-agent-2")
        for s in streams:
            s.wait_progress(256 * KB, 15)
        marks = {a: len(a.log()) for a in (a1, a2)}

        first.kill()
        killed_at = time.monotonic()
        for s in streams:
            wait_for(lambda s=s: s.ended, PROMPT + 1, what=f"{s.name} to be closed after the server died")
            assert s.ended_at - killed_at < PROMPT
            assert s.corrupt is None, s.corrupt
        # the agents closed their side too: no target connection is left open
        wait_for(lambda: counts["open"] == counts["closed"], PROMPT,
                 what=f"the agents to close every target connection: {counts}")
        for agent in (a1, a2):
            wait_log_line(agent, "lost the server", start=marks[agent], timeout=PROMPT)
        assert os.path.exists(world.sock), "SIGKILL leaves the admin socket file behind"

        restarted_at = time.monotonic()
        second = world.start_server()  # same port, admin socket and state directory
        after = world.api("GET", "/v1/proxies")["proxies"]
        keys = ("name", "agent_id", "local_ip", "local_port", "remote_port", "enabled")
        assert [{k: p[k] for k in keys} for p in after] == [{k: p[k] for k in keys} for p in before]
        wait_for(lambda: agent_ids(world) == ["agent-1", "agent-2"], AGENT_BACK_BOUND,
                 what=f"both agents to reconnect:\n{a1.log()[-2000:]}\n{a2.log()[-2000:]}")
        back_after = time.monotonic() - restarted_at
        for agent in (a1, a2):
            wait_log_line(agent, "connected to server", start=marks[agent], timeout=5)
        assert_ok(one_shot(V4, p1, 500 * KB))
        assert_ok(one_shot(V4, p2, 500 * KB))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((V4, p3), timeout=5).close()  # still disabled
        print(f"\nserver SIGKILL: 1 fault, 4 connections closed as expected, agents back {back_after:.1f} s "
              f"after the restart, {sum(s.bytes_checked for s in streams)} bytes checked")
        assert_no_traceback(second, a1, a2)
    finally:
        target.stop()


# -- the target going down mid-stream -------------------------------------------------------------------
POUR_SCRIPT = r"""
import hashlib, socket, sys, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(8)
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept()
got = b""
while len(got) < 4:
    got += c.recv(4 - len(got))
deadline = time.monotonic() + 120
for i in range(100000):  # until killed (bounded anyway)
    if time.monotonic() > deadline:
        break
    c.sendall(hashlib.sha256(i.to_bytes(8, "big")).digest() * 2048)
"""


def pour_block(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * 2048  # 64 KiB, as POUR_SCRIPT sends


def is_pour_prefix(data: bytes) -> bool:
    for i in range(0, len(data), 64 * KB):
        piece = data[i:i + 64 * KB]
        if piece != pour_block(i // (64 * KB))[:len(piece)]:
            return False
    return True


class FaultyTarget:
    """A target that, asked with b"GO\\r\\n", sends `payload` and then closes cleanly or resets."""

    def __init__(self, how: str, payload: bytes) -> None:
        self.how = how
        self.payload = payload
        self.ended_at: list[float] = []
        self.server = TargetServer(self._handle)
        self.port = self.server.port

    def _handle(self, conn: socket.socket) -> None:
        got = b""
        while len(got) < 4:
            data = conn.recv(4 - len(got))
            if not data:
                return
            got += data
        conn.sendall(self.payload)
        if self.how == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.ended_at.append(time.monotonic())
        conn.close()

    def stop(self) -> None:
        self.server.stop()


@pytest.mark.parametrize("how", ["close", "reset", "killed"])
def test_target_down_mid_stream(world, echo_target, how):
    """The target ends a connection while sending: closed cleanly, the client gets every byte then
    EOF; reset or killed, the client gets an uncorrupted part of the stream and is closed within
    PROMPT.  A long-lived connection through the same agent and new clients are unaffected."""
    server = world.start_server()
    agent = start_agent(world, "agent-1")
    echo_port = world.add_proxy(echo_target.port)
    bystander = streams_through(echo_port, 1, "bystander")
    payload = os.urandom(4 * MB)
    faulty: FaultyTarget | None = None
    pourer: Proc | None = None
    clients = 0
    try:
        bystander[0].wait_progress(128 * KB, 15)
        if how == "killed":
            pourer = Proc([sys.executable, "-u", "-c", POUR_SCRIPT], world.tmp / "pourer.log")
            wait_for(lambda: pourer.log().strip().isdigit() or not pourer.alive(), 10, what="the pourer's port")
            target_port = int(pourer.log().strip())
        else:
            faulty = FaultyTarget(how, payload)
            target_port = faulty.port
        port = world.add_proxy(target_port)

        for _ in range(1 if how == "killed" else 3):
            clients += 1
            with socket.create_connection((V4, port), timeout=10) as c:
                c.sendall(b"GO\r\n")
                if how == "killed":
                    got = bytearray()
                    c.settimeout(10)
                    while len(got) < 2 * MB:  # the target is mid-stream
                        data = c.recv(256 * KB)
                        assert data, f"EOF after {len(got)} bytes, before the kill"
                        got += data
                    pourer.kill()
                    ended_at = time.monotonic()
                    rest, _how, closed_at = read_until_closed(c, PROMPT + 2)
                    got += rest
                    assert is_pour_prefix(bytes(got)), "the bytes that arrived are not what the target sent"
                else:
                    got, closed_how, closed_at = read_until_closed(c, 20)
                    ended_at = faulty.ended_at[-1]
                    if how == "close":
                        assert closed_how == "eof"
                        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), \
                            f"{len(got)} of {len(payload)} bytes, or different bytes"
                    else:
                        assert payload.startswith(got), "the bytes that arrived are not what the target sent"
                assert closed_at - ended_at < PROMPT, f"the client was closed {closed_at - ended_at:.2f} s after the target"
            wait_for(lambda: [x for x in world.api("GET", "/v1/connections")["connections"]
                              if x["remote_port"] == port] == [], PROMPT, what="the connection to leave the list")
            bystander[0].wait_progress(64 * KB, 15)
            assert_ok(one_shot(V4, echo_port, 200 * KB))
        if how != "killed":  # the same tunnel serves the next client of the same target
            with socket.create_connection((V4, port), timeout=10) as c:
                c.sendall(b"GO\r\n")
                got, _, _ = read_until_closed(c, 20)
                assert payload.startswith(got) and (how == "reset" or got == payload)
    finally:
        finish_all(bystander)
        if faulty:
            faulty.stop()
        if pourer:
            pourer.stop()
    assert_survived(bystander)
    print(f"\ntarget {how} mid-stream: {clients} fault(s), bystander {bystander[0].bytes_checked} bytes checked")
    assert_no_traceback(server, agent)


# -- slowloris ------------------------------------------------------------------------------------------
def client_hello(world) -> bytes:
    """The bytes of a real TLS ClientHello to the agent port (made with a memory BIO, never sent whole)."""
    ctx = client_ctx(world.creds.ca, world.creds.agent("agent-1"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def dribble_until_closed(sock: socket.socket, data: bytes, interval: float = 1.0,
                         max_bytes: int = 15) -> tuple[int, float, bytes]:
    """Send `data` one byte per `interval` (at most `max_bytes`), until the peer closes.

    Returns (bytes sent, seconds until the close was seen, bytes received); AssertionError if
    the peer is still open after the last byte plus one interval.
    """
    start = time.monotonic()
    received = bytearray()
    sent = 0
    for i in range(min(max_bytes, len(data)) + 1):
        # wait out one interval, watching for the close
        deadline = start + i * interval
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(4096)
            except (socket.timeout, TimeoutError):
                break
            except ConnectionResetError:
                return sent, time.monotonic() - start, bytes(received)
            if not chunk:
                return sent, time.monotonic() - start, bytes(received)
            received += chunk
        if i < min(max_bytes, len(data)):
            try:
                sock.sendall(data[i:i + 1])
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                return sent, time.monotonic() - start, bytes(received)
    raise AssertionError(f"still open after {sent} bytes in {time.monotonic() - start:.1f} s")


@pytest.mark.parametrize("stage", ["tls-handshake", "hello-frame"])
def test_slowloris_on_the_agent_port(world, echo_target, peers, stage):
    """One byte per second into the agent port, during the TLS handshake or, after it, into the
    first frame: closed by the handshake timeout (2 s here), while a real agent keeps working."""
    server = world.start_server("--handshake-timeout", "2")
    agent = start_agent(world, "agent-1")
    port = world.add_proxy(echo_target.port)
    live = streams_through(port, 1, "live")
    try:
        if stage == "tls-handshake":
            sock = socket.create_connection((V4, world.port), timeout=5)
            data = client_hello(world)
        else:
            peer = peers(world.port, client_ctx(world.creds.ca, world.creds.agent("agent-2")))
            sock = peer.sock  # TLS is up: now the hello frame, one byte a second
            data = encode("hello", proto=PROTO_VERSION, agent_id="agent-2", version="0")
        with sock:
            sent, elapsed, _received = dribble_until_closed(sock, data)
        assert 1.5 <= elapsed <= 2 + PROMPT, f"closed after {elapsed:.1f} s with --handshake-timeout 2"
        assert sent < len(data)
        wait_log_line(server, "TLS handshake timed out" if stage == "tls-handshake" else "sent no hello within 2 s")
        live[0].wait_progress(64 * KB, 10)
        assert agent_ids(world) == ["agent-1"]
        assert_ok(one_shot(V4, port, 100 * KB))
    finally:
        finish_all(live)
    assert_survived(live)
    print(f"\nslowloris on the agent port ({stage}): closed after {elapsed:.1f} s and {sent} bytes")
    assert_no_traceback(server, agent)


def test_slowloris_on_a_public_port(world, echo_target):
    """50 clients dribble one byte a second into a proxy port for 10 s.  They are tunneled like any
    client (their bytes come back from the echo target); meanwhile a normal client's request through
    the same proxy works and the admin API answers."""
    server = world.start_server()
    agent = start_agent(world, "agent-1")
    port = world.add_proxy(echo_target.port)
    slow = [socket.create_connection((V4, port), timeout=10) for _ in range(50)]
    sent = [bytearray() for _ in slow]
    done = threading.Event()
    errors: list[str] = []

    def dribble() -> None:
        try:
            for _ in range(10):
                for i, s in enumerate(slow):
                    b = os.urandom(1)
                    s.sendall(b)
                    sent[i] += b
                if done.wait(1.0):
                    return
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    dribbler = threading.Thread(target=dribble, daemon=True)
    dribbler.start()
    normal = 0
    try:
        deadline = time.monotonic() + 9
        while time.monotonic() < deadline and dribbler.is_alive():
            assert_ok(one_shot(V4, port, 64 * KB, timeout=5))
            normal += 1
            status = world.api("GET", "/v1/status")
            assert status["connections"] >= 1
            time.sleep(0.5)
        dribbler.join(15)
        assert not dribbler.is_alive() and not errors, errors
        assert normal >= 5
        # the slow clients were served like any client: their bytes came back
        for s, mine in zip(slow, sent):
            s.shutdown(socket.SHUT_WR)
            got, how, _ = read_until_closed(s, 10)
            assert (got, how) == (bytes(mine), "eof")
    finally:
        done.set()
        for s in slow:
            s.close()
    wait_for(lambda: world.api("GET", "/v1/connections")["connections"] == [], 5, what="every connection to end")
    print(f"\nslowloris on a public port: 50 slow clients x 10 bytes echoed, {normal} normal requests served meanwhile")
    assert_no_traceback(server, agent)


@pytest.mark.slow
def test_slowloris_on_the_admin_socket(world, echo_target):
    """Ten clients dribble a request into the admin socket one byte a second: each is closed after
    the request timeout (10 s) without an answer, and other admin requests are answered meanwhile."""
    server = world.start_server()
    start_agent(world, "agent-1")
    port = world.add_proxy(echo_target.port)
    request = b"GET /v1/status HTTP/1.1\r\nHost: anywhered\r\n\r\n"
    results: list[tuple[int, float, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def slow_client() -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(world.sock)
                r = dribble_until_closed(s, request, max_bytes=15)
            with lock:
                results.append(r)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=slow_client, daemon=True) for _ in range(10)]
    for t in threads:
        t.start()
    answered = 0
    deadline = time.monotonic() + 16
    while time.monotonic() < deadline and any(t.is_alive() for t in threads):
        assert world.api("GET", "/v1/status")["proxies"] == 1
        answered += 1
        time.sleep(0.5)
    for t in threads:
        t.join(5)
    assert not errors, errors
    assert len(results) == 10
    for sent, elapsed, received in results:
        assert 9.0 <= elapsed <= 10 + PROMPT, f"closed after {elapsed:.1f} s; the request timeout is 10 s"
        assert received == b"" and sent < len(request)
    assert answered >= 15, f"only {answered} admin requests answered in the meantime"
    assert_ok(one_shot(V4, port, 64 * KB))
    wait_for(lambda: len(log_lines(server, "admin client", "timed out after 10 s")) == 10, 5,
             what="the ten timeouts in the log")
    print(f"\nslowloris on the admin socket: 10 slow clients closed after ~10 s, {answered} requests answered meanwhile")
    assert_no_traceback(server)


# -- clients that stop reading ----------------------------------------------------------------------------
def test_clients_that_stop_reading(world, echo_target):
    """20 clients stop reading while their targets push data: the flow stops (backpressure), the
    server's and the agent's memory stay within +40 MB, and other clients are served normally;
    closed, the 20 connections end promptly at the target too."""
    limit = 64 * MB
    state = {"sent": [0] * 20, "done": 0}
    slots = list(range(20))
    lock = threading.Lock()
    block = os.urandom(256 * KB)

    def pour(conn: socket.socket) -> None:
        with lock:
            slot = slots.pop(0)
        try:
            while state["sent"][slot] < limit:
                conn.sendall(block)
                state["sent"][slot] += len(block)
        finally:
            with lock:
                state["done"] += 1

    pourer = TargetServer(pour)
    server = world.start_server()
    agent = start_agent(world, "agent-1")
    port = world.add_proxy(pourer.port)
    echo_port = world.add_proxy(echo_target.port)
    live = streams_through(echo_port, 1, "live")
    stuck: list[socket.socket] = []
    try:
        live[0].wait_progress(128 * KB, 10)
        base = {"server": rss_kb(server.pid), "agent": rss_kb(agent.pid)}
        stuck = [socket.create_connection((V4, port), timeout=10) for _ in range(20)]
        for s in stuck:  # a small receive buffer, and never read
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KB)
        wait_for(lambda: all(state["sent"]), 15, what=f"every target to start pouring: {state['sent']}")
        # wait until the flow has stopped everywhere (every buffer on the way is full), at most 30 s
        last, still_since, deadline = -1, time.monotonic(), time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.2)
            total = sum(state["sent"])
            if total != last:
                last, still_since = total, time.monotonic()
            elif time.monotonic() - still_since > 2.0:
                break
        else:
            raise AssertionError(f"the targets never stopped: {sum(state['sent']) / MB:.0f} MB sent")
        grew = {"server": rss_kb(server.pid) - base["server"], "agent": rss_kb(agent.pid) - base["agent"]}
        assert grew["server"] < 40 * 1024, f"anywhered grew by {grew['server'] / 1024:.0f} MB"
        assert grew["agent"] < 40 * 1024, f"the agent grew by {grew['agent'] / 1024:.0f} MB"
        assert max(state["sent"]) < limit, "a target could send everything to a client that does not read"
        # everybody else is served normally
        for _ in range(5):
            assert_ok(one_shot(V4, echo_port, 256 * KB))
        live[0].wait_progress(256 * KB, 15)
        assert world.api("GET", "/v1/status")["connections"] == 21
        stuck_mb = sum(state["sent"]) / MB
        for s in stuck:
            s.close()
        closed_at = time.monotonic()
        wait_for(lambda: state["done"] == 20, PROMPT, what=f"the 20 target connections to end ({state['done']} did)")
        assert time.monotonic() - closed_at < PROMPT
        wait_for(lambda: world.api("GET", "/v1/status")["connections"] == 1, PROMPT, what="only the live one to remain")
    finally:
        for s in stuck:
            s.close()
        finish_all(live)
        pourer.stop()
    assert_survived(live)
    print(f"\nclients that stop reading: 20 stuck with {stuck_mb:.0f} MB in flight, RSS growth server "
          f"{grew['server'] / 1024:.1f} MB, agent {grew['agent'] / 1024:.1f} MB")
    assert_no_traceback(server, agent)


# -- the admin connection cut while a data connection flows (network namespaces) ----------------------------
TAG = f"awf{os.getpid()}"  # namespace and interface names carry our pid; veth names stay within 15 chars


@pytest.fixture
def two_hosts(tmp_path):
    """Server host and agent host, one veth pair between them; the target listens inside the agent's host."""
    with nshost.two_hosts(tmp_path, TAG, "10.232.7", heartbeat=0.5, need_nft=True) as hosts:
        yield {"server": hosts.server, "agent": hosts.agent, "api": hosts.api, "hosts": hosts}


@pytest.mark.netns
def test_admin_connection_cut_while_a_data_connection_flows(two_hosts):
    """Drop every packet of the agent's admin connection (and any new connection to the agent port)
    on the agent's host with nftables, while a tunneled connection opened before moves checksummed
    bytes both ways: the data connection keeps flowing, the server declares the session dead by
    heartbeat (0.5 s interval, three missed), and once the rule is gone the agent reconnects; at
    the end not a byte of the data connection was lost.

    Why nftables on one 4-tuple rather than `ss -K` or a link down: `ss -K` aborts the socket
    with a RST, which the server sees at once (no heartbeat needed), and a link down also stalls
    the data connection; a silent drop of the admin connection alone is exactly "the admin
    connection is cut while the data connections keep flowing"."""
    server, agent, api = two_hosts["server"], two_hosts["agent"], two_hosts["api"]
    hosts = two_hosts["hosts"]
    NS_SRV, NS_AGT, SRV_IP, AGT_IP = hosts.ns_srv, hosts.ns_agt, hosts.srv_ip, hosts.agt_ip  # noqa: N806

    def session() -> dict | None:
        return next((a for a in api("GET", "/v1/agents")["agents"] if a["agent_id"] == "agent-1"), None)

    wait_for(session, 15, what=f"the agent to connect:\n{agent.log()}")
    agent.wait_log("connected to server")
    api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": TGT_PORT,
                                "remote_port": 8080})
    stream = EchoStream(connect_in(NS_SRV)("127.0.0.1", 8080, 10), "data", block=8192, pace=0.01).start()
    try:
        stream.wait_progress(128 * KB, 15)
        conn_ids = [c["id"] for c in api("GET", "/v1/connections")["connections"]]
        assert len(conn_ids) == 1
        address = session()["address"]
        admin_port = int(address.rsplit(":", 1)[1])
        assert address == f"{AGT_IP}:{admin_port}"
        marks = {p: len(p.log()) for p in (server, agent)}
        rules = f"""
table inet awcut {{
  chain out {{
    type filter hook output priority 0; policy accept;
    ip daddr {SRV_IP} tcp dport {AGENT_PORT} tcp sport {admin_port} drop
    ip daddr {SRV_IP} tcp dport {AGENT_PORT} tcp flags & (syn | ack) == syn drop
  }}
  chain in {{
    type filter hook input priority 0; policy accept;
    ip saddr {SRV_IP} tcp sport {AGENT_PORT} tcp dport {admin_port} drop
  }}
}}
"""
        run("ip", "netns", "exec", NS_AGT, "nft", "-f", "-", stdin=rules)
        cut_at = time.monotonic()
        moved_before = stream.progress()
        line = wait_log_line(server, "agent agent-1", "no heartbeat", start=marks[server], timeout=6)
        detected = time.monotonic() - cut_at
        assert f"({address})" in line, line
        assert session() is None
        wait_log_line(agent, "no heartbeat from the server", start=marks[agent], timeout=6)
        # the data connection carries on without its admin connection, both ways, checked
        stream.wait_progress(256 * KB, 15)
        assert session() is None, "the agent came back although the agent port is cut off"
        assert [c["id"] for c in api("GET", "/v1/connections")["connections"]] == conn_ids
        moved_during = stream.progress() - moved_before

        run("ip", "netns", "exec", NS_AGT, "nft", "delete", "table", "inet", "awcut")
        restored_at = time.monotonic()
        wait_for(session, 15, what=f"the agent to reconnect after the cut:\n{agent.log()[marks[agent]:][-3000:]}")
        back_after = time.monotonic() - restored_at
        new_address = session()["address"]
        assert new_address != address
        stream.wait_progress(128 * KB, 15)
        assert one_shot("127.0.0.1", 8080, 256 * KB, connect=connect_in(NS_SRV))["ok"]
    finally:
        stream.finish()
    assert stream.corrupt is None and stream.ended is None and stream.clean_close, (stream.ended, stream.corrupt)
    print(f"\nadmin connection cut: 1 fault, detected after {detected:.1f} s, {moved_during} bytes moved "
          f"during the cut, agent back {back_after:.1f} s after the restore, {stream.bytes_checked} bytes checked")
    assert_no_traceback(server, agent)
