"""Trunks: long-lived TLS data connections that carry many client connections as streams.

Theory of operation
-------------------
A `Trunk` owns one TLS socket and speaks `mux.py` frames on it, both ways.  Each client
connection is a `Stream` on a trunk, joined to a plain socket (the client on the server, the
target on the agent).

Plain → trunk: a stream reads at most min(frame_max, its send window) bytes into the shared
scratch buffer, 8 bytes in, writes the frame header in front and hands the frame to the trunk.
A frame of a TLS record (16 KiB) or more is sent at once when nothing is queued, keeping only
what TLS did not take (`pending`); smaller frames (requests, WINDOW, OPEN, END) are queued and
the queues are written at the end of the loop pass (`Loop.call_at_end`), joined: ten clients'
requests that arrive together cost one TLS record and one system call instead of ten, on both
sides.  A stream stops reading when its window is used up (it resumes on WINDOW) or when the
trunk's queue is over `high` (it resumes when the queue drains below `low`, in turn with the
others that wait: oldest first, so every busy stream of a congested trunk gets its share):
backpressure, per stream and per trunk.  Which frame goes next is the scheduler's (below).

Trunk → plain: the trunk reads into a buffer of its own (so a stream that resumes reading in
the middle of a dispatch cannot overwrite frames still being handled), decodes frames and hands
DATA to its stream, which writes to its plain socket at once and keeps the rest in `outbuf`.
The peer never has more than the stream's receive window unacknowledged, so `outbuf` is bounded
by it; a sender that exceeds it breaks the protocol and loses the stream.  Credit is returned
(WINDOW) once a quarter of the window has been delivered.  The window starts at `WINDOW_SIZE`
and doubles (up to `MAX_WINDOW`) when a whole window was delivered within `GROW_WITHIN` with
`outbuf` empty: a stream that fast would be held back by a window of one round trip's worth of a
slower link, and its plain socket keeps up, so the window is what limits it.  What the streams of
a trunk grew by comes out of `WINDOW_BUDGET` and goes back when they close.

The budget: a window bounds one stream, not the process: N clients that stop reading would hold
N windows.  So every stream of the process (all trunks of the loop) draws on one buffer budget
(`set_buffer_budget`: anywhered's and the agent's `buffer_budget`, default `BUFFER_BUDGET`).
Withholding credit from a stream whose `outbuf` already holds data is not enough: a client that
stops reading holds what its peer was *allowed* to send when it stopped, i.e. the credit it got
while it still read.  So what is counted is a stream's commitment (`Stream.committed`): what it
holds plus what its peer may have in flight or still send under credit returned here, i.e.
recv_window - credit not yet returned, less what is left of the peer's first window (every
stream starts with it, and no receiver can refuse it).  Rules, all applied where credit is
returned (`_credit`: once per quarter window, not per chunk):
  1. a stream gets all its credit back while the commitments of all streams stay within the
     budget (the common case: nothing changes);
  2. beyond it, a stream gets back only what fits in the budget; one that holds data may get
     nothing (it is asked again each time its socket takes bytes: no lost wake-up);
  3. a stream that holds nothing always gets enough back that its peer may send
     `FLOOR_WINDOW`: readers are never starved by non-readers, whatever the budget;
  4. a window doubles only if the doubled window fits in the budget.
  5. the first window is the budget's too where the peer takes it from OPEN (mux.py): the
     server grants each new stream `WINDOW_SIZE` while that fits in the budget, else what is left,
     at least `FLOOR_WINDOW` (`grant_first_window`); the rest comes as credit when it fits.
So what the process holds is at most the budget plus `FLOOR_WINDOW` per stream (plus, per
stream from a peer that takes no first window from OPEN, what is left of its whole first
window).  The accounts (`_held`:
the bytes in outbufs; `_committed`) are module globals, changed exactly where bytes enter or
leave an outbuf, where credit is returned, and when a stream closes; the path of a chunk that
goes straight to its socket does not touch them.

A stream may lead with bytes of its own side (`Stream.lead`: the agent's PROXY protocol header,
proxyproto.py), put in `outbuf` before anything from the peer: they are written first, through
the same partial-write path, earn the peer no credit and count in no window, and the plain
socket is not read until they are all out (so nothing from the target precedes them either).

END after the last DATA is a half-close, passed on as shutdown(SHUT_WR) once `outbuf` is empty;
a stream is done when both directions have ended.  ABORT, or the trunk going away, closes the
plain socket at once.  `Stream` offers what the server's connection table reads from a relay:
byte counts, `close()`, `first_byte_at`, `last_active`.

A proxy's bandwidth limit (shaper.py) applies to the server's streams of that proxy: `up` and
`down` are the gates of its two directions (class attributes, None for every other stream).  An
unlimited stream checks one module global, `_shaped` (how many streams of the process have a
limit), per read, per DATA frame and per interest update, and nothing else while it is 0.  A
limited stream reads its plain socket at most what `up` allows and spends it; it writes to its
plain socket at most what `down` allows, keeping the rest in `outbuf` (within its window, like
any), so credit goes back only for what its socket took and the peer stops sending, and stops
reading its own socket, when the window is used up.  With no token left the stream drops READ
(resp. WRITE) from its mask (`up_wait`, `down_wait`) until the gate's timer resumes it.

Scheduling
----------
On a link slower than the processes (a WAN, a saturated uplink), everything queued in front of a
frame is time an interactive stream waits: an SSH keystroke behind megabytes of a download.  Three
queues can hold those bytes, and each is kept short, so that a frame never waits behind more
than a few milliseconds of sending:
  * the kernel's: TCP_NOTSENT_LOWAT limits what the trunk's socket holds unsent to `LOWAT_TIME`
    of sending at the trunk's measured rate (4 KiB at least; with it the kernel stops taking
    more instead of queueing megabytes, and the choice of what goes next stays here).  The
    kernel still takes a whole write past the mark (tens of KB measured), so a slow trunk also
    asks it (SIOCOUTQNSD, one ioctl per write at a few hundred writes a second) and writes only
    while less than LOWAT is unsent;
  * the frame being written (`pending`: TLS must finish a frame it was handed before any other
    may go): DATA frames are at most `frame_max`, `FRAME_TIME` of sending at the measured rate
    (8 KiB at least, `MAX_PAYLOAD` on a fast path, where frames that large save CPU);
  * the trunk's own: two lanes.  The urgent lane (control frames: OPEN, READY, FAIL, WINDOW, END,
    ABORT, PING, PONG; and DATA of *light* streams) is written before the bulk lane (DATA of busy
    streams).  On a slow trunk, and while the kernel refuses part of a write (`backlogged`), a
    stream is light as long as it has sent less than `LIGHT_RATE` a second, with bursts of
    `LIGHT_BURST` (a token bucket
    per stream, `allowance`): keystrokes, requests and acknowledgements are light, a transfer is
    not after its first 16 KiB.  A light stream may go on even when the trunk is congested and
    the busy streams wait their turn.  A stream's frames never overtake each other: it may use the
    urgent lane only once none of its DATA is left in the bulk lane (`bulk_mark`), and its END
    follows its DATA; a light stream spends its allowance whichever lane its DATA takes (one that
    read on an allowance it never spent, while its earlier DATA waited in the bulk lane, passed
    congestion a window at a time and starved the others).  The bulk lane of a slow trunk is kept
    to `HIGH_FRAMES` frames while its queue is empty too (with the fast limits then, the first
    streams to read again each queued up to `HIGH`, and a keystroke that took the bulk lane waited
    behind it: p99 of 0.4-0.8 s in metric h); busy streams take turns (oldest waiting first).
The rate (`_remeter`, every `METER_PERIOD`) is what the trunk handed to TLS.  Only a trunk that
is backlogged at less than `SLOW_RATE` is *slow*, and only a slow trunk takes the limits above
(its frames, lanes and LOWAT follow its rate); at twice SLOW_RATE it is fast again (frames of
`MAX_PAYLOAD`, queue limits `HIGH`/`LOW`, no LOWAT), so loopback and a fast LAN keep the figures
of before (checked with alternating `make bench --quick` runs; every knob of the slow mode left on
for a fast path cost 10-30% on 1 MiB c100 there).  The server puts every new stream on the
oldest live trunk and the others stand by, until that trunk is known to be fast (`fast`: it has
carried twice SLOW_RATE): then new streams are spread, least busy first.  Several trunks on one
bottleneck compete for its queue and each drains at a fraction of its rate: streams spread over
two before either was known to be slow gave an echo p99 of 36-40 ms in metric h, on one trunk
16-17.5; on loopback one trunk until proven fast is as fast or faster (alternating quick runs).
Bench metric h (`bench/run.py --metrics h`: a 40 Mbit/s tbf link between two network namespaces,
iperf3 -P 1/4/16 both ways, a 64-byte echo 20 times a second): interactive p99 of 16-17.5 ms
where direct has 7-24 and the goal allows 21-45, bulk 0.99-1.00x direct; before this scheduler
4.6-8 s with 4 or 16 streams.

Ownership
---------
A trunk belongs to one agent session (`owner`: the server's AgentSession, the agent's session
number).  When that session ends or is replaced, its owner calls `retire()`: from then on no new
stream is put on the trunk, its owner no longer counts it (the agent opens fresh ones for the
next session at once), and it closes when its last stream ends, at once if it carries none.  A
trunk therefore never outlives its session as a place for new clients, whatever happened to the
path under it, yet the connections it carries are not cut for an admin connection that was.

Liveness
--------
Every trunk checks its own path, on both sides: its owner calls `check_alive(now, interval)`
once per heartbeat interval.  A trunk that has heard nothing for half an interval sends a PING
(8 bytes on stream 0, answered by a PONG); one that has heard nothing for `STALE_AFTER`
intervals is *stale* (`stale()`: no new client is placed on it, the server holds the client for
a live trunk instead); one silent for `DEAD_AFTER` intervals is closed with everything on it.
Anything received counts, so a busy trunk sends no pings.  PINGs go only to a peer that
announced it understands them (older peers get none, and are checked as before, by their admin
connection only).

Why pings on the trunk rather than TCP keepalive with TCP_USER_TIMEOUT: keepalive only shows
that the peer's kernel still answers; a peer process that is wedged, or a path whose NAT entry
was replaced, can keep a kernel-level conversation going or fail it only after the kernel's own
retries, and TCP_USER_TIMEOUT bites only on unacknowledged data, so an idle black-holed trunk
is noticed only by keepalive probes at the kernel's pace.  A PING costs one frame (about 40 bytes
of TLS) per interval on an idle trunk, none on a busy one; it proves the peer's loop reads this
trunk, gives the trunk a round-trip time of its own (`rtt`), and needs no socket options.
"""

from __future__ import annotations

import collections
import fcntl
import sys
import errno
import logging
import socket
import ssl
from typing import Any, Callable

from . import dgram, mux, tls
from .loop import READ, WRITE, Loop
from .scratch import SCRATCH as _scratch, SCRATCH_VIEW as _view
from .common import printable
from .wire import ProtocolError

log = logging.getLogger("anywhere.trunk")

HIGH = 1024 * 1024  # queued bytes over which streams stop reading, on a fast path (see Scheduling)
LOW = 256 * 1024
HIGH_FRAMES = 4  # on a slower one: this many frames of frame_max
QUANTUM = 8 * 1024  # the smallest DATA frame limit (half a TLS record)
FRAME_TIME = 0.004  # seconds: a DATA frame is at most what the trunk sends in this time
LOWAT_TIME = 0.002  # seconds: what the kernel may hold unsent (TCP_NOTSENT_LOWAT), in sending time
LOWAT_MIN, LOWAT_MAX = 4 * 1024, 1024 * 1024
LOWAT_OFF = 2**31 - 1  # what the kernel holds unsent is then limited by the send buffer only
SLOW_RATE = 32 * 1024 * 1024  # bytes a second: a backlogged trunk slower than this is on a slow link
METER_PERIOD = 0.1  # seconds between measurements of the trunk's sending rate
LIGHT_RATE = 64 * 1024  # bytes a second a stream may send ahead of the bulk lane ...
LIGHT_BURST = 16 * 1024  # ... with bursts of this much: interactive traffic never waits behind bulk
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # Linux's number; Python 3.11 does not name it
READ_SIZE = 512 * 1024
# Every trunk of the process reads into this one buffer (the loop is single-threaded, and nothing
# of a read outlives its _on_readable: the decoder copies what it keeps, a stream copies what its
# socket does not take).  A buffer per trunk cost 516 KiB resident each (bytearray(n) writes its
# n zero bytes), idle or not: 1 MiB of an idle agent's 1.1 MiB on the server (issue 18).
_READ_BUF = bytearray(READ_SIZE)
_READ_VIEW = memoryview(_READ_BUF)
SHORT_READ = tls.READ_AHEAD  # less than OpenSSL's read-ahead buffer read: the kernel had no more
WINDOW_BUDGET = 12 * 1024 * 1024  # per trunk: what its streams' receive windows may grow by in all
GROW_WITHIN = 0.05  # seconds: a stream that delivers its whole window faster gets a bigger one
BUFFER_BUDGET = 256 * 1024 * 1024  # per process, by default: see "The budget" in the module's docstring
FLOOR_WINDOW = 64 * 1024  # beyond the budget, what a stream that holds nothing may still be owed
_FOREIGN = -1  # Stream.mask of a socket registered by another owner: the next _update re-points it
COALESCE = 16384  # frames under one TLS record's worth wait for the end of the loop pass
COALESCE_MAX = 65536  # at most this much joined into one write
STALE_AFTER = 2.0  # heartbeat intervals without a byte: no new stream goes on this trunk
DEAD_AFTER = 3.0  # heartbeat intervals without a byte: the trunk is closed
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
# the per-chunk path reads these as globals of this module, not attributes of mux
_HDR = mux.HEADER_SIZE
_MAX_PAYLOAD = mux.MAX_PAYLOAD
_DATA = mux.DATA
_DATA_WORD = _DATA << 24
_pack_header_into = mux.HEADER.pack_into
_WINDOW_SIZE = mux.WINDOW_SIZE
# The budget's accounts, one set per process (every trunk of the loop shares them); changed only
# where bytes enter or leave an outbuf and where credit is returned, never per chunk delivered.
_budget = BUFFER_BUDGET
_held = 0  # bytes in the outbufs of every stream
_committed = 0  # the sum of Stream.committed: what may come to be held, beyond first windows
_shaped = 0  # streams under a bandwidth limit, in the process: while 0, no stream looks for one


_SIOCOUTQNSD = 0x894B  # linux/sockios.h: bytes in a TCP socket's send queue not yet sent
_int_buf = bytearray(4)


def _unsent(fd: int) -> int:
    """What the kernel holds unsent for this TCP socket (0 where it cannot say)."""
    try:
        fcntl.ioctl(fd, _SIOCOUTQNSD, _int_buf)
    except OSError:
        return 0
    return int.from_bytes(_int_buf, sys.byteorder)


def set_buffer_budget(size: int) -> None:
    """Set the process's buffer budget (bytes); applies to the credit returned from now on."""
    global _budget
    if size < 0:
        raise ValueError(f"buffer budget {size} is negative")
    _budget = size


def buffer_usage() -> dict[str, int]:
    """The budget's accounts: bytes held in outbufs, bytes committed (held, or in flight or
    allowed under credit this process returned) and the budget."""
    return {"held": _held, "committed": _committed, "budget": _budget}


class Trunk:
    def __init__(self, loop: Loop, sock: ssl.SSLSocket, leftover: bytes, *, name: str,
                 on_open: Callable[..., None] | None = None,
                 on_close: Callable[["Trunk", str], None] | None = None) -> None:
        self.loop = loop
        self.sock = sock
        self.name = name
        self.on_open = on_open
        self.on_close = on_close
        self.decoder = mux.MuxDecoder()
        self.streams: dict[int, Stream] = {}
        self.out: collections.deque[bytes] = collections.deque()  # the bulk lane: DATA of busy streams
        self.urgent: collections.deque[bytes] = collections.deque()  # control frames and light streams' DATA
        self.pending: bytes | memoryview | None = None  # handed to TLS, not all taken: goes first
        self.out_bytes = 0  # in pending, urgent and out
        self.bulk_in = self.bulk_taken = 0  # bytes put in the bulk lane / taken from it, ever
        self.frame_max = _MAX_PAYLOAD  # see Scheduling
        self.backlogged = False  # the kernel refused part of the last write
        self._meter_backlogged = False  # ... at some time since the meter's period began
        self.slow = False  # on a slow link (see Scheduling)
        self.fast = False  # has carried twice SLOW_RATE: a fast path, where streams are spread
        self._slow_limits = (HIGH, LOW)  # (high, low) while backlogged, from the rate
        self.high, self.low = HIGH, LOW
        self._meter_bytes = 0
        self._meter_start = loop.now
        self._lowat = 0
        self._fd = sock.fileno()
        self.blocked: dict[Stream, None] = {}  # streams waiting for the queue to drain, oldest first
        self.window_budget = WINDOW_BUDGET
        self.closed = False
        self.reason = ""
        self.mask = 0
        self.owner: Any = None  # the session this trunk belongs to (see Ownership)
        self.retired = False
        self.can_ping = False  # the peer understands PING (see Liveness)
        self.takes_window = False  # the peer takes the first window OPEN grants (see mux.py)
        self.takes_pp = False  # the peer writes the PROXY header OPEN asks for (see mux.py, proxyproto.py)
        self.udp = False  # the peer carries UDP flows (DatagramStream; the agent says udp=1)
        self.last_rx = loop.time()
        self.idle_since = self.last_rx  # when its last stream ended (trunks on demand close after a while)
        self.rtt: float | None = None
        self._ping_sent: float | None = None
        self._next_id = 1
        self._flush_due = False
        # One TLS record per call, so per 16 KiB: the SSL object's own read(len, buffer) spares
        # the two Python frames of SSLSocket.recv_into -> read (about 5% of the agent's CPU in bulk);
        # its write() likewise spares SSLSocket.send's frame and checks.
        sslobj = getattr(sock, "_sslobj", None)
        self._read: Callable[[int, memoryview], int] = sslobj.read if sslobj is not None else \
            (lambda n, buf: sock.recv_into(buf, n))
        self._send: Callable[[bytes | memoryview], int] = sslobj.write if sslobj is not None else sock.send
        # After a short read, stop when OpenSSL holds nothing more (tls.has_pending; _read keeps
        # the SSL object it asks about alive) rather than read again only to meet SSLWantReadError.
        self._has_pending = tls.has_pending(sock)
        sock.setblocking(False)
        self._update()
        if leftover:
            self._handle(memoryview(leftover))
        loop.call_soon(self._on_readable)  # TLS may already hold bytes the selector will not report

    # -- plumbing --------------------------------------------------------------------------------------
    def _update(self) -> None:
        if self.closed:
            return
        mask = READ | (WRITE if self.out_bytes else 0)
        if mask == self.mask:
            return
        if self.mask == 0:
            self.loop.register(self.sock, mask, self._on_event)
        else:
            self.loop.modify(self.sock, mask, self._on_event)
        self.mask = mask

    def _on_event(self, mask: int) -> None:
        if mask & WRITE:
            self._flush()
            if self.closed:
                return
        if mask & READ:
            self._on_readable()

    @property
    def congested(self) -> bool:
        return self.out_bytes >= self.high

    def new_stream_id(self) -> int:
        """The next stream id not in use: ids wrap at 2**32 and skip streams still open (a
        reused id would be an OPEN for a live stream, which the agent must take for an attack)."""
        streams, sid = self.streams, self._next_id
        while sid in streams:
            sid = sid + 1 if sid + 1 < 2**32 else 1
        self._next_id = sid + 1 if sid + 1 < 2**32 else 1
        return sid

    # -- output ----------------------------------------------------------------------------------------
    def write(self, data: bytes | memoryview) -> None:
        """Queue one or more whole frames in the bulk lane.  A frame of a TLS record or more is
        sent at once when nothing is queued; smaller ones wait for the end of the loop pass, so
        that what every stream produced in one pass leaves in one TLS write."""
        if self.closed:
            return
        if not self.out_bytes and len(data) >= COALESCE and not (self.slow and _unsent(self._fd) > self._lowat):
            try:
                sent = self._send(data)
            except _WOULD_BLOCK:
                sent = 0
            except OSError as exc:
                self.close(f"write failed: {exc}")
                return
            self._meter_bytes += sent
            if self.loop.now - self._meter_start >= METER_PERIOD:
                self._remeter()
            if sent == len(data):
                return
            self.pending = bytes(data[sent:])  # data may be the shared scratch buffer
            self.out_bytes = len(self.pending)
            self._backlog(True)
            self._update()
            return
        chunk = bytes(data)
        n = len(chunk)
        self.out.append(chunk)
        self.bulk_in += n
        self.out_bytes += n
        if not self._flush_due and not self.mask & WRITE:
            self._flush_due = True
            self.loop.call_at_end(self._flush_at_end)

    def control(self, frame: bytes | memoryview) -> None:
        """Queue a frame in the urgent lane: ahead of every bulk frame not yet handed to TLS."""
        if self.closed:
            return
        chunk = bytes(frame)
        self.urgent.append(chunk)
        self._queued(len(chunk))

    def _queued(self, n: int) -> None:
        self.out_bytes += n
        if not self._flush_due and not self.mask & WRITE:
            self._flush_due = True
            self.loop.call_at_end(self._flush_at_end)

    def _flush_at_end(self) -> None:
        self._flush_due = False
        if not self.closed and not self.mask & WRITE:
            self._flush()

    def _next(self) -> bytes | None:
        """What to hand to TLS next: the urgent lane first, then the bulk lane; small frames of
        both joined into one write (bulk ones only up to frame_max while the kernel refuses some:
        see Scheduling); a frame of a TLS record or more goes alone."""
        parts: list[bytes] = []
        size = 0
        alone = False  # the first frame is a big one: it goes by itself
        for lane, most in ((self.urgent, COALESCE_MAX), (self.out, self.frame_max if self.backlogged else COALESCE_MAX)):
            taken = 0
            while lane and not alone:
                n = len(lane[0])
                if parts and (n >= COALESCE or size + n > most):
                    break
                parts.append(lane.popleft())
                size += n
                taken += n
                alone = n >= COALESCE and len(parts) == 1
            if lane is self.out:
                self.bulk_taken += taken
            if alone:
                break
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _flush(self) -> None:
        while not self.closed:
            head = self.pending
            if head is None:
                if not self.out_bytes:
                    if self.backlogged:
                        self._backlog(False)  # everything went
                    break
                head = self.pending = self._next()
            if self.slow and _unsent(self._fd) > self._lowat:
                self._backlog(True)  # the kernel takes whole buffers past LOWAT: ask it first
                break
            try:
                sent = self._send(head)
            except _WOULD_BLOCK:
                self._backlog(True)
                break
            except OSError as exc:
                self.close(f"write failed: {exc}")
                return
            self.out_bytes -= sent
            self._meter_bytes += sent
            if sent < len(head):
                self.pending = memoryview(head)[sent:]  # the rest, not a copy of it
                self._backlog(True)
                break
            self.pending = None
        if self.closed:
            return
        if self.loop.now - self._meter_start >= METER_PERIOD:
            self._remeter()
        if self.blocked and self.out_bytes < self.low:
            self._resume()
        self._update()

    def _resume(self) -> None:
        """Let waiting streams read again, oldest first, until the queue is full again; those that
        got no turn keep their place ahead of those that just had one (round robin: with a set,
        the same streams went first every time and the rest starved)."""
        waiting = list(self.blocked)
        self.blocked = {}
        for i, stream in enumerate(waiting):
            if self.congested or self.closed:
                rest = dict.fromkeys(st for st in waiting[i:] if not st.closed)
                rest.update(self.blocked)
                self.blocked = rest
                return
            stream.pump()

    def _backlog(self, backlogged: bool) -> None:
        """The kernel refused part of a write (or took everything again): the queue limits that
        keep the lanes short apply while it refuses, and always on a slow trunk (see Scheduling)."""
        if backlogged != self.backlogged:
            self.backlogged = backlogged
            if backlogged:
                self._meter_backlogged = True
            # a slow trunk keeps its short limits while its queue is empty too: with the fast ones,
            # the first streams to read again would each put up to HIGH into it at once
            self.high, self.low = self._slow_limits if backlogged or self.slow else (HIGH, LOW)

    def _remeter(self) -> None:
        """Every METER_PERIOD: the rate the trunk handed to TLS.  A trunk that could not hand over
        all it had (backlogged) at less than SLOW_RATE is on a slow link: its largest DATA frame
        becomes FRAME_TIME's worth of that rate, its queue limits a few such frames and the kernel's
        unsent limit LOWAT_TIME's worth; at twice SLOW_RATE it is on a fast path again (MAX_PAYLOAD
        frames, HIGH/LOW, no unsent limit).  See Scheduling."""
        now = self.loop.now
        rate = self._meter_bytes / (now - self._meter_start)
        backlogged, self._meter_backlogged = self._meter_backlogged or self.backlogged, False
        self._meter_bytes, self._meter_start = 0, now
        if rate >= 2 * SLOW_RATE:
            self.fast = True
        if not self.slow:
            if not backlogged or rate >= SLOW_RATE:
                return
            self.slow, self.fast = True, False
            log.debug("trunk %s: a slow link (%.1f MB/s while backlogged): short frames and queues", self.name, rate / 1e6)
        elif rate >= 2 * SLOW_RATE:
            self.slow = False
            log.debug("trunk %s: a fast path again (%.1f MB/s)", self.name, rate / 1e6)
            self.frame_max, self._slow_limits = _MAX_PAYLOAD, (HIGH, LOW)
            self.high, self.low = HIGH, LOW
            self._set_lowat(LOWAT_OFF)
            return
        frame = int(rate * FRAME_TIME) // QUANTUM * QUANTUM
        self.frame_max = frame = QUANTUM if frame < QUANTUM else _MAX_PAYLOAD if frame > _MAX_PAYLOAD else frame
        self._slow_limits = (HIGH_FRAMES * frame, frame)
        self.high, self.low = self._slow_limits
        lowat = int(rate * LOWAT_TIME)
        self._set_lowat(LOWAT_MIN if lowat < LOWAT_MIN else LOWAT_MAX if lowat > LOWAT_MAX else lowat)

    def _set_lowat(self, lowat: int) -> None:
        if abs(lowat - self._lowat) < self._lowat // 4:
            return  # not worth a system call
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, lowat)
        except OSError:
            pass  # not TCP (a test's socketpair)
        self._lowat = lowat

    # -- input -------------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        if self.closed:
            return
        got, eof = 0, False
        read, view, has_pending = self._read, _READ_VIEW, self._has_pending
        try:
            while got < READ_SIZE:
                n = read(READ_SIZE - got, view[got:])
                if n == 0:
                    eof = True
                    break
                got += n
                if got < SHORT_READ and has_pending is not None and not has_pending():
                    break  # what the kernel still gets, the selector reports
        except _WOULD_BLOCK:
            pass
        except ssl.SSLEOFError:
            eof = True  # closed without close_notify: what SSLSocket.recv_into reports as EOF too
        except OSError as exc:
            self.close(f"read failed: {exc}")
            return
        if got:
            self.last_rx = self.loop.now
            self._handle(view[:got])
        if eof and not self.closed:
            self.close("closed by peer")
        elif got >= READ_SIZE and not self.closed:
            self.loop.call_soon(self._on_readable)

    def _handle(self, view: memoryview) -> None:
        streams = self.streams
        try:
            for kind, sid, payload in self.decoder.feed(view):
                if self.closed:
                    return
                if kind == _DATA:  # most frames: straight to the stream
                    stream = streams.get(sid)
                    if stream is not None:  # else in flight for a stream this side has closed
                        stream.on_data(payload)
                else:
                    self._dispatch(kind, sid, payload)
        except ProtocolError as exc:
            log.warning("trunk %s: protocol error: %s; closing it", self.name, exc)
            self.close(f"protocol error: {exc}")

    def _dispatch(self, kind: int, sid: int, payload: memoryview | bytes) -> None:
        if kind == mux.PING:
            self.control(mux.ping_frame(mux.PONG, bytes(payload)))
            return
        if kind == mux.PONG:
            if self._ping_sent is not None:
                self.rtt = self.loop.time() - self._ping_sent
                self._ping_sent = None
            return
        if kind == mux.OPEN:
            if self.on_open is None or sid in self.streams:
                raise ProtocolError(f"unexpected OPEN for stream {sid}")
            request = mux.parse_open_request(bytes(payload))
            if request.problem is not None:  # this stream's PROXY fields only: it fails, the trunk goes on
                log.warning("trunk %s: stream %d refused: %s", self.name, sid, request.problem)
                self.control(mux.frame(mux.FAIL, sid, request.problem.encode()))
                return
            if request.udp is None:
                self.on_open(self, sid, request.host, request.port, request.window, request.origin)
            else:  # a UDP flow: udp is its idle timeout (DatagramStream)
                self.on_open(self, sid, request.host, request.port, request.window, None, request.udp)
            return
        stream = self.streams.get(sid)
        if stream is None:
            return  # frames in flight for a stream this side has already closed
        if kind == mux.DATA:
            stream.on_data(payload)
        elif kind == mux.WINDOW:
            stream.on_window(mux.parse_window(bytes(payload)))
        elif kind == mux.END:
            stream.on_peer_end()
        elif kind == mux.READY:
            if stream.on_ready is None:
                raise ProtocolError(f"unexpected READY for stream {sid}")
            callback, stream.on_ready, stream.on_fail = stream.on_ready, None, None  # answered: FAIL no more
            callback()
        elif kind == mux.FAIL:
            # FAIL answers OPEN instead of READY; after READY (or on a stream this side did not
            # open) it would drop the stream's on_close and leave its connection listed for ever
            if stream.on_fail is None or stream.on_ready is None:
                raise ProtocolError(f"unexpected FAIL for stream {sid}")
            reason = printable(bytes(payload).decode("utf-8", "replace"))
            callback, stream.on_close = stream.on_fail, None  # the fail callback reports it
            stream.on_fail = stream.on_ready = None
            stream.close(f"failed: {reason}", notify=False)
            callback(reason)
        elif kind == mux.ABORT:
            reason = printable(bytes(payload).decode("utf-8", "replace")) or "no reason"
            stream.close(f"aborted by peer: {reason}", notify=False)

    # -- liveness and ownership ------------------------------------------------------------------------
    def check_alive(self, now: float, interval: float) -> bool:
        """Once per heartbeat `interval`: ping a quiet trunk, close a silent one; False if closed."""
        if self.closed:
            return False
        silent = now - self.last_rx
        if silent >= DEAD_AFTER * interval:
            log.warning("trunk %s: nothing received for %.1f s; closing it", self.name, silent)
            self.close(f"no sign of life for {silent:.0f} s")
            return False
        if self.can_ping and silent >= interval / 2 and (self._ping_sent is None or now - self._ping_sent >= interval):
            self._ping_sent = now
            self.control(mux.ping_frame(mux.PING, b"\0" * mux.PING_SIZE))
        return True

    def stale(self, now: float, interval: float) -> bool:
        """Known or suspected dead: closed, retired, or silent for STALE_AFTER intervals."""
        return self.closed or self.retired or now - self.last_rx >= STALE_AFTER * interval

    def retire(self, reason: str) -> None:
        """Its session is over: take no new stream, and close once the last one has ended."""
        self.retired = True
        if not self.streams:
            self.close(reason)

    # -- ending --------------------------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Close the trunk and every stream on it; idempotent, never raises."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        for stream in list(self.streams.values()):
            stream.close(f"data connection lost: {reason}", notify=False)
        self.loop.close_socket(self.sock, self.mask)
        self.mask = 0
        self.out.clear()
        self.urgent.clear()
        self.pending = None
        self.out_bytes = 0
        if self.on_close is not None:
            callback, self.on_close = self.on_close, None
            try:
                callback(self, reason)
            except Exception:
                log.exception("trunk on_close callback failed")

    def __repr__(self) -> str:
        return f"<Trunk {self.name} {len(self.streams)} streams {'closed' if self.closed else 'open'}>"


class Stream:
    """One client connection on a trunk, joined to a plain socket once it is attached."""

    # a stream never hands its trunk over (carrier.Carrier); a class attribute, not one more per
    # instance: the 31st attribute cost every stream 0.45 KiB (its __dict__ outgrew the shared keys)
    handoff = None
    # bytes of this side's own at the head of outbuf (`lead`: the agent's PROXY header), not the
    # peer's: outside its window, no credit for them, and nothing is read before they are written.
    # A class attribute too: only a stream that leads with a header has one of its own.
    own = 0
    # A proxy's bandwidth limit (shaper.py): the gates of its two directions, None while unlimited,
    # and whether it waits for tokens.  Class attributes, so an unlimited stream carries none (a 30th
    # instance attribute would unshare every stream's __dict__: 1.3 KiB more each); read only while
    # the module's `_shaped` says some stream has a limit (Python 3.11 looks a class attribute up
    # through an instance in about 60 ns, a module global in a few: the agent, and a server
    # without limits, pay the latter per chunk).
    up: Any = None  # plain → trunk: what the stream reads from its socket
    down: Any = None  # trunk → plain: what it writes to its socket
    up_wait = False
    down_wait = False

    def __init__(self, trunk: Trunk, sid: int, name: str = "",
                 on_close: Callable[["Stream", str], None] | None = None) -> None:
        self.trunk = trunk
        self.sid = sid
        self.name = name
        self.on_close = on_close
        self.on_ready: Callable[[], None] | None = None
        self.on_fail: Callable[[str], None] | None = None
        self.on_first_byte: Callable[["Stream"], None] | None = None
        self.sock: socket.socket | None = None
        self.mask = 0
        self.send_window = mux.WINDOW_SIZE
        self.recv_window = mux.WINDOW_SIZE  # grows, see the module's docstring
        self.credit = 0
        self.window_delivered = 0  # delivered since window_start (for growing the window)
        self.window_start = trunk.loop.time()
        self.outbuf = bytearray()
        self.committed = 0  # this stream's share of _committed, see _recount
        self.free_first = _WINDOW_SIZE  # the peer's first window, outside the budget unless granted (grant_first_window)
        self.eof_read = False
        self.peer_ended = False
        self.shut = False
        self.nbytes_in = 0  # plain → trunk
        self.nbytes_out = 0  # trunk → plain
        self.closed = False
        self.reason = ""
        self.first_byte_at: float | None = None
        self.last_active = trunk.loop.time()
        self.allowance = float(LIGHT_BURST)  # what it may still send in the urgent lane (see Scheduling)
        self.bulk_mark = 0  # the trunk's bulk_in after this stream's last frame in the bulk lane
        self.dialer: Any = None  # the agent's dial of the target, cancelled if the stream closes first
        trunk.streams[sid] = self

    # what the server's connection table reads (the same names as Relay's)
    @property
    def bytes_a_to_b(self) -> int:
        return self.nbytes_in

    @property
    def bytes_b_to_a(self) -> int:
        return self.nbytes_out

    def attach(self, sock: socket.socket, read_now: bool = True, registered: bool = False) -> None:
        """Join the plain socket.  `read_now=False` for a socket just accepted or dialled: nothing
        is there to read yet, so the selector is asked instead of trying (and failing) at once.
        `registered`: the socket is still registered with the loop by someone else (a Dialer with
        keep_registered), and is re-pointed here with one selector change."""
        self.sock = sock
        if registered:
            self.mask = _FOREIGN
        if sock.gettimeout() != 0.0:  # already non-blocking when it comes from Dialer or accepted()
            sock.setblocking(False)
        if self.outbuf:
            self._drain()  # what came ahead of the socket (early bytes): written at once
            if self.closed:
                return
        if read_now:
            self.pump()
        else:
            self._update()
        if self.peer_ended and not self.outbuf:
            self._shutdown()

    def lead(self, data: bytes) -> None:
        """Bytes of this side's own for the plain socket, ahead of anything from the peer (the
        agent's PROXY header, before the target is even dialled): they go out through outbuf like
        the peer's (a partial write waits for the socket, nothing overtakes them), are not counted
        in the peer's window nor credited back, and the socket is not read until they are written
        (so the reply to them, or a banner, never precedes them)."""
        global _held
        if self.sock is not None or self.outbuf or self.nbytes_out:
            raise RuntimeError("lead() comes before any byte for the socket")
        self.outbuf += data
        self.own = len(data)
        _held += len(data)

    # -- plumbing ---------------------------------------------------------------------------------------
    def _update(self) -> None:
        if self.closed or self.sock is None:
            return
        reading = not self.eof_read and self.send_window > 0 and not self.own and self not in self.trunk.blocked \
            and not (_shaped and self.up_wait)
        mask = (READ if reading else 0) | (WRITE if self.outbuf and not (_shaped and self.down_wait) else 0)
        if mask == self.mask:
            return
        if self.mask == 0:
            self.trunk.loop.register(self.sock, mask, self._on_event)
        elif mask == 0:
            self.trunk.loop.unregister(self.sock)
        else:
            self.trunk.loop.modify(self.sock, mask, self._on_event)
        self.mask = mask

    def _on_event(self, mask: int) -> None:
        if mask & WRITE:
            self._drain()
        if mask & READ and not self.closed:
            self.pump()

    def _first_byte(self) -> None:
        self.first_byte_at = self.trunk.loop.time()
        if self.on_first_byte is not None:
            try:
                self.on_first_byte(self)
            except Exception:
                log.exception("on_first_byte callback failed")

    # -- plain → trunk ---------------------------------------------------------------------------------
    def pump(self) -> None:
        sock, trunk = self.sock, self.trunk
        if sock is None or self.closed or self.own:
            return
        up = self.up if _shaped else None  # a bandwidth limit (shaper.py): None for an unlimited proxy
        for _ in range(16):
            window = self.send_window
            if self.eof_read or window <= 0:
                break
            limit = trunk.frame_max
            if window < limit:
                limit = window
            light = 0
            if trunk.backlogged or trunk.slow:  # the kernel refuses, or may at once: which lane matters (see Scheduling)
                now = trunk.loop.now
                light = self.allowance + (now - self.last_active) * LIGHT_RATE
                if light > LIGHT_BURST:
                    light = LIGHT_BURST
                self.allowance, self.last_active = light, now
                if light < 512:
                    light = 0
                if trunk.out_bytes >= trunk.high:  # congested: only a light stream may go on, in the urgent lane
                    if not light:
                        trunk.blocked[self] = None
                        break
                    if light < limit:
                        limit = int(light)
            elif trunk.out_bytes >= trunk.high:
                trunk.blocked[self] = None
                break
            if up is not None:
                allowed = self._up_allowed(up)
                if not allowed:
                    break
                if allowed < limit:
                    limit = allowed
            try:
                n = sock.recv_into(_view[_HDR:_HDR + limit])
            except _WOULD_BLOCK:
                break
            except OSError as exc:
                self.close(f"{self.name} read failed: {exc.strerror or exc}")
                return
            if n == 0:
                self.eof_read = True
                end = mux.frame(mux.END, self.sid)
                if self.bulk_mark > trunk.bulk_taken:
                    trunk.write(end)  # behind its own DATA still in the bulk lane
                else:
                    trunk.control(end)
                self._check_done()
                break
            _pack_header_into(_scratch, 0, _DATA_WORD | n, self.sid)
            if light:
                self.allowance = light - n if n < light else 0.0  # spent, whichever lane it takes
            if light and n <= light and self.bulk_mark <= trunk.bulk_taken:  # never ahead of its own DATA
                trunk.control(_view[:_HDR + n])
            else:
                trunk.write(_view[:_HDR + n])
                self.bulk_mark = trunk.bulk_in
            self.send_window = window - n
            self.nbytes_in += n
            if up is not None:
                up.spend(n)
            self.last_active = trunk.loop.now  # for idle timeouts: the time of this loop pass will do
            if self.first_byte_at is None:
                self._first_byte()
            if trunk.closed:
                return
            if n < limit:
                break  # the kernel gave what it had
        self._update()

    def open_window(self, credit: int) -> None:
        """Widen this side's send window by `credit` (READY does it for a stream opened early)."""
        starved = self.send_window <= 0
        self.send_window += credit
        if starved:
            self.pump()  # it had stopped reading; otherwise the selector still watches it

    def on_window(self, credit: int) -> None:
        self.send_window += credit
        if self.send_window > mux.MAX_WINDOW:
            raise ProtocolError(f"stream {self.sid}: window credit beyond what was sent")
        self.pump()

    # -- trunk → plain ---------------------------------------------------------------------------------
    def on_data(self, payload: memoryview | bytes) -> None:
        n = len(payload)
        outbuf = self.outbuf
        if self.peer_ended:
            raise ProtocolError(f"stream {self.sid}: DATA after END")
        if len(outbuf) - self.own + n > self.recv_window:
            raise ProtocolError(f"stream {self.sid}: more data than its window")
        self.nbytes_out += n
        self.last_active = self.trunk.loop.now
        if self.first_byte_at is None:
            self._first_byte()
        if self.sock is None or outbuf or (_shaped and self.down is not None):
            outbuf += payload
            self._hold(n)
            if self.down is not None and len(outbuf) == n and not self.down_wait:
                self._drain()  # limited: what the tokens allow goes now, the rest waits (shaper.py)
            else:
                self._update()
            return
        try:
            sent = self.sock.send(payload)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            self.close(f"{self.name} write failed: {exc.strerror or exc}")
            return
        if sent < n:
            outbuf += payload[sent:]  # before _credit, which grows the window only for a reader that keeps up
            self._credit(sent)
            self._hold(n - sent)
            self._update()  # now it waits to write
            return
        credit = self.credit + n
        if credit < self.recv_window >> 2:
            self.credit = credit  # not worth a WINDOW frame yet (what _credit would decide, one call less)
        else:
            self._credit(n)

    def _drain(self) -> None:
        global _held
        if not self.outbuf or self.sock is None:
            return
        data: bytearray = self.outbuf
        down = self.down if _shaped else None
        if down is not None:  # a bandwidth limit: at most what the tokens allow
            allowed = self._down_allowed(down, len(data))
            if not allowed:
                self._update()
                return
            if allowed < len(data):
                data = data[:allowed]  # a copy: outbuf is cut below, which a view would forbid
        try:
            sent = self.sock.send(data)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            self.close(f"{self.name} write failed: {exc.strerror or exc}")
            return
        del self.outbuf[:sent]
        _held -= sent
        if down is not None:
            down.spend(sent)
            if self.outbuf and sent == len(data) and not down.grant(len(self.outbuf)):
                self.down_wait = True  # the tokens ran out, not the socket's room: wait for them
                down.wait(self._resume_down)
        own = self.own
        if own:  # our own bytes first: no credit for them; reading starts once they are all out
            self.own = own - sent if sent < own else 0
            sent = sent - own if sent > own else 0
        self._credit(sent)
        self._recount()
        if not self.outbuf and self.peer_ended:
            self._shutdown()
        self._update()

    def _credit(self, delivered: int) -> None:
        credit = self.credit + delivered
        window = self.recv_window
        if credit < window >> 2:
            self.credit = credit
            return
        global _committed
        trunk = self.trunk
        others = _committed - self.committed  # what the budget has committed to the other streams
        moved = self.window_delivered + credit
        if moved >= window:
            now = trunk.loop.time()
            if now - self.window_start < GROW_WITHIN and window < mux.MAX_WINDOW and not self.outbuf \
                    and trunk.window_budget >= window and others + 2 * window <= _budget:
                trunk.window_budget -= window  # a whole window in no time, and our reader keeps up: double it
                self.recv_window = window * 2
                credit += window
                window *= 2
            self.window_start = now
            moved = 0
        first = self.free_first - self.nbytes_out  # what is left of a first window not the budget's
        if first < 0:
            first = 0
        keep = 0  # credit kept back
        committed = window - first  # this stream's commitment if it gets everything back
        if others + committed > _budget:  # it does not fit: return less (see "The budget")
            cap = _budget - others  # one that holds data gets what fits, perhaps nothing
            if cap < FLOOR_WINDOW and not self.outbuf:
                cap = FLOOR_WINDOW  # one that holds nothing always gets some: readers never starve
            keep = committed - cap if committed > cap else 0
            if keep > credit - (FLOOR_WINDOW >> 2):
                keep = credit  # nothing, or too little for a frame (the peer still has 3/4 of the floor)
            committed -= keep
        if committed < len(self.outbuf):
            committed = len(self.outbuf)  # only a peer that broke its window gets here; what is held counts
        self.window_delivered = moved - keep
        self.credit = keep
        _committed = others + committed
        self.committed = committed
        if credit > keep:
            trunk.control(mux.window_frame(self.sid, credit - keep))

    def grant_first_window(self) -> int:
        """For a peer that takes its first window from us (see mux.py): what the budget lets it send
        before any credit, the whole WINDOW_SIZE while it fits, else what is left (at least
        FLOOR_WINDOW); counted in the budget like any credit.  The rest of recv_window is credit kept
        back, returned by `_credit` when the budget allows."""
        global _committed
        room = _budget - _committed
        window = _WINDOW_SIZE if room >= _WINDOW_SIZE else max(FLOOR_WINDOW, room - room % FLOOR_WINDOW)
        kept = self.recv_window - window
        self.free_first = 0
        self.credit = kept
        self.window_delivered = -kept  # not delivered: never sent
        _committed += window - self.committed
        self.committed = window
        return window

    def _hold(self, n: int) -> None:
        """`n` bytes went into outbuf (the rare path: the plain socket did not take them)."""
        global _held
        _held += n
        self._recount()

    def _recount(self) -> None:
        """Record this stream's commitment as it is now (see "The budget"); between recounts it
        can only fall (bytes delivered straight to the socket), so the recorded one is an upper
        bound."""
        global _committed
        first = self.free_first - self.nbytes_out
        committed = self.recv_window - self.credit - (first if first > 0 else 0)
        if committed < len(self.outbuf):
            committed = len(self.outbuf)  # as in _credit
        _committed += committed - self.committed
        self.committed = committed

    # -- a bandwidth limit (shaper.py) -----------------------------------------------------------------
    def shape(self, up: Any, down: Any) -> None:
        """Put the stream under these gates (None: unlimited that way), now or anew on a change of
        its proxy's limit; a stream that waited for the old gate goes on under the new one."""
        global _shaped
        was = self.up is not None or self.down is not None
        for gate, resume in ((self.up, self._resume_up), (self.down, self._resume_down)):
            if gate is not None:
                gate.leave(resume)
        self.up, self.down = up, down
        _shaped += (up is not None or down is not None) - was
        self.up_wait = self.down_wait = False
        if self.closed or self.sock is None:
            return
        if self.outbuf:
            self._drain()
        if not self.closed:
            self.pump()

    def _up_allowed(self, up: Any) -> int:
        """What the gate lets this stream read now; 0: it waits (out of the selector) for tokens."""
        allowed = up.grant()
        if not allowed:
            self.up_wait = True
            up.wait(self._resume_up)
        elif self.up_wait:
            self.up_wait = False  # tokens came back before its turn (pumped for another reason)
            up.leave(self._resume_up)
        return allowed

    def _down_allowed(self, down: Any, want: int) -> int:
        allowed = down.grant(want)
        if not allowed:
            self.down_wait = True
            down.wait(self._resume_down)
        elif self.down_wait:
            self.down_wait = False
            down.leave(self._resume_down)
        return allowed

    def _resume_up(self) -> None:
        self.up_wait = False
        self.pump()

    def _resume_down(self) -> None:
        self.down_wait = False
        self._drain()

    def on_peer_end(self) -> None:
        self.peer_ended = True
        if not self.outbuf and self.sock is not None:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.shut or self.sock is None:
            return
        self.shut = True
        if self.eof_read:
            self._check_done()  # both ways ended: close() sends the FIN (nothing is left unread)
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                self.close(f"{self.name} shutdown failed: {exc.strerror or exc}")
                return
        self._check_done()

    def _check_done(self) -> None:
        if self.eof_read and self.shut and not self.outbuf:
            self.close("done", notify=False)

    # -- ending -------------------------------------------------------------------------------------------
    def close(self, reason: str = "closed", notify: bool = True) -> None:
        """Close the stream (and tell the peer with ABORT unless `notify` is false); idempotent."""
        global _held, _committed
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        trunk = self.trunk
        if notify and not trunk.closed:
            trunk.control(mux.frame(mux.ABORT, self.sid, reason.encode("utf-8", "replace")[:1024]))
        trunk.streams.pop(self.sid, None)
        if not trunk.streams:
            trunk.idle_since = trunk.loop.now
        trunk.blocked.pop(self, None)
        if _shaped and (self.up is not None or self.down is not None):
            self.shape(None, None)  # out of its gates' queues (closed: nothing more happens)
        trunk.window_budget += self.recv_window - mux.WINDOW_SIZE
        _held -= len(self.outbuf)
        _committed -= self.committed
        self.committed = 0
        if self.dialer is not None:
            dialer, self.dialer = self.dialer, None
            dialer.cancel()
        if self.sock is not None:
            trunk.loop.close_socket(self.sock, self.mask)
            self.mask = 0
        self.outbuf = bytearray()
        if self.on_close is not None:
            callback, self.on_close = self.on_close, None
            try:
                callback(self, reason)
            except Exception:
                log.exception("stream on_close callback failed")
        if trunk.retired and not trunk.streams:
            trunk.close("its session is over and its last stream has ended")


class DatagramStream(Stream):
    """A UDP flow on a trunk: a stream whose endpoint is a datagram flow instead of a TCP socket.

    Each datagram travels whole, length-prefixed (dgram.py), in the stream's DATA bytes; the window
    and credit machinery is Stream's (a datagram is sent only when the whole of it fits in the send
    window; credit is returned as datagrams are handed on, which is at once: UDP has no outbuf).
    What does not fit (the window used up, or the trunk's queue over `high`) is dropped here, at the
    edge, and counted in `dropped`, as a router drops what it cannot queue: the trunk is reliable,
    so nothing is lost inside the tunnel, and nothing is buffered without bound either.  A light
    flow (DNS, a game, a voice call: under LIGHT_RATE, see Scheduling) is an interactive stream
    like any: on a slow or backlogged trunk its datagrams take the urgent lane, so they are neither
    dropped for a queue full of someone else's bulk nor wait behind it (behind 8 downloads on a
    40 Mbit/s link, 111 of 160 echoes came back before this, 160 after: test_udp_behind_bulk).
    `deliver(datagram)` hands a datagram from the peer to the endpoint (the server sends it to its
    client's address, the agent to its connected UDP socket); it must not raise.  `sock`, if the
    owner sets it (the agent's connected socket, registered with `mask`), is closed with the
    stream.  No half-close: a flow has no EOF; it ends by ABORT (idle timeout, kill) or with its
    trunk.  Stream's TCP path (attach, pump, _drain) is never used, and is not slowed by this."""

    def __init__(self, trunk: Trunk, sid: int, name: str, on_close: Callable[["Stream", str], None] | None,
                 deliver: Callable[[bytes], None]) -> None:
        super().__init__(trunk, sid, name, on_close)
        self.deliver = deliver
        self.decoder = dgram.DatagramDecoder()
        self.dropped = 0  # datagrams dropped at this edge (no window, or the trunk congested)
        self.datagrams_in = self.datagrams_out = 0

    def attach(self, sock: socket.socket, read_now: bool = True, registered: bool = False) -> None:
        raise TypeError("a datagram stream has no socket to attach")

    def _update(self) -> None:
        pass  # the owner of `sock` registers it

    def pump(self) -> None:
        pass  # nothing to read: datagrams are pushed (send_datagram)

    def send_datagram(self, datagram: bytes | memoryview) -> bool:
        """Send one datagram from the endpoint to the peer; False if it was dropped (counted)."""
        trunk = self.trunk
        n = len(datagram)
        framed = n + dgram.PREFIX
        if self.closed or trunk.closed or framed > self.send_window or n > dgram.MAX_DATAGRAM:
            self.dropped += 1
            return False
        light = 0.0
        if trunk.backlogged or trunk.slow:  # a light flow (DNS, a game, VoIP) goes ahead of bulk, as a light stream
            light = self.allowance + (trunk.loop.now - self.last_active) * LIGHT_RATE
            if light > LIGHT_BURST:
                light = LIGHT_BURST
        frame = mux.HEADER.pack(_DATA_WORD | framed, self.sid) + n.to_bytes(dgram.PREFIX, "big") + bytes(datagram)
        if light >= framed and self.bulk_mark <= trunk.bulk_taken:  # never ahead of its own datagrams
            trunk.control(frame)
        elif trunk.out_bytes >= trunk.high:  # congested, and the flow is not light: dropped, as a router would
            self.dropped += 1
            return False
        else:
            trunk.write(frame)
            self.bulk_mark = trunk.bulk_in
        if light:
            self.allowance = light - framed if light > framed else 0.0  # spent, whichever lane it took
        self.send_window -= framed
        self.nbytes_in += n
        self.datagrams_in += 1
        self.last_active = trunk.loop.now
        if self.first_byte_at is None:
            self._first_byte()
        return True

    def on_data(self, payload: memoryview | bytes) -> None:
        n = len(payload)
        if n > self.recv_window:
            raise ProtocolError(f"stream {self.sid}: more data than its window")
        self.last_active = self.trunk.loop.now
        for datagram in self.decoder.feed(payload):  # ProtocolError (oversize): the trunk ends it
            self.nbytes_out += len(datagram)
            self.datagrams_out += 1
            if self.first_byte_at is None:
                self._first_byte()
            self.deliver(datagram)
            if self.closed:
                return
        self._credit(n)  # handed on at once: nothing is held but the decoder's one partial datagram

    def on_peer_end(self) -> None:
        self.close("ended by peer", notify=False)
