"""Checksummed traffic through a tunnel to an echo target, for the fault and soak tests.

`EchoStream` is one long-lived connection moving random blocks there and back in a thread and
checking every byte that returns; `one_shot` is one short connection (payload, EOF, everything
back, EOF).  Both only report; the tests decide what is expected.  Every loop is bounded in count
and time.
"""

from __future__ import annotations

import os
import socket
import threading
import time


class EchoStream:
    """A live tunneled connection to an echo target: send a random block, read exactly it back, repeat.

    `bytes_checked` counts bytes that made the round trip and compared equal.  The thread ends by
    itself when the connection fails (`ended` says how) or after `max_seconds`; `finish()` stops
    it and closes the connection cleanly (EOF both ways) if it is still up.
    """

    def __init__(self, sock: socket.socket, name: str, block: int = 16384, pace: float = 0.005,
                 max_seconds: float = 900.0, io_timeout: float = 15.0) -> None:
        self.sock = sock
        self.name = name
        self.block = block
        self.pace = pace
        self.max_seconds = max_seconds
        self.io_timeout = io_timeout
        self.bytes_checked = 0
        self.rounds = 0
        self.corrupt: str | None = None  # set if a byte came back different
        self.ended: str | None = None  # set if the connection failed before finish()
        self.ended_at: float | None = None
        self.clean_close: bool | None = None  # set by finish()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"stream-{name}", daemon=True)

    def start(self) -> "EchoStream":
        self.thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        self.sock.settimeout(self.io_timeout)
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                payload = os.urandom(self.block)
                self.sock.sendall(payload)
                got = bytearray()
                while len(got) < len(payload):
                    data = self.sock.recv(len(payload) - len(got))
                    if not data:
                        raise EOFError(f"EOF after {len(got)} of {len(payload)} echoed bytes")
                    got += data
                if got != payload:
                    first = next(i for i in range(len(payload)) if got[i] != payload[i])
                    self.corrupt = f"{self.name}: byte {self.bytes_checked + first} differs"
                    raise EOFError(self.corrupt)
                with self._lock:
                    self.bytes_checked += len(payload)
                    self.rounds += 1
                if self.pace:
                    time.sleep(self.pace)
        except (OSError, EOFError) as exc:
            self.ended = f"{type(exc).__name__}: {exc}"
            self.ended_at = time.monotonic()

    def progress(self) -> int:
        with self._lock:
            return self.bytes_checked

    def wait_progress(self, more: int, timeout: float) -> None:
        """Wait until `more` further bytes have been checked; AssertionError if not within `timeout`."""
        target = self.progress() + more
        deadline = time.monotonic() + timeout
        while self.progress() < target:
            if self.ended:
                raise AssertionError(f"{self.name} ended: {self.ended}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: fewer than {more} bytes moved in {timeout} s")
            time.sleep(0.02)

    def finish(self, timeout: float = 15.0) -> None:
        """Stop; if the connection is still up, half-close and expect the echo's EOF with nothing before it."""
        self._stop.set()
        self.thread.join(timeout + self.io_timeout)
        if self.thread.is_alive():
            raise AssertionError(f"{self.name}: the stream thread did not stop")
        try:
            if self.ended is None:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                    self.sock.settimeout(timeout)
                    rest = self.sock.recv(65536)
                    self.clean_close = rest == b""
                    if rest:
                        self.corrupt = f"{self.name}: {len(rest)} unexpected bytes after the last echo"
                except OSError as exc:
                    self.ended = f"at close: {type(exc).__name__}: {exc}"
                    self.clean_close = False
        finally:
            self.sock.close()


def one_shot(host: str, port: int, size: int, timeout: float = 15.0, connect=None) -> dict:
    """One short tunneled connection to an echo target: `size` random bytes, EOF, all back, EOF.

    Returns {"ok": bool, "match": bool, "prefix": bool, "received": int, "error": str | None}:
    ok means every byte came back equal and then EOF; prefix means what did come back is an
    uncorrupted beginning of what was sent (true also when ok).  `connect(host, port, timeout)`
    makes the socket (default: socket.create_connection), e.g. inside a network namespace.
    """
    connect = connect or (lambda h, p, t: socket.create_connection((h, p), timeout=t))
    payload = os.urandom(size)
    got = bytearray()
    error = None
    try:
        with connect(host, port, timeout) as c:
            c.settimeout(timeout)
            reader_error: list[BaseException] = []

            def read() -> None:
                try:
                    while True:
                        data = c.recv(65536)
                        if not data:
                            return
                        got.extend(data)
                        if len(got) > size:
                            return
                except OSError as exc:
                    reader_error.append(exc)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()  # read while writing: a large payload must not deadlock on full buffers
            try:
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)
            finally:
                reader.join(timeout + 5)
            if reader.is_alive():
                error = "reader still running"
            elif reader_error:
                error = f"{type(reader_error[0]).__name__}: {reader_error[0]}"
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    match = bytes(got) == payload
    return {"ok": match and error is None, "match": match, "prefix": payload.startswith(bytes(got)),
            "received": len(got), "size": size, "error": error}
