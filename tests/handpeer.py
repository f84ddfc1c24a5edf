"""A hand-written agent side for tests: TLS to the agent port with `ssl`, wire frames by hand."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from anywhere.net import hostport
from anywhere.wire import FrameDecoder, encode


def sock_name(sock: socket.socket) -> str:
    """Our end of a connection as the server's log writes its peer: 127.0.0.1:PORT or [::1]:PORT."""
    host, port = sock.getsockname()[:2]
    return hostport(host, port)


def client_ctx(ca: Path, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    ctx.check_hostname = True
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Read until the peer closes (EOF, reset or a TLS alert); AssertionError if it is still open after `timeout`.

    Returns the bytes read and how the connection ended.
    """
    deadline = time.monotonic() + timeout
    got = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the server did not close the connection within {timeout} s (read {bytes(got[:200])!r})")
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            continue
        except ConnectionResetError:
            return bytes(got), "reset"
        except ssl.SSLError as exc:  # an alert, or EOF without close_notify
            return bytes(got), f"tls: {exc.reason or exc}"
        if not data:
            return bytes(got), "eof"
        got += data


class HandPeer:
    """A hand-written agent-side TLS connection to the agent port, speaking wire frames."""

    def __init__(self, port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1", server_hostname: str = "localhost",
                 timeout: float = 5.0) -> None:
        self.raw = socket.create_connection((host, port), timeout=timeout)
        try:
            self.sock = ctx.wrap_socket(self.raw, server_hostname=server_hostname)
        except BaseException:
            self.raw.close()
            raise
        self.sock.settimeout(timeout)
        self.decoder = FrameDecoder()
        self.peer = sock_name(self.sock)

    def send(self, msg_type: str, **fields) -> None:
        self.sock.sendall(encode(msg_type, **fields))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 5.0) -> dict:
        """The next message, answering and skipping the server's pings."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                if msg["type"] == "ping":
                    self.send("pong", seq=msg["seq"])
                    continue
                return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no message from the server within {timeout} s")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("the server closed the connection")
            self.decoder.receive_data(data)

    def messages_until_closed(self, timeout: float = 5.0) -> tuple[list[dict], str]:
        data, how = until_closed(self.sock, timeout)
        if data:
            self.decoder.receive_data(data)
        msgs = []
        while (msg := self.decoder.next_message()) is not None:
            msgs.append(msg)
        return msgs, how

    def close(self) -> None:
        for s in (self.sock, self.raw):
            try:
                s.close()
            except OSError:
                pass
