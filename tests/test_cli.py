"""The command lines: `anywhered` (start and the original's proxy/agent verbs) and `anywherectl`,
run as real subprocesses against a real anywhered on loopback.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from anywhere.common import __version__
from conftest import free_port, recv_all, wait_for

PY = sys.executable
CTL = "anywhere.ctl"
SERVER = "anywhere.server_cli"
AGENT = "anywhere.agent_cli"


def run(world, prog: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m prog args... --admin-socket world.sock`; bounded, never checked here."""
    return world.ctl(*args, "--admin-socket", world.sock, check=False, prog=prog)


def ok(world, prog: str, *args: str) -> str:
    res = run(world, prog, *args)
    assert res.returncode == 0, f"{prog} {args} exited {res.returncode}: {res.stderr}"
    assert res.stderr == "", res.stderr
    return res.stdout


def rows(table: str) -> tuple[str, list[list[str]]]:
    """A table's header line, and each body row split into cells on runs of two or more spaces."""
    lines = table.rstrip("\n").splitlines()
    return lines[0], [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]


def assert_echo(port: int, size: int = 2000) -> None:
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c, 10) == payload


def proxies(world) -> list[dict]:
    return world.api("GET", "/v1/proxies")["proxies"]


@pytest.fixture
def up(world, echo_target):
    """A server and agent-1 on loopback; the echo target's port as `world.target`."""
    world.start_server()
    world.start_agent("agent-1")
    world.target = echo_target.port
    return world


# -- the original's verbs on anywhered ---------------------------------------------------------------
def test_anywhered_proxy_and_agent_verbs(up):
    world = up
    remote = free_port()
    out = ok(world, SERVER, "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
             "--local-port", str(world.target), "--remote-port", str(remote))
    assert f"proxy agent-1:{remote} added" in out
    assert f"port {remote}" in out and f"127.0.0.1:{world.target}" in out
    assert [p["remote_port"] for p in proxies(world)] == [remote]
    assert_echo(remote)

    header, body = rows(ok(world, SERVER, "proxy", "list"))
    for title in ("NAME", "AGENT", "ONLINE", "ENABLED", "STATE", "REMOTE PORT", "LOCAL IP", "LOCAL PORT", "WHITELIST", "BANDWIDTH", "CONNS",
                  "TOTAL", "REJECTED", "IN", "OUT", "SOURCE"):
        assert title in header
    # one echo of 2000 bytes has gone through
    assert body == [[f"agent-1:{remote}", "agent-1", "yes", "yes", "listening", str(remote), "127.0.0.1", str(world.target), "-",
                     "-", "0", "1", "0", "2.0 KB", "2.0 KB", "api"]]

    header, body = rows(ok(world, SERVER, "agent", "list"))
    assert header.split()[0] == "AGENT" and "ADDRESS" in header
    assert [r[0] for r in body] == ["agent-1"]
    assert body[0][1].startswith("127.0.0.1:")

    out = ok(world, SERVER, "proxy", "del", "--remote-port", str(remote))
    assert f"proxy agent-1:{remote} deleted" in out
    assert proxies(world) == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", remote), timeout=5).close()
    _, body = rows(ok(world, SERVER, "proxy", "list"))
    assert body == []


def test_anywhered_proxy_del_accepts_the_originals_agent_id_flag(up):
    world = up
    remote = world.add_proxy(world.target)
    ok(world, SERVER, "proxy", "del", "--agent-id", "agent-1", "--remote-port", str(remote))
    assert proxies(world) == []


# -- anywherectl ---------------------------------------------------------------------------------------
def test_anywherectl_verbs(up):
    world = up
    remote = free_port()
    out = ok(world, CTL, "proxy", "add", "--name", "web", "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
             "--local-port", str(world.target), "--remote-port", str(remote), "--wl", "127.0.0.1,::1")
    assert f"proxy web added: port {remote}" in out
    [p] = proxies(world)
    assert (p["name"], p["remote_port"], p["whitelist"]) == ("web", remote, ["127.0.0.1/32", "::1/128"])

    _, body = rows(ok(world, CTL, "proxy", "list"))
    assert body == [["web", "agent-1", "yes", "yes", "listening", str(remote), "127.0.0.1", str(world.target), "127.0.0.1/32,::1/128",
                     "-", "0", "0", "0", "0 B", "0 B", "api"]]

    _, body = rows(ok(world, CTL, "agent", "list"))
    assert [r[0] for r in body] == ["agent-1"]

    with socket.create_connection(("127.0.0.1", remote), timeout=5) as c:
        payload = os.urandom(1234)
        c.sendall(payload)
        got = b""
        c.settimeout(10)
        while len(got) < len(payload):
            chunk = c.recv(65536)
            assert chunk, "EOF before the echo"
            got += chunk
        assert got == payload
        source = f"127.0.0.1:{c.getsockname()[1]}"

        header, body = rows(ok(world, CTL, "conn", "list"))
        for title in ("ID", "PROXY", "AGENT", "SOURCE", "TARGET", "BYTES IN", "BYTES OUT"):
            assert title in header
        assert len(body) == 1, body
        row = body[0]
        assert row[1:7] == ["web", "agent-1", source, f"127.0.0.1:{world.target}", "1234", "1234"]

        _, body = rows(ok(world, CTL, "proxy", "list"))
        assert body[0][10] == "1"  # CONNS (after BANDWIDTH)

        status = ok(world, CTL, "status")
        assert status.splitlines()[0].startswith(f"anywhered {__version__}, server id anywhered, up ")
        fields = dict(re.split(r":\s+", line, maxsplit=1) for line in status.strip().splitlines()[1:6])
        assert fields["agents"] == "1 connected" and fields["proxies"] == "1"
        assert fields["connections"].startswith("1 live, 1 in all")
        assert fields["bytes"] == "1.2 KB in, 1.2 KB out"

        out = ok(world, CTL, "proxy", "del", "web")
        assert "proxy web deleted; 1 connection(s) closed" in out
        c.settimeout(5)
        try:
            assert c.recv(100) == b""
        except ConnectionResetError:
            pass
    assert proxies(world) == []
    _, body = rows(ok(world, CTL, "conn", "list"))
    assert body == []


def test_json_output(up):
    world = up
    remote = free_port()

    def js(*args: str):
        return json.loads(ok(world, CTL, *args, "--json"))

    added = js("proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1", "--local-port", str(world.target),
               "--remote-port", str(remote))
    assert set(added["proxy"]) >= {"name", "agent_id", "local_ip", "local_port", "remote_port", "whitelist"}
    assert added["proxy"]["remote_port"] == remote
    listed = js("proxy", "list")["proxies"]
    assert len(listed) == 1
    assert set(listed[0]) >= {"name", "agent_id", "local_ip", "local_port", "remote_port", "whitelist",
                              "agent_online", "connections"}
    assert listed[0]["agent_online"] is True
    [agent] = js("agent", "list")["agents"]
    assert set(agent) >= {"agent_id", "address", "version", "connected_since", "rtt_ms", "connections"}
    assert agent["agent_id"] == "agent-1" and agent["version"] == __version__
    with socket.create_connection(("127.0.0.1", remote), timeout=5) as c:
        c.sendall(b"x" * 10)
        c.settimeout(10)
        assert c.recv(100) == b"x" * 10
        wait_for(lambda: js("conn", "list")["connections"], 5, what="the connection to be listed")
        [conn] = js("conn", "list")["connections"]
        assert set(conn) >= {"id", "proxy", "agent_id", "source", "target", "bytes_in", "bytes_out", "age"}
        assert conn["source"] == f"127.0.0.1:{c.getsockname()[1]}"
        assert (conn["bytes_in"], conn["bytes_out"]) == (10, 10)
        status = js("status")
        assert set(status) >= {"server_id", "version", "uptime", "agents", "proxies", "connections"}
        assert (status["agents"], status["proxies"], status["connections"]) == (1, 1, 1)
    deleted = js("proxy", "del", "--remote-port", str(remote))
    assert deleted["deleted"] == f"agent-1:{remote}"
    assert deleted["closed_connections"] in (0, 1)  # the client may have closed first
    # anywhered's verbs speak JSON too
    assert json.loads(ok(world, SERVER, "proxy", "list", "--json")) == {"proxies": []}


# -- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prog", [CTL, SERVER])
def test_daemon_error_is_printed_with_status_1(up, prog):
    world = up
    remote = world.add_proxy(world.target)
    res = run(world, prog, "proxy", "add", "--name", "second", "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
              "--local-port", str(world.target), "--remote-port", str(remote))
    assert res.returncode == 1, res
    assert res.stdout == ""
    assert f"remote port {remote} is already used by proxy agent-1:{remote}" in res.stderr
    assert "409" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = run(world, prog, "proxy", "del", "no-such-proxy")
    assert res.returncode == 1
    assert "no proxy named no-such-proxy" in res.stderr
    assert len(proxies(world)) == 1


@pytest.mark.parametrize("prog", [CTL, SERVER])
@pytest.mark.parametrize("verb", [("proxy", "list"), ("agent", "list"), ("conn", "list")])
def test_daemon_not_running(world, tmp_path, prog, verb):
    world.sock = str(tmp_path / "nothing-here" / "anywhered.sock")
    res = run(world, prog, *verb)
    assert res.returncode == 1
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert world.sock in lines[0]
    assert "Traceback" not in res.stderr


def test_daemon_not_running_stale_socket(world, tmp_path):
    """A socket file nobody listens on (as a crashed daemon leaves it): still one line."""
    world.sock = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(world.sock)  # bound, never listening
        res = run(world, CTL, "status")
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert world.sock in lines[0] and "refused" in lines[0]


@pytest.mark.parametrize("prog", [CTL, SERVER])
def test_bad_port_exits_2(world, tmp_path, prog):
    world.sock = str(tmp_path / "unused.sock")
    res = run(world, prog, "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
              "--local-port", "70000", "--remote-port", "8080")
    assert res.returncode == 2
    assert "70000" in res.stderr
    res = run(world, prog, "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
              "--local-port", "80", "--remote-port", "http")
    assert res.returncode == 2
    assert "'http'" in res.stderr


def test_bad_args_of_start_and_agent_exit_2():
    for args in ([SERVER, "start", "-p", "70000"], [SERVER, "start", "--heartbeat", "0"],
                 [AGENT, "-s", "127.0.0.1", "-p", "70000"], [AGENT]):
        res = subprocess.run([PY, "-m", *args], capture_output=True, text=True, timeout=30)
        assert res.returncode == 2, (args, res.returncode, res.stderr)
        assert res.stderr.strip(), args


@pytest.mark.parametrize("prog,name", [(SERVER, "anywhered"), (AGENT, "anywhere"), (CTL, "anywherectl")])
def test_version_and_help(prog, name):
    res = subprocess.run([PY, "-m", prog, "--version"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(name + " ") and __version__ in res.stdout
    res = subprocess.run([PY, "-m", prog, "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: {name}")


# -- anywhered start refusing to start ---------------------------------------------------------------------
def start_fails(creds, tmp_path, *extra: str, cert: str | None = None, port: int | None = None) -> subprocess.CompletedProcess:
    sock = tmp_path / "anywhered.sock"
    args = [PY, "-m", SERVER, "start", "-p", str(port or free_port()), "--ca", str(creds.ca),
            "--cert", cert or str(creds.server_cert), "--key", str(creds.server_key),
            "--admin-socket", str(sock), "--state-dir", str(tmp_path / "state"), *extra]
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"anywhered started instead of refusing: {extra}") from None
    assert res.returncode != 0, res
    assert not os.path.lexists(sock), "a server that does not start must not leave its admin socket"
    assert "Traceback" not in res.stderr, res.stderr
    return res


def test_start_with_invalid_whitelist_entry(creds, tmp_path):
    res = start_fails(creds, tmp_path, "--wl", "127.0.0.1,10.0.0.300")
    assert "10.0.0.300" in res.stderr
    res = start_fails(creds, tmp_path, "--wl", "::1,not-an-ip/8")
    assert "not-an-ip/8" in res.stderr


def test_start_with_missing_certificate(creds, tmp_path):
    missing = str(tmp_path / "no-such-server.crt")
    res = start_fails(creds, tmp_path, cert=missing)
    assert missing in res.stderr
    assert "no such file" in res.stderr


def test_start_with_agent_port_in_use(creds, tmp_path):
    with socket.socket(socket.AF_INET6) as blocker:
        blocker.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        blocker.bind(("::", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        res = start_fails(creds, tmp_path, port=port)
    assert str(port) in res.stderr
    assert "in use" in res.stderr


# -- flags: the same ranges as the configuration keys they override --------------------------------------
@pytest.mark.parametrize("flag,value,expected", [
    ("--pool-size", "-1", "must be a whole number 0..1024"),
    ("--pool-size", "1025", "must be a whole number 0..1024"),
    ("--heartbeat", "7200", "must be a number of seconds greater than 0 (at most 3600)"),
    ("--data-timeout", "inf", "must be a number of seconds greater than 0 (at most 86400)"),
    ("--handshake-timeout", "86401", "must be a number of seconds greater than 0 (at most 86400)"),
    ("--drain-timeout", "1e9", "must be a number of seconds greater than 0 (at most 86400)"),
    ("--server-id", "x" * 65, "must be 1-64 printable characters"),
])
def test_start_refuses_a_flag_out_of_its_keys_range(creds, tmp_path, flag, value, expected):
    res = start_fails(creds, tmp_path, flag, value)
    assert res.returncode == 2
    assert f"{flag}: {value}: {expected}" in res.stderr  # argparse's "argument [-s/]--flag: ..." names the flag


@pytest.mark.parametrize("value", ["-1", "0", "nan", "86401"])
def test_agent_refuses_a_dial_timeout_out_of_its_keys_range(creds, value):
    crt, key = creds.agent("agent-1")
    common = ["-i", "agent-1", "-s", "127.0.0.1", "-p", str(free_port()), "--ca", str(creds.ca), "--cert", str(crt),
              "--key", str(key), "--dial-timeout", value]
    for args in ([AGENT, "check-config", *common], [AGENT, *common]):
        try:
            res = subprocess.run([PY, "-m", *args], capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent ran with --dial-timeout {value}") from None
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert f"argument --dial-timeout: {value}: must be a number of seconds greater than 0 (at most 86400)" in res.stderr


def test_flag_help_shows_the_keys_range():
    res = subprocess.run([PY, "-m", SERVER, "start", "--help"], capture_output=True, text=True, timeout=30)
    text = " ".join(res.stdout.split())
    assert "--pool-size N trunks (multiplexed data connections) each agent is asked to keep (0..1024; default 2;" in text
    assert "--heartbeat SECONDS heartbeat interval in seconds (more than 0, at most 3600; default 5)" in text
    res = subprocess.run([PY, "-m", AGENT, "--help"], capture_output=True, text=True, timeout=30)
    assert "seconds to reach a target (more than 0, at most 86400; default 5)" in " ".join(res.stdout.split())


@pytest.mark.parametrize("pool_size,beyond", [("1024", "1025"), ("0", "-1")])
def test_wire_limits_are_accepted_and_agents_welcomed_one_past_is_refused(world, echo_target, pool_size, beyond):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\npool_max = 1024\n")
    for flag, value in (("--heartbeat", "3600.5"), ("--pool-size", beyond)):
        res = subprocess.run([PY, "-m", SERVER, "check-config", "--config", str(conf), flag, value],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and f"argument {flag}: {value}: must be" in res.stderr, (flag, value, res.stderr)
    world.start_server("--config", str(conf), "--heartbeat", "3600", "--pool-size", pool_size)
    agent = world.start_agent("agent-1")
    agent.wait_log("connected to server")  # welcomed, not merely listed
    assert_echo(world.add_proxy(echo_target.port))


def test_pool_size_zero_is_accepted_with_a_deprecation_warning(tmp_path):
    """The per-client data connection lost to trunks on every loopback row but bulk (bench/run.py
    --paths anywhere,anywhere-conn): pool_size = 0 still works for this release, and says so."""
    conf = tmp_path / "anywhered.conf"
    conf.write_text("[server]\npool_size = 0\n")
    res = subprocess.run([PY, "-m", SERVER, "check-config", "--config", str(conf)], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    assert "pool_size = 0" in res.stdout.splitlines()
    assert "deprecated: pool_size = 0 (a data connection of its own per client, no trunks)" in res.stderr
    conf.write_text("[server]\npool_size = 1\n")
    res = subprocess.run([PY, "-m", SERVER, "check-config", "--config", str(conf)], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0 and "deprecated" not in res.stderr, res.stderr
