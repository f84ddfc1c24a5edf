"""A real link between server and agent that drops, and an agent host that comes back with another
address (issue 13, part 1): two hosts in network namespaces (tests/nshost.py), real processes.

The goal measured here: after an outage of any length, a new client works within three heartbeats
plus two seconds of the link coming back; connections held across an outage shorter than
dead-peer detection (three heartbeats) keep working.  HB is short so the tests are quick; every
rule scales with it.  The times printed are the measured ones.
"""

from __future__ import annotations

import os
import time

import pytest

import nshost
from conftest import wait_for, wait_log_line
from nshost import TGT_PORT
from streams import EchoStream, one_shot

pytestmark = pytest.mark.netns

HB = 1.0
GOAL = 3 * HB + 2  # seconds from the link coming back to a new client served
PORT = 8080


@pytest.fixture
def hosts(tmp_path):
    config = tmp_path / "anywhered.conf"
    config.write_text("[server]\ntrunk_idle_timeout = 0\n")  # trunks from the connect on
    with nshost.two_hosts(tmp_path, f"awl{os.getpid() % 100000}", "10.233.1", heartbeat=HB,
                          server_args=("--config", str(config))) as h:
        h.config = config
        wait_for(lambda: agent(h), 15, what=f"the agent to connect:\n{h.agent.log()}")
        h.agent.wait_log("connected to server")
        h.api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": TGT_PORT,
                                      "remote_port": PORT})
        wait_for(lambda: (agent(h) or {}).get("trunks") == 2, 10, what="both trunks")
        yield h


def agent(h) -> dict | None:
    return next((a for a in h.api("GET", "/v1/agents")["agents"] if a["agent_id"] == "agent-1"), None)


def held_streams(h, n: int) -> list[EchoStream]:
    """n slow, live connections, so that every trunk carries one."""
    streams = [EchoStream(h.connect()("127.0.0.1", PORT, 10), f"held-{i}", block=512, pace=0.05, io_timeout=60).start()
               for i in range(n)]
    for s in streams:
        s.wait_progress(1024, 10)
    return streams


def first_success_after(h, since: float, limit: float) -> float:
    """Seconds from `since` until a fresh client's echo comes back whole (tries every 0.2 s)."""
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        last = one_shot("127.0.0.1", PORT, 4096, timeout=2, connect=h.connect())
        if last["ok"]:
            return time.monotonic() - since
        time.sleep(0.2)
    raise AssertionError(f"no client served within {limit} s of the link coming back; last try: {last}")


def test_an_outage_shorter_than_dead_peer_detection_loses_nothing(hosts):
    streams = held_streams(hosts, 4)
    try:
        marks = {p: len(p.log()) for p in (hosts.server, hosts.agent)}
        hosts.link(up=False)
        time.sleep(1.5)  # the outage itself: half of dead-peer detection (3 heartbeats)
        hosts.link(up=True)
        back = time.monotonic()
        took = first_success_after(hosts, back, GOAL + 5)
        for s in streams:
            s.wait_progress(2048, 15)  # the held connections carry on, every byte checked
        assert "disconnected" not in hosts.server.log()[marks[hosts.server]:]
        assert agent(hosts)["trunks"] == 2
    finally:
        for s in streams:
            s.finish()
    for s in streams:
        assert s.corrupt is None and s.ended is None and s.clean_close, (s.name, s.ended, s.corrupt)
    print(f"\noutage 1.5 s (< {3 * HB:g} s detection): new client served {took:.1f} s after the link came back; "
          f"{sum(s.bytes_checked for s in streams)} bytes checked on 4 held connections")
    assert took <= GOAL


def test_after_an_outage_longer_than_detection_a_new_client_works_within_the_goal(hosts):
    streams = held_streams(hosts, 4)
    try:
        marks = {p: len(p.log()) for p in (hosts.server, hosts.agent)}
        hosts.link(up=False)
        wait_log_line(hosts.server, "agent agent-1", "no heartbeat", start=marks[hosts.server], timeout=10)
        wait_log_line(hosts.agent, "no heartbeat from the server", start=marks[hosts.agent], timeout=10)
        time.sleep(2 * HB)  # well past detection on both sides
        hosts.link(up=True)
        back = time.monotonic()
        took = first_success_after(hosts, back, GOAL + 10)
        # the old trunks were black holes: both sides close them by their own liveness check
        wait_for(lambda: hosts.api("GET", "/v1/status")["retired_trunks"] == 0, 3 * HB + 5,
                 what="the old trunks to be closed on the server")
        wait_for(lambda: (agent(hosts) or {}).get("trunks") == 2, 10, what="two fresh trunks")
    finally:
        for s in streams:
            s.finish(timeout=2)
    print(f"\noutage longer than detection: new client served {took:.1f} s after the link came back (goal {GOAL:g} s)")
    assert took <= GOAL


def test_an_agent_back_on_a_new_address_serves_new_clients_within_the_goal(hosts):
    streams = held_streams(hosts, 4)  # every trunk carries a stream, as in the field report
    try:
        marks = {p: len(p.log()) for p in (hosts.server, hosts.agent)}
        old_address = agent(hosts)["address"]
        hosts.link(up=False)
        time.sleep(2.0)  # a NAT gateway reboot: shorter than detection
        hosts.readdress_agent("10.233.1.3")
        hosts.link(up=True)
        back = time.monotonic()
        took = first_success_after(hosts, back, GOAL + 10)
        wait_for(lambda: (agent(hosts) or {}).get("address", "").startswith("10.233.1.3:"), 10,
                 what="the session from the new address")
        wait_for(lambda: hosts.api("GET", "/v1/status")["retired_trunks"] == 0, 3 * HB + 5,
                 what="the old address's trunks to be closed on the server")
        wait_log_line(hosts.agent, "nothing received for", start=marks[hosts.agent], timeout=3 * HB + 5)
        assert agent(hosts)["trunks"] == 2
        # and it keeps working: a burst of clients, all served
        results = [one_shot("127.0.0.1", PORT, 65536, timeout=10, connect=hosts.connect()) for _ in range(20)]
        assert all(r["ok"] for r in results), [r for r in results if not r["ok"]][:3]
    finally:
        for s in streams:
            s.finish(timeout=2)
    print(f"\nagent back on a new address ({old_address} -> 10.233.1.3): new client served {took:.1f} s after "
          f"the link came back (goal {GOAL:g} s)")
    assert took <= GOAL


def test_deny_and_reload_close_a_connected_agents_trunks_at_once(hosts):
    streams = held_streams(hosts, 2)
    try:
        hosts.config.write_text("[server]\ndeny = agent-1\n")
        hosts.api("POST", "/v1/reload")
        denied_at = time.monotonic()
        status = {}

        def all_closed() -> bool:
            status.update(hosts.api("GET", "/v1/status"))
            return status["trunks"] == 0 and status["retired_trunks"] == 0 and status["connections"] == 0
        wait_for(all_closed, 2, what=f"the revoked agent's trunks to close at once: {status}")
        closed_after = time.monotonic() - denied_at
        for s in streams:
            wait_for(lambda s=s: s.ended, 5, what=f"{s.name} to be cut")
        wait_log_line(hosts.agent, "revoked", timeout=5)
    finally:
        for s in streams:
            s.finish(timeout=2)
    print(f"\ndeny + reload: trunks and connections closed {closed_after:.2f} s after the reload")
