"""The agent against a changing or misbehaving server: DNS changes, a server that never speaks TLS,
and a backoff that spreads reconnecting agents out."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess

import pytest

from anywhere import credentials
from anywhere.agent import backoff_delay
from conftest import PY, Proc, wait_for


def test_backoff_is_exponential_jittered_and_bounded():
    for failures, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (50, 30.0)):
        delays = [backoff_delay(failures, 1.0, 30.0) for _ in range(2000)]
        assert min(delays) >= max(1.0, ceiling / 2) - 1e-9 and max(delays) <= ceiling + 1e-9
        if ceiling >= 4:
            # a thousand agents restarting together spread over half the interval, not in lock-step
            assert statistics.pstdev(delays) > ceiling / 10
            assert len({round(d, 3) for d in delays}) > 1000


def test_server_that_accepts_tcp_but_never_answers_tls(world, creds):
    """The agent gives up on the handshake after handshake_timeout and tries again later."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    crt, key = creds.agent("agent-1")
    conf = world.tmp / "agent-1.conf"
    conf.write_text(f"[agent]\nserver = 127.0.0.1\nserver_port = {port}\nhandshake_timeout = 1\nca = {creds.ca}\n"
                    f"cert = {crt}\nkey = {key}\nallow = *\n")
    agent = Proc([PY, "-m", "anywhere.agent_cli", "--config", str(conf), "--log-level", "debug"], world.tmp / "agent.log")
    world.procs.append(agent)
    try:
        agent.wait_log("TLS handshake timed out", timeout=6)
        agent.wait_log("retrying in", timeout=3)
        assert agent.alive()
    finally:
        silent.close()


NETNS = shutil.which("ip") is not None and os.geteuid() == 0


@pytest.mark.netns
def test_dns_change_of_the_server_name_is_picked_up_on_reconnect(tmp_path):
    """The agent resolves the server's name on every attempt: when the name moves to another
    address (the server restarted elsewhere), the agent follows.  Name resolution inside a network
    namespace reads /etc/netns/NS/hosts (ip netns exec bind-mounts it over /etc/hosts)."""
    if not NETNS:
        pytest.skip("needs root and iproute2 to build network namespaces")
    tag = f"aw{os.getpid() % 100000}"
    srv, agt = f"{tag}-dsrv", f"{tag}-dagt"
    hosts_dir = f"/etc/netns/{agt}"
    procs: list[subprocess.Popen] = []

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, timeout=20)
    try:
        for ns in (srv, agt):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"{tag}a", "netns", srv, "type", "veth", "peer", "name", f"{tag}b", "netns", agt)
        sh("ip", "-n", srv, "addr", "add", "10.232.0.1/24", "dev", f"{tag}a")
        sh("ip", "-n", srv, "addr", "add", "10.232.0.2/24", "dev", f"{tag}a")
        sh("ip", "-n", agt, "addr", "add", "10.232.0.10/24", "dev", f"{tag}b")
        sh("ip", "-n", srv, "link", "set", f"{tag}a", "up")
        sh("ip", "-n", agt, "link", "set", f"{tag}b", "up")
        os.makedirs(hosts_dir, exist_ok=True)
        with open(f"{hosts_dir}/hosts", "w") as f:
            f.write("127.0.0.1 localhost\n10.232.0.1 tunnel.test\n")
        cred = tmp_path / "credential"
        credentials.init(str(cred), "tunnel.test", ["10.232.0.1", "10.232.0.2"])
        credentials.issue("agent-1", str(cred))
        port = 1111

        def server(address: str, n: int) -> tuple[subprocess.Popen, str]:
            sock = str(tmp_path / f"s{n}.sock")
            log = open(tmp_path / f"server{n}.log", "wb")
            p = subprocess.Popen(["ip", "netns", "exec", srv, PY, "-m", "anywhere.server_cli", "start", "-p", str(port),
                                  "--bind", address, "--ca", str(cred / "ca.crt"), "--cert", str(cred / "server.crt"),
                                  "--key", str(cred / "server.key"), "--admin-socket", sock,
                                  "--state-dir", str(tmp_path / f"state{n}"), "--heartbeat", "0.5"],
                                 stdout=log, stderr=subprocess.STDOUT)
            procs.append(p)
            wait_for(lambda: os.path.exists(sock), 15, what="the server's admin socket")
            return p, sock

        from anywhere.ctl import Client
        first, sock1 = server("10.232.0.1", 1)
        agent_log = open(tmp_path / "agent.log", "wb")
        agent = subprocess.Popen(["ip", "netns", "exec", agt, PY, "-m", "anywhere.agent_cli", "-i", "agent-1",
                                  "-s", "tunnel.test", "-p", str(port), "--ca", str(cred / "ca.crt"),
                                  "--cert", str(cred / "agent-1.crt"), "--key", str(cred / "agent-1.key")],
                                 stdout=agent_log, stderr=subprocess.STDOUT)
        procs.append(agent)
        wait_for(lambda: Client(sock1).call("GET", "/v1/agents")["agents"], 15, what="the agent on the first address")

        # the name moves; the old server goes away; a new one listens on the new address only
        with open(f"{hosts_dir}/hosts", "w") as f:
            f.write("127.0.0.1 localhost\n10.232.0.2 tunnel.test\n")
        first.terminate()
        first.wait(10)
        _, sock2 = server("10.232.0.2", 2)
        wait_for(lambda: Client(sock2).call("GET", "/v1/agents")["agents"], 20,
                 what="the agent to follow the name to the new address")
        [agent_info] = Client(sock2).call("GET", "/v1/agents")["agents"]
        assert agent_info["address"].startswith("10.232.0.10:")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for ns in (srv, agt):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        shutil.rmtree(hosts_dir, ignore_errors=True)


def test_a_trunk_whose_set_up_failed_is_opened_again(world, tmp_path):
    """A server that takes one handshake at a time (max_unauthenticated = 1) refuses the second of
    the two trunks the agent opens at once after its welcome: the agent opens it again at its next
    liveness check (heartbeat 1 s), instead of staying a trunk short until something else refills."""
    conf = tmp_path / "anywhered.conf"
    conf.write_text("[server]\nmax_unauthenticated = 1\nheartbeat = 1\ntrunk_idle_timeout = 0\n")
    world.start_server("--config", str(conf))
    agent = world.start_agent("agent-1")

    def trunks() -> int:
        return next(a["trunks"] for a in world.api("GET", "/v1/agents")["agents"] if a["agent_id"] == "agent-1")

    wait_for(lambda: "trunk set-up failed" in agent.log(), 10, what="the second trunk refused")
    wait_for(lambda: trunks() == 2, 10, what=f"the refused trunk opened again:\n{agent.log()[-2000:]}")
