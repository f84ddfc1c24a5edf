"""Deterministic, checked bulk traffic and an open-loop interactive echo, for the shaped-link tests.

Run as a script it is the bulk target (`python bulkpeer.py PORT`, on 127.0.0.1; prints
"listening"): each connection starts with one line, ``down SEED N`` or ``up SEED N``.

- down: the target sends N bytes of `Pattern(SEED)`, half-closes, and closes when the client has.
- up: the client sends N bytes of `Pattern(SEED)` after the line; the target checks each byte as
  it arrives and reports 9-byte records: ``p`` + the count checked so far (big-endian, 8 bytes)
  every `REPORT` bytes, then ``k`` + N when all N came and matched, or ``x`` + the offset of the
  first byte that differs (or of the EOF that came early), and closes.

A `Pattern` is a byte stream that only its seed decides (SHAKE-128 blocks), so either end can
check any byte without storing the data: a byte lost, duplicated, reordered or changed shows
as the offset where the stream stops matching.

`BulkDown` / `BulkUp` are the client ends, each in a thread of its own; `progress` is the count
of bytes proven to have crossed (received and matched; for up, what the target reported), with
`trace` (time, progress) samples for fairness checks.  `Interactive` sends a SIZE-byte numbered
message every 1/RATE s whatever the echoes do (open loop) from one thread and checks, from
another, that each comes back whole and in order.  All of them only report; every loop is
bounded in count and time.
"""

from __future__ import annotations

import hashlib
import select
import socket
import struct
import sys
import threading
import time

BLOCK = 65536
REPORT = 128 * 1024


class Pattern:
    """The byte stream of `seed`: block i is SHAKE-128("seed:i") of BLOCK bytes."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.offset = 0  # of the next byte `take` returns or `check` expects
        self._block = b""
        self._index = -1

    def _at(self, offset: int) -> bytes:
        index = offset // BLOCK
        if index != self._index:
            self._index = index
            self._block = hashlib.shake_128(f"{self.seed}:{index}".encode()).digest(BLOCK)
        return self._block[offset % BLOCK:]

    def take(self, n: int) -> bytes:
        """The next n bytes (n <= BLOCK)."""
        out = self._at(self.offset)[:n]
        if len(out) < n:
            out += self._at(self.offset + len(out))[:n - len(out)]
        self.offset += n
        return out

    def check(self, data: bytes | memoryview) -> int | None:
        """Compare the next len(data) bytes; None if they match, else the offset of the first that differs."""
        data = memoryview(data)
        while data:
            want = self._at(self.offset)[:len(data)]
            got = data[:len(want)]
            if got != want:
                first = next(i for i in range(len(want)) if got[i] != want[i])
                return self.offset + first
            self.offset += len(want)
            data = data[len(want):]
        return None


# -- the target -----------------------------------------------------------------------------------------
def _read_line(conn: socket.socket, limit: int = 128) -> tuple[bytes, bytes]:
    buf = b""
    while b"\n" not in buf:
        data = conn.recv(limit)
        if not data or len(buf) > limit:
            raise EOFError("no request line")
        buf += data
    line, rest = buf.split(b"\n", 1)
    return line, rest


def _serve(conn: socket.socket) -> None:
    try:
        conn.settimeout(120)
        line, rest = _read_line(conn)
        kind, seed, n = line.decode().split()
        pattern, n = Pattern(int(seed)), int(n)
        if kind == "down":
            while pattern.offset < n:
                conn.sendall(pattern.take(min(BLOCK, n - pattern.offset)))
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
            return
        reported, data = 0, rest
        while True:
            if data:
                bad = pattern.check(data[:n - pattern.offset])
                if bad is not None:
                    conn.sendall(b"x" + struct.pack("!Q", bad))
                    return
                if pattern.offset >= n:
                    conn.sendall(b"k" + struct.pack("!Q", n))
                    return
                if pattern.offset - reported >= REPORT:
                    reported = pattern.offset
                    conn.sendall(b"p" + struct.pack("!Q", reported))
            data = conn.recv(65536)
            if not data:
                conn.sendall(b"x" + struct.pack("!Q", pattern.offset))  # EOF before N bytes
                return
    except (OSError, EOFError, ValueError):
        pass
    finally:
        conn.close()


def serve(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)
    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve, args=(conn,), daemon=True).start()


# -- the client ends ----------------------------------------------------------------------------------
class _Ender:
    """A thread around one connection: `progress`, `trace`, `error` (None: fine), `done`."""

    def __init__(self, sock: socket.socket, name: str, io_timeout: float) -> None:
        self.sock = sock
        self.name = name
        self.io_timeout = io_timeout
        self.progress = 0
        self.trace: list[tuple[float, int]] = []
        self.error: str | None = None
        self.done = False
        self.thread = threading.Thread(target=self._guarded, name=name, daemon=True)

    def start(self) -> "_Ender":
        self.thread.start()
        return self

    def _advance(self, progress: int) -> None:
        self.progress = progress
        self.trace.append((time.monotonic(), progress))

    def _guarded(self) -> None:
        try:
            self.sock.settimeout(self.io_timeout)
            self._run()
        except (OSError, EOFError, ValueError) as exc:
            self.error = self.error or f"{type(exc).__name__}: {exc}"
        finally:
            self.done = True

    def _run(self) -> None:
        raise NotImplementedError

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.error = self.error or f"still running after {timeout:g} s"
        self.sock.close()

    def at(self, when: float) -> int:
        """Progress at monotonic time `when` (the last sample at or before it)."""
        return max((p for t, p in self.trace if t <= when), default=0)


class BulkDown(_Ender):
    """Asks the target for n bytes of Pattern(seed) and checks every byte that arrives."""

    def __init__(self, sock: socket.socket, seed: int, n: int, io_timeout: float = 30.0) -> None:
        super().__init__(sock, f"down-{seed}", io_timeout)
        self.seed, self.n = seed, n

    def _run(self) -> None:
        self.sock.sendall(f"down {self.seed} {self.n}\n".encode())
        pattern = Pattern(self.seed)
        while True:
            data = self.sock.recv(65536)
            if not data:
                break
            bad = pattern.check(data)
            if bad is not None or pattern.offset > self.n:
                self.error = f"{self.name}: byte {bad if bad is not None else self.n} is not the pattern's"
                return
            self._advance(pattern.offset)
        if pattern.offset != self.n:
            self.error = f"{self.name}: EOF after {pattern.offset} of {self.n} bytes"
            return
        self.sock.shutdown(socket.SHUT_WR)


class BulkUp(_Ender):
    """Sends n bytes of Pattern(seed); progress is what the target reports it has checked."""

    def __init__(self, sock: socket.socket, seed: int, n: int, io_timeout: float = 30.0) -> None:
        super().__init__(sock, f"up-{seed}", io_timeout)
        self.seed, self.n = seed, n
        self.sent = 0

    def _send(self) -> None:
        try:
            self.sock.sendall(f"up {self.seed} {self.n}\n".encode())
            pattern = Pattern(self.seed)
            while pattern.offset < self.n:
                self.sock.sendall(pattern.take(min(BLOCK, self.n - pattern.offset)))
                self.sent = pattern.offset
        except OSError as exc:
            self.error = self.error or f"{self.name}: send: {exc}"

    def _run(self) -> None:
        sender = threading.Thread(target=self._send, name=f"{self.name}-send", daemon=True)
        sender.start()
        buf = b""
        try:
            while True:
                data = self.sock.recv(64)
                if not data:
                    self.error = self.error or f"{self.name}: closed after {self.progress} of {self.n} bytes checked"
                    return
                buf += data
                while len(buf) >= 9:
                    kind, value = buf[:1], struct.unpack("!Q", buf[1:9])[0]
                    buf = buf[9:]
                    if kind == b"p":
                        self._advance(value)
                    elif kind == b"k" and value == self.n:
                        self._advance(value)
                        return
                    else:
                        self.error = f"{self.name}: the target found byte {value} not the pattern's"
                        return
        finally:
            sender.join(self.io_timeout)


class Interactive:
    """SIZE-byte numbered messages every 1/RATE s for `seconds` (open loop); each echo checked."""

    def __init__(self, sock: socket.socket, rate: float = 20.0, size: int = 64, seconds: float = 10.0,
                 io_timeout: float = 30.0) -> None:
        self.sock, self.rate, self.size, self.seconds = sock, rate, size, seconds
        self.io_timeout = io_timeout
        self.sent = 0
        self.echoed = 0  # came back whole, in order
        self.error: str | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._guard(self._send), daemon=True),
                         threading.Thread(target=self._guard(self._receive), daemon=True)]

    def message(self, seq: int) -> bytes:
        return struct.pack("!Q", seq) + bytes((seq + i) % 251 for i in range(self.size - 8))

    def _guard(self, fn):
        def run() -> None:
            try:
                fn()
            except (OSError, ValueError) as exc:
                self.error = self.error or f"interactive: {type(exc).__name__}: {exc}"
        return run

    def start(self) -> "Interactive":
        self.sock.settimeout(self.io_timeout)
        for t in self._threads:
            t.start()
        return self

    def stop_sending(self) -> None:
        self._stop.set()

    def _send(self) -> None:
        t0 = time.monotonic()
        count = int(self.seconds * self.rate)
        for seq in range(count):
            delay = t0 + seq / self.rate - time.monotonic()
            if self._stop.wait(max(0.0, delay)):
                return
            self.sock.sendall(self.message(seq))
            self.sent = seq + 1

    def _receive(self) -> None:
        buf = b""
        count = int(self.seconds * self.rate)
        heard = time.monotonic()
        while self.echoed < count:
            if self._stop.is_set() and self.echoed >= self.sent:
                return
            ready, _, _ = select.select([self.sock], [], [], 0.1)  # the socket's timeout is for the sender
            if not ready:
                if self.echoed < self.sent and time.monotonic() - heard > self.io_timeout:
                    raise ValueError(f"no echo for {self.io_timeout:g} s ({self.echoed} of {self.sent} back)")
                continue
            data = self.sock.recv(65536)
            heard = time.monotonic()
            if not data:
                raise ValueError(f"EOF after {self.echoed} echoes")
            buf += data
            while len(buf) >= self.size:
                if buf[:self.size] != self.message(self.echoed):
                    raise ValueError(f"echo {self.echoed} is not message {self.echoed} (lost, reordered or changed)")
                buf = buf[self.size:]
                self.echoed += 1

    def finish(self, timeout: float) -> None:
        """Stop sending; wait up to `timeout` for the echoes still out; close."""
        self.stop_sending()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads) and self.error is None:
            self.error = f"interactive: {self.sent - self.echoed} of {self.sent} echoes not back within {timeout:g} s"
        self.sock.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
