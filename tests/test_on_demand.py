"""Trunks on demand (issue 18): an idle agent holds only its admin connection; the first client
opens its trunks, and trunks that carried nothing for trunk_idle_timeout are closed by the server.

Real server and agent processes on loopback, and a hand-written agent for the wire's side of it.
The heartbeat is long (30 s) where a test says a client is served "at once": a client that had
to wait for the server to ask again (a heartbeat later) would take that long.
"""

from __future__ import annotations

import os
import threading
import time

from conftest import echo, log_lines, wait_for
from handpeer import client_ctx
from anywhere.wire import PROTO_VERSION

HB = "30"


def status(world) -> dict:
    return world.api("GET", "/v1/status")


def trunks(world, agent_id: str = "agent-1") -> int | None:
    return next((a["trunks"] for a in world.api("GET", "/v1/agents")["agents"] if a["agent_id"] == agent_id), None)


def noisy(proc, *needles: str) -> list[str]:
    """Lines above DEBUG that mention all of `needles`."""
    return [line for line in log_lines(proc, *needles) if " DEBUG " not in line]


def test_an_idle_agent_holds_no_trunk_and_its_trunks_close_after_the_idle_timeout(world, echo_target):
    server = world.start_server("--heartbeat", HB, "--trunk-idle-timeout", "2")
    agent = world.start_agent()
    port = world.add_proxy(echo_target.port)
    time.sleep(1.5)
    assert trunks(world) == 0 and status(world)["tls_handshakes"] == 1  # the admin connection alone

    started = time.monotonic()
    assert echo(port, b"first") == b"first"  # held while the trunks open, then served
    first = time.monotonic() - started
    assert first < 10, f"the first client took {first:.1f} s: the agent was not asked at once"
    wait_for(lambda: trunks(world) == 2, 5, what="both trunks")
    for i in range(50):
        data = os.urandom(100 + i)
        assert echo(port, data) == data
    assert status(world)["tls_handshakes"] == 3  # the admin connection and two trunks: no more

    wait_for(lambda: trunks(world) == 0, 8, what="the trunks closed for idleness")
    assert log_lines(server, "agent-1", "closing them (closed: idle)")  # said, at debug level
    assert noisy(server, "trunk", "closed") == [] and noisy(agent, "trunk", "closed") == []
    assert agent.alive and world.api("GET", "/v1/agents")["agents"][0]["agent_id"] == "agent-1"

    # the correctness test: the next client is served at once and without error
    started = time.monotonic()
    assert echo(port, b"again") == b"again"
    assert time.monotonic() - started < 10
    wait_for(lambda: trunks(world) == 2, 5, what="the trunks open again")
    assert status(world)["tls_handshakes"] == 5
    assert [line for line in noisy(agent, "WARNING") if "allow = *" not in line] == [] and noisy(agent, "ERROR") == []
    assert noisy(server, "WARNING", "trunk") == [] and noisy(server, "ERROR") == []
    counters = world.api("GET", "/v1/proxies")["proxies"][0]
    assert counters["connections_total"] == 52 and not any(counters["rejected"].values()), counters


def test_clients_arriving_together_all_wait_for_the_first_trunks(world, echo_target):
    world.start_server("--heartbeat", HB, "--trunk-idle-timeout", "60")
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    assert trunks(world) == 0
    results: list[bytes | str] = []

    def one(i: int) -> None:
        data = os.urandom(2000 + i)
        try:
            results.append(b"ok" if echo(port, data) == data else f"client {i}: wrong bytes")
        except OSError as exc:
            results.append(f"client {i}: {exc}")
    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [b"ok"] * 40
    assert status(world)["tls_handshakes"] == 3  # the 40 clients opened two trunks, not one each
    assert trunks(world) == 2


def test_trunk_idle_timeout_0_keeps_the_trunks_open_from_the_welcome_on(world, echo_target):
    world.start_server("--trunk-idle-timeout", "0")
    world.start_agent()
    wait_for(lambda: trunks(world) == 2, 10, what="two trunks without a client")
    port = world.add_proxy(echo_target.port)
    assert echo(port, b"x") == b"x"
    time.sleep(3)
    assert trunks(world) == 2 and status(world)["tls_handshakes"] == 3


def test_the_wire_on_demand_is_offered_by_the_agent_and_unasked_trunks_are_refused(world, peers, echo_target):
    world.start_server("--heartbeat", HB, "--trunk-idle-timeout", "60")
    ctx = client_ctx(world.creds.ca, world.creds.agent("agent-2"))
    old = peers(world.port, ctx)  # an agent older than on demand: its welcome does not offer it
    old.send("hello", proto=PROTO_VERSION, agent_id="agent-2", version="0.0.9")
    welcome = old.recv()
    assert welcome["type"] == "welcome" and "on_demand" not in welcome and welcome["pool"] == 2
    old.close()
    wait_for(lambda: trunks(world, "agent-2") is None, 5, what="the old agent gone")

    admin = peers(world.port, ctx)
    admin.send("hello", proto=PROTO_VERSION, agent_id="agent-2", version="0.2", on_demand=1)
    welcome = admin.recv()
    assert welcome["type"] == "welcome" and welcome["on_demand"] == 1
    unasked = peers(world.port, ctx)  # not asked for: refused
    unasked.send("trunk", proto=PROTO_VERSION, agent_id="agent-2", session=welcome["session"])
    msgs, how = unasked.messages_until_closed(5)
    assert trunks(world, "agent-2") == 0

    port = world.add_proxy(echo_target.port, agent_id="agent-2")
    client = threading.Thread(target=lambda: echo(port, b"held"), daemon=True)
    client.start()
    asked = admin.recv(5)  # a client came: the agent is asked for its trunks
    assert asked == {"type": "trunks", "count": 2}
    client.join(0.1)
