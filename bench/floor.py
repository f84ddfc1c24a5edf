"""The floor under Anywhere on this machine: what the same work costs with no tunnel logic at all.

    .venv/bin/python bench/floor.py [--gb N] [--echoes N] [--rounds N]

Anywhere relays every byte twice through the kernel and once through TLS each way (client →
anywhered → TLS → agent → target).  This measures, in one run, beside Anywhere itself:

- bulk, CPU seconds per GB of each piece on loopback, with the same TLS contexts as Anywhere
  (tls.py): a plain relay hop (recv + send, 256 KiB buffers: what socat does), a TLS sender
  (encrypt + send, 256 KiB writes) and a TLS receiver (recv + decrypt).  The sum for the two
  processes (plain in + TLS out, TLS in + plain out) is what no Python tunnel with user-space
  TLS can go under here; Anywhere's figure is the g metric of one iperf3 stream through it;
- small messages: a 100-byte echo through a minimal pair of relay processes (one selectors
  loop each, plain ↔ TLS, no framing, no flow control, nothing else), round trip and CPU per
  echo in each relay, beside the same echo through anywhered + agent.

Medians of --rounds.  Not part of `make test` (it is a measurement, not a check).  Every process
it starts is its own child and is ended (or reaped) before it returns.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from anywhere import tls  # noqa: E402
from harness.metrics import Settings, Targets, iperf  # noqa: E402
from harness.paths import PATHS, Context  # noqa: E402
from harness.procs import CLK_TCK, Procs, cpu_ticks, raise_nofile  # noqa: E402
from harness.services import Echo, Ports  # noqa: E402

CHUNK = 256 * 1024


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def child(fn, *args) -> tuple[int, int]:
    """Fork; the child runs fn(write_fd, *args) and exits.  Returns (pid, read end of its report pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            fn(w, *args)
        except BaseException as exc:  # report, never return into the parent's code
            os.write(w, f"error {exc!r}\n".encode())
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def report(fd: int) -> str:
    with os.fdopen(fd) as f:
        return f.read().strip()


# -- bulk ---------------------------------------------------------------------------------------------
def _send_plain(w: int, port: int, nbytes: int) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    data = os.urandom(CHUNK)
    sent = 0
    while sent < nbytes:
        s.sendall(data)
        sent += CHUNK
    s.close()


def _relay_plain(w: int, lsock: socket.socket, out_port: int) -> None:
    src, _ = lsock.accept()
    dst = socket.create_connection(("127.0.0.1", out_port))
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got, t = 0, cpu()
    while n := src.recv_into(buf):
        dst.sendall(view[:n])
        got += n
    os.write(w, f"{(cpu() - t) / (got / 1e9):.4f}\n".encode())


def _sink_plain(w: int, lsock: socket.socket) -> None:
    conn, _ = lsock.accept()
    buf = bytearray(CHUNK)
    while conn.recv_into(buf):
        pass


def _send_tls(w: int, port: int, nbytes: int, creds: Path) -> None:
    ctx = tls.client_context(str(creds / "ca.crt"), str(creds / "agent-1.crt"), str(creds / "agent-1.key"))
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    data = os.urandom(CHUNK)
    sent, t = 0, cpu()
    while sent < nbytes:
        s.sendall(data)
        sent += CHUNK
    os.write(w, f"{(cpu() - t) / (sent / 1e9):.4f}\n".encode())
    s.shutdown(socket.SHUT_WR)  # then wait for the receiver to close, so no unread ticket resets the stream
    s.settimeout(60)
    try:
        while s.recv(65536):
            pass
    except (OSError, ssl.SSLError):
        pass


def _recv_tls(w: int, lsock: socket.socket, creds: Path) -> None:
    ctx = tls.server_context(str(creds / "ca.crt"), str(creds / "server.crt"), str(creds / "server.key"))
    conn, _ = lsock.accept()
    s = ctx.wrap_socket(conn, server_side=True)
    buf = bytearray(512 * 1024)
    got, t = 0, cpu()
    while True:
        try:
            n = s.recv_into(buf)
        except ssl.SSLError:
            break
        if not n:
            break
        got += n
    os.write(w, f"{(cpu() - t) / (got / 1e9):.4f}\n".encode())
    s.close()


def bulk_floor(nbytes: int, creds: Path) -> dict:
    out: dict[str, float] = {}
    sink = listener()
    relay = listener()
    p_sink, _ = child(_sink_plain, sink)
    p_relay, r_relay = child(_relay_plain, relay, sink.getsockname()[1])
    p_send, _ = child(_send_plain, relay.getsockname()[1], nbytes)
    out["plain relay hop"] = float(report(r_relay))
    for pid in (p_send, p_relay, p_sink):
        os.waitpid(pid, 0)
    sink.close()
    relay.close()
    lsock = listener()
    p_recv, r_recv = child(_recv_tls, lsock, creds)
    p_send, r_send = child(_send_tls, lsock.getsockname()[1], nbytes, creds)
    out["TLS send"] = float(report(r_send))
    out["TLS receive"] = float(report(r_recv))
    for pid in (p_send, p_recv):
        os.waitpid(pid, 0)
    lsock.close()
    return out


# -- small messages through a minimal relay pair -------------------------------------------------------
def _min_relay(w: int, plain: socket.socket, tsock: ssl.SSLSocket, nbytes: int) -> None:
    """One selectors loop: plain → TLS and TLS → plain, nothing else, until `nbytes` moved in all;
    reports the CPU µs it took."""
    sel = selectors.DefaultSelector()
    plain.setblocking(False)
    tsock.setblocking(False)
    sel.register(plain, selectors.EVENT_READ, "plain")
    sel.register(tsock, selectors.EVENT_READ, "tls")
    buf = bytearray(65536)
    view = memoryview(buf)
    moved, t = 0, cpu()
    while moved < nbytes:
        for key, _ in sel.select():
            if key.data == "plain":
                n = plain.recv_into(buf)
                if not n:
                    return
                tsock.sendall(view[:n])
                moved += n
            else:
                while True:
                    try:
                        n = tsock.recv_into(buf)
                    except ssl.SSLWantReadError:
                        break
                    if not n:
                        return
                    plain.setblocking(True)
                    plain.sendall(view[:n])
                    plain.setblocking(False)
                    moved += n
    os.write(w, f"{(cpu() - t) * 1e6:.1f}\n".encode())


def _server_side(w: int, tls_l: socket.socket, client_l: socket.socket, nbytes: int, creds: Path) -> None:
    ctx = tls.server_context(str(creds / "ca.crt"), str(creds / "server.crt"), str(creds / "server.key"))
    t = ctx.wrap_socket(tls_l.accept()[0], server_side=True)
    c, _ = client_l.accept()
    _min_relay(w, c, t, nbytes)


def _agent_side(w: int, tls_port: int, target_port: int, nbytes: int, creds: Path) -> None:
    ctx = tls.client_context(str(creds / "ca.crt"), str(creds / "agent-1.crt"), str(creds / "agent-1.key"))
    t = ctx.wrap_socket(socket.create_connection(("127.0.0.1", tls_port)), server_hostname="localhost")
    target = socket.create_connection(("127.0.0.1", target_port))
    target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _min_relay(w, target, t, nbytes)


def echo_loop(port: int, count: int, size: int = 100) -> float:
    """Round trip of `count` sequential echoes of `size` bytes; returns µs per echo."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"x" * size
        s.sendall(msg)
        _recv_n(s, size)
        t0 = time.perf_counter()
        for _ in range(count):
            s.sendall(msg)
            _recv_n(s, size)
        return (time.perf_counter() - t0) / count * 1e6


def _recv_n(s: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("echo closed")
        got += len(data)


def echo_floor(echo_port: int, count: int, creds: Path) -> dict:
    tls_l, client_l = listener(), listener()
    nbytes = 2 * 100 * (count + 1)  # each relay moves every request and every reply
    p_server, r_server = child(_server_side, tls_l, client_l, nbytes, creds)
    p_agent, r_agent = child(_agent_side, tls_l.getsockname()[1], echo_port, nbytes, creds)
    try:
        rtt = echo_loop(client_l.getsockname()[1], count)
    finally:
        tls_l.close()
        client_l.close()
    server_us, agent_us = float(report(r_server)), float(report(r_agent))
    for pid in (p_server, p_agent):
        os.waitpid(pid, 0)
    return {"rtt": rtt, "server": server_us / (count + 1), "agent": agent_us / (count + 1)}


def echo_anywhere(ctx: Context, echo_port: int, count: int) -> dict:
    path = PATHS["anywhere"](ctx)
    try:
        port = path.start(echo_port)
        agent, server = path.procs
        echo_loop(port, 50)
        before = [cpu_ticks([server.pid]), cpu_ticks([agent.pid])]
        rtt = echo_loop(port, count)
        after = [cpu_ticks([server.pid]), cpu_ticks([agent.pid])]
    finally:
        path.stop()
    us = [(a - b) / CLK_TCK / count * 1e6 for a, b in zip(after, before)]
    return {"rtt": rtt, "server": us[0], "agent": us[1]}


def bulk_anywhere(ctx: Context, procs: Procs, ports: Ports, seconds: int) -> float:
    """CPU seconds of anywhered + agent per GB of one iperf3 stream: metric g of bench/run.py."""
    return iperf(PATHS["anywhere"](ctx), Targets(procs, ports, 0, 0), Settings(iperf_seconds=seconds), 1)["cpu_s_per_gb"]


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/floor.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.0, help="GB per bulk measurement")
    p.add_argument("--echoes", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="anywhere-floor-"))
    (workdir / "logs").mkdir()
    procs = Procs(workdir / "logs")
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)
    try:
        ports = Ports()
        ctx = Context(procs, ports, workdir, dict(os.environ, PYTHONPATH=str(HERE.parent)))
        creds = ctx.anywhere_creds()
        echo_port = Echo(procs, ports).start()
        for rnd in range(args.rounds):
            print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for k, v in bulk_floor(int(args.gb * 1e9), creds).items():
                add(f"bulk: {k} (s/GB)", v)
            add("bulk: Anywhere, anywhered + agent (s/GB)", bulk_anywhere(ctx, procs, ports, 4))
            floor = echo_floor(echo_port, args.echoes, creds)
            anyw = echo_anywhere(ctx, echo_port, args.echoes)
            for k in ("rtt", "server", "agent"):
                add(f"echo: minimal relay pair, {k} (µs)", floor[k])
                add(f"echo: Anywhere, {k} (µs)", anyw[k])
    finally:
        procs.stop_all()
    med = {k: statistics.median(v) for k, v in rows.items()}
    two_hops = med["bulk: plain relay hop (s/GB)"] + med["bulk: TLS send (s/GB)"] + med["bulk: TLS receive (s/GB)"]
    print(f"{'measurement':48} {'median':>9}  runs")
    for k, v in med.items():
        print(f"{k:48} {v:9.3f}  {', '.join(f'{x:.3g}' for x in rows[k])}")
    print(f"{'bulk: floor for two processes (s/GB)':48} {two_hops:9.3f}  plain hop + TLS send + TLS receive")
    print(f"Anywhere / floor: bulk {med['bulk: Anywhere, anywhered + agent (s/GB)'] / two_hops:.2f}x; echo CPU "
          f"{(med['echo: Anywhere, server (µs)'] + med['echo: Anywhere, agent (µs)']) / (med['echo: minimal relay pair, server (µs)'] + med['echo: minimal relay pair, agent (µs)']):.2f}x, "
          f"round trip {med['echo: Anywhere, rtt (µs)'] / med['echo: minimal relay pair, rtt (µs)']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
