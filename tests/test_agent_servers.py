"""One agent, several servers (issue 17): ``server = a, b:1111`` and ``-s a,b``; an independent
session with each server, active-active; one server lost or removed disturbs no other.

Every server here is a real anywhered on loopback (a `World` each: its own port, admin socket,
state directory and absent proxies directory), the agent a real ``anywhere`` process; each is
ended by pid in the fixtures' teardown, also when a test fails.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from anywhere import agent_cli, config
from anywhere.agent import settings
from anywhere.agent.session import Session
from anywhere.agent.settings import ServerAddress
from anywhere.loop import Loop
from conftest import PY, Proc, World, echo, log_lines, wait_for, wait_log_line

AGENT = "anywhere.agent_cli"
POOL = 2  # anywhered's default pool_size: the trunks each server asks the agent to keep
BACK_BOUND = 35.0  # seconds for a restarted server to see the agent again: its backoff is at most 30 s


# -- parsing: the key, the flag --------------------------------------------------------------------------
def _resolve_file(tmp_path: Path, creds, text: str) -> settings.AgentConfig:
    crt, key = creds.agent("agent-1")
    path = tmp_path / "agent-1.conf"
    path.write_text(f"[agent]\n{text}\nca = {creds.ca}\ncert = {crt}\nkey = {key}\n")
    return settings.resolve(str(path), {})


def _file_error(tmp_path: Path, creds, text: str) -> str:
    with pytest.raises(config.ConfigError) as err:
        _resolve_file(tmp_path, creds, text)
    return str(err.value)


def test_server_key_takes_several_entries_each_with_its_port(tmp_path, creds):
    cfg = _resolve_file(tmp_path, creds, "server = a.example.net, B.example.net:1111, 192.0.2.1:7, "
                                         "[2001:db8::1]:1112, 2001:db8::2, [2001:db8::3]\nserver_port = 2222")
    assert cfg.servers == [ServerAddress("a.example.net", 2222), ServerAddress("b.example.net", 1111),
                           ServerAddress("192.0.2.1", 7), ServerAddress("2001:db8::1", 1112),
                           ServerAddress("2001:db8::2", 2222), ServerAddress("2001:db8::3", 2222)]
    assert [str(s) for s in cfg.servers] == ["a.example.net:2222", "b.example.net:1111", "192.0.2.1:7",
                                             "[2001:db8::1]:1112", "[2001:db8::2]:2222", "[2001:db8::3]:2222"]
    # one server, today's form, and the default port
    assert _resolve_file(tmp_path, creds, "server = tunnel.example.com").servers == [ServerAddress("tunnel.example.com", 1111)]


def test_flag_takes_several_entries_and_p_is_their_default_port(creds):
    crt, key = creds.agent("agent-1")
    base = ["--ca", str(creds.ca), "--cert", str(crt), "--key", str(key)]
    args = agent_cli.build_parser().parse_args(["-s", "a.example.net,b.example.net:1111,[::1]:9,::1", "-p", "3333", *base])
    assert agent_cli.load(args).servers == [ServerAddress("a.example.net", 3333), ServerAddress("b.example.net", 1111),
                                            ServerAddress("::1", 9), ServerAddress("::1", 3333)]
    args = agent_cli.build_parser().parse_args(["-s", "127.0.0.1", *base])
    assert agent_cli.load(args).servers == [ServerAddress("127.0.0.1", 1111)]
    # the flag overrides the file's list as a whole
    args = agent_cli.build_parser().parse_args(["-s", "[2001:db8::1]", "-p", "1", *base])
    assert agent_cli.load(args).servers == [ServerAddress("2001:db8::1", 1)]


@pytest.mark.parametrize("value, message", [
    ("a.example.net, A.example.net:1111", "a.example.net:1111 is listed twice (an entry without a port is on port 1111)"),
    ("2001:db8::1, [2001:db8:0::1]:1111", "[2001:db8::1]:1111 is listed twice (an entry without a port is on port 1111)"),
    ("127.0.0.1:5, 127.0.0.1:5", "127.0.0.1:5 is listed twice"),
    ("127.0.0.1:1111, 127.0.0.1", "127.0.0.1:1111 is listed twice (an entry without a port is on port 1111)"),
])
def test_duplicate_servers_are_refused_naming_file_section_key_value(tmp_path, creds, value, message):
    path = tmp_path / "agent-1.conf"
    assert _file_error(tmp_path, creds, f"server = {value}") == f"{path} [agent] server = {value}: {message}"


@pytest.mark.parametrize("value, message", [
    ("a.example.net, b.example.net:0", "'b.example.net:0': the port must be 1..65535"),
    ("a.example.net, b.example.net:", "'b.example.net:': the port must be 1..65535"),
    ("a.example.net, b.example.net:x", "'b.example.net:x': the port must be 1..65535"),
    ("a.example.net, bad host!", "'bad host!': the host must be a host name or an IP address (an IPv6 address "
                                 "with a port in brackets: [2001:db8::1]:1111)"),
    ("a.example.net, a:b:c", "'a:b:c': the host must be a host name or an IP address (an IPv6 address "
                             "with a port in brackets: [2001:db8::1]:1111)"),
    ("a.example.net, [a.example.net]:1", "'[a.example.net]:1': in brackets goes an IPv6 address, e.g. "
                                         "[2001:db8::1] or [2001:db8::1]:1111"),
    ("a.example.net, [2001:db8::1", "'[2001:db8::1': in brackets goes an IPv6 address, e.g. "
                                    "[2001:db8::1] or [2001:db8::1]:1111"),
    ("[2001:db8::1]1111", "in brackets goes an IPv6 address, e.g. [2001:db8::1] or [2001:db8::1]:1111"),
    ("b.example.net:70000", "the port must be 1..65535"),
])
def test_bad_server_entries_are_refused_naming_file_section_key_value(tmp_path, creds, value, message):
    path = tmp_path / "agent-1.conf"
    assert _file_error(tmp_path, creds, f"server = {value}") == f"{path} [agent] server = {value}: {message}"


def _check_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", AGENT, "check-config", *args], capture_output=True, text=True, timeout=60)


def test_flag_errors_name_the_flag_and_its_value(creds):
    crt, key = creds.agent("agent-1")
    base = ["--ca", str(creds.ca), "--cert", str(crt), "--key", str(key)]
    res = _check_config("-s", "a.example.net,b.example.net:0", *base)
    assert res.returncode == 2
    assert "argument -s/--server-ip: a.example.net,b.example.net:0: 'b.example.net:0': the port must be 1..65535" in res.stderr
    res = _check_config("-s", "a.example.net,a.example.net:1111", *base)
    assert res.returncode == 1
    assert res.stderr.strip() == ("-s a.example.net,a.example.net:1111: a.example.net:1111 is listed twice "
                                  "(an entry without a port is on port 1111)")
    res = _check_config("-s", "a.example.net,a.example.net:1111", "-p", "7", *base)  # not duplicates on port 7
    assert res.returncode == 0, res.stderr
    assert "servers = a.example.net:7, a.example.net:1111" in res.stdout.splitlines()


def test_server_name_defaults_to_each_servers_host(creds):
    crt, key = creds.agent("agent-1")
    loop = Loop()
    try:
        cfg = settings.resolve(None, {"server": "a.example.net, [2001:db8::1]:9", "ca": str(creds.ca),
                                      "cert": str(crt), "key": str(key)})
        names = [Session(loop, cfg, s, on_welcome=lambda: None, on_lost=lambda: None,
                         on_open=lambda m: None).server_name for s in cfg.servers]
        assert names == ["a.example.net", "2001:db8::1"]
        cfg.server_name = "tunnel.example.com"
        assert Session(loop, cfg, cfg.servers[1], on_welcome=lambda: None, on_lost=lambda: None,
                       on_open=lambda m: None).server_name == "tunnel.example.com"
    finally:
        loop.close()


# -- on loopback: real servers, one agent --------------------------------------------------------------
class StatusReader:
    """What systemd would receive from the agent on NOTIFY_SOCKET: its STATUS= lines, read in the test's thread."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.statuses: list[str] = []

    def wait(self, pattern: str, timeout: float) -> str:
        """The first STATUS= (from now on) matching the regular expression `pattern`."""
        start = len(self.statuses)

        def seen() -> str | None:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                data = b""
            for line in data.decode("utf-8").splitlines():
                if line.startswith("STATUS="):
                    self.statuses.append(line[7:])
            return next((s for s in self.statuses[start:] if re.search(pattern, s)), None)
        return wait_for(seen, timeout, interval=0, what=f"STATUS= matching {pattern!r}; seen {self.statuses[-5:]}")

    def close(self) -> None:
        self.sock.close()


def _another_world(tmp_path, creds, name: str):
    """One more anywhered's World (its own port, admin socket, state and absent proxies directory)."""
    (tmp_path / name).mkdir()
    w = World(tmp_path / name, creds)
    yield w
    w.stop_all()


@pytest.fixture
def other(tmp_path, creds):
    yield from _another_world(tmp_path, creds, "b")


@pytest.fixture
def third(tmp_path, creds):
    yield from _another_world(tmp_path, creds, "c")


@pytest.fixture
def status(tmp_path):
    reader = StatusReader(tmp_path / "notify.sock")
    yield reader
    reader.close()


def start_agent(world: World, status: StatusReader, *args: str) -> Proc:
    """An agent (agent-1) with `args` (-s ... or --config ...), STATUS= to `status`; ended with `world`."""
    crt, key = world.creds.agent("agent-1")
    env = dict(os.environ, NOTIFY_SOCKET=status.path)
    proc = Proc([PY, "-m", AGENT, "--ca", str(world.creds.ca), "--cert", str(crt), "--key", str(key),
                 "--log-level", "debug", *args], world.tmp / "agent.log", env=env)
    world.procs.append(proc)
    return proc


def agent_row(world: World) -> dict | None:
    return next((a for a in world.api("GET", "/v1/agents")["agents"] if a["agent_id"] == "agent-1"), None)


def wait_ready(world: World, agent: Proc, timeout: float = 15.0) -> dict:
    """The agent's row on `world`'s server once its session is up with all its trunks."""
    return wait_for(lambda: (row := agent_row(world)) is not None and row["trunks"] == POOL and row, timeout,
                    what=f"agent-1 with {POOL} trunks on the server at port {world.port}:\n{agent.log()[-3000:]}")


def add_proxy(world: World, target_port: int) -> int:
    return world.add_proxy(target_port)


def trunks_up(server: Proc) -> int:
    return len(log_lines(server, "trunk from agent agent-1", "up;"))


def assert_untouched(world: World, before: dict, trunk_lines: int, agent: Proc, name: str, mark: int) -> None:
    """The agent's session with `world`'s server is the one of `before`: same admin connection, same
    trunks, no trunk opened or closed since, and nothing in the agent's log about losing that server."""
    row = agent_row(world)
    assert row is not None
    same = ("connected_since", "address", "trunks", "trunks_stale")
    assert {k: row[k] for k in same} == {k: before[k] for k in same}
    assert trunks_up(world.server) == trunk_lines
    assert not log_lines(world.server, "trunk", "closed")
    trouble = [line for line in agent.log()[mark:].splitlines() if f"server {name}:" in line
               and any(word in line for word in ("lost", "retrying", "reconnecting", "closed", "WARNING", "ERROR"))]
    assert not trouble, trouble


def test_one_agent_two_servers_one_killed_and_restarted(world, other, status, echo_target):
    a_server, b_server = world.start_server("--trunk-idle-timeout", "0"), other.start_server("--trunk-idle-timeout", "0")
    a_name, b_name = f"127.0.0.1:{world.port}", f"[::1]:{other.port}"
    agent = start_agent(world, status, "-i", "agent-1", "-s", f"{a_name},{b_name}")
    wait_ready(world, agent)
    b_before = wait_ready(other, agent)
    a_port, b_port = add_proxy(world, echo_target.port), add_proxy(other, echo_target.port)
    assert echo(a_port, b"via a") == b"via a"
    assert echo(b_port, b"via b") == b"via b"
    status.wait(rf"^agent agent-1: {re.escape(a_name)} connected \({POOL} trunks\), "
                rf"{re.escape(b_name)} connected \({POOL} trunks\); \d+ connection\(s\)$", 10)
    wait_log_line(agent, f"server {a_name}: connected to server")
    wait_log_line(agent, f"server {b_name}: connected to server")
    b_trunks, mark = trunks_up(b_server), len(agent.log())

    # a steady stream of short connections through B, 20 a second for 6 s; A is killed after 1 s
    failures, done, start = [], 0, time.monotonic()
    for n in range(120):
        if n == 20:
            a_server.kill()
        payload = f"b-{n}".encode() * 50
        got = echo(b_port, payload)
        if got != payload:
            failures.append((n, got[:40]))
        done += 1
        time.sleep(max(0.0, start + (n + 1) / 20 - time.monotonic()))
    assert failures == [], f"{len(failures)} of {done} connections through B failed: {failures[:5]}"
    wait_log_line(agent, f"server {a_name}: lost the server", start=mark)
    status.wait(rf"{re.escape(a_name)} (reconnecting in \d+ s|connecting), {re.escape(b_name)} connected "
                rf"\({POOL} trunks\)", 10)
    assert_untouched(other, b_before, b_trunks, agent, b_name, mark)

    # A again, same port and state directory: the agent comes back to it within its backoff
    restarted = world.start_server("--trunk-idle-timeout", "0")
    wait_ready(world, agent, BACK_BOUND)
    wait_for(lambda: echo(a_port, b"via a again") == b"via a again", 10, what="A's proxy to work again")
    assert echo(b_port, b"via b still") == b"via b still"
    assert_untouched(other, b_before, b_trunks, agent, b_name, mark)
    assert log_lines(agent, f"server {a_name}: connected to server", start=mark)
    assert not log_lines(restarted, "Traceback") and not log_lines(agent, "Traceback")


def test_reload_with_a_server_removed_and_one_added(world, other, third, status, echo_target):
    a_server, b_server = world.start_server("--trunk-idle-timeout", "0"), other.start_server("--trunk-idle-timeout", "0")
    third.start_server("--trunk-idle-timeout", "0")
    a_name, b_name, c_name = f"127.0.0.1:{world.port}", f"127.0.0.1:{other.port}", f"[::1]:{third.port}"
    crt, key = world.creds.agent("agent-1")
    conf = world.tmp / "agent-1.conf"

    def write(servers: str) -> None:
        conf.write_text(f"[agent]\nserver = {servers}\nserver_port = {world.port}\nca = {world.creds.ca}\n"
                        f"cert = {crt}\nkey = {key}\nallow = 127.0.0.1\n")
    write(f"127.0.0.1, 127.0.0.1:{other.port}")  # A on server_port, B with its own
    agent = start_agent(world, status, "--config", str(conf))
    wait_ready(world, agent)
    b_before = wait_ready(other, agent)
    a_port, b_port = add_proxy(world, echo_target.port), add_proxy(other, echo_target.port)
    assert echo(b_port, b"via b") == b"via b"
    b_trunks, mark = trunks_up(b_server), len(agent.log())
    # a client connection through each of A and B, open across the reload
    held = socket.create_connection(("127.0.0.1", b_port), timeout=10)
    held_a = socket.create_connection(("127.0.0.1", a_port), timeout=10)
    try:
        for conn in (held, held_a):
            conn.sendall(b"before")
            assert conn.recv(100) == b"before"

        write(f"127.0.0.1:{other.port}, [::1]:{third.port}")  # A removed, C added, B kept
        agent.signal(signal.SIGHUP)
        wait_log_line(agent, "configuration reloaded; changed: servers", start=mark)
        wait_log_line(agent, f"server {a_name}: removed by a reload", start=mark)
        wait_log_line(agent, f"server {c_name}: added by a reload", start=mark)
        wait_ready(third, agent)
        wait_for(lambda: agent_row(world) is None, 10, what="A to see the agent go")
        status.wait(rf"^agent agent-1: {re.escape(b_name)} connected \({POOL} trunks\), {re.escape(c_name)} "
                    rf"connected \({POOL} trunks\); \d+ connection\(s\)$", 10)
        c_port = add_proxy(third, echo_target.port)
        assert echo(c_port, b"via c") == b"via c"
        assert echo(b_port, b"via b still") == b"via b still"
        held.sendall(b"after")
        assert held.recv(100) == b"after"  # the stream through B went on through the reload
        # the one through A too: A's session is closed, its trunk retired, its stream carries on
        held_a.sendall(b"after")
        assert held_a.recv(100) == b"after"
        assert not log_lines(agent, f"server {a_name}: removed: its last connection has ended")
        held_a.close()
        wait_log_line(agent, f"server {a_name}: removed: its last connection has ended", start=mark, timeout=5)
        assert_untouched(other, b_before, b_trunks, agent, b_name, mark)
    finally:
        held.close()
        held_a.close()

    # a reload that fails changes nothing: a duplicate
    mark = len(agent.log())
    write(f"127.0.0.1:{other.port}, 127.0.0.1:{other.port}")
    agent.signal(signal.SIGHUP)
    line = wait_log_line(agent, "reload refused", start=mark)
    assert f"{conf} [agent] server = 127.0.0.1:{other.port}, 127.0.0.1:{other.port}: 127.0.0.1:{other.port} is listed twice" in line
    time.sleep(0.5)
    assert agent_row(third) is not None
    assert_untouched(other, b_before, b_trunks, agent, b_name, mark)
    assert not log_lines(a_server, "Traceback") and not log_lines(agent, "Traceback")
