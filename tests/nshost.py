"""Two hosts in network namespaces, for the tests of what crosses a real link.

`two_hosts(tmp_path, tag, subnet, heartbeat)` is a context manager: a server host and an agent
host joined by one veth pair (`DEV_SRV` / `DEV_AGT`), anywhered on the server host, an agent on
the agent host, and an echo target on the agent host's loopback (so it survives the agent host
changing its address).  `Hosts` can take the link down and up, give the agent host a new address,
shape the link with tbf (`shape`), and run code (a client socket) inside either namespace.  Every
address lives only inside the namespaces made here; every process is ended by pid and every
namespace deleted on exit, also when the test fails.  Without root or `ip netns`, the caller's
test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from anywhere import credentials
from anywhere.ctl import Client
from conftest import Proc

CLONE_NEWNET = 0x40000000
AGENT_PORT, TGT_PORT = 1111, 7000
REPO = str(Path(__file__).resolve().parent.parent)

ECHO_SCRIPT = r"""
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(256)
print("listening", flush=True)
def serve(c):
    try:
        while True:
            d = c.recv(1 << 16)
            if not d:
                c.shutdown(socket.SHUT_WR)
                return
            c.sendall(d)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, a = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def run(*args: str, check: bool = True, timeout: float = 10, stdin: str | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def netns_names() -> set[str]:
    res = run("ip", "netns", "list", check=False)
    return {line.split()[0] for line in res.stdout.splitlines() if line.strip()}


def in_netns(ns: str, fn, timeout: float = 30.0):
    """Run fn() in a fresh thread that has joined network namespace `ns` (setns(2) affects only the
    calling thread); a socket made there stays in that namespace and may be used from any thread."""
    box: dict = {}

    def run_there() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=run_there, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"in_netns({ns}) did not finish within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def connect_in(ns: str) -> Callable[[str, int, float], socket.socket]:
    return lambda host, port, timeout: in_netns(ns, lambda: socket.create_connection((host, port), timeout=timeout))


def start_in(ns: str, args: list[str], log: Path) -> Proc:
    """`args` run inside network namespace `ns` (ip netns exec), this checkout's code importable."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return Proc(["ip", "netns", "exec", ns, *args], log, env=env)


def teardown(procs: list[Proc], namespaces: list[str]) -> None:
    """End `procs` by pid (last started first), then delete `namespaces`; every one is tried."""
    for proc in reversed(procs):
        try:
            proc.stop(timeout=5)
        except Exception:
            proc.kill()
    errors = []
    for name in namespaces:
        if name in netns_names():
            res = run("ip", "netns", "del", name, check=False)
            if res.returncode:
                errors.append(res.stderr)
    assert not errors, errors


def skip_unless_netns(need_nft: bool = False) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"network-namespace tests need root (running as uid {os.geteuid()})")
    if shutil.which("ip") is None:
        pytest.skip("network-namespace tests need the `ip` command (iproute2)")
    if need_nft and shutil.which("nft") is None:
        pytest.skip("this test needs nft: apt-get install nftables")


@dataclass
class Hosts:
    ns_srv: str
    ns_agt: str
    dev_srv: str
    dev_agt: str
    srv_ip: str
    agt_ip: str
    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    server: Proc | None = None
    agent: Proc | None = None
    sock: str = ""
    cred: Path | None = None
    config: Path | None = None  # the server's --config, when the test gives one

    @property
    def api(self):
        return Client(self.sock).call

    def start(self, ns: str, args: list[str], name: str) -> Proc:
        proc = start_in(ns, args, self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def connect(self) -> Callable[[str, int, float], socket.socket]:
        """A client's connect() on the server host (for streams.one_shot and EchoStream)."""
        return connect_in(self.ns_srv)

    def link(self, up: bool) -> None:
        """The agent host's end of the link down (nothing passes, nothing is reset) or up again."""
        run("ip", "-n", self.ns_agt, "link", "set", self.dev_agt, "up" if up else "down")

    def shape(self, rate: str = "40mbit", burst: str = "16kb", latency: str = "20ms") -> None:
        """The same tbf on both ends' egress: a link of `rate` each way whose bottleneck queue holds
        `latency` worth of bytes (this kernel has no netem; tbf is built in).  Skips the caller's
        test with the reason if tc or tbf is not there."""
        if shutil.which("tc") is None:
            pytest.skip("shaped-link tests need the `tc` command (iproute2)")
        for ns, dev in ((self.ns_srv, self.dev_srv), (self.ns_agt, self.dev_agt)):
            res = run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                      "latency", latency, check=False)
            if res.returncode != 0:
                pytest.skip(f"tbf does not work here: {res.stderr.strip()}")

    def readdress_agent(self, new_ip: str) -> None:
        """The agent host comes back with another address (NAT gateway reboot, new lease): old
        connections from it are black holes on both sides until something notices."""
        run("ip", "-n", self.ns_agt, "addr", "flush", "dev", self.dev_agt)
        run("ip", "-n", self.ns_agt, "addr", "add", f"{new_ip}/24", "dev", self.dev_agt)
        self.agt_ip = new_ip


@contextlib.contextmanager
def two_hosts(tmp_path: Path, tag: str, subnet: str, heartbeat: float, server_args: tuple[str, ...] = (),
              need_nft: bool = False) -> Iterator[Hosts]:
    """`tag`: at most 9 characters (veth names stay within 15); `subnet`: e.g. "10.232.7" (a /24
    used only inside these namespaces)."""
    skip_unless_netns(need_nft)
    hosts = Hosts(f"{tag}-srv", f"{tag}-agt", f"{tag}s", f"{tag}a", f"{subnet}.1", f"{subnet}.2", tmp_path)
    for name in (hosts.ns_srv, hosts.ns_agt):
        if name in netns_names():
            run("ip", "netns", "del", name, check=False)
    probe = run("ip", "netns", "add", hosts.ns_srv, check=False)
    if probe.returncode != 0:
        pytest.skip(f"`ip netns add` failed, network namespaces unavailable: {probe.stderr.strip()}")
    try:
        run("ip", "netns", "add", hosts.ns_agt)
        for ns in (hosts.ns_srv, hosts.ns_agt):
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "link", "add", hosts.dev_srv, "netns", hosts.ns_srv, "type", "veth", "peer", "name", hosts.dev_agt,
            "netns", hosts.ns_agt)
        run("ip", "-n", hosts.ns_srv, "addr", "add", f"{hosts.srv_ip}/24", "dev", hosts.dev_srv)
        run("ip", "-n", hosts.ns_agt, "addr", "add", f"{hosts.agt_ip}/24", "dev", hosts.dev_agt)
        run("ip", "-n", hosts.ns_srv, "link", "set", hosts.dev_srv, "up")
        run("ip", "-n", hosts.ns_agt, "link", "set", hosts.dev_agt, "up")
        if need_nft:
            probe = run("ip", "netns", "exec", hosts.ns_agt, "nft", "list", "ruleset", check=False)
            if probe.returncode != 0:
                pytest.skip(f"nft does not work in a network namespace here: {probe.stderr.strip()}")
        cred = hosts.cred = tmp_path / "credential"
        credentials.init(str(cred), "server.test", [hosts.srv_ip])
        credentials.issue("agent-1", str(cred))
        target = hosts.start(hosts.ns_agt, [sys.executable, "-u", "-c", ECHO_SCRIPT, str(TGT_PORT)], "target")
        target.wait_log("listening")
        hosts.sock = str(tmp_path / "anywhered.sock")
        hosts.server = hosts.start(hosts.ns_srv, [
            sys.executable, "-m", "anywhere.server_cli", "start", "-p", str(AGENT_PORT), "--ca", str(cred / "ca.crt"),
            "--cert", str(cred / "server.crt"), "--key", str(cred / "server.key"), "--admin-socket", hosts.sock,
            "--state-dir", str(tmp_path / "state"), "--log-level", "debug", "--heartbeat", f"{heartbeat:g}",
            *server_args], "server")
        hosts.server.wait_log("listening for agents")
        hosts.agent = hosts.start(hosts.ns_agt, [
            sys.executable, "-m", "anywhere.agent_cli", "-i", "agent-1", "-s", hosts.srv_ip, "-p", str(AGENT_PORT),
            "--ca", str(cred / "ca.crt"), "--cert", str(cred / "agent-1.crt"), "--key", str(cred / "agent-1.key"),
            "--log-level", "debug"], "agent")
        yield hosts
    finally:
        teardown(hosts.procs, [hosts.ns_srv, hosts.ns_agt])
