"""Two hosts joined by a shaped link, in network namespaces, for metric h.

`ShapedLink()` (a context manager) makes two namespaces, ``server`` and ``agent``, joined by one
veth pair, each end with an address of a /24 used only inside them (10.234.X.1 and 10.234.X.2),
and the same tbf on both ends' egress (``tc qdisc add dev DEV root tbf rate 40mbit burst 16kb
latency 20ms`` by default): a link of that rate each way with a bounded queue at the bottleneck
(this kernel has no netem; see /work/shared/notes/network-emulation.md).  Names carry the
runner's pid, so two runs never meet.  `cmd(side, args)` is the command line that runs `args`
in a side's namespace (`ip netns exec` execs the command: the pid the harness records is the
command's own); `congestion` sets the TCP congestion control in both (else they keep what a new
namespace gets: the host's default); `ss(side)` lists that side's TCP sockets with their queues (`ss -tin`).  On exit
the namespaces are deleted, also after an error or Ctrl-C; the processes in them are the
caller's to end first (by pid, through `Procs`).

`unavailable()` says why metric h cannot run here (not root, no `ip`, no `tc`), or None.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

SIDES = ("server", "agent")


def _run(*args: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"the `{tool}` command is missing (apt-get install {pkg})"
    return None


class ShapedLink:
    def __init__(self, rate: str = "40mbit", burst: str = "16kb", latency: str = "20ms", tag: str | None = None,
                 congestion: str | None = None) -> None:
        pid = os.getpid()
        tag = tag or f"awh{pid}"
        self.ns = {"server": f"{tag}-srv", "agent": f"{tag}-agt"}
        self.dev = {"server": f"{tag}s"[:15], "agent": f"{tag}a"[:15]}
        subnet = f"10.234.{pid % 250}"
        self.addr = {"server": f"{subnet}.1", "agent": f"{subnet}.2"}
        self.tbf = ["tbf", "rate", rate, "burst", burst, "latency", latency]
        self.cc = congestion  # TCP congestion control in both namespaces (None: what a new namespace gets)
        self.made: list[str] = []

    def describe(self) -> str:
        return (f"namespaces {self.ns['server']} ({self.addr['server']}) and {self.ns['agent']} ({self.addr['agent']}), "
                f"one veth pair, `tc qdisc add dev DEV root {' '.join(self.tbf)}` on both ends")

    def cmd(self, side: str, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side], *args]

    def __enter__(self) -> "ShapedLink":
        try:
            for side in SIDES:
                _run("ip", "netns", "add", self.ns[side])
                self.made.append(self.ns[side])
                _run("ip", "-n", self.ns[side], "link", "set", "lo", "up")
                if self.cc:
                    _run(*self.cmd(side, ["sysctl", "-q", "-w", f"net.ipv4.tcp_congestion_control={self.cc}"]))
            _run("ip", "link", "add", self.dev["server"], "netns", self.ns["server"], "type", "veth",
                 "peer", "name", self.dev["agent"], "netns", self.ns["agent"])
            for side in SIDES:
                ns, dev = self.ns[side], self.dev[side]
                _run("ip", "-n", ns, "addr", "add", f"{self.addr[side]}/24", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *self.tbf)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Delete the namespaces (the veth pair goes with them); idempotent, never raises."""
        for ns in reversed(self.made):
            try:
                _run("ip", "netns", "del", ns, check=False)
            except (OSError, subprocess.SubprocessError):
                pass
        self.made = []

    def congestion(self) -> str:
        return _run(*self.cmd("server", ["sysctl", "-n", "net.ipv4.tcp_congestion_control"]), check=False).stdout.strip() or "?"

    def ss(self, side: str) -> str:
        """`ss -tin` in a side's namespace: every TCP socket with its queues, cwnd, rtt, notsent (no -p:
        finding the processes walks every /proc/PID/fd, enough CPU to show in the latencies)."""
        return _run("ip", "netns", "exec", self.ns[side], "ss", "-tin", check=False).stdout

    def drops(self, side: str) -> int | None:
        """Packets the side's tbf has dropped so far (its queue was full), from `tc -s qdisc`."""
        out = _run("tc", "-n", self.ns[side], "-s", "qdisc", "show", "dev", self.dev[side], check=False).stdout
        m = re.search(r"\(dropped (\d+),", out)
        return int(m.group(1)) if m else None
