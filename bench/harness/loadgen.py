"""Load generator for metrics d and f, run in its own process (its CPU is never the tunnel's).

    python loadgen.py conns PORT --count 2000 --concurrency 50
        d: COUNT short connections, CONCURRENCY in flight; each connects, sends 1 byte, reads the
        1-byte echo, closes.  Prints one JSON object: ok, failed, errors, elapsed, rate.

    python loadgen.py hold PORT --count 5000 --sample 200 --open-timeout 60
        f: opens COUNT connections (each proven end to end by a 1-byte echo) and keeps them open;
        prints {"phase": "open", ...}; waits for a line on stdin; measures the round trip of a
        16-byte echo on SAMPLE of the open connections, one after another; prints
        {"phase": "rtt", ...}; waits for a line on stdin; closes everything and exits.

    python loadgen.py interactive PORT --host H --rate 20 --size 64 --seconds 15 --skip 3
        h: one connection; a SIZE-byte message every 1/RATE s on a fixed schedule (sent whether
        or not the earlier echoes are back: a slow echo does not slow the probe down), for SKIP +
        SECONDS s; the round trip of each message sent after SKIP s is recorded; after the last
        send it waits up to --drain s for the echoes still out.  Prints one JSON object: sent,
        answered, lost (not back in time), rtt p50/p99/max/mean in ms and every rtt.

conns and hold use one non-blocking epoll loop on 127.0.0.1.  Every wait is bounded.
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


def cmd_interactive(args: argparse.Namespace) -> dict:
    """The interactive probe of metric h (see the module's docstring)."""
    interval = 1.0 / args.rate
    count = int((args.skip + args.seconds) * args.rate)
    skip = int(args.skip * args.rate)
    sock = socket.create_connection((args.host, args.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sent_at: list[float] = []  # by sequence number
    rtts: list[float] = []  # by sequence number, in the order the echoes come back
    outbuf = b""
    got = bytearray()
    pad = bytes(args.size - 8)
    t0 = time.monotonic()
    end = t0 + count * interval + args.drain
    error = None
    while len(rtts) < count and time.monotonic() < end:
        now = time.monotonic()
        while len(sent_at) < count and t0 + len(sent_at) * interval <= now:
            outbuf += len(sent_at).to_bytes(8, "big") + pad
            sent_at.append(now)
        if outbuf:
            try:
                outbuf = outbuf[sock.send(outbuf):]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                error = f"send: {exc}"
                break
        next_send = t0 + len(sent_at) * interval if len(sent_at) < count else end
        wait = max(0.0, min(next_send, end) - time.monotonic())
        sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if outbuf else 0))
        for _key, _ev in sel.select(wait):
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                error = f"recv: {exc}"
                break
            if not data:
                error = "the echo connection closed"
                break
            now = time.monotonic()
            got += data
            while len(got) >= args.size:
                seq = int.from_bytes(got[:8], "big")
                if seq != len(rtts) or seq >= len(sent_at):
                    error = f"echo {len(rtts)} came back as {seq}"
                    break
                rtts.append(now - sent_at[seq])
                del got[:args.size]
        if error:
            break
    sock.close()
    kept = [r * 1e3 for r in rtts[skip:]]
    measured = count - skip
    return {"sent": len(sent_at), "answered": len(rtts), "measured": measured, "lost": measured - len(kept),
            "error": error, "rtt_p50_ms": pct(kept, 50), "rtt_p99_ms": pct(kept, 99),
            "rtt_max_ms": max(kept, default=None), "rtt_mean_ms": sum(kept) / len(kept) if kept else None,
            "rtts_ms": [round(r, 2) for r in kept]}


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
    i = sub.add_parser("interactive")
    i.add_argument("port", type=int)
    i.add_argument("--host", default=HOST)
    i.add_argument("--rate", type=float, default=20.0, help="messages per second")
    i.add_argument("--size", type=int, default=64, help="bytes per message (at least 8)")
    i.add_argument("--seconds", type=float, default=15.0, help="measured")
    i.add_argument("--skip", type=float, default=0.0, help="seconds sent first and not measured")
    i.add_argument("--drain", type=float, default=5.0, help="after the last send, wait this long for echoes")
    args = p.parse_args()
    if args.mode == "conns":
        print(json.dumps(cmd_conns(args)), flush=True)
    elif args.mode == "interactive":
        print(json.dumps(cmd_interactive(args)), flush=True)
    else:
        cmd_hold(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
