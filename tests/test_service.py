"""Running as a service: reload, drain on SIGTERM, --daemon with a pid file, and the systemd units."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import PY, TargetServer, echo, recv_all, wait_for

ROOT = Path(__file__).resolve().parent.parent



def echo_once(port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    """The echo through the tunnel, reaching it over the loopback address `source` (v4 or v6)."""
    return echo(port, data, host=source)

def test_reload_applies_whitelist_to_new_connections_and_keeps_live_ones(world, echo_target):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\nwhitelist = 127.0.0.1\n")
    server = world.start_server("--config", str(conf))
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    live = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        live.sendall(b"before")
        assert live.recv(100) == b"before"
        assert echo_once(port, b"v6", "::1") == b""  # not whitelisted yet

        conf.write_text("[server]\nwhitelist = ::1\n")
        res = world.ctl("reload", "--admin-socket", world.sock)
        assert "changed whitelist" in res.stdout
        assert echo_once(port, b"v6 now", "::1") == b"v6 now"
        assert echo_once(port, b"v4 now", "127.0.0.1") == b""  # the new whitelist applies to new connections
        live.sendall(b"after")  # the live connection and the agent session are untouched
        assert live.recv(100) == b"after"
        assert [a["agent_id"] for a in world.api("GET", "/v1/agents")["agents"]] == ["agent-1"]

        # a broken file is refused as a whole; the old configuration stays in force
        conf.write_text("[server]\nwhitelist = 127.0.0.1\nport = 70000\n")
        res = world.ctl("reload", "--admin-socket", world.sock, check=False)
        assert res.returncode == 1
        assert f"{conf} [server] port = 70000: must be 1..65535" in res.stderr
        assert echo_once(port, b"still v6", "::1") == b"still v6"
        assert echo_once(port, b"v4", "127.0.0.1") == b""
        assert server.alive()

        # SIGHUP does the same as anywherectl reload
        conf.write_text("[server]\nwhitelist = 127.0.0.1\n")
        server.signal(signal.SIGHUP)
        wait_for(lambda: echo_once(port, b"v4 again", "127.0.0.1") == b"v4 again", 5, what="SIGHUP reload")
        live.sendall(b"end")
        assert live.recv(100) == b"end"
    finally:
        live.close()


def test_agent_reloads_on_sighup_keeping_its_relays(world, echo_target, creds):
    world.start_server()
    crt, key = creds.agent("agent-1")
    conf = world.tmp / "agent-1.conf"
    conf.write_text(f"[agent]\nserver = 127.0.0.1\nserver_port = {world.port}\nca = {creds.ca}\ncert = {crt}\nkey = {key}\n"
                    f"allow = 127.0.0.1:{echo_target.port}\n")
    agent = world.start_agent("agent-1", "--config", str(conf))
    port = world.add_proxy(echo_target.port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as live:
        live.sendall(b"one")
        assert live.recv(10) == b"one"
        conf.write_text(conf.read_text() + "dial_timeout = 2\nlog_level = debug\n")
        agent.signal(signal.SIGHUP)
        agent.wait_log("configuration reloaded; changed: dial_timeout")
        conf.write_text(conf.read_text() + "server_port = 0\n")  # broken: refused, nothing changes
        agent.signal(signal.SIGHUP)
        agent.wait_log("reload refused")
        live.sendall(b"two")
        assert live.recv(10) == b"two"
    assert echo_once(port, b"new") == b"new"


def test_sigterm_drains_connections_in_flight(world):
    """A request in flight when SIGTERM arrives still gets its whole reply; new clients are refused."""
    def slow(conn):
        data = recv_all(conn)
        time.sleep(1.5)
        conn.sendall(b"reply to " + data)
    target = TargetServer(slow)
    try:
        server = world.start_server("--drain-timeout", "8")
        world.start_agent()
        port = world.add_proxy(target.port)
        result = {}

        def client():
            result["reply"] = echo_once(port, b"request")
        t = threading.Thread(target=client)
        t.start()
        wait_for(lambda: world.api("GET", "/v1/connections")["connections"], 5, what="the connection to be live")
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        server.wait_log("draining")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()  # no longer accepting
        t.join(10)
        assert result.get("reply") == b"reply to request"
        assert server.popen.wait(10) == 0
        assert time.monotonic() - started < 5  # it exited once drained, not at the drain timeout
    finally:
        target.stop()


def test_drain_is_bounded(world, echo_target):
    server = world.start_server("--drain-timeout", "1")
    world.start_agent()
    port = world.add_proxy(echo_target.port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
        idle.sendall(b"x")
        assert idle.recv(1) == b"x"
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.popen.wait(10) == 0
        assert 0.8 < time.monotonic() - started < 5
        assert recv_all(idle, 5) == b""  # closed at the end of the drain
    assert "drain time over" in server.log()


def _daemon_args(world, creds, pidfile: Path, log: Path) -> list[str]:
    return [PY, "-m", "anywhere.server_cli", "start", "--daemon", "--pidfile", str(pidfile), "--log-file", str(log),
            "-p", str(world.port), "--ca", str(creds.ca), "--cert", str(creds.server_cert), "--key",
            str(creds.server_key), "--admin-socket", world.sock, "--state-dir", str(world.tmp / "state")]


def test_daemon_mode_with_pid_file(world, creds):
    from conftest import free_port
    world.port = free_port()
    world.sock = str(world.tmp / "d.sock")
    pidfile, log = world.tmp / "run" / "anywhered.pid", world.tmp / "anywhered.log"
    res = subprocess.run(_daemon_args(world, creds, pidfile, log), capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    pid = int(pidfile.read_text())  # written by the daemon before the command returned
    assert os.path.exists(f"/proc/{pid}")
    try:
        assert pid != os.getpid()
        wait_for(lambda: os.path.exists(world.sock), 10, what="the daemon's admin socket")
        assert world.api("GET", "/v1/status")["server_id"] == "anywhered"
        # a second start is refused in the terminal
        again = subprocess.run(_daemon_args(world, creds, pidfile, log), capture_output=True, text=True, timeout=30)
        assert again.returncode == 1
        assert f"already running as pid {pid}" in again.stderr
        assert "listening for agents" in log.read_text()
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, what="the daemon to exit")
    assert not pidfile.exists()  # removed on exit
    assert "anywhered stopped" in log.read_text()


def test_agent_daemon_mode(world, creds):
    world.start_server()
    crt, key = creds.agent("agent-1")
    pidfile, log = world.tmp / "agent.pid", world.tmp / "agent.log"
    args = [PY, "-m", "anywhere.agent_cli", "-i", "agent-1", "-s", "127.0.0.1", "-p", str(world.port), "--ca",
            str(creds.ca), "--cert", str(crt), "--key", str(key), "--daemon", "--pidfile", str(pidfile),
            "--log-file", str(log)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, what="pid file"))
    try:
        wait_for(lambda: world.api("GET", "/v1/agents")["agents"], 10, what="the daemonized agent to connect")
        again = subprocess.run(args, capture_output=True, text=True, timeout=30)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, what="the agent daemon to exit")
    assert not pidfile.exists()


# -- the units ----------------------------------------------------------------------------------------
UNITS = ["anywhered.service", "anywhere-agent@.service", "anywhere-agents.target"]


@pytest.fixture
def units(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    out = tmp_path / "units"
    out.mkdir()
    for name in UNITS:
        text = (ROOT / "systemd" / name).read_text()
        # systemd-analyze verify fails when ExecStart's binary is missing: point at one that exists
        text = re.sub(r"/usr/bin/anywhere(d|ctl)?\b", "/bin/true", text)
        (out / name).write_text(text)
    shutil.copy(out / "anywhere-agent@.service", out / "anywhere-agent@agent-1.service")
    return out


def test_units_verify_without_warnings(units):
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", "anywhered.service", "anywhere-agents.target",
                          "anywhere-agent@agent-1.service"], cwd=units, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


@pytest.mark.parametrize("unit", ["anywhered.service", "anywhere-agent@agent-1.service"])
def test_units_are_hardened(units, unit):
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", unit], cwd=units,
                         capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert match, res.stdout + res.stderr
    assert float(match.group(1)) <= 2.0


def test_unit_conventions():
    server = (ROOT / "systemd" / "anywhered.service").read_text()
    agent = (ROOT / "systemd" / "anywhere-agent@.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "Restart=on-failure", "User=anywhere", "RuntimeDirectory=anywhere",
                 "StateDirectory=anywhere", "AmbientCapabilities=CAP_NET_BIND_SERVICE", "ExecReload=/usr/bin/anywherectl reload"):
        assert line in server.splitlines(), line
    assert re.search(r"^WatchdogSec=\d+", server, re.M)
    for line in ("Type=notify", "PartOf=anywhere-agents.target", "AssertPathExists=/etc/anywhere/agents/%i.conf",
                 "ExecStart=/usr/bin/anywhere --config /etc/anywhere/agents/%i.conf"):
        assert line in agent.splitlines(), line
    assert "%I" not in agent
    sysusers = (ROOT / "systemd" / "anywhere.sysusers").read_text()
    assert re.search(r"^u anywhere ", sysusers, re.M)


def test_anywherectl_reload_without_daemon_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "anywhere.ctl", "reload", "--admin-socket", str(tmp_path / "none.sock")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "none.sock" in res.stderr
