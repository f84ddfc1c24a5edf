"""A TLS connection on the loop that speaks control frames: handshake, messages in and out, detach.

Theory of operation
-------------------
`FramedConn` wraps a connected TCP socket in TLS (server or client side) and runs the
handshake without blocking, within `handshake_timeout` seconds.  Once it is up, incoming bytes
go through the sans-IO `wire.FrameDecoder` and each message is handed to ``on_message``;
`send()` queues an encoded frame in a bounded output buffer (a peer that stops reading its
control messages is disconnected, not buffered for without end).  `close()` is idempotent,
never raises and calls ``on_close(conn, reason)`` exactly once.

A data connection uses this object only for its hello; `detach()` then hands the TLS socket
and any bytes already read past the last frame to the relay, and this object forgets the
socket (``on_close`` is not called for a detached connection).

Deadlines: a connection has one timer slot.  It holds the handshake timeout, then whatever its
owner sets with `set_deadline(seconds, callback)` (the server's "first frame within
handshake_timeout"), cleared with `clear_deadline()`, and finally `send_and_close`'s grace.
Closing or detaching cancels it.

It owns its socket, its output buffer and its timer; it must not know what the messages mean
(that is its owner's, through ``on_message``), nor block, nor buffer more than `MAX_OUT`.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any, Callable

from . import tls
from .loop import READ, WRITE, Loop, Timer
from .wire import FrameDecoder, ProtocolError, encode

log = logging.getLogger("anywhere.framed")

MAX_OUT = 256 * 1024
READ_BUDGET = 256 * 1024
CLOSE_GRACE = 2.0

_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class FramedConn:
    def __init__(self, loop: Loop, raw: socket.socket, ctx: ssl.SSLContext, *, server_side: bool,
                 peer: str, on_message: Callable[["FramedConn", dict], None],
                 on_close: Callable[["FramedConn", str], None],
                 on_handshake: Callable[["FramedConn"], None] | None = None,
                 server_hostname: str | None = None, handshake_timeout: float = 10.0) -> None:
        self._init(loop, peer, on_message, on_close)
        self.on_handshake = on_handshake
        self.state = "handshake"
        raw.setblocking(False)
        self.sock: ssl.SSLSocket = ctx.wrap_socket(raw, server_side=server_side, server_hostname=server_hostname,
                                                   do_handshake_on_connect=False)
        self._timer = loop.call_later(handshake_timeout, self._on_handshake_timeout)
        self._set_mask(READ | WRITE)
        loop.call_soon(self._handshake)

    def _init(self, loop: Loop, peer: str, on_message: Callable[["FramedConn", dict], None],
              on_close: Callable[["FramedConn", str], None]) -> None:
        self.loop = loop
        self.peer = peer
        self.on_message = on_message
        self.on_close = on_close
        self.on_handshake: Callable[["FramedConn"], None] | None = None
        self.decoder = FrameDecoder()
        self.out = bytearray()
        self.reason = ""
        self.mask = 0
        self.last_rx = loop.time()
        self.identity: str | None = None
        self.serial: str | None = None
        self.idle_since = 0.0  # when it last became an idle (warm) data connection
        self._timer: Timer | None = None

    @classmethod
    def resume(cls, loop: Loop, sock: ssl.SSLSocket, initial: bytes, *, peer: str, identity: str | None,
               on_message: Callable[["FramedConn", dict], None],
               on_close: Callable[["FramedConn", str], None]) -> "FramedConn":
        """Control frames again on a connection a relay has finished with (`Relay.handoff`)."""
        self = cls.__new__(cls)
        self._init(loop, peer, on_message, on_close)
        self.sock = sock
        self.identity = identity
        self.state = "open"
        if initial:
            self.decoder.receive_data(initial)
        self._set_mask(READ)
        loop.call_soon(self._resume_read)
        return self

    def _resume_read(self) -> None:
        if self.state == "open":
            self._read()  # TLS may already hold decrypted bytes the selector will not report

    # -- plumbing ------------------------------------------------------------------------------
    def _set_mask(self, mask: int) -> None:
        if mask == self.mask or self.state in ("closed", "detached"):
            return
        if self.mask == 0:
            self.loop.register(self.sock, mask, self._on_event)
        elif mask == 0:
            self.loop.unregister(self.sock)
        else:
            self.loop.modify(self.sock, mask, self._on_event)
        self.mask = mask

    def _on_event(self, mask: int) -> None:
        if self.state == "handshake":
            self._handshake()
            return
        if mask & WRITE:
            self._flush()
        if mask & READ and self.state == "open":
            self._read()

    # -- handshake -------------------------------------------------------------------------------
    def _handshake(self) -> None:
        if self.state != "handshake":
            return
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_mask(READ)
            return
        except ssl.SSLWantWriteError:
            self._set_mask(WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            self.close(f"TLS handshake failed: {tls.describe_error(exc)}")
            return
        self.clear_deadline()
        self.state = "open"
        self.identity = tls.peer_identity(self.sock)
        self.serial = tls.peer_serial(self.sock)
        self.last_rx = self.loop.time()
        self._set_mask(READ | (WRITE if self.out else 0))
        if self.on_handshake is not None:
            self.on_handshake(self)
        if self.state == "open":
            self._read()  # the peer's first frame may have arrived with the handshake

    def _on_handshake_timeout(self) -> None:
        self._timer = None
        if self.state == "handshake":
            self.close("TLS handshake timed out")

    # -- deadline ------------------------------------------------------------------------------------
    def set_deadline(self, seconds: float, callback: Callable[["FramedConn"], None]) -> None:
        """Call ``callback(self)`` in `seconds` unless `clear_deadline()`, `close()` or `detach()`
        comes first; replaces the deadline set before (the handshake timeout included: set it once
        the handshake is done, e.g. from ``on_handshake``).  Nothing happens on a closed connection."""
        self.clear_deadline()
        if self.state in ("closed", "detached"):
            return
        self._timer = self.loop.call_later(seconds, self._on_deadline, callback)

    def clear_deadline(self) -> None:
        """Cancel the pending deadline, if any; idempotent."""
        if self._timer:
            self._timer.cancel()
            self._timer = None

    def _on_deadline(self, callback: Callable[["FramedConn"], None]) -> None:
        self._timer = None
        callback(self)

    # -- input -------------------------------------------------------------------------------------
    def _read(self) -> None:
        got = 0
        eof = False
        while got < READ_BUDGET:
            try:
                data = self.sock.recv(65536)
            except _WOULD_BLOCK:
                break
            except (ssl.SSLError, OSError) as exc:
                self.close(f"read failed: {tls.describe_error(exc)}")
                return
            if not data:
                eof = True
                break
            got += len(data)
            self.decoder.receive_data(data)
        if got:
            self.last_rx = self.loop.time()
        if eof:
            self.decoder.receive_data(b"")
        self._dispatch()
        if eof and self.state == "open":
            self.close("connection closed by peer")
        elif got >= READ_BUDGET and self.state == "open":
            self.loop.call_soon(self._read)

    def _dispatch(self) -> None:
        while self.state == "open":
            try:
                msg = self.decoder.next_message()
            except ProtocolError as exc:
                log.warning("protocol error from %s: %s; closing the connection", self.peer, exc)
                self.close(f"protocol error: {exc}")
                return
            if msg is None:
                return
            self.on_message(self, msg)

    # -- output ------------------------------------------------------------------------------------
    def _encode(self, msg_type: str, fields: dict[str, Any]) -> bytes | None:
        """The frame, or None after closing this connection: a message that cannot be encoded
        (too long, out of range) must not leave the connection open and forgotten."""
        try:
            return encode(msg_type, **fields)
        except ValueError as exc:
            log.error("cannot send %s to %s: %s; closing the connection", msg_type, self.peer, exc)
            self.close(f"cannot encode {msg_type}")
            return None

    def send(self, msg_type: str, **fields: Any) -> None:
        if self.state not in ("open", "handshake"):
            return
        frame = self._encode(msg_type, fields)
        if frame is None:
            return
        self.out += frame
        if len(self.out) > MAX_OUT:
            self.close("peer is not reading its control messages")
            return
        if self.state == "open":
            self._flush()

    def _flush(self) -> None:
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except _WOULD_BLOCK:
                sent = 0
            except (ssl.SSLError, OSError) as exc:
                self.close(f"write failed: {tls.describe_error(exc)}")
                return
            del self.out[:sent]
        if self.state == "closing" and not self.out:
            self.close(self.reason)
            return
        if self.state in ("open", "closing"):
            self._set_mask((READ if self.state == "open" else 0) | (WRITE if self.out else 0) or WRITE)

    def send_and_close(self, msg_type: str, why: str, **fields: Any) -> None:
        """Send one last message, then close (for `why`) once it has left, or after a short grace."""
        if self.state != "open":
            self.close(why)
            return
        frame = self._encode(msg_type, fields)
        if frame is None:
            return
        self.out += frame
        self.state = "closing"
        self.reason = why
        self.clear_deadline()
        self._timer = self.loop.call_later(CLOSE_GRACE, self.close, why)
        self._flush()

    # -- ending ----------------------------------------------------------------------------------
    def detach(self) -> tuple[ssl.SSLSocket, bytes]:
        """Hand the socket over (to a relay); this object is finished without calling on_close."""
        if self.mask:
            self.loop.unregister(self.sock)
            self.mask = 0
        self.clear_deadline()
        self.state = "detached"
        return self.sock, self.decoder.take_leftover()

    def close(self, reason: str) -> None:
        if self.state in ("closed", "detached"):
            return
        self.state = "closed"
        self.reason = reason
        self.clear_deadline()
        self.loop.close_socket(self.sock, self.mask)
        self.mask = 0
        callback = self.on_close
        self.on_close = _ignore_close
        callback(self, reason)

    @property
    def open(self) -> bool:
        return self.state == "open"

    def __repr__(self) -> str:
        return f"<FramedConn {self.peer} {self.identity or '?'} {self.state}>"


def _ignore_close(_conn: FramedConn, _reason: str) -> None:
    pass
