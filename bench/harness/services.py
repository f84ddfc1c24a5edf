"""The target services (what every path forwards to), on 127.0.0.1 only (metric h: on every address
of the agent host's network namespace, started through a `prefix` such as `ip netns exec NS`).

- iperf3: a fresh one-off server (`iperf3 -s -1`) for every iperf3 measurement (a, b, g, i: it
  takes iperf3 -u's datagrams on the UDP port of its number), so a failed test can never leave a
  busy server behind.
- nginx: one master + 1 worker (`worker_processes 1`, `daemon off;`, running as root with its
  own prefix, config, pid file and temp paths in the run's temp dir), serving /1k (1024 bytes)
  and /1m (1 MiB); access log off, sendfile on, keepalive_requests 1000000 (a wrk connection
  stays one TCP connection for the whole run: metric c measures the relay, d measures connects).
- echo: `echo_server.py`, one epoll loop in its own process, RLIMIT_NOFILE at the hard limit.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

from .procs import Proc, Procs, wait_until, listening

HERE = Path(__file__).resolve().parent


class Ports:
    """Free TCP (and UDP) ports on 127.0.0.1, below the ephemeral range (so a client socket never holds one)."""

    def __init__(self, low: int = 20000, high: int = 32000) -> None:
        self.low, self.high = low, high
        self.next = random.randrange(low, high)
        self.used: set[int] = set()

    def get(self) -> int:
        for _ in range(self.high - self.low):
            port = self.next
            self.next = self.low if self.next + 1 >= self.high else self.next + 1
            if port in self.used:
                continue
            try:  # free for TCP and for UDP (metric i uses one number for both)
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind(("127.0.0.1", port))
            except OSError:
                continue
            if listening(port):
                continue
            self.used.add(port)
            return port
        raise RuntimeError("no free port")


def udp_bound(port: int, pid: int | None = None) -> bool:
    """Whether a UDP socket is bound to `port` (any address), from /proc/net/udp{,6} (with `pid`: in
    that process's network namespace)."""
    want = f":{port:04X}"
    base = f"/proc/{pid}/net" if pid else "/proc/net"
    for table in (f"{base}/udp", f"{base}/udp6"):
        try:
            with open(table) as f:
                next(f)
                if any(line.split()[1].endswith(want) for line in f):
                    return True
        except OSError:
            pass
    return False


def wait_listen(proc: Proc, port: int, what: str, timeout: float = 15.0, where: Proc | None = None) -> None:
    """Wait until `port` listens in the network namespace of `where` (default: `proc`, which must
    stay alive meanwhile)."""
    pid = (where or proc).pid
    try:
        wait_until(lambda: listening(port, pid), timeout, f"{what} to listen on port {port}", alive=proc.alive)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n--- {proc.name} log ---\n{proc.log_tail()}") from None


class Nginx:
    WORKERS = 1

    def __init__(self, procs: Procs, ports: Ports, workdir: Path) -> None:
        self.procs = procs
        self.prefix = workdir / "nginx"
        self.port = ports.get()
        self.proc: Proc | None = None

    def start(self) -> int:
        p = self.prefix
        (p / "html").mkdir(parents=True, exist_ok=True)
        (p / "tmp").mkdir(exist_ok=True)
        rnd = random.Random(7)
        (p / "html" / "1k").write_bytes(rnd.randbytes(1024))
        (p / "html" / "1m").write_bytes(rnd.randbytes(1024 * 1024))
        conf = f"""
user root;
worker_processes {self.WORKERS};
worker_rlimit_nofile 20000;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
daemon off;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        root {p}/html;
        location / {{ }}
    }}
}}
"""
        (p / "nginx.conf").write_text(conf)
        self.proc = self.procs.start("nginx", ["nginx", "-p", str(p), "-c", str(p / "nginx.conf"),
                                               "-e", str(p / "error.log")])
        wait_listen(self.proc, self.port, "nginx")
        return self.port


class Echo:
    def __init__(self, procs: Procs, ports: Ports, bind: str = "127.0.0.1", prefix: list[str] | None = None) -> None:
        self.procs = procs
        self.port = ports.get()
        self.bind = bind
        self.prefix = prefix or []
        self.proc: Proc | None = None

    def start(self) -> int:
        self.proc = self.procs.start("echo", [*self.prefix, sys.executable, str(HERE / "echo_server.py"), str(self.port),
                                              self.bind])
        wait_listen(self.proc, self.port, "echo server")
        return self.port


def iperf3_server(procs: Procs, ports: Ports, bind: str | None = "127.0.0.1",
                  prefix: list[str] | None = None) -> tuple[Proc, int]:
    """A one-off iperf3 server on `bind` (None: every address)."""
    port = ports.get()
    proc = procs.start("iperf3-server", [*(prefix or []), "iperf3", "-s", "-1", *(["-B", bind] if bind else []),
                                         "-p", str(port)])
    wait_listen(proc, port, "iperf3 server")
    return proc, port


def nproc() -> int:
    return os.cpu_count() or 1
