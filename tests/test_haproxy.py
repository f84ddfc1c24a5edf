"""Several servers in front of users (issue 17): HAProxy (Debian's haproxy) in TCP mode in front of
two anywhered with the same proxies.d, one agent on both, health-checked on the REST port with
`GET /v1/proxies/web/health` — the configuration is etc/examples/haproxy.cfg itself, with this
test's addresses and ports put in.

Server A listens on 127.0.0.2, server B on 127.0.0.3 (agent port, proxy port and REST port each),
HAProxy on 127.0.0.1; one agent (`-s 127.0.0.2:PA,127.0.0.3:PB`) serves both.  A steady stream of
short clients goes through HAProxy while A is SIGKILLed: only the clients in flight at the kill may
fail; every later one succeeds; the restarted A takes traffic again once its agent is back (its
health check answers 503 until then).  Skipped, with the reason, without haproxy.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import PY, Client, Proc, echo, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (make system-deps installs it)")


class Server:
    """One anywhered on its own loopback address, from a configuration file."""

    def __init__(self, tmp: Path, creds, address: str, proxies_dir: Path, token: Path, web_port: int,
                 rest: int) -> None:
        self.tmp, self.address, self.rest, self.web_port = tmp, address, rest, web_port
        tmp.mkdir()
        self.port = free_port(socket.AF_INET)
        self.sock = str(tmp / "anywhered.sock")
        self.config = tmp / "anywhered.conf"
        self.config.write_text(
            f"[server]\nport = {self.port}\nbind = {address}\nproxy_bind = {address}\n"
            f"ca = {creds.ca}\ncert = {creds.server_cert}\nkey = {creds.server_key}\n"
            f"admin_socket = {self.sock}\nstate_dir = {tmp / 'state'}\nproxies_dir = {proxies_dir}\n"
            f"api_listen = {address}:{rest}\napi_token_file = {token}\nhealth_public = true\n"
            "heartbeat = 1\nlog_level = debug\n")
        self.proc: Proc | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        self.proc = Proc([PY, "-m", "anywhere.server_cli", "start", "--config", str(self.config)],
                         self.tmp / f"server{self.runs}.log")
        self.proc.wait_log("listening for agents")

    def health(self) -> int:
        try:
            return requests.get(f"http://{self.address}:{self.rest}/v1/proxies/web/health", timeout=5).status_code
        except requests.ConnectionError:
            return 0

    def served(self) -> int:
        proxies = Client(self.sock).call("GET", "/v1/proxies")["proxies"]
        return next(p["connections_total"] for p in proxies if p["name"] == "web")


def haproxy_config(front: int, servers: list[Server], rest: int) -> str:
    """etc/examples/haproxy.cfg with this test's addresses and ports (and no syslog)."""
    text = (ROOT / "etc" / "examples" / "haproxy.cfg").read_text()
    text = re.sub(r"(?m)^\s*log .*\n", "", text)
    text = re.sub(r"(?m)^#.*\n", "", text)  # the comments name example hosts
    text = text.replace("bind :8080", f"bind 127.0.0.1:{front}")
    text = text.replace("check port 1112", f"check port {rest}")
    text = text.replace("server a a.example.net:8080", f"server a {servers[0].address}:{servers[0].web_port}")
    text = text.replace("server b b.example.net:8080", f"server b {servers[1].address}:{servers[1].web_port}")
    assert "example.net" not in text and f"127.0.0.1:{front}" in text
    return text


def client(port: int) -> bool:
    data = secrets.token_bytes(64)
    try:
        return echo(port, data) == data
    except OSError:
        return False


@pytest.fixture
def farm(tmp_path, creds, echo_target):
    web_port, rest, front = free_port(socket.AF_INET), free_port(socket.AF_INET), free_port(socket.AF_INET)
    proxies = tmp_path / "proxies.d"  # the same file for both servers, as configuration management makes it
    proxies.mkdir()
    (proxies / "web.conf").write_text(f"[web]\nagent = agent-1\nlocal_ip = 127.0.0.1\n"
                                      f"local_port = {echo_target.port}\nremote_port = {web_port}\n")
    token = tmp_path / "api.token"
    token.write_text(secrets.token_hex(16) + "\n")
    token.chmod(0o600)
    servers = [Server(tmp_path / name, creds, address, proxies, token, web_port, rest)
               for name, address in (("a", "127.0.0.2"), ("b", "127.0.0.3"))]
    procs: list[Proc] = []
    try:
        for server in servers:
            server.start()
        crt, key = creds.agent("agent-1")
        agent = Proc([PY, "-m", "anywhere.agent_cli", "-i", "agent-1", "-s",
                      ",".join(f"{s.address}:{s.port}" for s in servers), "--server-name", "localhost",
                      "--ca", str(creds.ca), "--cert", str(crt), "--key", str(key), "--log-level", "debug"],
                     tmp_path / "agent.log")
        procs.append(agent)
        (tmp_path / "haproxy.cfg").write_text(haproxy_config(front, servers, rest))
        check = Proc([HAPROXY, "-c", "-f", str(tmp_path / "haproxy.cfg")], tmp_path / "haproxy-check.log")
        assert check.popen.wait(30) == 0, check.log()
        haproxy = Proc([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")], tmp_path / "haproxy.log")
        procs.append(haproxy)
        for server in servers:
            wait_for(lambda s=server: s.health() == 200, 20, what=f"the proxy on {server.address} to be healthy")
        yield servers, front
    finally:
        for proc in reversed(procs):
            proc.stop()
        for server in servers:
            if server.proc is not None:
                server.proc.stop()


def test_a_server_killed_behind_haproxy_fails_only_the_clients_in_flight(farm):
    servers, front = farm
    a, b = servers
    time.sleep(2.5)  # HAProxy's checks (rise 2, every second) have seen both servers up
    assert all(client(front) for _ in range(20))
    assert a.served() > 0 and b.served() > 0, "HAProxy sends clients to both servers"

    results: list[tuple[float, float, bool]] = []
    lock = threading.Lock()
    killed: list[float] = []

    def one() -> None:
        start = time.monotonic()
        good = client(front)
        with lock:
            results.append((start, time.monotonic(), good))

    threads, begin = [], time.monotonic()
    for i in range(200):  # 20 a second for 10 s; A SIGKILLed at 4 s
        delay = begin + i / 20 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if not killed and time.monotonic() - begin >= 4:
            a.proc.kill()
            killed.append(time.monotonic())
        t = threading.Thread(target=one, daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(30)
    assert len(results) == 200
    failed = [r for r in results if not r[2]]
    assert all(start <= killed[0] <= end for start, end, _ in failed), \
        f"clients that were not in flight at the kill failed: {[r for r in failed if r[0] > killed[0]]}"
    assert len(failed) <= 5, failed
    print(f"\n200 clients through HAProxy, server A SIGKILLed at 4 s: {len(failed)} failed (in flight at the kill)")

    # A restarted: its share again once its agent is back
    served_b = b.served()
    a.start()
    restarted = time.monotonic()
    first = a.health()
    wait_for(lambda: a.health() == 200, 40, what="the agent to come back to the restarted server")
    print(f"restarted A: health {first} at once, 200 after {time.monotonic() - restarted:.1f} s")
    time.sleep(2.5)  # HAProxy's rise
    assert all(client(front) for _ in range(20))
    assert a.served() > 0, "the restarted server takes traffic again"
    assert b.served() > served_b
