"""The relay: join two stream sockets, both directions, with backpressure and half-close.

Theory of operation
-------------------
A `Relay` owns two sockets, A and B, and two `_Half`s: A→B and B→A.  A side is either
*plain* (raw TCP: the public client, the intranet target) or *framed* (the TLS data connection,
which carries the chunk stream of `wire.py`).  Each half:

1. reads from its source into the process's one scratch buffer (scratch.py, shared with the
   trunks' streams: the loop is single-threaded, so a buffer in use is never shared): an idle
   connection holds no buffer at all;
2. converts: plain→framed writes a 4-byte chunk header in front of the bytes it just read
   (the read lands at offset 4 of the scratch buffer, so there is no copy); framed→plain runs
   the sans-IO `ChunkDecoder`, which hands back views of the payloads;
3. writes to the destination at once.  Only what the destination does not take is copied, into
   ``pending`` (at most one scratch buffer's worth), and the half stops reading its source until
   ``pending`` has drained: backpressure, expressed by dropping READ from the source's interest
   mask.  Memory per direction is therefore bounded by the scratch size, whatever the peers do.

End of stream: a plain source's EOF becomes an END chunk on a framed destination, and an END
chunk becomes ``shutdown(SHUT_WR)`` on a plain destination — each only after ``pending`` has
drained, so no byte is lost when a peer closes right after sending.  Half-close is thereby
carried end to end, both ways, through the TLS data connection without closing TLS (RFC 8446
close_notify would also be a half-close, but it ends the TLS connection for good; an END chunk
leaves it reusable).  When both halves have ended the relay closes both sockets and reports
``"done"``.  A read or write error, a TLS connection that closes without END, an ABORT chunk or a
malformed chunk aborts the relay: both sockets are closed at once and the reason is reported.

TLS detail: OpenSSL may hold decrypted bytes that the kernel no longer signals as readable, so
after backpressure clears a half tries to read at once instead of waiting for the selector, and
a half that stops reading because of its per-event budget reschedules itself (with OpenSSL's
read-ahead, see tls.py, not even ``SSLSocket.pending()`` counts what is held).

It owns its two sockets (it closes them, or hands B over in `handoff`) and at most one scratch
buffer's worth of `pending` per direction.  It must not know proxies, agents or counters beyond
its own byte counts (the owner reads those, see carrier.Carrier), nor block, nor buffer more.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from typing import Callable

from .loop import READ, WRITE, Loop
from .scratch import SCRATCH as _scratch, SCRATCH_SIZE, SCRATCH_VIEW as _view
from .wire import ABORT, END, HEADER_SIZE, MAX_CHUNK, ChunkDecoder, ProtocolError, chunk_header, pack_header

MAX_ROUNDS = 4  # scratch buffers moved per readiness event before giving others a turn

log = logging.getLogger("anywhere.relay")

_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Side:
    __slots__ = ("relay", "sock", "framed", "is_ssl", "name", "mask", "out_half", "in_half")

    def __init__(self, relay: "Relay", sock: socket.socket, framed: bool, name: str) -> None:
        self.relay = relay
        self.sock = sock
        self.framed = framed
        self.is_ssl = isinstance(sock, ssl.SSLSocket)
        self.name = name
        self.mask = 0
        self.out_half: _Half
        self.in_half: _Half

    def on_event(self, mask: int) -> None:
        relay = self.relay
        if mask & WRITE:
            self.in_half.on_writable()
        if mask & READ and not relay.closed:
            self.out_half.on_readable()
        relay._update_interest()


class _Half:
    __slots__ = ("relay", "src", "dst", "decoder", "encode", "pending", "src_eof", "eof_sent", "nbytes")

    def __init__(self, relay: "Relay", src: _Side, dst: _Side) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.decoder = ChunkDecoder() if src.framed and not dst.framed else None
        self.encode = dst.framed and not src.framed
        self.pending: bytes | None = None
        self.src_eof = False
        self.eof_sent = False
        self.nbytes = 0  # payload bytes delivered to dst's peer direction

    # -- state ---------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.eof_sent and self.pending is None

    def wants_read(self) -> bool:
        return not self.src_eof and self.pending is None

    def wants_write(self) -> bool:
        return self.pending is not None

    # -- events --------------------------------------------------------------------------------
    def on_readable(self) -> None:
        if self.wants_read():
            self._pump()

    def on_writable(self) -> None:
        if self.pending is None:
            return
        data, self.pending = self.pending, None
        if not self._write(data):
            return
        if self.src_eof:
            if not self.eof_sent:
                self._send_eof()
            else:
                self.relay._check_done()
        else:
            self._pump()  # read at once: TLS may hold bytes the selector will not report

    # -- moving bytes --------------------------------------------------------------------------
    def _pump(self) -> None:
        relay = self.relay
        sock = self.src.sock
        is_ssl = self.src.is_ssl
        off = HEADER_SIZE if self.encode else 0
        limit = SCRATCH_SIZE
        for _ in range(MAX_ROUNDS):
            got = off
            eof = blocked = False
            try:
                while got < limit:
                    n = sock.recv_into(_view[got:limit])
                    if n == 0:
                        eof = True
                        break
                    got += n
                    if not is_ssl:
                        blocked = True  # the kernel gave what it had; epoll is level-triggered
                        break
            except _WOULD_BLOCK:
                blocked = True
            except OSError as exc:
                relay._abort(f"{self.src.name} read failed: {_os_reason(exc)}")
                return
            if got > off:
                if not self._forward(got - off) or relay.closed:
                    return
            if eof:
                self._on_src_eof()
                return
            if blocked:
                return
        if is_ssl:  # the budget ran out: TLS may hold more that the selector will not report
            relay.loop.call_soon(self.on_readable)

    def _forward(self, n: int) -> bool:
        """Pass on n freshly read bytes from the scratch buffer; False if dst is backed up."""
        relay = self.relay
        if relay.first_byte_at is None:
            relay._first_byte()
        relay.last_active = relay.loop.time()
        if self.encode:
            pack_header(_scratch, 0, n)
            self.nbytes += n
            return self._write(_view[:HEADER_SIZE + n])
        if self.decoder is None:
            self.nbytes += n
            return self._write(_view[:n])
        return self._decode(_view[:n])

    def _decode(self, view: memoryview) -> bool:
        try:
            payloads, end = self.decoder.feed(view)
            if self.decoder.trailing and not self.relay.reuse:
                raise ProtocolError("data after END on the data stream")
        except ProtocolError as exc:
            self.relay._abort(f"{self.src.name} sent a malformed data stream: {exc}")
            return False
        for i, payload in enumerate(payloads):
            self.nbytes += len(payload)
            if not self._write(payload):
                if self.relay.closed:
                    return False
                rest = b"".join(bytes(p) for p in payloads[i + 1:])
                if rest:
                    self.nbytes += len(rest)
                    self.pending += rest
                if end is not None:
                    self._note_end(end)
                return False
        if end is not None:
            self._note_end(end)
            return False
        return True

    def _note_end(self, end: str) -> None:
        if end == "abort":
            self.relay._abort(f"{self.src.name} aborted the stream")
        else:
            self._on_src_eof()

    def _write(self, data: memoryview | bytes) -> bool:
        """Write data to dst; keep what it does not take in `pending`.  False if not all written."""
        try:
            sent = self.dst.sock.send(data)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            self.relay._abort(f"{self.dst.name} write failed: {_os_reason(exc)}")
            return False
        if sent < len(data):
            self.pending = bytes(data[sent:])
            return False
        return True

    def _on_src_eof(self) -> None:
        if self.decoder is not None and self.decoder.ended is None:
            self.relay._abort(f"{self.src.name} closed without ending the stream")
            return
        self.src_eof = True
        if self.pending is None and not self.eof_sent:
            self._send_eof()

    def _send_eof(self) -> None:
        self.eof_sent = True
        if self.dst.framed:
            if not self._write(chunk_header(END)):
                return
        else:
            try:
                self.dst.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    self.relay._abort(f"{self.dst.name} shutdown failed: {_os_reason(exc)}")
                    return
        self.relay._check_done()


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    return exc.strerror or str(exc)


class Relay:
    """Two sockets joined.  `close()` is idempotent and never raises; `on_close(reason)` runs once."""

    def __init__(self, loop: Loop, a: socket.socket, b: socket.socket, *, a_framed: bool = False,
                 b_framed: bool = False, a_name: str = "A", b_name: str = "B",
                 on_close: Callable[["Relay", str], None] | None = None, reuse: bool = False) -> None:
        self.loop = loop
        self.a = _Side(self, a, a_framed, a_name)
        self.b = _Side(self, b, b_framed, b_name)
        self.a_to_b = _Half(self, self.a, self.b)
        self.b_to_a = _Half(self, self.b, self.a)
        self.a.out_half, self.a.in_half = self.a_to_b, self.b_to_a
        self.b.out_half, self.b.in_half = self.b_to_a, self.a_to_b
        self.on_close = on_close
        self.closed = False
        self.reason = ""
        # reuse: when both directions have ended, B (the framed data connection) is not closed but
        # handed over in `handoff` as (socket, bytes read past the END) for its next use
        self.reuse = reuse and b_framed and not a_framed
        self.handoff: tuple[socket.socket, bytes] | None = None
        self.first_byte_at: float | None = None
        self.last_active = loop.time()  # for idle timeouts
        self.on_first_byte: Callable[["Relay"], None] | None = None
        for side in (self.a, self.b):
            side.sock.setblocking(False)

    def start(self, b_initial: bytes = b"", a_initial: bytes = b"") -> None:
        """Begin relaying; *_initial are bytes already read from that side (e.g. after a handshake)."""
        for half, initial in ((self.b_to_a, b_initial), (self.a_to_b, a_initial)):
            if initial and not self.closed:
                if half.decoder is not None:
                    half._decode(memoryview(initial))
                elif half.encode:
                    half.nbytes += len(initial)
                    framed = b"".join(chunk_header(len(initial[i:i + MAX_CHUNK])) + initial[i:i + MAX_CHUNK]
                                      for i in range(0, len(initial), MAX_CHUNK))
                    half._write(framed)
                else:
                    half.nbytes += len(initial)
                    half._write(initial)
        if self.closed:
            return
        # sockets may already hold data (TLS in particular): try both directions now
        for half in (self.a_to_b, self.b_to_a):
            if not self.closed:
                half.on_readable()
        if not self.closed:
            self._update_interest()

    def _first_byte(self) -> None:
        self.first_byte_at = self.loop.time()
        if self.on_first_byte is not None:
            try:
                self.on_first_byte(self)
            except Exception:  # a metric must never break the relay
                log.exception("on_first_byte callback failed")

    @property
    def bytes_a_to_b(self) -> int:
        return self.a_to_b.nbytes

    @property
    def bytes_b_to_a(self) -> int:
        return self.b_to_a.nbytes

    def _update_interest(self) -> None:
        if self.closed:
            return
        for side in (self.a, self.b):
            mask = (READ if side.out_half.wants_read() else 0) | (WRITE if side.in_half.wants_write() else 0)
            if mask == side.mask:
                continue
            if side.mask == 0:
                self.loop.register(side.sock, mask, side.on_event)
            elif mask == 0:
                self.loop.unregister(side.sock)
            else:
                self.loop.modify(side.sock, mask, side.on_event)
            side.mask = mask

    def _check_done(self) -> None:
        if self.a_to_b.done and self.b_to_a.done:
            self.close("done")

    def _abort(self, reason: str) -> None:
        self.close(reason)

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        sides = (self.a, self.b)
        if reason == "done" and self.reuse:
            decoder = self.b_to_a.decoder
            self.handoff = (self.b.sock, decoder.trailing if decoder is not None else b"")
            if self.b.mask:
                self.loop.unregister(self.b.sock)
                self.b.mask = 0
            sides = (self.a,)
        for side in sides:
            self.loop.close_socket(side.sock, side.mask)
            side.mask = 0
        for half in (self.a_to_b, self.b_to_a):
            half.pending = None
        if self.on_close is not None:
            callback, self.on_close = self.on_close, None
            try:
                callback(self, reason)
            except Exception:  # never raise out of close()
                log.exception("on_close callback failed")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Relay {self.a.name}→{self.b.name} {self.bytes_a_to_b}/{self.bytes_b_to_a} bytes {state}>"


__all__ = ["Relay", "SCRATCH_SIZE", "ABORT"]
