"""Several agents behind one proxy (issue 17): balance modes, a failed agent skipped before the
client sees a byte, passive health, and the health check load balancers use.  Real anywhered and
agent processes on loopback, real clients; the counts come from the daemon's API.  An agent killed
mid-run, its target refusing, and HAProxy in front of two servers: tests/test_ha_netns.py.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import threading
import time

import pytest
import requests

from conftest import echo, free_port, wait_for

N = 100


def add(world, target: int, agents: list[str], balance: str | None = None, port: int | None = None) -> int:
    port = port or free_port()
    body = {"name": "web", "agent_ids": agents, "local_ip": "127.0.0.1", "local_port": target, "remote_port": port}
    if balance:
        body["balance"] = balance
    world.api("POST", "/v1/proxies", body)
    return port


def per_agent(world, name: str = "web") -> dict[str, dict]:
    proxy = next(p for p in world.api("GET", "/v1/proxies")["proxies"] if p["name"] == name)
    return {a["agent_id"]: a for a in proxy["agents"]}


def totals(world) -> dict[str, int]:
    return {a: row["connections_total"] for a, row in per_agent(world).items()}


def ok(port: int) -> bool:
    data = secrets.token_bytes(64)
    return echo(port, data) == data


@pytest.fixture
def two(world, echo_target):
    """anywhered with agent-1 and agent-2 connected; the echo target's port as `world.target`."""
    world.start_server()
    world.agents = {a: world.start_agent(a) for a in ("agent-1", "agent-2")}
    world.target = echo_target.port
    return world


@pytest.mark.parametrize("balance,expected", [
    ("round-robin", {"agent-1": N // 2, "agent-2": N // 2}),
    ("least-connections", {"agent-1": N // 2, "agent-2": N // 2}),  # sequential: every pick a tie, taken in turn
    ("failover", {"agent-1": N, "agent-2": 0}),
])
def test_sequential_clients_are_spread_as_the_balance_mode_says(two, balance, expected):
    port = add(two, two.target, ["agent-1", "agent-2"], balance)
    for _ in range(N):
        assert ok(port)
    assert totals(two) == expected


def test_least_connections_sends_a_client_to_the_agent_with_fewer_live_ones(two):
    port = add(two, two.target, ["agent-1", "agent-2"], "least-connections")
    held = []
    try:
        for _ in range(N):  # held open: each pick sees the live counts
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            held.append(c)
        rows = per_agent(two)
        assert {a: r["connections"] for a, r in rows.items()} == {"agent-1": N // 2, "agent-2": N // 2}
        for c in held[::2]:  # close agent-1's half or agent-2's: whichever, the next ones fill the gap
            c.close()
        wait_for(lambda: sum(r["connections"] for r in per_agent(two).values()) == N // 2, 10, what="closes")
        before = {a: r["connections"] for a, r in per_agent(two).items()}
        for _ in range(10):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            c.sendall(b"y")
            assert c.recv(1) == b"y"
            held.append(c)
        after = {a: r["connections"] for a, r in per_agent(two).items()}
        assert after["agent-1"] - before["agent-1"] + after["agent-2"] - before["agent-2"] == 10
        assert abs(after["agent-1"] - after["agent-2"]) <= abs(before["agent-1"] - before["agent-2"]) or \
            abs(after["agent-1"] - after["agent-2"]) <= 1
    finally:
        for c in held:
            c.close()


def stream_of_clients(port: int, seconds: float, rate: float, during=None) -> list[tuple[float, float, bool]]:
    """Short clients at `rate` a second for `seconds` (each on its own thread, bounded): (start, end, ok)."""
    results: list[tuple[float, float, bool]] = []
    lock = threading.Lock()

    def one() -> None:
        start = time.monotonic()
        try:
            good = ok(port)
        except OSError:
            good = False
        with lock:
            results.append((start, time.monotonic(), good))

    threads = []
    begin = time.monotonic()
    for i in range(int(seconds * rate)):
        delay = begin + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if during is not None:
            during(time.monotonic() - begin)
        t = threading.Thread(target=one, daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(30)
    return results


def test_an_agent_that_refuses_the_target_is_skipped_before_the_client_sees_anything(world, echo_target, tmp_path):
    world.start_server()
    agent1 = world.start_agent("agent-1")
    conf = tmp_path / "agent-2.conf"
    conf.write_text(f"[agent]\nallow = 127.0.0.1:{echo_target.port}\n")
    agent2 = world.start_agent("agent-2", "--config", str(conf))
    port = add(world, echo_target.port, ["agent-1", "agent-2"], "round-robin")
    switched: list[float] = []

    def refuse_at_3s(elapsed: float) -> None:
        if elapsed >= 3 and not switched:  # from now on agent-2 refuses the target (not in its allowlist)
            conf.write_text("[agent]\nallow = 127.0.0.1:1\n")
            agent2.signal(signal.SIGHUP)
            switched.append(time.monotonic())

    results = stream_of_clients(port, 8, 20, refuse_at_3s)
    assert len(results) == 160
    failed = [r for r in results if not r[2]]
    assert failed == [], f"{len(failed)} client(s) failed"
    rows = per_agent(world)
    assert rows["agent-2"]["state"] == "backing off" and rows["agent-2"]["backoff"] > 0, rows
    log = world.server.log()
    assert "agent agent-2 could not reach 127.0.0.1:" in log and "trying agent agent-1" in log
    table = world.ctl("proxy", "list", "--admin-socket", world.sock).stdout
    assert "proxy web (round-robin): agent-1 online" in table and "agent-2 backing off" in table, table
    agent1.stop()  # the only agent left refuses: now a client is refused, and counted as such
    wait_for(lambda: per_agent(world)["agent-1"]["state"] == "offline", 10, what="agent-1 offline")
    assert echo(port, b"ping") == b""
    proxy = next(p for p in world.api("GET", "/v1/proxies")["proxies"] if p["name"] == "web")
    assert proxy["rejected"].get("target_refused", 0) >= 1


def test_health_check_says_whether_a_proxy_can_serve(world, echo_target, tmp_path):
    token = tmp_path / "api.token"
    token.write_text("t" * 32 + "\n")
    token.chmod(0o600)
    rest = free_port(socket.AF_INET)
    conf = tmp_path / "anywhered.conf"
    conf.write_text(f"[server]\napi_listen = 127.0.0.1:{rest}\napi_token_file = {token}\nhealth_public = true\n")
    world.start_server("--config", str(conf))
    port = add(world, echo_target.port, ["agent-1", "agent-2"])
    url = f"http://127.0.0.1:{rest}/v1/proxies/web/health"
    res = requests.get(url, timeout=5)  # no token: health_public
    assert res.status_code == 503 and res.json() == {
        "proxy": "web", "status": "unavailable", "reason": "no agent can serve: agent-1 offline, agent-2 offline"}
    agent = world.start_agent("agent-2")
    res = requests.get(url, timeout=5)
    assert res.status_code == 200 and res.json() == {"proxy": "web", "status": "ok"}
    assert ok(port)
    assert requests.get(f"http://127.0.0.1:{rest}/v1/proxies", timeout=5).status_code == 401  # the rest needs it
    world.api("POST", "/v1/proxies/web/disable")
    res = requests.get(url, timeout=5)
    assert res.status_code == 503 and res.json()["reason"] == "proxy disabled"
    world.api("POST", "/v1/proxies/web/enable")
    agent.stop()
    wait_for(lambda: requests.get(url, timeout=5).status_code == 503, 10, what="503 once the agent is gone")
    assert requests.get(f"http://127.0.0.1:{rest}/v1/proxies/nosuch/health", timeout=5).status_code == 404


def test_several_agents_from_a_file_the_command_line_and_export(world, echo_target):
    os.makedirs(world.tmp / "proxies.d")
    world.proxies_dir = str(world.tmp / "proxies.d")
    filed = free_port()
    (world.tmp / "proxies.d" / "ha.conf").write_text(
        f"[ha]\nagents = agent-1, agent-2\nbalance = failover\nlocal_ip = 127.0.0.1\nlocal_port = {echo_target.port}\n"
        f"remote_port = {filed}\n")
    world.start_server()
    world.start_agent("agent-1")
    world.start_agent("agent-2")
    for _ in range(4):
        assert ok(filed)
    assert totals_of(world, "ha") == {"agent-1": 4, "agent-2": 0}
    cli = free_port()
    out = world.ctl("proxy", "add", "--agent-id", "agent-2,agent-1", "--balance", "round-robin", "--local-ip",
                    "127.0.0.1", "--local-port", str(echo_target.port), "--remote-port", str(cli), "--name", "cli",
                    "--admin-socket", world.sock).stdout
    assert "agent agent-2, agent-1" in out
    for _ in range(4):
        assert ok(cli)
    assert totals_of(world, "cli") == {"agent-2": 2, "agent-1": 2}
    text = world.ctl("proxy", "export", "cli", "--admin-socket", world.sock).stdout
    assert "agents = agent-2, agent-1\nbalance = round-robin\n" in text
    bad = world.ctl("proxy", "add", "--agent-id", "agent-1,agent-1", "--local-ip", "127.0.0.1", "--local-port", "80",
                    "--remote-port", str(free_port()), "--admin-socket", world.sock, check=False)
    assert bad.returncode == 1 and "agent_ids names an agent twice" in bad.stderr


def totals_of(world, name: str) -> dict[str, int]:
    return {a: row["connections_total"] for a, row in per_agent(world, name).items()}
