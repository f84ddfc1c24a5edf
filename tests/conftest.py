"""Shared fixtures: credentials, free ports, and real anywhered / anywhere processes on loopback.

Every process a test starts is ended by pid in the fixture's teardown, also when the test fails.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from anywhere import credentials
from anywhere.ctl import Client

PY = sys.executable


def free_port(family: int = socket.AF_INET6) -> int:
    """A TCP port free on both 127.0.0.1 and ::1 (the daemons bind dual-stack)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
        else:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@dataclass
class Creds:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path

    def agent(self, agent_id: str) -> tuple[Path, Path]:
        crt, key = self.dir / f"{agent_id}.crt", self.dir / f"{agent_id}.key"
        if not crt.exists():
            credentials.issue(agent_id, str(self.dir))
        return crt, key


@pytest.fixture(scope="session")
def creds(tmp_path_factory) -> Creds:
    d = tmp_path_factory.mktemp("credential")
    credentials.init(str(d), "localhost", ["127.0.0.1", "::1"])
    c = Creds(d, d / "ca.crt", d / "server.crt", d / "server.key")
    c.agent("agent-1")
    c.agent("agent-2")
    return c


@pytest.fixture(scope="session")
def other_creds(tmp_path_factory) -> Creds:
    """A second, unrelated CA with its own server and agent-1 certificates."""
    d = tmp_path_factory.mktemp("other-credential")
    credentials.init(str(d), "localhost", ["127.0.0.1", "::1"])
    c = Creds(d, d / "ca.crt", d / "server.crt", d / "server.key")
    c.agent("agent-1")
    return c


class Proc:
    """A child process with its log in a file; `stop()` ends it by pid."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.args = args
        self.log_path = log
        self._log = open(log, "ab")
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        def seen() -> bool:
            if text in self.log():
                return True
            if not self.alive():
                raise AssertionError(f"{self.args[2]} exited {self.popen.returncode} before logging {text!r}:\n{self.log()}")
            return False
        wait_for(seen, timeout, what=f"{text!r} in {self.log_path.name}")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait()


def log_lines(proc: Proc, *needles: str, start: int = 0) -> list[str]:
    """The lines of a process's log (after offset `start`) that contain every needle."""
    return [line for line in proc.log()[start:].splitlines() if all(n in line for n in needles)]


def wait_log_line(proc: Proc, *needles: str, timeout: float = 5.0, start: int = 0) -> str:
    """The first log line (after offset `start`) that contains every needle, waiting for it."""
    lines = wait_for(lambda: log_lines(proc, *needles, start=start), timeout,
                     what=f"a line with {needles} in {proc.log_path.name}:\n{proc.log()[start:][-3000:]}")
    return lines[0]


@dataclass
class World:
    """Server and agents on loopback, in one test's temporary directory."""

    tmp: Path
    creds: Creds
    procs: list[Proc] = field(default_factory=list)
    port: int = 0
    sock: str = ""
    state_dir: str = ""
    proxies_dir: str = ""  # absent unless a test writes files there (never the host's /etc/anywhere)
    server: Proc | None = None

    def start_server(self, *extra: str, wl: str | None = None, port: int | None = None, wait: bool = True,
                     creds: Creds | None = None, prefix: tuple[str, ...] = ()) -> Proc:
        c = creds or self.creds
        self.port = port or self.port or free_port()
        self.sock = self.sock or str(self.tmp / "anywhered.sock")
        self.state_dir = self.state_dir or str(self.tmp / "state")
        self.proxies_dir = self.proxies_dir or str(self.tmp / "proxies.d")
        args = [*prefix, PY, "-m", "anywhere.server_cli", "start", "-p", str(self.port), "--ca", str(c.ca),
                "--cert", str(c.server_cert), "--key", str(c.server_key), "--admin-socket", self.sock,
                "--state-dir", self.state_dir, "--proxies-dir", self.proxies_dir, "--log-level", "debug", *extra]
        if wl is not None:
            args += ["--wl", wl]
        proc = Proc(args, self.tmp / f"server{len(self.procs)}.log")
        self.procs.append(proc)
        self.server = proc
        if wait:
            proc.wait_log("listening for agents")
        return proc

    def start_agent(self, agent_id: str = "agent-1", *extra: str, wait: bool = True, server: str = "127.0.0.1",
                    cert: tuple[Path, Path] | None = None, ca: Path | None = None) -> Proc:
        crt, key = cert or self.creds.agent(agent_id)
        args = [PY, "-m", "anywhere.agent_cli", "-i", agent_id, "-s", server, "-p", str(self.port),
                "--ca", str(ca or self.creds.ca), "--cert", str(crt), "--key", str(key), "--log-level", "debug", *extra]
        proc = Proc(args, self.tmp / f"agent-{agent_id}-{len(self.procs)}.log")
        self.procs.append(proc)
        if wait:
            wait_for(lambda: any(a["agent_id"] == agent_id for a in self.api("GET", "/v1/agents")["agents"]),
                     15, what=f"agent {agent_id} to connect:\n{proc.log()}")
        return proc

    def api(self, method: str, path: str, body=None):
        return Client(self.sock).call(method, path, body)

    def add_proxy(self, local_port: int, agent_id: str = "agent-1", local_ip: str = "127.0.0.1",
                  remote_port: int | None = None, whitelist: list[str] | None = None) -> int:
        remote_port = remote_port or free_port()
        body = {"agent_id": agent_id, "local_ip": local_ip, "local_port": local_port, "remote_port": remote_port}
        if whitelist is not None:
            body["whitelist"] = whitelist
        self.api("POST", "/v1/proxies", body)
        return remote_port

    def ctl(self, *args: str, check: bool = True, prog: str = "anywhere.ctl") -> subprocess.CompletedProcess:
        res = subprocess.run([PY, "-m", prog, *args], capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"{args} exited {res.returncode}: {res.stderr}")
        return res

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def world(tmp_path, creds):
    w = World(tmp_path, creds)
    yield w
    w.stop_all()


# -- small targets on loopback ------------------------------------------------------------------------
class TargetServer:
    """A threaded TCP server on 127.0.0.1 running `handler(conn)` per connection; closed on stop()."""

    def __init__(self, handler, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.conns: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        except BaseException as exc:  # surfaced by tests that check .errors
            self.errors.append(exc)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def echo_handler(conn: socket.socket) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


@pytest.fixture
def echo_target():
    t = TargetServer(echo_handler)
    yield t
    t.stop()


def echo(port: int, data: bytes = b"ping", host: str = "127.0.0.1", source: str | None = None) -> bytes:
    """Send `data` to HOST:PORT (a tunnel's public port), half-close, and read until EOF.

    b"" when the server refuses or closes the client instead (reset, broken pipe, not connected).
    `source` binds the client's own address (e.g. 127.0.0.2 for a second source on loopback).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        if source:
            c.bind((source, 0))
        c.connect((host, port))
        try:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            return recv_all(c, 10)
        except OSError:
            return b""


def ask(port: int, data: bytes = b"hello") -> bytes:
    """A new client: one request, what it gets back (b"" if refused or closed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(data)
            c.settimeout(5)
            return c.recv(65536)
    except OSError:
        return b""


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False

def recv_all(sock: socket.socket, timeout: float = 30.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


@pytest.fixture
def peers():
    """`peers(port, ctx, ...)` makes a hand-written agent-side TLS peer (handpeer.HandPeer), closed after the test."""
    from handpeer import HandPeer
    made: list[HandPeer] = []

    def make(*args, **kwargs) -> HandPeer:
        peer = HandPeer(*args, **kwargs)
        made.append(peer)
        return peer
    yield make
    for peer in made:
        peer.close()


# -- UDP targets (test_udp, test_same_port) -----------------------------------------------------------
def free_udp_port() -> int:
    while True:
        port = free_port(socket.AF_INET)
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            probe.close()


class UdpEcho:
    """A UDP echo target on 127.0.0.1 in a thread; every datagram is sent back as it came."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.port = self.sock.getsockname()[1]
        self.sources: set = set()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if ready:
                data, addr = self.sock.recvfrom(65535)
                self.sources.add(addr)
                self.sock.sendto(data, addr)

    def stop(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def udp_echo():
    echo = UdpEcho()
    yield echo
    echo.stop()
