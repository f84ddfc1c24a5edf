"""The wire protocol between agent and server, sans-IO: bytes in, messages out.

Theory of operation
-------------------
Every connection from an agent to the server (port 1111) is mutual TLS.  Inside it:

Control frames
    ``length (4 bytes, big-endian) | UTF-8 JSON object``; the object has a ``type`` and the
    fields listed in `MESSAGES`.  A frame longer than `MAX_FRAME` is refused before its body
    is read, so a peer cannot make us buffer more than that.  The first frame on a connection
    says what the connection is:

    * admin connection:  agent ``hello`` {proto, agent_id, version} → server ``welcome``
      {proto, server_id, heartbeat, pool} or ``error`` {reason}; then ``ping``/``pong`` both ways,
      server ``open`` {conn, host, port} → agent ``fail`` {conn, reason} when the target
      cannot be reached (success is the data connection itself).
      Trunks on demand: an agent that says ``on_demand`` 1 in its hello, welcomed with
      ``on_demand`` 1, opens no trunk until the server sends ``trunks`` {count}: keep that many
      from now on (at most `MAX_TRUNKS`); 0: the server is closing them for idleness, do not
      replace them.  Without it (either side older) the agent keeps ``pool`` trunks always.
      The per-client data connections (``open`` below, deprecated) carry no PROXY protocol
      header: a client of a proxy with ``proxy_protocol`` is never sent there.
    * data connection:   agent ``data`` {proto, agent_id, conn} → server ``ready`` {conn} or
      ``error`` {reason}; after ``ready`` the connection switches to the chunk stream.
    * warm data connection: agent ``pool`` {proto, agent_id}, then nothing until the server
      uses it: server ``open`` {conn, host, port} → agent ``ready`` {conn} (then the chunk
      stream) or ``fail`` {conn, reason} (and it stays warm).

    * trunk: agent ``trunk`` {proto, agent_id}; from then on the connection carries the frames of
      `mux.py` both ways: many client connections at once, as streams (see trunk.py).  Optional
      flags say what the agent understands: ``ping`` 1, ``window`` 1, ``pp`` 1 (it writes the
      PROXY protocol header OPEN asks for; a proxy with ``proxy_protocol`` is served only by
      trunks that say so).

    Once both directions of a chunk stream have ENDed, a data connection of either kind is
    warm again: the next frame on it is the server's next ``open``.  ``welcome``'s ``pool`` tells
    the agent how many trunks to keep (at most `MAX_TRUNKS`); 0: none, every client then gets a
    data connection.

    ``proto`` is the protocol version; a peer speaking another version gets an ``error`` that
    names both versions.

Chunk stream (data connection, after ``ready``)
    Each direction is a sequence of chunks: ``length (4 bytes, big-endian) | payload``.
    Length 0 is END (the sender will send nothing more in this direction: a TCP half-close
    carried end to end), `ABORT` (0xFFFFFFFF) means the sender's side failed (reset) and the
    connection must be torn down.  A payload is at most `MAX_CHUNK` bytes.  An explicit END,
    rather than TLS close_notify, leaves the TLS connection usable once both directions
    have ended: it is then warm again for the next client (`Relay` with ``reuse``).

Decoders raise `ProtocolError` for anything malformed; the caller closes that one connection
and logs the peer.  `receive_data(b"")` means EOF, as in h11.

It owns the control frames' format and the ranges of their fields (one home for those limits).
It must not do I/O, import anything of the package, or hold more than `MAX_FRAME` of a frame
it has not yet decoded.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from .errors import RemoteProtocolError

PROTO_VERSION = 1
MAX_FRAME = 64 * 1024
MAX_CHUNK = 1024 * 1024
END = 0
ABORT = 0xFFFFFFFF

# Ranges of the fields the peers exchange (checked by `_check` both ways).  They are the one home of
# these limits: config.py's spec and the command-line flags take their bounds from here, so a value
# that passes check-config can always be sent.
MAX_HEARTBEAT = 3600  # welcome.heartbeat: seconds, 0 < heartbeat <= MAX_HEARTBEAT
MAX_POOL = 1024  # welcome.pool: trunks an agent is asked to keep, 0..MAX_POOL
MAX_TRUNKS = 16  # an agent keeps at most this many trunks, whatever welcome.pool asks
MIN_PORT, MAX_PORT = 1, 65535  # open.port

_HEADER = struct.Struct("!I")
HEADER_SIZE = _HEADER.size
pack_header = _HEADER.pack_into

# type -> {field: python type}; every listed field is required, extra fields are ignored
# (a newer peer may add some).
MESSAGES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hello": {"proto": int, "agent_id": str, "version": str},
    "welcome": {"proto": int, "server_id": str, "heartbeat": (int, float), "pool": int},
    "error": {"reason": str},
    "ping": {"seq": int},
    "pong": {"seq": int},
    "open": {"conn": int, "host": str, "port": int},
    "fail": {"conn": int, "reason": str},
    "data": {"proto": int, "agent_id": str, "conn": int},
    "pool": {"proto": int, "agent_id": str},
    "trunk": {"proto": int, "agent_id": str},
    "ready": {"conn": int},
    "trunks": {"count": int},
}


ProtocolError = RemoteProtocolError  # the remote peer broke the protocol (its fault, not ours): errors.py


def encode(msg_type: str, **fields: Any) -> bytes:
    """One control frame.  Raises ValueError for a message we would refuse ourselves."""
    msg = {"type": msg_type, **fields}
    _check(msg, ValueError)
    try:
        body = json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except TypeError as exc:
        raise ValueError(f"{msg_type}: {exc}") from None
    if len(body) > MAX_FRAME:
        raise ValueError(f"{msg_type} frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


def _check(msg: Any, exc: type[Exception]) -> dict:
    if not isinstance(msg, dict):
        raise exc("frame is not a JSON object")
    msg_type = msg.get("type")
    spec = MESSAGES.get(msg_type) if isinstance(msg_type, str) else None
    if spec is None:
        raise exc(f"unknown message type {msg_type!r}")
    for name, kind in spec.items():
        value = msg.get(name)
        # bool is an int subclass: refuse it where a number is meant
        if isinstance(value, bool) or not isinstance(value, kind):
            raise exc(f"{msg_type}: field {name!r} missing or not {_kind_name(kind)}")
    for name in ("conn", "port", "seq"):
        if name in spec and not (0 <= msg[name] < 2**63):
            raise exc(f"{msg_type}: field {name!r} out of range")
    if "heartbeat" in spec and not (0 < msg["heartbeat"] <= MAX_HEARTBEAT):  # also refuses NaN and infinities
        raise exc(f"{msg_type}: heartbeat {msg['heartbeat']!r} out of range (0, {MAX_HEARTBEAT}]")
    if "pool" in spec and not (0 <= msg["pool"] <= MAX_POOL):
        raise exc(f"{msg_type}: pool {msg['pool']} out of range 0..{MAX_POOL}")
    if "count" in spec and not (0 <= msg["count"] <= MAX_POOL):
        raise exc(f"{msg_type}: count {msg['count']} out of range 0..{MAX_POOL}")
    if "port" in spec and not (MIN_PORT <= msg["port"] <= MAX_PORT):
        raise exc(f"{msg_type}: port {msg['port']} out of range {MIN_PORT}..{MAX_PORT}")
    return msg


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


class FrameDecoder:
    """Control frames in, messages (dicts) out."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self.eof = False

    def receive_data(self, data: bytes) -> None:
        if not data:
            self.eof = True
            return
        if self.eof:
            raise ProtocolError("data after end of stream")
        self._buf += data

    def next_message(self) -> dict | None:
        """The next complete message, or None if more bytes are needed."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            if self.eof and buf:
                raise ProtocolError("connection closed in the middle of a frame header")
            return None
        (length,) = _HEADER.unpack_from(buf)
        if length > self._max:
            raise ProtocolError(f"frame of {length} bytes exceeds the maximum of {self._max}")
        if len(buf) < HEADER_SIZE + length:
            if self.eof:
                raise ProtocolError("connection closed in the middle of a frame")
            return None
        body = bytes(buf[HEADER_SIZE:HEADER_SIZE + length])
        del buf[:HEADER_SIZE + length]
        try:
            msg = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ProtocolError(f"frame is not valid UTF-8 JSON: {exc.__class__.__name__}") from None
        return _check(msg, ProtocolError)

    def take_leftover(self) -> bytes:
        """Bytes received after the last complete frame (the start of the chunk stream)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


class ChunkDecoder:
    """The chunk stream of one direction of a data connection.

    `feed(view)` returns ``(payloads, end)``: the payload pieces in order (memoryviews into
    `view`, valid until the caller reuses its buffer) and ``None``, ``"end"`` or ``"abort"``.
    Bytes after END in the same feed are not part of this stream (on a connection being reused
    they are the next control frame): they are kept in `trailing` for the caller.  Anything
    after ABORT, or fed after the end, is a protocol error.
    """

    __slots__ = ("_hdr", "_remaining", "ended", "max_chunk", "trailing")

    def __init__(self, max_chunk: int = MAX_CHUNK) -> None:
        self._hdr = b""
        self._remaining = 0
        self.ended: str | None = None
        self.max_chunk = max_chunk
        self.trailing = b""

    def feed(self, view: memoryview) -> tuple[list[memoryview], str | None]:
        payloads: list[memoryview] = []
        pos, n = 0, len(view)
        if n and self.ended is not None:
            raise ProtocolError(f"data after {self.ended.upper()} on the data stream")
        while pos < n:
            if self.ended == "end":
                self.trailing = bytes(view[pos:])
                break
            if self.ended is not None:
                raise ProtocolError(f"data after {self.ended.upper()} on the data stream")
            if self._remaining:
                take = min(self._remaining, n - pos)
                payloads.append(view[pos:pos + take])
                pos += take
                self._remaining -= take
                continue
            need = HEADER_SIZE - len(self._hdr)
            if need < HEADER_SIZE or n - pos < HEADER_SIZE:
                piece = bytes(view[pos:pos + need])
                self._hdr += piece
                pos += len(piece)
                if len(self._hdr) < HEADER_SIZE:
                    break
                (length,) = _HEADER.unpack(self._hdr)
                self._hdr = b""
            else:
                (length,) = _HEADER.unpack_from(view, pos)
                pos += HEADER_SIZE
            if length == END:
                self.ended = "end"
            elif length == ABORT:
                self.ended = "abort"
            elif length > self.max_chunk:
                raise ProtocolError(f"chunk of {length} bytes exceeds the maximum of {self.max_chunk}")
            else:
                self._remaining = length
        return payloads, self.ended

    @property
    def mid_chunk(self) -> bool:
        return bool(self._remaining or self._hdr)


def chunk_header(length: int) -> bytes:
    return _HEADER.pack(length)
