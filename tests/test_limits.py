"""Least privilege and limits: the agent's allowlist, revoked certificates, who may use the admin
socket, every connection limit biting (logged and counted), and running out of file descriptors."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509

from conftest import PY, Proc, TargetServer, echo, echo_handler, free_port, log_lines, recv_all, wait_for, wait_log_line




def rejected(world, port: int) -> dict:
    return next(p for p in world.api("GET", "/v1/proxies")["proxies"] if p["remote_port"] == port)["rejected"]


# -- the agent's allowlist ------------------------------------------------------------------------------
def test_agent_allowlist_refuses_targets_outside_it(world, echo_target):
    other = TargetServer(echo_handler)
    try:
        world.start_server()
        agent = world.start_agent("agent-1", "--allow", f"127.0.0.1:{echo_target.port}")
        allowed = world.add_proxy(echo_target.port)
        outside = world.add_proxy(other.port)  # the server asks; the agent refuses
        assert echo(allowed, b"in") == b"in"
        started = time.monotonic()
        assert echo(outside, b"out") == b""
        assert time.monotonic() - started < 1.0  # refused at once, not after the data timeout
        assert other.conns == []  # the target outside the list was never dialled
        agent.wait_log(f"127.0.0.1:{other.port} is not in this agent's allowlist")
        world.server.wait_log(f"could not reach 127.0.0.1:{other.port}")
        assert rejected(world, outside)["target_refused"] == 1
    finally:
        other.stop()


def test_allowlist_by_name_and_by_network(world, echo_target):
    world.start_server()
    world.start_agent("agent-1", "--allow", f"localhost:{echo_target.port},127.0.0.0/8:{echo_target.port + 0}")
    by_name = world.add_proxy(echo_target.port, local_ip="localhost")
    assert echo(by_name, b"name") == b"name"
    by_ip = world.add_proxy(echo_target.port, local_ip="127.0.0.1")
    assert echo(by_ip, b"net") == b"net"


def test_a_name_cannot_reach_an_address_outside_the_list(world, echo_target):
    """allow = ::1 only: 'localhost' resolves to 127.0.0.1 too, which must not be dialled."""
    world.start_server()
    agent = world.start_agent("agent-1", "--allow", "::1")
    port = world.add_proxy(echo_target.port, local_ip="localhost")  # the target listens on 127.0.0.1 only
    assert echo(port, b"x") == b""
    assert echo_target.conns == []
    agent.wait_log("cannot reach localhost")


def test_agent_config_without_allow_refuses_everything(world, echo_target, creds):
    world.start_server()
    crt, key = creds.agent("agent-1")
    conf = world.tmp / "agent-1.conf"
    conf.write_text(f"[agent]\nserver = 127.0.0.1\nserver_port = {world.port}\nca = {creds.ca}\ncert = {crt}\nkey = {key}\n")
    agent = world.start_agent("agent-1", "--config", str(conf))
    agent.wait_log("allow is empty: this agent refuses every target")
    port = world.add_proxy(echo_target.port)
    assert echo(port) == b""
    assert echo_target.conns == []


# -- revocation -------------------------------------------------------------------------------------------
def _serial(cert_path) -> str:
    return format(x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number, "X")


def test_denied_agent_is_refused_and_reload_drops_a_connected_one(world, echo_target, creds):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\ndeny = agent-2\n")
    server = world.start_server("--config", str(conf))
    denied = world.start_agent("agent-2", wait=False)
    denied.wait_log("revoked on this server")
    server.wait_log("agent agent-2 is denied")
    assert [a["agent_id"] for a in world.api("GET", "/v1/agents")["agents"]] == []

    world.start_agent("agent-1")
    port = world.add_proxy(echo_target.port)
    live = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        live.sendall(b"a")
        assert live.recv(1) == b"a"
        serial = _serial(creds.agent("agent-1")[0])
        conf.write_text(f"[server]\ndeny = agent-2, serial:{serial}\n")
        assert "changed deny" in world.ctl("reload", "--admin-socket", world.sock).stdout
        assert recv_all(live, 5) == b""  # its connections went with it
        server.wait_log(f"certificate serial {serial} in deny")
        wait_for(lambda: world.api("GET", "/v1/agents")["agents"] == [], 5, what="agent-1 to be dropped")
        time.sleep(2.5)  # it keeps trying (with backoff) and keeps being refused
        assert world.api("GET", "/v1/agents")["agents"] == []
    finally:
        live.close()


# -- the admin socket's callers -------------------------------------------------------------------------
# A client with nothing but the standard library, run as another user: that user may not be able
# to read this checkout or its venv (a private temporary directory), and only the daemon's own
# check of the caller is under test here.
_STATUS_AS_CALLER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(1.0)
try:
    data = s.recv(65536)  # a refused caller is answered at once, before it says anything
except socket.timeout:
    data = b""
    s.sendall(b"GET /v1/status HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
s.settimeout(10)
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode("utf-8", "replace"))
"""


def _as(uid: int, gid: int, groups: list[int], sock: str) -> str:
    """GET /v1/status on the admin socket as uid/gid/groups; the raw HTTP answer."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    cmd = [setpriv, f"--reuid={uid}", f"--regid={gid}"]
    cmd += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    python = os.path.realpath(sys.executable)  # outside the checkout, which may be private
    res = subprocess.run(cmd + [python, "-I", "-S", "-c", _STATUS_AS_CALLER, sock], capture_output=True,
                         text=True, timeout=30, cwd="/")
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_admin_socket_refuses_users_outside_the_group(world):
    if os.geteuid() != 0:
        pytest.skip("needs root to run anywherectl as other users")
    import grp
    group = grp.getgrgid(65534).gr_name  # nogroup: stands for "anywhere" here
    conf = world.tmp / "anywhered.conf"
    conf.write_text(f"[server]\nadmin_group = {group}\n")
    # a socket other users can reach (pytest's temporary directories are private to root)
    shared = tempfile.mkdtemp(prefix="anywhere-admin-")
    os.chmod(shared, 0o755)
    world.sock = os.path.join(shared, "anywhered.sock")
    try:
        _check_admin_callers(world, conf, group)
    finally:
        world.stop_all()
        shutil.rmtree(shared, ignore_errors=True)


def _check_admin_callers(world, conf, group: str) -> None:
    server = world.start_server("--config", str(conf))
    os.chmod(world.sock, 0o666)  # past the file mode: the daemon's own check must refuse
    outsider = _as(65534, 100, [], world.sock)  # user nobody, group users
    assert outsider.startswith("HTTP/1.1 403") and "permission denied" in outsider
    server.wait_log("uid=65534(nobody)")
    member = _as(65534, 100, [65534], world.sock)  # supplementary group
    assert member.startswith("HTTP/1.1 200") and '"server_id":"anywhered"' in member, member
    primary = _as(65534, 65534, [], world.sock)
    assert primary.startswith("HTTP/1.1 200"), primary
    assert world.api("GET", "/v1/status")["server_id"] == "anywhered"  # root is always let in


# -- limits ---------------------------------------------------------------------------------------------
def test_per_proxy_and_total_connection_limits(world, echo_target):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\nmax_connections_per_proxy = 2\nmax_connections = 3\n")
    server = world.start_server("--config", str(conf))
    world.start_agent()
    p1, p2 = world.add_proxy(echo_target.port), world.add_proxy(echo_target.port)
    held = []
    try:
        for port in (p1, p1):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            held.append(c)
        assert echo(p1) == b""  # a third on p1: per-proxy limit
        server.wait_log("max_connections_per_proxy = 2 reached")
        c = socket.create_connection(("127.0.0.1", p2), timeout=10)
        c.sendall(b"y")
        assert c.recv(1) == b"y"
        held.append(c)
        assert echo(p2) == b""  # a fourth in all: total limit
        server.wait_log("max_connections = 3 reached")
        assert rejected(world, p1)["limit"] == 1 and rejected(world, p2)["limit"] == 1
        for c in held:
            c.close()
        wait_for(lambda: echo(p1) == b"ping", 5, what="room again once connections end")
    finally:
        for c in held:
            c.close()


def test_rate_limit_per_source_address(world, echo_target):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\nrate_limit = 5\n")
    server = world.start_server("--config", str(conf))
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    results = [echo(port) for _ in range(8)]
    assert results == [b"ping"] * 5 + [b""] * 3
    assert echo(port, source="127.0.0.2") == b"ping"  # another source address has its own budget
    assert rejected(world, port)["limit"] == 3
    log = server.log()
    assert log.count("(rate_limit)") == 1  # logged once, the rest counted, not flooding the log


def test_pending_per_agent_and_max_agents(world, echo_target):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\nmax_pending_per_agent = 2\nmax_agents = 1\npool_size = 0\ndata_timeout = 3\n")
    server = world.start_server("--config", str(conf))
    agent = world.start_agent()
    port = world.add_proxy(echo_target.port)
    second = world.start_agent("agent-2", wait=False)
    second.wait_log("maximum of agents")
    server.wait_log("max_agents = 1")
    agent.signal(signal.SIGSTOP)  # nobody answers: clients wait
    waiting = []
    try:
        for _ in range(2):
            waiting.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        wait_for(lambda: world.api("GET", "/v1/status")["pending"] == 2, 5, what="two clients waiting")
        started = time.monotonic()
        assert echo(port) == b""
        assert time.monotonic() - started < 1.0
        assert rejected(world, port)["limit"] == 1
    finally:
        agent.signal(signal.SIGCONT)
        for c in waiting:
            c.close()


def test_idle_timeout_per_proxy(world, echo_target):
    world.start_server()
    world.start_agent()
    remote = free_port()
    world.api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": echo_target.port,
                                      "remote_port": remote, "idle_timeout": 1.5})
    with socket.create_connection(("127.0.0.1", remote), timeout=10) as idle, \
            socket.create_connection(("127.0.0.1", remote), timeout=10) as busy:
        for c in (idle, busy):
            c.sendall(b"hi")
            assert c.recv(2) == b"hi"
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:  # the busy one talks every 0.3 s
            busy.sendall(b"k")
            assert busy.recv(1) == b"k"
            time.sleep(0.3)
        assert recv_all(idle, 2) == b""  # closed for idling
        busy.sendall(b"still")
        assert busy.recv(5) == b"still"
    world.server.wait_log("idle for 1.5 s")


def test_unauthenticated_flood_on_the_agent_port(world, echo_target):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\nmax_unauthenticated = 20\nhandshake_timeout = 5\n")
    server = world.start_server("--config", str(conf))
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    flood = []
    try:
        for _ in range(60):  # silent TCP connections: no TLS handshake ever
            flood.append(socket.create_connection(("127.0.0.1", world.port), timeout=5))
        server.wait_log("max_unauthenticated = 20")
        assert echo(port, b"served") == b"served"  # tunnels and the admin API carry on
        assert world.api("GET", "/v1/status")["agents"] == 1
    finally:
        for c in flood:
            c.close()


def test_out_of_file_descriptors_refuses_then_recovers_without_spinning(world, echo_target):
    """With a low RLIMIT_NOFILE the daemon runs out of descriptors under load: it must not busy-loop
    on the listener, must keep its process, and must serve again once descriptors are free."""
    world.port = free_port()
    world.sock = str(world.tmp / "anywhered.sock")
    args = [PY, "-m", "anywhere.server_cli", "start", "-p", str(world.port), "--ca", str(world.creds.ca),
            "--cert", str(world.creds.server_cert), "--key", str(world.creds.server_key), "--admin-socket", world.sock,
            "--state-dir", str(world.tmp / "state"), "--pool-size", "0", "--log-level", "debug"]

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    log = world.tmp / "lowfd.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, preexec_fn=low_limit)
    server = Proc.__new__(Proc)
    server.args, server.log_path, server._log, server.popen = args, log, open(log, "ab"), popen
    world.procs.append(server)
    world.server = server
    server.wait_log("listening for agents")
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    clients = []
    try:
        for _ in range(80):  # each costs the server 2 descriptors: far past 64
            try:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        wait_for(lambda: "pausing it" in server.log(), 10, what="the EMFILE pause")
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = open(f"/proc/{popen.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks
        before = cpu()
        time.sleep(2.0)
        assert cpu() - before < 0.5, "the daemon spins while out of descriptors"
        assert popen.poll() is None
    finally:
        for c in clients:
            c.close()
    wait_for(lambda: echo(port, b"again") == b"again", 15, what="recovery once descriptors are free")
    assert "Traceback" not in server.log()


def open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit in /proc/{pid}/limits")


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is not installed")
def test_the_open_files_limit_is_raised_to_the_hard_one_and_a_short_one_is_said(world, tmp_path):
    """anywhered raises its soft limit of open files to the hard one (a fleet needs a descriptor
    per agent), and says so when even that is below max_agents + max_connections."""
    server = world.start_server(prefix=("prlimit", "--nofile=1024:4096"))
    assert open_files_limit(server.pid) == (4096, 4096)
    line = wait_log_line(server, "WARNING", "may open 4096 files")
    assert "max_agents + max_connections (10000 + 10000)" in line and "LimitNOFILE" in line
    server.stop()
    conf = tmp_path / "small.conf"
    conf.write_text("[server]\nmax_agents = 100\nmax_connections = 1000\n")
    server = world.start_server("--config", str(conf), prefix=("prlimit", "--nofile=1024:4096"))
    assert open_files_limit(server.pid) == (4096, 4096)
    assert log_lines(server, "may open") == []
