"""Load generator for metrics d and f, run in its own process (its CPU is never the tunnel's).

    python loadgen.py conns PORT --count 2000 --concurrency 50
        d: COUNT short connections, CONCURRENCY in flight; each connects, sends 1 byte, reads the
        1-byte echo, closes.  Prints one JSON object: ok, failed, errors, elapsed, rate.

    python loadgen.py hold PORT --count 5000 --sample 200 --open-timeout 60
        f: opens COUNT connections (each proven end to end by a 1-byte echo) and keeps them open;
        prints {"phase": "open", ...}; waits for a line on stdin; measures the round trip of a
        16-byte echo on SAMPLE of the open connections, one after another; prints
        {"phase": "rtt", ...}; waits for a line on stdin; closes everything and exits.

Both use one non-blocking epoll loop on 127.0.0.1.  Every wait is bounded.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import random
import resource
import selectors
import socket
import sys
import time
from collections import Counter

HOST = "127.0.0.1"


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))  # nearest rank
    return values[k]


class Opener:
    """Opens connections with a bound on those in flight; each must echo one byte to count."""

    def __init__(self, port: int, concurrency: int, timeout: float, keep: bool) -> None:
        self.port = port
        self.concurrency = concurrency
        self.timeout = timeout
        self.keep = keep
        self.sel = selectors.DefaultSelector()
        self.inflight: dict[int, tuple[socket.socket, float, int]] = {}  # fd -> (sock, started, phase)
        self.ok = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()
        self.kept: list[socket.socket] = []
        self.latencies: list[float] = []

    def _fail(self, fd: int, why: str) -> None:
        sock, _, _ = self.inflight.pop(fd)
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        self.failed += 1
        self.errors[why] += 1

    def _launch(self) -> None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            self.failed += 1
            self.errors[f"socket: {errno.errorcode.get(exc.errno, exc.errno)}"] += 1
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((HOST, self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed += 1
            self.errors[f"connect: {errno.errorcode.get(err, err)}"] += 1
            return
        self.inflight[sock.fileno()] = (sock, time.perf_counter(), 0)
        self.sel.register(sock, selectors.EVENT_WRITE)

    def _event(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        _, started, phase = self.inflight[fd]
        if phase == 0:  # connected (or failed to)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(fd, f"connect: {errno.errorcode.get(err, err)}")
                return
            try:
                sock.send(b"x")
            except OSError as exc:
                self._fail(fd, f"send: {errno.errorcode.get(exc.errno, exc.errno)}")
                return
            self.inflight[fd] = (sock, started, 1)
            self.sel.modify(sock, selectors.EVENT_READ)
            return
        try:
            data = sock.recv(16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(fd, f"recv: {errno.errorcode.get(exc.errno, exc.errno)}")
            return
        if data != b"x":
            self._fail(fd, "closed before the echo" if not data else "wrong echo")
            return
        self.sel.unregister(sock)
        del self.inflight[fd]
        self.ok += 1
        self.latencies.append(time.perf_counter() - started)
        if self.keep:
            self.kept.append(sock)
        else:
            sock.close()

    def run(self, count: int, deadline: float) -> float:
        """Open `count` connections (or until `deadline`, monotonic); returns the elapsed seconds."""
        t0 = time.perf_counter()
        started = 0
        last_sweep = time.monotonic()
        while True:
            now = time.monotonic()
            while started < count and len(self.inflight) < self.concurrency and now < deadline:
                self._launch()
                started += 1
            if not self.inflight and (started >= count or now >= deadline):
                break
            for key, _ in self.sel.select(0.2):
                self._event(key.fileobj)  # type: ignore[arg-type]
            if now - last_sweep > 0.2:
                last_sweep = now
                limit = time.perf_counter() - self.timeout
                for fd in [fd for fd, (_, t, _) in self.inflight.items() if t < limit]:
                    self._fail(fd, "timeout")
                if now >= deadline + self.timeout:  # bounded whatever happens
                    for fd in list(self.inflight):
                        self._fail(fd, "timeout")
        return time.perf_counter() - t0


def cmd_conns(args: argparse.Namespace) -> dict:
    op = Opener(args.port, args.concurrency, args.timeout, keep=False)
    elapsed = op.run(args.count, time.monotonic() + args.max_time)
    return {"ok": op.ok, "failed": op.failed, "attempted": op.ok + op.failed, "errors": dict(op.errors),
            "elapsed": elapsed, "rate": op.ok / elapsed if elapsed > 0 else 0.0,
            "conn_p50_ms": (pct(op.latencies, 50) or 0) * 1e3, "conn_p99_ms": (pct(op.latencies, 99) or 0) * 1e3}


def rtt_sample(socks: list[socket.socket], n: int, timeout: float) -> dict:
    rnd = random.Random(1)
    sample = rnd.sample(socks, min(n, len(socks)))
    payload = b"0123456789abcdef"
    rtts: list[float] = []
    errors: Counter[str] = Counter()
    for sock in sample:
        sock.setblocking(True)
        sock.settimeout(timeout)
        t0 = time.perf_counter()
        try:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                data = sock.recv(len(payload) - len(got))
                if not data:
                    raise ConnectionError("closed")
                got += data
        except (OSError, ConnectionError) as exc:
            errors[type(exc).__name__] += 1
            continue
        rtts.append(time.perf_counter() - t0)
    return {"phase": "rtt", "sampled": len(sample), "ok": len(rtts), "errors": dict(errors),
            "rtt_p50_ms": (pct(rtts, 50) or 0) * 1e3, "rtt_p99_ms": (pct(rtts, 99) or 0) * 1e3,
            "rtt_max_ms": max(rtts, default=0) * 1e3}


def cmd_hold(args: argparse.Namespace) -> None:
    op = Opener(args.port, args.concurrency, args.timeout, keep=True)
    elapsed = op.run(args.count, time.monotonic() + args.open_timeout)
    print(json.dumps({"phase": "open", "opened": len(op.kept), "failed": op.failed, "errors": dict(op.errors),
                      "elapsed": elapsed}), flush=True)
    sys.stdin.readline()
    print(json.dumps(rtt_sample(op.kept, args.sample, args.timeout)), flush=True)
    sys.stdin.readline()
    for sock in op.kept:
        sock.close()


def main() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("conns")
    c.add_argument("port", type=int)
    c.add_argument("--count", type=int, default=2000)
    c.add_argument("--concurrency", type=int, default=50)
    c.add_argument("--timeout", type=float, default=10.0, help="per connection")
    c.add_argument("--max-time", type=float, default=120.0, help="stop launching after this")
    h = sub.add_parser("hold")
    h.add_argument("port", type=int)
    h.add_argument("--count", type=int, default=5000)
    h.add_argument("--concurrency", type=int, default=100)
    h.add_argument("--sample", type=int, default=200)
    h.add_argument("--timeout", type=float, default=10.0, help="per connection / per echo")
    h.add_argument("--open-timeout", type=float, default=60.0)
    args = p.parse_args()
    if args.mode == "conns":
        print(json.dumps(cmd_conns(args)), flush=True)
    else:
        cmd_hold(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
