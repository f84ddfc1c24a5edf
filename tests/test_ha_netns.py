"""No single point of failure (issue 17), on a LAN of network namespaces (nslan.py): real
anywhered, agent, target and HAProxy processes, each host with its own address and loopback.

* Two agents behind one proxy, each reaching its own target on its own host's loopback, while
  short clients arrive 20 a second from another host: one agent SIGKILLed mid-run fails no client
  that had not reached it yet, and takes its share again once restarted; then that agent's target
  refusing connections (killed) fails no client at all: each is sent to the other agent before it
  has received a byte.
* HAProxy (Debian's, in TCP mode, etc/examples/haproxy.cfg with this LAN's addresses) in front of
  two anywhered with the same proxies.d, one agent on both (`-s A,B`): server A SIGKILLed during a
  stream of clients through HAProxy fails only the clients in flight at the kill; the restarted A
  answers its health check with 503 until the agent is back, then takes traffic again.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from anywhere import credentials
from anywhere.ctl import Client
from conftest import Proc, wait_for
from nslan import Lan, lan

ROOT = Path(__file__).resolve().parent.parent
AGENT_PORT, REST_PORT, WEB_PORT, TARGET_PORT, FRONT_PORT = 1111, 1112, 8080, 7000, 9000
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


class Servers:
    """anywhered on hosts of the LAN, with one proxies.d for all (as configuration management makes it)."""

    def __init__(self, net: Lan, tmp: Path, hosts: list[str], agents: list[str], proxy: str) -> None:
        self.net, self.tmp = net, tmp
        self.cred = tmp / "credential"
        credentials.init(str(self.cred), "server.test", [net.ip[h] for h in hosts])
        for agent in agents:
            credentials.issue(agent, str(self.cred))
        (tmp / "proxies.d").mkdir()
        (tmp / "proxies.d" / "web.conf").write_text(proxy)
        token = tmp / "api.token"
        token.write_text(secrets.token_hex(16) + "\n")
        token.chmod(0o600)
        self.procs: dict[str, Proc] = {}
        self.runs: dict[str, int] = {}
        for host in hosts:
            (tmp / host).mkdir()
            (tmp / host / "anywhered.conf").write_text(
                f"[server]\nport = {AGENT_PORT}\nca = {self.cred / 'ca.crt'}\ncert = {self.cred / 'server.crt'}\n"
                f"key = {self.cred / 'server.key'}\nadmin_socket = {tmp / host / 'anywhered.sock'}\n"
                f"state_dir = {tmp / host / 'state'}\nproxies_dir = {tmp / 'proxies.d'}\n"
                f"api_listen = {net.ip[host]}:{REST_PORT}\napi_token_file = {token}\nhealth_public = true\n"
                "heartbeat = 1\nlog_level = debug\n")

    def start(self, host: str) -> Proc:
        self.runs[host] = self.runs.get(host, 0) + 1
        proc = self.net.start(host, [sys.executable, "-m", "anywhere.server_cli", "start", "--config",
                                     str(self.tmp / host / "anywhered.conf")], f"server-{host}-{self.runs[host]}")
        proc.wait_log("listening for agents")
        self.procs[host] = proc
        return proc

    def api(self, host: str, method: str, path: str):
        return Client(str(self.tmp / host / "anywhered.sock")).call(method, path)

    def agents(self, host: str) -> dict[str, dict]:
        proxy = next(p for p in self.api(host, "GET", "/v1/proxies")["proxies"] if p["name"] == "web")
        return {a["agent_id"]: a for a in proxy["agents"]}

    def agent(self, host: str, agent_id: str, servers: list[str]) -> Proc:
        cred = self.cred
        return self.net.start(host, [
            sys.executable, "-m", "anywhere.agent_cli", "-i", agent_id, "-s", ",".join(self.net.ip[s] for s in servers),
            "-p", str(AGENT_PORT), "--ca", str(cred / "ca.crt"), "--cert", str(cred / f"{agent_id}.crt"),
            "--key", str(cred / f"{agent_id}.key"), "--log-level", "debug"], f"{agent_id}-{time.monotonic_ns()}")


def one_client(net: Lan, host: str, address: str, port: int) -> bool:
    """A short client from `host`: 64 bytes there and back, then closed; False on any failure."""
    data = secrets.token_bytes(64)
    try:
        with net.connect(host, address, port) as c:
            c.sendall(data)
            c.shutdown(1)
            got = b""
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    break
                got += chunk
            return got == data
    except OSError:
        return False


def stream_of_clients(net: Lan, host: str, address: str, port: int, seconds: float, rate: float,
                      at: float, action) -> tuple[list[tuple[float, float, bool]], float]:
    """Short clients at `rate` a second for `seconds` (a thread each, bounded); `action` runs once
    at `at` seconds.  Returns (start, end, ok) of each, and when the action ran."""
    results: list[tuple[float, float, bool]] = []
    lock = threading.Lock()

    def one() -> None:
        start = time.monotonic()
        good = one_client(net, host, address, port)
        with lock:
            results.append((start, time.monotonic(), good))

    threads, acted, begin = [], 0.0, time.monotonic()
    for i in range(int(seconds * rate)):
        delay = begin + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if not acted and time.monotonic() - begin >= at:
            action()
            acted = time.monotonic()
        t = threading.Thread(target=one, daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(30)
    return results, acted


def test_two_agents_behind_one_proxy_one_killed_then_its_target_refusing(tmp_path):
    with lan(tmp_path, "ha1", "10.234.61", ["srv", "agt1", "agt2", "edge"]) as net:
        servers = Servers(net, tmp_path, ["srv"], ["agent-1", "agent-2"],
                          f"[web]\nagents = agent-1, agent-2\nbalance = round-robin\nlocal_ip = 127.0.0.1\n"
                          f"local_port = {TARGET_PORT}\nremote_port = {WEB_PORT}\n")
        servers.start("srv")
        targets = {a: net.echo_target(h, TARGET_PORT, f"target-{a}") for a, h in (("agent-1", "agt1"),
                                                                                  ("agent-2", "agt2"))}
        agents = {a: servers.agent(h, a, ["srv"]) for a, h in (("agent-1", "agt1"), ("agent-2", "agt2"))}
        wait_for(lambda: all(r["state"] == "online" for r in servers.agents("srv").values()), 20, what="both agents")
        srv = net.ip["srv"]
        assert all(one_client(net, "edge", srv, WEB_PORT) for _ in range(10))

        # agent-2 SIGKILLed mid-run
        results, killed = stream_of_clients(net, "edge", srv, WEB_PORT, 8, 20, 3, agents["agent-2"].kill)
        failed = [r for r in results if not r[2]]
        assert len(results) == 160
        assert [r for r in failed if r[0] >= killed] == [], "a client that came after the kill failed"
        assert all(start <= killed <= end for start, end, _ in failed) and len(failed) <= 5, failed
        print(f"\n160 clients, agent-2 SIGKILLed at 3 s: {len(failed)} failed (in flight at the kill)")
        wait_for(lambda: servers.agents("srv")["agent-2"]["state"] == "offline", 10, what="agent-2 offline")

        # restarted: its share again
        agents["agent-2"] = servers.agent("agt2", "agent-2", ["srv"])
        wait_for(lambda: servers.agents("srv")["agent-2"]["state"] == "online", 20, what="agent-2 back")
        before = {a: r["connections_total"] for a, r in servers.agents("srv").items()}
        assert all(one_client(net, "edge", srv, WEB_PORT) for _ in range(20))
        after = {a: r["connections_total"] for a, r in servers.agents("srv").items()}
        assert {a: after[a] - before[a] for a in after} == {"agent-1": 10, "agent-2": 10}

        # agent-2's target refuses connections from 3 s on: no client fails at all
        results, _ = stream_of_clients(net, "edge", srv, WEB_PORT, 8, 20, 3, targets["agent-2"].kill)
        failed = [r for r in results if not r[2]]
        assert len(results) == 160 and failed == [], f"{len(failed)} client(s) failed"
        rows = servers.agents("srv")
        assert rows["agent-2"]["state"] == "backing off", rows
        log = servers.procs["srv"].log()
        assert "agent agent-2 could not reach 127.0.0.1:7000" in log and "trying agent agent-1" in log
        print(f"160 clients, agent-2's target refusing from 3 s: 0 failed; agent-2 {rows['agent-2']}")


def haproxy_config(net: Lan) -> str:
    """etc/examples/haproxy.cfg with this LAN's addresses and ports (no syslog, no comments)."""
    text = (ROOT / "etc" / "examples" / "haproxy.cfg").read_text()
    text = re.sub(r"(?m)^\s*log .*\n", "", text)
    text = re.sub(r"(?m)^#.*\n", "", text)
    text = text.replace("bind :8080", f"bind 127.0.0.1:{FRONT_PORT}")
    text = text.replace("check port 1112", f"check port {REST_PORT}")
    text = text.replace("server a a.example.net:8080", f"server a {net.ip['a']}:{WEB_PORT}")
    text = text.replace("server b b.example.net:8080", f"server b {net.ip['b']}:{WEB_PORT}")
    assert "example.net" not in text
    return text


def health(net: Lan, host: str) -> int:
    """The status of GET /v1/proxies/web/health on `host`'s REST port, asked from the edge host."""
    try:
        with net.connect("edge", net.ip[host], REST_PORT) as c:
            c.sendall(b"GET /v1/proxies/web/health HTTP/1.0\r\n\r\n")
            head = c.recv(1024)
    except OSError:
        return 0
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return int(match.group(1)) if match else 0


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make system-deps installs it)")
def test_haproxy_in_front_of_two_servers_one_killed(tmp_path):
    with lan(tmp_path, "ha2", "10.234.62", ["a", "b", "agt", "edge"]) as net:
        servers = Servers(net, tmp_path, ["a", "b"], ["agent-1"],
                          f"[web]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = {TARGET_PORT}\n"
                          f"remote_port = {WEB_PORT}\n")
        servers.start("a")
        servers.start("b")
        net.echo_target("agt", TARGET_PORT, "target")
        servers.agent("agt", "agent-1", ["a", "b"])  # one agent on both servers
        (tmp_path / "haproxy.cfg").write_text(haproxy_config(net))
        check = Proc([HAPROXY, "-c", "-f", str(tmp_path / "haproxy.cfg")], tmp_path / "haproxy-check.log")
        assert check.popen.wait(30) == 0, check.log()
        net.start("edge", [HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")], "haproxy")
        for host in ("a", "b"):
            wait_for(lambda h=host: health(net, h) == 200, 20, what=f"web on server {host} healthy")
        time.sleep(2.5)  # HAProxy's checks (rise 2, every second) have seen both up
        front = ("edge", "127.0.0.1", FRONT_PORT)
        assert all(one_client(net, *front) for _ in range(20))
        served = lambda h: next(p["connections_total"] for p in servers.api(h, "GET", "/v1/proxies")["proxies"])  # noqa: E731
        assert served("a") > 0 and served("b") > 0, "HAProxy sends clients to both servers"

        results, killed = stream_of_clients(net, *front, 10, 20, 4, servers.procs["a"].kill)
        failed = [r for r in results if not r[2]]
        assert len(results) == 200
        assert [r for r in failed if r[0] > killed] == [], "a client that came after the kill failed"
        assert all(start <= killed <= end for start, end, _ in failed) and len(failed) <= 5, failed
        print(f"\n200 clients through HAProxy, server A SIGKILLed at 4 s: {len(failed)} failed (in flight)")

        served_b = served("b")
        servers.start("a")
        restarted, first = time.monotonic(), health(net, "a")
        wait_for(lambda: health(net, "a") == 200, 40, what="the agent back on the restarted server")
        print(f"restarted A: health {first} at once, 200 after {time.monotonic() - restarted:.1f} s")
        time.sleep(2.5)  # HAProxy's rise
        assert all(one_client(net, *front) for _ in range(20))
        assert served("a") > 0 and served("b") > served_b, "the restarted server takes traffic again"
