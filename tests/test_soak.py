"""Soak: a bounded run of mixed traffic with faults, then a leak check.

anywhered with two agents and an echo target.  For SOAK_SECONDS (default 90) seconds:

* CONCURRENCY workers open short tunneled connections one after the other (random payloads from
  1 byte to 1 MiB, half-closed, everything back, checked byte for byte);
* LONG_PER_AGENT long-lived connections per agent move random blocks continuously, each checked;
* every FAULT_EVERY seconds agent-2 (the "chaos" agent) is hit: in turn SIGTERM and restart,
  disconnect by the operator (POST /v1/agents/agent-2/disconnect), SIGKILL and restart.  Short
  connections avoid agent-2 while it is down; connections through agent-2 that were in flight
  when it was hit may end (counted as expected ends: they must have ended during a fault window,
  with every byte they did get uncorrupted).  Everything else must complete with matching bytes:
  agent-1's long-lived connections live through the whole soak.

At the end, after every client has closed and a short settle: anywhered's and agent-1's (which
lived through the whole soak) open descriptors and RSS are back at their level after warm-up,
within FD_MARGIN descriptors and RSS_MARGIN_MB.  Descriptors are compared net of the warm pool of
idle data connections (one descriptor each on either side), which legitimately grows with
concurrency up to pool_max and is drained only after pool_idle_timeout.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest

from conftest import TargetServer, echo_handler, wait_for
from procstat import fd_count, fd_kinds, rss_kb
from streams import EchoStream, one_shot

pytestmark = pytest.mark.slow

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "90"))
FAULT_EVERY = 15.0
CONCURRENCY = 20
LONG_PER_AGENT = 2
FD_MARGIN = 10
RSS_MARGIN_MB = 20
SETTLE = 10.0  # at most this long for every connection to end before the readings
SIZES = [1, 100, 1000, 4096, 16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024]
WEIGHTS = [10, 10, 10, 20, 20, 15, 10, 5]
V4 = "127.0.0.1"


class Faults:
    """Windows during which an agent is being hit, for judging the connections that ended then."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.down: set[str] = set()
        self.windows: list[tuple[str, float, float]] = []
        self.count = 0

    def begin(self, agent: str) -> float:
        with self.lock:
            self.down.add(agent)
            self.count += 1
        return time.monotonic()

    def end(self, agent: str, started: float) -> None:
        with self.lock:
            self.down.discard(agent)
            self.windows.append((agent, started, time.monotonic()))

    def is_down(self, agent: str) -> bool:
        with self.lock:
            return agent in self.down

    def covers(self, agent: str, start: float, end: float) -> bool:
        with self.lock:
            windows = list(self.windows)
            open_now = agent in self.down
        return open_now or any(a == agent and start <= w_end and end >= w_start for a, w_start, w_end in windows)


def readings(world, server, agent) -> dict:
    status = world.api("GET", "/v1/status")
    warm = {a["agent_id"]: a["warm"] for a in world.api("GET", "/v1/agents")["agents"]}
    return {"server_fds": fd_count(server.pid), "server_rss_kb": rss_kb(server.pid),
            "agent_fds": fd_count(agent.pid), "agent_rss_kb": rss_kb(agent.pid),
            "warm_total": status["warm_data_connections"], "warm_agent_1": warm.get("agent-1", 0),
            "connections": status["connections"], "pending": status["pending"]}


def test_soak(world):
    target = TargetServer(echo_handler)
    faults = Faults()
    stop = threading.Event()
    results: list[dict] = []
    results_lock = threading.Lock()
    longs: dict[str, list[EchoStream]] = {"agent-1": [], "agent-2": []}
    ended: list[EchoStream] = []  # long-lived connections through agent-2 that a fault ended
    try:
        # one source address opens thousands of connections a minute here: lift the per-source rate limit
        conf = world.tmp / "anywhered.conf"
        conf.write_text("[server]\nrate_limit = 0\n")
        server = world.start_server("--config", str(conf))
        agent1 = world.start_agent("agent-1")
        agent2 = world.start_agent("agent-2")
        for proc in (agent1, agent2):
            proc.wait_log("connected to server")
        ports = {"agent-1": world.add_proxy(target.port, agent_id="agent-1"),
                 "agent-2": world.add_proxy(target.port, agent_id="agent-2")}

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            deadline = time.monotonic() + SOAK_SECONDS + 60  # a hard bound besides `stop`
            while not stop.is_set() and time.monotonic() < deadline:
                agent = rng.choice(["agent-1", "agent-2"])
                if faults.is_down(agent):
                    agent = "agent-1"
                size = rng.choices(SIZES, WEIGHTS)[0]
                start = time.monotonic()
                r = one_shot(V4, ports[agent], size, timeout=20)
                r.update(agent=agent, start=start, end=time.monotonic())
                with results_lock:
                    results.append(r)

        # warm-up: the allocator, the pools and the code paths settle before the baseline
        for size in SIZES * 4:
            for agent in ("agent-1", "agent-2"):
                assert one_shot(V4, ports[agent], size)["ok"]
        wait_for(lambda: world.api("GET", "/v1/status")["connections"] == 0, SETTLE, what="the warm-up to end")
        time.sleep(1.0)
        before = readings(world, server, agent1)

        def new_long(agent: str, name: str) -> EchoStream:
            sock = socket.create_connection((V4, ports[agent]), timeout=10)
            return EchoStream(sock, name, block=32 * 1024, pace=0.02, max_seconds=SOAK_SECONDS + 120).start()

        for agent in ("agent-1", "agent-2"):
            longs[agent] = [new_long(agent, f"{agent}-long-{i}") for i in range(LONG_PER_AGENT)]
        workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(CONCURRENCY)]
        for t in workers:
            t.start()

        kinds = ["term-restart", "operator-disconnect", "kill-restart"]
        started = time.monotonic()
        next_fault = started + FAULT_EVERY
        while time.monotonic() < started + SOAK_SECONDS:
            time.sleep(0.2)
            for s in longs["agent-1"]:
                assert s.ended is None and s.corrupt is None, f"{s.name}: {s.ended or s.corrupt}"
            if time.monotonic() < next_fault or time.monotonic() > started + SOAK_SECONDS - 5:
                continue
            kind = kinds[(faults.count) % len(kinds)]
            since = [a["connected_since"] for a in world.api("GET", "/v1/agents")["agents"] if a["agent_id"] == "agent-2"]
            hit = faults.begin("agent-2")
            time.sleep(0.3)  # workers stop choosing agent-2 for new connections
            if kind == "operator-disconnect":
                world.api("POST", "/v1/agents/agent-2/disconnect")
            else:
                agent2.stop() if kind == "term-restart" else agent2.kill()
                agent2 = world.start_agent("agent-2", wait=False)
            wait_for(lambda: [a["connected_since"] for a in world.api("GET", "/v1/agents")["agents"]
                              if a["agent_id"] == "agent-2"] not in ([], since), 40,
                     what=f"agent-2 to come back after {kind}:\n{agent2.log()[-3000:]}")
            agent2.wait_log("connected to server", timeout=10)
            time.sleep(0.5)
            faults.end("agent-2", hit)
            # long-lived connections through agent-2 that ended are replaced
            for i, s in enumerate(longs["agent-2"]):
                if s.ended:
                    s.finish()
                    ended.append(s)
                    longs["agent-2"][i] = new_long("agent-2", f"agent-2-long-{i}-{faults.count}")
            next_fault = time.monotonic() + FAULT_EVERY
        stop.set()
        for t in workers:
            t.join(60)
        assert not any(t.is_alive() for t in workers), "a worker did not stop"
        current = longs["agent-1"] + longs["agent-2"]
        for s in current:
            s.finish()

        # judge the traffic
        bad_short = [r for r in results if not r["ok"] and not (r["agent"] == "agent-2"
                                                                and faults.covers("agent-2", r["start"], r["end"]))]
        corrupt_short = [r for r in results if not r["prefix"]]
        expected_short = [r for r in results if not r["ok"] and r not in bad_short]
        assert not corrupt_short, corrupt_short[:5]
        assert not bad_short, f"{len(bad_short)} short connection(s) failed outside a fault: {bad_short[:5]}"
        for s in longs["agent-1"]:
            assert s.ended is None and s.corrupt is None and s.clean_close, (s.name, s.ended, s.corrupt)
        for s in longs["agent-2"]:
            assert s.corrupt is None, s.corrupt
            if s.ended:  # ended at the very end by a fault? only inside a window (plus promptness)
                assert faults.covers("agent-2", s.ended_at - 3, s.ended_at), (s.name, s.ended)
            else:
                assert s.clean_close, s.name
        for s in ended:
            assert s.corrupt is None, s.corrupt
            assert faults.covers("agent-2", s.ended_at - 3, s.ended_at), (s.name, s.ended)
        assert len(results) > 100, f"only {len(results)} short connections in {SOAK_SECONDS} s"

        # the leak check
        wait_for(lambda: (lambda st: st["connections"] == 0 and st["pending"] == 0)(world.api("GET", "/v1/status")),
                 SETTLE, what="every connection to end")
        time.sleep(2.0)
        after = readings(world, server, agent1)
        server_fd_growth = (after["server_fds"] - after["warm_total"]) - (before["server_fds"] - before["warm_total"])
        agent_fd_growth = (after["agent_fds"] - after["warm_agent_1"]) - (before["agent_fds"] - before["warm_agent_1"])
        server_rss_growth = (after["server_rss_kb"] - before["server_rss_kb"]) / 1024
        agent_rss_growth = (after["agent_rss_kb"] - before["agent_rss_kb"]) / 1024

        ok_short = [r for r in results if r["ok"]]
        all_long = current + ended
        bytes_checked = sum(r["size"] for r in ok_short) + sum(r["received"] for r in expected_short) \
            + sum(s.bytes_checked for s in all_long)
        print(f"\nsoak {SOAK_SECONDS:.0f} s: {len(results) + len(all_long)} connections handled "
              f"({len(results)} short, {len(all_long)} long-lived), {faults.count} faults injected on agent-2, "
              f"{len(expected_short)} short and {len(ended)} long connection(s) ended by a fault as expected, "
              f"{bytes_checked} bytes checked (echoed round trips), 0 mismatches")
        print(f"  anywhered: fds {before['server_fds']} → {after['server_fds']} (warm pool {before['warm_total']} → "
              f"{after['warm_total']}; net growth {server_fd_growth:+d}), RSS {before['server_rss_kb'] / 1024:.1f} → "
              f"{after['server_rss_kb'] / 1024:.1f} MB ({server_rss_growth:+.1f} MB)")
        print(f"  agent-1:   fds {before['agent_fds']} → {after['agent_fds']} (warm {before['warm_agent_1']} → "
              f"{after['warm_agent_1']}; net growth {agent_fd_growth:+d}), RSS {before['agent_rss_kb'] / 1024:.1f} → "
              f"{after['agent_rss_kb'] / 1024:.1f} MB ({agent_rss_growth:+.1f} MB)")
        pool_bound = 2 * (8 + CONCURRENCY + LONG_PER_AGENT) + 4  # pool_size + peak concurrency, per agent
        assert after["warm_total"] <= pool_bound, f"{after['warm_total']} idle data connections kept (bound {pool_bound})"
        assert server_fd_growth <= FD_MARGIN, f"anywhered: {server_fd_growth:+d} fds net of the pool: {fd_kinds(server.pid)}"
        assert agent_fd_growth <= FD_MARGIN, f"agent-1: {agent_fd_growth:+d} fds net of the pool: {fd_kinds(agent1.pid)}"
        assert server_rss_growth <= RSS_MARGIN_MB, f"anywhered RSS grew by {server_rss_growth:.1f} MB"
        assert agent_rss_growth <= RSS_MARGIN_MB, f"agent-1 RSS grew by {agent_rss_growth:.1f} MB"
        for proc in world.procs:
            text = proc.log_path.read_text(errors="replace")  # stopped ones too
            assert "Traceback" not in text, f"{proc.log_path.name}:\n{text[-5000:]}"
    finally:
        stop.set()
        for s in longs["agent-1"] + longs["agent-2"] + ended:
            if s.thread.is_alive() or s.sock.fileno() != -1:
                try:
                    s.finish(timeout=2)
                except (AssertionError, OSError):
                    s.sock.close()
        target.stop()
