"""Several hosts on one LAN, each in its own network namespace, for the tests of several servers
and several agents (issue 17).

`lan(tmp_path, tag, subnet, names)` is a context manager: a namespace `TAG-lan` holding a bridge,
and one namespace `TAG-NAME` per host, joined to the bridge by a veth pair, with the address
SUBNET.N/24 (N = 1, 2, ... in the order of `names`) and its loopback up.  `Lan.start` runs a
process inside a host (`ip netns exec`), `Lan.connect` makes a client socket there.  Every address
lives only inside these namespaces; every process is ended by pid and every namespace deleted on
exit, also when the test fails.  Without root or `ip netns`, the caller's test is skipped.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from conftest import Proc
from nshost import ECHO_SCRIPT, in_netns, netns_names, run, skip_unless_netns, start_in, teardown


@dataclass
class Lan:
    tag: str
    tmp: Path
    ip: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def start(self, host: str, args: list[str], name: str) -> Proc:
        proc = start_in(self.ns(host), args, self.tmp / f"{name}.log")
        self.procs.append(proc)
        return proc

    def echo_target(self, host: str, port: int, name: str) -> Proc:
        """An echo server on `host`'s own loopback (only its agent reaches it)."""
        proc = self.start(host, [sys.executable, "-u", "-c", ECHO_SCRIPT, str(port)], name)
        proc.wait_log("listening")
        return proc

    def connect(self, host: str, address: str, port: int, timeout: float = 5.0) -> socket.socket:
        return in_netns(self.ns(host), lambda: socket.create_connection((address, port), timeout=timeout))


@contextlib.contextmanager
def lan(tmp_path: Path, tag: str, subnet: str, names: list[str]) -> Iterator[Lan]:
    """`tag`: at most 6 characters (interface names stay within 15); `subnet`: e.g. "10.234.5" (a
    /24 used only inside these namespaces)."""
    skip_unless_netns()
    net = Lan(tag, tmp_path)
    spaces = [f"{tag}-lan"] + [net.ns(n) for n in names]
    for name in spaces:
        if name in netns_names():
            run("ip", "netns", "del", name, check=False)
    probe = run("ip", "netns", "add", spaces[0], check=False)
    if probe.returncode != 0:
        import pytest
        pytest.skip(f"`ip netns add` failed, network namespaces unavailable: {probe.stderr.strip()}")
    try:
        hub = spaces[0]
        run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", hub, "link", "set", "br0", "up")
        for i, name in enumerate(names, start=1):
            ns = net.ns(name)
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            host_dev, hub_dev = f"{tag}h{i}", f"{tag}p{i}"
            run("ip", "link", "add", host_dev, "netns", ns, "type", "veth", "peer", "name", hub_dev, "netns", hub)
            run("ip", "-n", hub, "link", "set", hub_dev, "master", "br0")
            run("ip", "-n", hub, "link", "set", hub_dev, "up")
            net.ip[name] = f"{subnet}.{i}"
            run("ip", "-n", ns, "addr", "add", f"{net.ip[name]}/24", "dev", host_dev)
            run("ip", "-n", ns, "link", "set", host_dev, "up")
        yield net
    finally:
        teardown(net.procs, list(reversed(spaces)))
