"""Failure modes on loopback: whitelists, offline agents, unreachable targets, timeouts, restarts,
dead peers, replaced sessions and deleted proxies.  Real anywhered and anywhere processes, real
sockets; every wait is bounded and every stopped process is continued before it is ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import threading
import time

import pytest

from anywhere import tls
from anywhere.wire import PROTO_VERSION, FrameDecoder, encode
from conftest import Proc, TargetServer, echo_handler, free_port, log_lines, recv_all, wait_for, wait_log_line

V4 = "127.0.0.1"
V6 = "::1"


# -- helpers ----------------------------------------------------------------------------------------
def connect(host: str, port: int, source: str | None = None, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout,
                                    source_address=(source, 0) if source else None)


def assert_echo(port: int, host: str = V4, source: str | None = None, size: int = 4096) -> None:
    """One connection through the tunnel: `size` random bytes there and back, then EOF both ways."""
    payload = os.urandom(size)
    with connect(host, port, source) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = recv_all(c, 10)
    assert got == payload, f"{len(got)} of {len(payload)} bytes came back from {host}"


def echo_once(c: socket.socket, size: int = 1000, timeout: float = 10.0) -> None:
    """On a connection that stays open: send `size` bytes and read exactly them back."""
    payload = os.urandom(size)
    c.sendall(payload)
    c.settimeout(timeout)
    got = b""
    while len(got) < len(payload):
        chunk = c.recv(65536)
        if not chunk:
            raise AssertionError(f"EOF after {len(got)} of {len(payload)} echoed bytes")
        got += chunk
    assert got == payload


def wait_closed(c: socket.socket, timeout: float) -> float:
    """Seconds until the peer closes `c` (EOF or reset); fails if it stays open or sends data."""
    start = time.monotonic()
    c.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise AssertionError(f"connection still open after {timeout} s") from None
    assert data == b"", f"expected a close without data, got {data[:100]!r}"
    return time.monotonic() - start


def assert_refused(host: str, port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5).close()




def agents(world) -> list[dict]:
    return world.api("GET", "/v1/agents")["agents"]


def agent_online(world, agent_id: str = "agent-1") -> bool:
    return any(a["agent_id"] == agent_id for a in agents(world))


def start_agent(world, agent_id: str = "agent-1") -> Proc:
    """An agent that is listed by the server and has logged its session (the server lists it a
    moment before the agent reads its welcome), so later log offsets see only what follows."""
    proc = world.start_agent(agent_id)
    proc.wait_log("connected to server")
    return proc


@contextlib.contextmanager
def sigstopped(proc: Proc):
    """SIGSTOP `proc` for the block; SIGCONT it afterwards, also when the block fails."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if proc.alive():
            os.kill(proc.pid, signal.SIGCONT)


# -- whitelist ---------------------------------------------------------------------------------------
def test_whitelist_v4_address_allows_v4_and_refuses_v6(world, echo_target):
    server = world.start_server(wl="127.0.0.1")
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    assert_echo(port, V4)
    with connect(V6, port) as c:
        assert wait_closed(c, 2) < 1.0
    line = wait_log_line(server, "refused", "whitelist", "[::1]")
    assert "global" in line
    # a single address is not a network: another loopback address is refused too
    with connect(V4, port, source="127.0.0.2") as c:
        wait_closed(c, 2)
    wait_log_line(server, "refused", "whitelist", "127.0.0.2")
    assert not log_lines(server, "refused", "127.0.0.1:")


def test_whitelist_v6_address_allows_v6_and_refuses_v4(world, echo_target):
    server = world.start_server(wl="::1")
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    assert_echo(port, V6)
    with connect(V4, port) as c:
        assert wait_closed(c, 2) < 1.0
    wait_log_line(server, "refused", "whitelist", "127.0.0.1")
    assert not log_lines(server, "refused", "[::1]")


def test_whitelist_cidr(world, echo_target):
    server = world.start_server(wl="127.0.0.0/8")
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    assert_echo(port, V4)
    assert_echo(port, V4, source="127.0.0.2")  # anywhere in the network
    assert_echo(port, V4, source="127.9.8.7")
    with connect(V6, port) as c:
        wait_closed(c, 2)
    wait_log_line(server, "refused", "whitelist", "[::1]")
    assert not log_lines(server, "refused", "127.")


def test_proxy_whitelist_overrides_global(world, echo_target):
    server = world.start_server(wl="127.0.0.1")
    world.start_agent()
    own = world.add_proxy(echo_target.port, whitelist=["::1"])
    plain = world.add_proxy(echo_target.port)
    listed = {p["remote_port"]: p for p in world.api("GET", "/v1/proxies")["proxies"]}
    assert listed[own]["whitelist"] == ["::1/128"]
    assert listed[plain]["whitelist"] == []
    # the proxy's own list decides: ::1 in, 127.0.0.1 (globally allowed) out
    assert_echo(own, V6)
    with connect(V4, own) as c:
        wait_closed(c, 2)
    line = wait_log_line(server, "refused", f"{own}", "127.0.0.1")
    assert "proxy's whitelist" in line
    # the other proxy still follows the global list
    assert_echo(plain, V4)
    with connect(V6, plain) as c:
        wait_closed(c, 2)
    line = wait_log_line(server, "refused", f"{plain}", "[::1]")
    assert "global whitelist" in line


def test_no_whitelist_is_open_and_warned(world, echo_target):
    server = world.start_server()
    line = wait_log_line(server, "WARNING", "no global whitelist")
    assert "any address" in line
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    assert_echo(port, V4)
    assert_echo(port, V6)
    assert_echo(port, V4, source="127.0.0.2")
    assert not log_lines(server, "refused")


def test_global_whitelist_gives_no_open_warning(world):
    server = world.start_server(wl="127.0.0.1,::1")
    time.sleep(0.3)  # the warning would come right after the listening line
    assert not log_lines(server, "no global whitelist")


# -- agent offline, target refused, data timeout ---------------------------------------------------
def test_agent_offline_client_closed_promptly(world, echo_target):
    server = world.start_server()
    world.start_agent("agent-1")
    port = world.add_proxy(echo_target.port, agent_id="agent-2")
    proxy = world.api("GET", "/v1/proxies")["proxies"][0]
    assert proxy["agent_online"] is False
    with connect(V4, port) as c:  # the listener exists although its agent does not
        assert wait_closed(c, 3) < 1.0
    wait_log_line(server, "agent agent-2 offline")
    assert world.api("GET", "/v1/status")["pending"] == 0
    # once the agent comes, the same proxy works
    world.start_agent("agent-2")
    assert_echo(port)


def test_target_refused_client_closed_promptly(world):
    server = world.start_server()
    agent = start_agent(world)
    dead = free_port(socket.AF_INET)  # nothing listens there
    port = world.add_proxy(dead)
    with connect(V4, port) as c:
        elapsed = wait_closed(c, 5)
    assert elapsed < 1.0, f"closed after {elapsed:.2f} s; the agent's fail should beat the 10 s data timeout"
    line = wait_log_line(agent, "cannot reach", f"127.0.0.1:{dead}")
    assert "Connection refused" in line
    line = wait_log_line(server, "could not reach", f"127.0.0.1:{dead}")
    assert "Connection refused" in line
    assert world.api("GET", "/v1/status")["pending"] == 0


def test_data_connection_timeout(world):
    counts = {"open": 0, "closed": 0}
    lock = threading.Lock()

    def counting_echo(conn: socket.socket) -> None:
        with lock:
            counts["open"] += 1
        try:
            echo_handler(conn)
        finally:
            with lock:
                counts["closed"] += 1

    target = TargetServer(counting_echo)
    try:
        server = world.start_server("--data-timeout", "1")
        agent = start_agent(world)
        port = world.add_proxy(target.port)
        assert_echo(port)  # the agent is fully up
        with sigstopped(agent):
            with connect(V4, port) as c:
                elapsed = wait_closed(c, 6)
            assert 0.8 <= elapsed <= 3.0, f"closed after {elapsed:.2f} s with --data-timeout 1"
            wait_log_line(server, "no data connection from agent agent-1 within 1 s")
            assert world.api("GET", "/v1/status")["pending"] == 0
        # continued, the agent meets the stale request: whatever it does with it, nothing is left
        # open on either side (a target connection dialled for it is closed again) ...
        time.sleep(1.0)
        wait_for(lambda: counts["open"] == counts["closed"], 5,
                 what=f"every target connection to be closed again: {counts}")
        assert world.api("GET", "/v1/connections")["connections"] == []
        # ... and the tunnel works as before
        assert_echo(port)
        wait_for(lambda: counts["open"] == counts["closed"], 5, what=f"the last target connection to close: {counts}")
        for proc in (server, agent):
            assert "Traceback" not in proc.log(), proc.log()
    finally:
        target.stop()


def _first_frame_answer(world, cert: tuple, frame: bytes, timeout: float = 5.0) -> tuple[list[dict], float]:
    """Speak to the agent port as an agent would, send one frame; the messages back until EOF."""
    ctx = tls.client_context(str(world.creds.ca), str(cert[0]), str(cert[1]))
    with socket.create_connection((V4, world.port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=V4) as s:
        s.sendall(frame)
        start = time.monotonic()
        decoder, messages = FrameDecoder(), []
        while True:
            try:
                data = s.recv(65536)
            except socket.timeout:
                raise AssertionError(f"no close within {timeout} s after {frame!r}; got {messages}") from None
            except ConnectionResetError:
                data = b""
            decoder.receive_data(data)
            while (msg := decoder.next_message()) is not None:
                messages.append(msg)
            if not data:
                return messages, time.monotonic() - start


@pytest.mark.parametrize("case", ["unknown-connection", "spoofed-id", "protocol-version", "not-a-hello"])
def test_refused_agent_connection_gets_an_error_and_is_closed(world, case):
    """A first frame the server refuses is answered with `error` {reason} and the connection is closed."""
    server = world.start_server()
    world.start_agent()  # a healthy agent beside the bad connection
    own, other = world.creds.agent("agent-1"), world.creds.agent("agent-2")
    cert, frame, expected = {
        "unknown-connection": (own, encode("data", proto=PROTO_VERSION, agent_id="agent-1", conn=12345),
                               "no client is waiting for connection 12345"),
        "spoofed-id": (other, encode("hello", proto=PROTO_VERSION, agent_id="agent-1", version="0"),
                       "does not match the identity of its certificate"),
        "protocol-version": (own, encode("hello", proto=99, agent_id="agent-1", version="0"),
                             "protocol version 99 is not supported"),
        "not-a-hello": (own, encode("ping", seq=1), "expected hello or data, got ping"),
    }[case]
    messages, elapsed = _first_frame_answer(world, cert, frame)
    assert [m["type"] for m in messages] == ["error"], messages
    assert expected in messages[0]["reason"]
    assert elapsed < 3.0
    assert "Traceback" not in server.log(), server.log()
    assert [a["agent_id"] for a in agents(world)] == ["agent-1"]


# -- restarts ---------------------------------------------------------------------------------------
def _restart_checks(world, port: int, name: str, agent: Proc, connects_before: int) -> None:
    proxies = world.api("GET", "/v1/proxies")["proxies"]
    assert [p["name"] for p in proxies] == [name]
    assert proxies[0]["remote_port"] == port
    wait_log_line(world.server, f"proxy {name} restored")
    wait_for(lambda: agent_online(world), 15, what=f"the agent to reconnect by itself:\n{agent.log()}")
    # the server lists the session a moment before the agent has read its welcome
    wait_for(lambda: agent.log().count("connected to server") > connects_before, 5,
             what=f"the agent to log its new session:\n{agent.log()}")
    assert_echo(port)


def test_server_restart_restores_proxies_and_agent_reconnects(world, echo_target):
    first = world.start_server()
    agent = start_agent(world)
    port = world.add_proxy(echo_target.port)
    name = f"agent-1:{port}"
    assert_echo(port)
    connects = agent.log().count("connected to server")
    assert first.stop() == 0
    assert "anywhered stopped" in first.log_path.read_text()
    assert not os.path.exists(world.sock), "a clean stop removes the admin socket"
    assert_refused(V4, port)
    wait_log_line(agent, "lost the server")
    world.start_server()  # same port, admin socket and state directory
    _restart_checks(world, port, name, agent, connects)


def test_server_sigkill_restart_replaces_stale_socket(world, echo_target):
    first = world.start_server()
    agent = start_agent(world)
    port = world.add_proxy(echo_target.port)
    name = f"agent-1:{port}"
    connects = agent.log().count("connected to server")
    first.kill()
    assert first.popen.returncode == -signal.SIGKILL
    assert stat.S_ISSOCK(os.lstat(world.sock).st_mode), "SIGKILL leaves the socket file behind"
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(world.sock)
    world.start_server()
    assert world.api("GET", "/v1/status")["proxies"] == 1
    _restart_checks(world, port, name, agent, connects)


# -- heartbeats ---------------------------------------------------------------------------------------
def test_heartbeat_server_drops_a_stopped_agent(world, echo_target):
    server = world.start_server("--heartbeat", "0.5")
    agent = start_agent(world)
    port = world.add_proxy(echo_target.port)
    mark = len(agent.log())
    with sigstopped(agent):
        start = time.monotonic()
        wait_for(lambda: not agent_online(world), 6, what="the stopped agent to be dropped")
        elapsed = time.monotonic() - start
        assert elapsed < 4.0, f"dropped after {elapsed:.1f} s with --heartbeat 0.5"
        line = wait_log_line(server, "agent-1", "heartbeat")
        assert "no heartbeat" in line
    # continued, the agent notices its session is gone and comes back by itself
    wait_log_line(agent, "lost the server", timeout=5, start=mark)
    wait_for(lambda: agent_online(world), 10, what=f"the agent to reconnect:\n{agent.log()[mark:]}")
    wait_log_line(agent, "connected to server", timeout=5, start=mark)
    assert agent.log()[mark:].count("connected to server") == 1
    assert_echo(port)


def test_heartbeat_agent_notices_a_stopped_server(world, echo_target):
    server = world.start_server("--heartbeat", "0.5")
    agent = start_agent(world)
    port = world.add_proxy(echo_target.port)
    mark = len(agent.log())
    since = agents(world)[0]["connected_since"]
    with sigstopped(server):
        start = time.monotonic()
        wait_log_line(agent, "no heartbeat from the server", timeout=6, start=mark)
        elapsed = time.monotonic() - start
        assert elapsed < 4.0, f"noticed after {elapsed:.1f} s with a 0.5 s heartbeat"
        wait_log_line(agent, "lost the server", timeout=2, start=mark)
    wait_log_line(agent, "connected to server", timeout=15, start=mark)
    wait_for(lambda: [a["connected_since"] for a in agents(world)] not in ([], [since]), 10,
             what="a new session of agent-1")
    assert_echo(port)


# -- session replacement ------------------------------------------------------------------------------
def test_session_replacement(world, echo_target):
    server = world.start_server()
    first = start_agent(world)
    port = world.add_proxy(echo_target.port)
    with connect(V4, port) as long_lived:
        echo_once(long_lived)
        second = world.start_agent("agent-1", wait=False)  # same id, same certificate
        wait_log_line(server, "agent agent-1 connected", "replacing its session", timeout=15)
        wait_log_line(first, "lost the server", timeout=5)
        # the one pushed out says why and does not fight back every second
        wait_log_line(first, "another agent is running with id agent-1", timeout=5)
        for _ in range(5):
            listed = [a["agent_id"] for a in agents(world)]
            assert listed == ["agent-1"], listed
            assert_echo(port)  # new tunnels work, whichever process holds the session
        echo_once(long_lived)  # the relay over the first agent was left alone
        long_lived.shutdown(socket.SHUT_WR)
        assert recv_all(long_lived, 10) == b""
    assert second.alive() and first.alive()


@pytest.mark.slow
def test_data_connection_survives_admin_connection_loss(world, echo_target):
    server = world.start_server()
    first = start_agent(world)
    port = world.add_proxy(echo_target.port)
    with connect(V4, port, timeout=10) as c:
        echo_once(c, 100_000)
        conns = world.api("GET", "/v1/connections")["connections"]
        assert len(conns) == 1
        conn_id = conns[0]["id"]
        # a second process with the same identity: the server closes the first one's admin connection
        second = world.start_agent("agent-1", wait=False)
        wait_log_line(server, "replacing its session", timeout=15)
        wait_log_line(first, "lost the server", timeout=5)
        # the data connection opened before keeps working, both ways, with volume
        echo_once(c, 1_000_000, timeout=20)
        assert conn_id in [x["id"] for x in world.api("GET", "/v1/connections")["connections"]]
        second.stop()
        echo_once(c, 1000)
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c, 10) == b""  # the half-close went through and the target's EOF came back
    wait_for(lambda: world.api("GET", "/v1/connections")["connections"] == [], 5, what="the connection to end")
    # pushed out by a session of the same id, the first agent waits the longest backoff (15-30 s)
    wait_for(lambda: agent_online(world), 35, what="the first agent to reconnect")
    assert_echo(port)


# -- deleting a proxy ---------------------------------------------------------------------------------
def test_delete_proxy_closes_listener_and_connections(world, echo_target):
    server = world.start_server()
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    name = f"agent-1:{port}"
    with connect(V4, port) as c:
        echo_once(c)
        assert len(world.api("GET", "/v1/connections")["connections"]) == 1
        answer = world.api("DELETE", f"/v1/proxies/{name}")
        assert answer["deleted"] == name
        assert answer["closed_connections"] >= 1
        assert wait_closed(c, 3) < 1.0
    assert_refused(V4, port)
    assert_refused(V6, port)
    assert world.api("GET", "/v1/proxies")["proxies"] == []
    wait_for(lambda: world.api("GET", "/v1/connections")["connections"] == [], 2, what="the connection list to empty")
    wait_log_line(server, f"proxy {name} deleted")
