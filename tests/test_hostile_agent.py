"""What a compromised agent, a hostile client or a flood can do to anywhered, and what it must not.

Each test reproduces one defect found in the security audit (issue 14) against running processes
on loopback: a hostile agent holds a valid certificate and speaks the protocol by hand
(tests/hostile.py); clients are plain sockets, some bound to 127.0.0.2 to come from another
address.  After every attack the server keeps serving the others.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import pytest

from anywhere import mux
from anywhere.loop import Loop
from anywhere.trunk import Stream, Trunk
from anywhere.wire import PROTO_VERSION
from conftest import echo, wait_for
from hostile import HostileAgent


def status(world) -> dict:
    return world.api("GET", "/v1/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def hostile(world, creds):
    """`hostile(agent_id)`: a HostileAgent with that agent's valid certificate, closed after the test."""
    made: list[HostileAgent] = []

    def make(agent_id: str = "agent-2") -> HostileAgent:
        agent = HostileAgent(world.port, creds.ca, creds.agent(agent_id), agent_id)
        made.append(agent)
        return agent
    yield make
    for agent in made:
        agent.close()


def forged_lines(log: str, forged: str) -> list[str]:
    """Log lines that begin with text a peer sent (a forged entry), not with the logger's timestamp."""
    return [line for line in log.splitlines() if line.startswith(forged)]


# -- 1. a long claimed id: the answer is cut, the connection closed ---------------------------------------
def test_a_long_claimed_id_is_cut_in_the_answer_and_every_such_connection_closes(world, creds, hostile):
    server = world.start_server()
    base = open_fds(server.pid)
    agent = hostile("agent-2")
    for _ in range(40):
        peer = agent.raw()
        peer.send("hello", proto=PROTO_VERSION, agent_id="x" * 20_000, version="0.1.0")
        msgs, _how = peer.messages_until_closed(5)  # before the fix: never closed
        assert [m["type"] for m in msgs] == ["error"], msgs
        reason = msgs[0]["reason"]
        assert "does not match" in reason and "more characters" in reason and len(reason) < 500, reason[:300]
        peer.close()
    wait_for(lambda: open_fds(server.pid) <= base + 2, 5, what="the refused connections' descriptors to be freed")
    assert max(len(line) for line in server.log().splitlines()) < 2000  # nothing quoted in full
    world.start_agent("agent-1")  # a valid agent still gets in


def test_a_frame_that_cannot_be_encoded_closes_its_connection_instead_of_leaking_it(world, creds, hostile):
    """The same defect by another door: a data connection naming a conn id is answered with the id
    quoted; the answer must stay bounded whatever is claimed, and the connection must close."""
    server = world.start_server()
    base = open_fds(server.pid)
    agent = hostile("agent-2")
    for _ in range(10):
        peer = agent.raw()
        peer.send("data", proto=PROTO_VERSION, agent_id="y" * 30_000, conn=1)
        msgs, _how = peer.messages_until_closed(5)
        assert msgs and msgs[0]["type"] == "error" and len(msgs[0]["reason"]) < 500
        peer.close()
    wait_for(lambda: open_fds(server.pid) <= base + 2, 5, what="descriptors back")


# -- 3. READY then FAIL must not leave connections listed for ever ------------------------------------------
def test_fail_after_ready_frees_the_connections_and_other_agents_keep_their_clients(world, creds, hostile, echo_target):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\nmax_connections = 3\n")
    server = world.start_server("--config", str(conf))
    world.start_agent("agent-1")
    good = world.add_proxy(echo_target.port)
    bad_agent = hostile("agent-2")
    assert bad_agent.connect()["type"] == "welcome"
    trunk = bad_agent.trunk()
    wait_for(lambda: any(a["agent_id"] == "agent-2" and a["trunks"] == 1 for a in world.api("GET", "/v1/agents")["agents"]),
             5, what="the hostile trunk to register")
    bad = world.add_proxy(9, agent_id="agent-2")
    clients, sids = [], []
    try:
        for _ in range(3):
            clients.append(socket.create_connection(("127.0.0.1", bad), timeout=5))
            sids.append(trunk.expect_open()[0])
        for sid in sids:
            trunk.send(mux.READY, sid)
        wait_for(lambda: status(world)["connections"] == 3, 5, what="three joined connections")
        # in one write: the server closes the trunk at the first FAIL, and a write after that could fail
        trunk.send_raw(b"".join(mux.frame(mux.FAIL, sid, b"changed my mind") for sid in sids))
        assert trunk.wait_closed(5), "a FAIL after READY is a protocol error: the trunk must close"
        wait_for(lambda: status(world)["connections"] == 0, 5, what="the connections to leave the table")
        assert echo(good, b"served") == b"served"  # another agent's proxy is not refused for max_connections
        assert "unexpected FAIL" in server.log()
    finally:
        for c in clients:
            c.close()


def test_stream_ids_wrap_around_streams_still_open():
    a, b = socket.socketpair()
    loop = Loop()
    try:
        trunk = Trunk(loop, a, b"", name="wrap")
        first = Stream(trunk, trunk.new_stream_id())
        assert first.sid == 1
        trunk._next_id = 2**32 - 1  # as after four billion streams
        last = Stream(trunk, trunk.new_stream_id())
        assert last.sid == 2**32 - 1
        assert trunk.new_stream_id() == 2  # 1 is still open: skipped, never reused
        trunk.close("test over")
    finally:
        loop.close()
        b.close()


# -- 9. the default rate limit: a load test passes, a flood is limited -------------------------------------
def _short_connections(port: int, count: int, in_flight: int, results: list) -> None:
    lock = threading.Lock()
    todo = iter(range(count))

    def worker() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            results.append(echo(port, b"hello"))
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def test_the_default_rate_limit_lets_a_load_test_from_one_address_through(world, echo_target):
    world.start_server()
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    results: list[bytes] = []
    _short_connections(port, 2000, 50, results)
    assert len(results) == 2000 and results.count(b"hello") == 2000, f"{results.count(b'hello')} of 2000 served"
    assert status(world)["rejected"].get("limit", 0) == 0


def test_a_flood_from_one_address_is_limited_while_other_addresses_are_served(world, echo_target):
    world.start_server()
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    stop = threading.Event()
    others: list[bytes] = []

    def other_address() -> None:
        while not stop.is_set() and len(others) < 400:
            others.append(echo(port, b"other", source="127.0.0.2"))
            time.sleep(0.02)
    sent = [0]

    def flood(n: int) -> None:
        linger = struct.pack("ii", 1, 0)  # close with a reset: no TIME_WAIT for 20,000 sockets
        for _ in range(n):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                s.settimeout(5)
                try:
                    s.connect(("127.0.0.1", port))
                except OSError:
                    continue
                sent[0] += 1
    watcher = threading.Thread(target=other_address, daemon=True)
    watcher.start()
    started = time.monotonic()
    floods = [threading.Thread(target=flood, args=(5000,), daemon=True) for _ in range(4)]
    for t in floods:
        t.start()
    for t in floods:
        t.join(120)
    elapsed = time.monotonic() - started
    stop.set()
    watcher.join(30)
    assert sent[0] >= 19_000
    limited = wait_for(lambda: status(world)["rejected"].get("limit", 0), 10, what="limit rejections")
    admitted = status(world)["connections_total"] + sum(v for k, v in status(world)["rejected"].items() if k != "limit")
    # a token bucket of 1000 a second with bursts of 2000: that much and no more from one address
    assert admitted <= 2000 + 1000 * elapsed + 200, (admitted, elapsed)
    assert limited >= sent[0] - (2000 + 1000 * elapsed + 200) - 200, (limited, sent[0], elapsed)
    assert others and others.count(b"other") == len(others), f"{others.count(b'other')} of {len(others)} served"


# -- 10. one address cannot take the whole pre-handshake budget ----------------------------------------------
def test_one_address_cannot_take_every_unauthenticated_slot(world):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\nmax_unauthenticated = 50\nhandshake_timeout = 30\n")
    server = world.start_server("--config", str(conf))
    held = []
    try:
        for _ in range(50):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", world.port))
            held.append(s)
        server.wait_log("max_unauthenticated_per_source")
        world.start_agent("agent-1")  # from 127.0.0.1: room is left for it
    finally:
        for s in held:
            s.close()


# -- 11. nothing a peer sends forges a log line ---------------------------------------------------------------
FORGED = "2026-01-01 00:00:00,000 WARNING anywhere.server: forged"


def test_an_agent_version_or_fail_reason_cannot_forge_log_lines(world, creds, hostile):
    server = world.start_server()
    agent = hostile("agent-2")
    assert agent.connect(version="1.0\n" + FORGED + "\r\n" + FORGED)["type"] == "welcome"
    trunk = agent.trunk()
    wait_for(lambda: any(a["trunks"] == 1 for a in world.api("GET", "/v1/agents")["agents"]), 5, what="the trunk")
    port = world.add_proxy(9, agent_id="agent-2")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        sid = trunk.expect_open()[0]
        trunk.send(mux.FAIL, sid, ("refused\n" + FORGED).encode())
        client.settimeout(5)
        try:
            assert client.recv(10) == b""
        except ConnectionResetError:
            pass
    wait_for(lambda: status(world)["rejected"].get("target_refused") == 1, 5, what="the refusal")
    agent.admin.send("fail", conn=12345, reason="x\n" + FORGED)
    log = server.log()
    assert forged_lines(log, FORGED) == []
    assert "\\x0a" + FORGED in log
    listed = world.api("GET", "/v1/agents")["agents"][0]["version"]
    assert "\n" not in listed and "\\x0a" in listed


# -- 12. refused clients do not write an audit line each -----------------------------------------------------
def test_refused_connections_are_audited_in_aggregate(world, echo_target):
    audit = world.tmp / "audit.log"
    conf = world.tmp / "anywhered.conf"
    conf.write_text(f"[server]\naudit_log = {audit}\n")
    server = world.start_server("--config", str(conf))
    world.start_agent()
    port = world.add_proxy(echo_target.port, whitelist=["10.0.0.0/8"])
    for _ in range(300):
        echo(port, b"x")
    echo(port, b"x", source="127.0.0.2")

    def refusals() -> list[dict]:
        if not audit.exists():
            return []
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        return [r for r in records if r.get("event") == "connection" and r.get("reason") == "whitelist"]
    wait_for(lambda: len(refusals()) == 2, 5, what="the first refusal of each source audited at once")
    time.sleep(0.5)
    assert len(refusals()) == 2  # not one line per refused connection
    server.stop()
    records = refusals()
    assert len(records) == 3 and records[-1]["count"] == 299 and records[-1]["source"] == "127.0.0.1"
    assert 1 + sum(r.get("count", 0) for r in records if r["source"].startswith("127.0.0.1")) == 300


# -- 4. trunks belong to their session ----------------------------------------------------------------------
def agent_entry(world, agent_id: str) -> dict | None:
    return next((a for a in world.api("GET", "/v1/agents")["agents"] if a["agent_id"] == agent_id), None)


def test_a_replaced_sessions_trunks_take_no_new_client_and_close_with_their_last_stream(world, hostile):
    world.start_server()
    first = hostile("agent-2")
    token = first.connect().get("session")
    old_trunk = first.trunk(session=token, ping=1)
    wait_for(lambda: (agent_entry(world, "agent-2") or {}).get("trunks") == 1, 5, what="the trunk")
    port = world.add_proxy(9, agent_id="agent-2")
    held = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sid = old_trunk.expect_open()[0]
        old_trunk.send(mux.READY, sid)
        wait_for(lambda: status(world)["connections"] == 1, 5, what="the held connection")
        second = hostile("agent-2")
        assert second.connect()["type"] == "welcome"  # the session is replaced
        wait_for(lambda: status(world).get("retired_trunks") == 1, 5, what="the old trunk to be retired")
        assert agent_entry(world, "agent-2")["trunks"] == 0  # not counted any more
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            assert second.admin.recv()["type"] == "open"  # not on the old session's trunk
        with pytest.raises(AssertionError, match="no OPEN"):
            old_trunk.expect_open(timeout=0.5)
        late = first.trunk(session=token, ping=1)  # opened for the session that is over
        assert late.wait_closed(5)
        old_trunk.send(mux.ABORT, sid, b"done")  # its last stream ends: the retired trunk closes
        assert old_trunk.wait_closed(5)
        wait_for(lambda: status(world)["retired_trunks"] == 0, 5, what="the retired trunk gone")
    finally:
        held.close()


def open_on_either(*trunks, timeout: float = 5.0):
    """(trunk, stream id) of the first OPEN the server sends on any of `trunks`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trunk in trunks:
            try:
                return trunk, trunk.expect_open(timeout=0.1)[0]
            except AssertionError:
                pass
    raise AssertionError(f"no OPEN on any trunk within {timeout} s")


def test_a_denied_agents_trunks_close_at_once_on_reload(world, hostile):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\n")
    server = world.start_server("--config", str(conf))
    agent = hostile("agent-2")
    agent.connect()
    agent.keep_alive()
    trunk = agent.trunk(session=agent.welcome.get("session"), ping=1)
    idle = agent.trunk(session=agent.welcome.get("session"), ping=1)
    wait_for(lambda: (agent_entry(world, "agent-2") or {}).get("trunks") == 2, 5, what="the trunks")
    port = world.add_proxy(9, agent_id="agent-2")
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        opened, sid = open_on_either(trunk, idle)
        opened.send(mux.READY, sid)
        wait_for(lambda: status(world)["connections"] == 1, 5, what="a connection through the trunk")
        conf.write_text("[server]\ndeny = agent-2\n")
        world.api("POST", "/v1/reload")
        started = time.monotonic()
        assert trunk.wait_closed(3) and idle.wait_closed(3), "a revoked agent's trunks must close at once"
        assert time.monotonic() - started < 3
    assert status(world)["trunks"] == 0 and status(world)["retired_trunks"] == 0
    server.wait_log("is denied now")


def test_a_silent_trunk_is_stale_at_once_for_new_clients_and_closed_after_three_heartbeats(world, hostile):
    server = world.start_server("--heartbeat", "1")
    agent = hostile("agent-2")
    agent.connect()
    agent.keep_alive()  # the admin connection stays healthy: only the trunk is silent
    silent = agent.trunk(session=agent.welcome.get("session"), ping=1)  # never answers the server's pings
    wait_for(lambda: (agent_entry(world, "agent-2") or {}).get("trunks") == 1, 5, what="the trunk")
    wait_for(lambda: agent_entry(world, "agent-2").get("trunks_stale") == 1, 5, what="the trunk to go stale")
    port = world.add_proxy(9, agent_id="agent-2")
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        wait_for(lambda: status(world)["pending"] == 1, 5, what="the client to be held for a live trunk")
        fresh = agent.trunk(session=agent.welcome.get("session"), ping=1)
        sid, host, port_asked = fresh.expect_open(timeout=3)  # served by the new, live trunk
        assert (host, port_asked) == ("127.0.0.1", 9)
        assert silent.wait_closed(5), "a trunk silent for three heartbeats must be closed"
    assert not any(kind == mux.OPEN for kind, _, _ in silent.frames)
    assert any(kind == mux.PING for kind, _, _ in silent.frames)  # it was asked first
    server.wait_log("nothing received for")
