"""UDP datagrams inside a trunk stream: the length-prefix framer, sans-IO.

Theory of operation
-------------------
A UDP flow (one client address and port on a proxy's port, trunk.DatagramStream) is one stream
on a trunk.  A stream carries bytes, and DATA frames may split or join them however the trunk
likes, so each datagram travels whole behind a 2-byte big-endian length: ``length (2) |
datagram``.  `encode` makes that; `DatagramDecoder.feed` takes the stream's bytes as they come
(whole, split anywhere, one byte at a time) and gives back the datagrams, each whole.

Rules: no I/O; a datagram is 0..`MAX_DATAGRAM` bytes (65,507: the most an IPv4 UDP datagram
holds), anything larger is refused on both sides (`encode`: ValueError, the caller's fault;
`feed`: ProtocolError, the peer's); the decoder never holds more than one datagram's worth of
bytes (`MAX_FRAMED`), so what a peer can make it hold is bounded whatever it sends.
"""

from __future__ import annotations

from .wire import ProtocolError

MAX_DATAGRAM = 65507  # 65,535 - 8 (UDP header) - 20 (IPv4 header)
PREFIX = 2
MAX_FRAMED = MAX_DATAGRAM + PREFIX


def encode(datagram: bytes | memoryview) -> bytes:
    """One datagram with its length in front; ValueError if it is larger than MAX_DATAGRAM."""
    n = len(datagram)
    if n > MAX_DATAGRAM:
        raise ValueError(f"datagram of {n} bytes exceeds {MAX_DATAGRAM}")
    return n.to_bytes(PREFIX, "big") + bytes(datagram)


class DatagramDecoder:
    """Stream bytes in, whole datagrams out (bytes)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()  # at most one incomplete framed datagram

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buf
        view = memoryview(data)
        pos, n = 0, len(view)
        while pos < n:
            if len(buf) < PREFIX:  # the length: perhaps one byte now, one later
                take = min(PREFIX - len(buf), n - pos)
                buf += view[pos:pos + take]
                pos += take
                if len(buf) < PREFIX:
                    break
                size = int.from_bytes(buf[:PREFIX], "big")
                if size > MAX_DATAGRAM:
                    raise ProtocolError(f"datagram of {size} bytes exceeds {MAX_DATAGRAM}")
                if size == 0:
                    out.append(b"")
                    buf.clear()
                continue
            size = int.from_bytes(buf[:PREFIX], "big")
            need = size - (len(buf) - PREFIX)
            if len(buf) == PREFIX and n - pos >= need:  # whole in what came: no copy into the buffer
                out.append(bytes(view[pos:pos + need]))
                pos += need
                buf.clear()
                continue
            take = min(need, n - pos)
            buf += view[pos:pos + take]
            pos += take
            if take == need:
                out.append(bytes(buf[PREFIX:]))
                buf.clear()
        return out

    @property
    def partial(self) -> int:
        """Bytes of an incomplete datagram held (0 between datagrams)."""
        return len(self._buf)
