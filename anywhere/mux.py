"""Multiplexed data connections ("trunks"): the frame codec, sans-IO.

Why
---
An idle TLS connection costs OpenSSL about 25 KiB per end here (measured: 50 KiB for a
connected pair, with SSL_MODE_RELEASE_BUFFERS already set by CPython, session caches and
tickets off or on alike).  One TLS data connection per client connection therefore costs at
least 50 KiB per tunneled connection across server and agent, three times the 16 KiB the
performance issue asks for; every new client also costs TLS records and selector changes on a
connection of its own.  Carrying many client connections ("streams") over a few long-lived
TLS connections per agent ("trunks") removes both costs: an idle stream is a plain socket and a
few hundred bytes of Python on each side.

What it costs, and how it is contained
--------------------------------------
Streams on one TCP connection share its flow control, so each stream gets its own window: a
sender may have at most the stream's window (`WINDOW_SIZE` at first; it grows, below)
unacknowledged; the receiver returns credit (WINDOW frames) for what it has handed to its
plain socket.  Memory per stream is thus bounded by
the window whatever the peers do, and a stream whose reader stalls stops only itself.

A fixed window caps a stream at window / round trip: 1 MiB over a trunk whose round trip
(through two busy processes and TLS) is a few milliseconds holds one bulk stream to well under
what the processes can carry.  So a receiver grows a stream's window (doubling, up to
`MAX_WINDOW`) when it delivered a whole window within a short time (trunk.GROW_WITHIN) while its
own reader kept up: the window, not a slow reader, was the limit.  Growth comes out of a
per-trunk budget, so the memory a trunk may be made to hold stays bounded however many streams
grow.  Across all trunks of a process, the credit a receiver returns comes out of one buffer
budget (trunk.py, "The budget"), so clients that stop reading cannot make it hold more than that
budget, however many they are.  Only each stream's first window (`WINDOW_SIZE`) is beyond it: a
sender may use it before the receiver has said anything.

Opening costs no round trip: the server sends OPEN and goes on reading its client at once, so
the first bytes travel right behind OPEN while the agent dials the target, which holds them
until the target answers.  Until READY the server keeps to a smaller window (`EARLY_WINDOW`),
so a target that is slow to answer costs the agent at most that much per waiting client; READY
opens the rest.

The other direction's first window is the opener's to grant: an agent that announces it (``window``
in its ``trunk`` message) takes the first window the server names in OPEN (``"window"``: what the
server's buffer budget lets it commit, see trunk.py); any other starts with `WINDOW_SIZE`.  FAIL or ABORT before READY discards what was held.

A proxy with ``proxy_protocol`` has its target told who the client is (proxyproto.py): OPEN then
also carries ``"pp": 1 | 2, "src": [IP, PORT], "dst": [IP, PORT]``, sent only to an agent that
announced ``pp`` in its ``trunk`` message (an older one would ignore them and connect the client
without its header).  Those fields are checked apart from the rest (`parse_open_request`): when
they are malformed, only that stream fails (the agent answers FAIL); a bad host or port is a
protocol error, as it always was.

Frames
------
``type (1) | length (3) | stream (4)`` big-endian, then ``length`` bytes of payload (at most
`MAX_PAYLOAD`, 256 KiB).  Types: OPEN (server → agent: JSON {"host", "port"}, and "window" and
the PROXY protocol fields "pp", "src", "dst" for a peer that announced them), READY, FAIL (UTF-8
reason), DATA, END (half-close of the sender's direction), ABORT (UTF-8 reason; the stream is
gone), WINDOW (4-byte credit increment), and PING / PONG (8 opaque bytes, echoed) on stream 0,
the trunk's own liveness check (trunk.py), sent only to a peer that said it understands them
(``ping`` in the agent's ``trunk`` message, ``trunk_ping`` in the server's ``welcome``).  Stream 0
is used by nothing else.  Anything else is a protocol error that ends the whole trunk.

It owns the trunk frames' format only; windows, budgets and scheduling are trunk.py's.  It must
not do I/O, nor hold more than one frame's worth of undecoded bytes.
"""

from __future__ import annotations

import functools
import json
import struct
from typing import Any, NamedTuple

from . import proxyproto
from .wire import ProtocolError

OPEN, READY, FAIL, DATA, END, ABORT, WINDOW, PING, PONG = range(1, 10)
NAMES = {OPEN: "OPEN", READY: "READY", FAIL: "FAIL", DATA: "DATA", END: "END", ABORT: "ABORT", WINDOW: "WINDOW",
         PING: "PING", PONG: "PONG"}
PING_SIZE = 8
HEADER = struct.Struct("!II")  # (type << 24 | length), stream
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 256 * 1024
WINDOW_SIZE = 1024 * 1024  # a stream's receive window to begin with
MAX_WINDOW = 4 * WINDOW_SIZE  # what a receiver may grow it to (the most a sender accepts)
EARLY_WINDOW = 16 * 1024  # what a stream may send before READY
MAX_UDP_IDLE = 86400  # seconds: the longest idle timeout of a UDP flow an OPEN may name
_CONTROL_MAX = {OPEN: 1024, READY: 0, FAIL: 1024, END: 0, ABORT: 1024, WINDOW: 4, PING: PING_SIZE, PONG: PING_SIZE}
_TRUNK_FRAMES = (PING, PONG)  # on stream 0, and only there


def frame(kind: int, stream: int, payload: bytes = b"") -> bytes:
    if kind not in NAMES or not 0 <= stream < 2**32 or (stream == 0) != (kind in _TRUNK_FRAMES) \
            or len(payload) > MAX_PAYLOAD:
        raise ValueError(f"bad frame {kind}/{stream}/{len(payload)}")
    return HEADER.pack(kind << 24 | len(payload), stream) + payload


def ping_frame(kind: int, payload: bytes) -> bytes:
    """PING or PONG: the trunk's liveness check, on stream 0."""
    return frame(kind, 0, payload)


def open_frame(stream: int, host: str, port: int, window: int | None = None,
               origin: proxyproto.Origin | None = None, udp: float | None = None) -> bytes:
    """OPEN; `window`: the first window the opener grants (only to a peer that said it takes one);
    `origin`: the client and the address it dialled, for the target's PROXY header (only to a peer
    that announced ``pp``); `udp`: a UDP flow (trunk.DatagramStream) that ends after that many
    seconds without a datagram (only to a peer that said it carries UDP)."""
    if origin is None:
        return frame(OPEN, stream, _open_payload(host, port, window, udp))
    fields: dict = {"host": host, "port": port}
    if window is not None:
        fields["window"] = window
    fields.update(proxyproto.open_fields(origin))
    return frame(OPEN, stream, json.dumps(fields, separators=(",", ":")).encode())


@functools.lru_cache(maxsize=1024)
def _open_payload(host: str, port: int, window: int | None, udp: float | None = None) -> bytes:  # the same few targets
    fields: dict = {"host": host, "port": port}
    if window is not None:
        fields["window"] = window
    if udp is not None:
        fields["udp"] = udp
    return json.dumps(fields, separators=(",", ":")).encode()


def window_frame(stream: int, credit: int) -> bytes:
    return frame(WINDOW, stream, struct.pack("!I", credit))


def parse_open(payload: bytes) -> tuple[str, int]:
    host, port, _window = parse_open_window(payload)
    return host, port


class OpenRequest(NamedTuple):
    """An OPEN: its target, the first window granted (None: WINDOW_SIZE), the PROXY header's origin
    (None: no header), `problem`: why the stream must fail (its PROXY fields are malformed), and
    `udp`: None for TCP, else a UDP flow's idle timeout in seconds (1..MAX_UDP_IDLE)."""

    host: str
    port: int
    window: int | None
    origin: proxyproto.Origin | None
    problem: str | None
    udp: float | None = None


def parse_open_request(payload: bytes) -> OpenRequest:
    """An OPEN payload whole.  ProtocolError (the trunk ends) for what was always one; malformed
    PROXY fields only fill `problem` (the stream fails, the trunk goes on)."""
    data = _open_json(payload)
    host, port, window = _open_target(data)
    udp = data.get("udp")
    if udp is not None and (isinstance(udp, bool) or not isinstance(udp, (int, float)) or not 0 < udp <= MAX_UDP_IDLE):
        raise ProtocolError(f"OPEN udp must be an idle timeout of more than 0 and at most {MAX_UDP_IDLE} seconds")
    udp = float(udp) if udp is not None else None
    try:
        return OpenRequest(host, port, window, proxyproto.parse_open_fields(data), None, udp)
    except ValueError as exc:
        return OpenRequest(host, port, window, None, str(exc)[:200], udp)


def parse_open_window(payload: bytes) -> tuple[str, int, int | None]:
    """(host, port, first window granted or None: WINDOW_SIZE) of an OPEN payload."""
    return _open_target(_open_json(payload))


def parse_open_full(payload: bytes) -> tuple[str, int, int | None, float | None]:
    """(host, port, window as parse_open_window, udp: None for TCP, else the flow's idle timeout
    in seconds, 1..MAX_UDP_IDLE) of an OPEN payload."""
    request = parse_open_request(payload)
    return request.host, request.port, request.window, request.udp


def _open_json(payload: bytes) -> Any:
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("OPEN payload is not JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("OPEN payload needs a host and a port 1..65535")
    return data


def _open_target(data: dict) -> tuple[str, int, int | None]:
    host, port = (data.get("host"), data.get("port")) if isinstance(data, dict) else (None, None)
    if not isinstance(host, str) or not host or isinstance(port, bool) or not isinstance(port, int) \
            or not 1 <= port <= 65535:
        raise ProtocolError("OPEN payload needs a host and a port 1..65535")
    window = data.get("window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or not 0 < window <= WINDOW_SIZE):
        raise ProtocolError(f"OPEN window must be 1..{WINDOW_SIZE}")
    return host, port, window


def parse_window(payload: bytes) -> int:
    (credit,) = struct.unpack("!I", payload)
    if not 0 < credit <= 2**30:
        raise ProtocolError(f"WINDOW credit {credit} out of range")
    return credit


class MuxDecoder:
    """Trunk bytes in, ``(type, stream, payload)`` out.

    DATA payloads come out as they arrive (possibly in several pieces, as memoryviews into the fed
    buffer); the payload of any other frame comes out whole, as bytes, once complete.
    """

    __slots__ = ("_hdr", "_kind", "_stream", "_remaining", "_control")

    def __init__(self) -> None:
        self._hdr = b""
        self._kind = 0
        self._stream = 0
        self._remaining = 0
        self._control = bytearray()

    def feed(self, view: memoryview) -> list[tuple[int, int, memoryview | bytes]]:
        out: list[tuple[int, int, memoryview | bytes]] = []
        pos, n = 0, len(view)
        while pos < n:
            if self._kind:  # inside a frame's payload
                take = min(self._remaining, n - pos)
                piece = view[pos:pos + take]
                pos += take
                self._remaining -= take
                if self._kind == DATA:
                    out.append((DATA, self._stream, piece))
                else:
                    self._control += piece
                if not self._remaining:
                    if self._kind != DATA:
                        out.append((self._kind, self._stream, bytes(self._control)))
                        self._control.clear()
                    self._kind = 0
                continue
            if not self._hdr and n - pos >= HEADER_SIZE:  # a whole header: read in place
                word, stream = HEADER.unpack_from(view, pos)
                pos += HEADER_SIZE
            else:
                need = HEADER_SIZE - len(self._hdr)
                piece = bytes(view[pos:pos + need])
                pos += len(piece)
                self._hdr += piece
                if len(self._hdr) < HEADER_SIZE:
                    break
                word, stream = HEADER.unpack(self._hdr)
                self._hdr = b""
            kind, length = word >> 24, word & 0xFFFFFF
            if kind not in NAMES:
                raise ProtocolError(f"unknown frame type {kind}")
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            if (stream == 0) != (kind in _TRUNK_FRAMES):
                raise ProtocolError(f"{NAMES[kind]} frame on stream {stream}" if stream else "frame on stream 0")
            limit = _CONTROL_MAX.get(kind)
            if limit is not None and length > limit:
                raise ProtocolError(f"{NAMES[kind]} frame of {length} bytes (at most {limit})")
            if kind == WINDOW and length != 4:
                raise ProtocolError("WINDOW frame without its 4-byte credit")
            if kind in _TRUNK_FRAMES and length != PING_SIZE:
                raise ProtocolError(f"{NAMES[kind]} frame of {length} bytes (exactly {PING_SIZE})")
            if length == 0:
                if kind != DATA:
                    out.append((kind, stream, b""))
                continue  # an empty DATA frame carries nothing
            self._kind, self._stream, self._remaining = kind, stream, length
        return out

    @property
    def mid_frame(self) -> bool:
        return bool(self._hdr or self._kind)
