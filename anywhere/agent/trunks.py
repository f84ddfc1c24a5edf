"""Data path 1, the default: trunks, each carrying many client connections as streams.

Theory of operation
-------------------
A welcome with ``pool`` > 0 asks the agent to keep that many trunks (at most wire.MAX_TRUNKS);
with ``on_demand``, none until the server's ``trunks`` asks (the session's `wanted`), and a trunk
the server closes (it does so once they have idled, after saying ``trunks`` 0) is not replaced:
the server asks again when a client comes.
`Trunks.refill` opens the missing ones: a `TrunkSetup` dials the server at the address the admin
connection reached, runs TLS, and, if the session it was opened for is still the welcomed one,
hands the socket over; `Trunks` makes it a `trunk.Trunk` and says ``trunk`` on it (agent id,
the session's token, ``ping=1``: it answers PING; ``window=1``: it takes a stream's first window
from OPEN; ``pp=1``: it writes a PROXY protocol header when OPEN asks for one; ``udp=1``: it
carries UDP flows).  From then on the
server opens streams on it: each OPEN names a target, dialled through `target.Targets` (the
allowlist); READY once it answers, FAIL with the reason if not.  The stream exists while its
target is dialled, so an ABORT meanwhile cancels the dial.  An OPEN with PROXY fields (a proxy
with ``proxy_protocol``, proxyproto.py) has the header put at the head of the stream's output
before the dial starts, so it is the target's first byte, ahead of the client's early bytes, and
the target is read only once it is written (a target that speaks first hears nothing before it).
An OPEN with ``udp`` (the flow's idle timeout) is a UDP flow (server/udp.py): a
`trunk.DatagramStream` joined to a UDP socket connected to the target (`Targets.dial_udp`, the
same allowlist); datagrams go both ways whole; the server ends the flow when it idles, and the
agent too, `UDP_IDLE_MARGIN` seconds later, should the server's ABORT never come.

Ownership (trunk.py, "Ownership"): a trunk belongs to the session it was opened in (its
``owner`` is the session's number).  When the session ends, `retire` stops counting its trunks,
so the next session opens its own at once; a retired trunk closes when its last stream ends.
Liveness: every heartbeat interval, whether or not a session is up, each trunk, current or
retired, checks its own (``Trunk.check_alive``).  A current trunk that closes is replaced after
the first backoff delay.  A trunk set-up that fails (the server busy with other handshakes, a
lost packet) is tried again at the next liveness check, one heartbeat interval later: without
that, an agent stayed a trunk short until something else refilled (issue 18's fleet benchmark
saw 6 of 2,000 trunks missing after a restart).

Rules: streams do not depend on the admin connection; a trunk is never reused by another
session; nothing here speaks on the admin connection.
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
import ssl
from typing import Callable

from .. import mux, proxyproto
from ..framed import FramedConn
from ..loop import READ, Loop, Timer
from ..trunk import DatagramStream, Stream, Trunk
from ..wire import MAX_TRUNKS, PROTO_VERSION, encode
from .session import Session, backoff_delay
from .target import Targets, target_name

UDP_IDLE_MARGIN = 5.0  # seconds after the flow's idle timeout: the agent ends a flow the server did not
UDP_RECV_BUDGET = 64  # datagrams read from one flow's socket per loop pass
_UDP_BUF = bytearray(65536)
_UDP_VIEW = memoryview(_UDP_BUF)

class SetupState(enum.Enum):
    DIALING = "dialing"  # connecting to the server
    HANDSHAKING = "handshaking"  # TLS
    DONE = "done"  # handed over as a trunk, or failed


class TrunkSetup:
    """One connection on its way to becoming a trunk: dial the server, TLS, then
    ``on_ready(sock, leftover, peer)``; ``on_done(self)`` exactly once, either way."""

    def __init__(self, session: Session, on_ready: Callable[[ssl.SSLSocket, bytes, str], None],
                 on_done: Callable[["TrunkSetup"], None]) -> None:
        self.session = session
        self.number = session.number  # opened for this session: useless to any other
        self.on_ready = on_ready
        self.on_done = on_done
        self.state = SetupState.DIALING
        session.connect_server(self._on_server)

    def _finish(self) -> None:
        if self.state is not SetupState.DONE:
            self.state = SetupState.DONE
            self.on_done(self)

    def _on_server(self, sock: socket.socket | None, error: str | None) -> None:
        if sock is None or self.session.closed:
            self._finish()
            if sock is not None:
                sock.close()
            else:
                self.session.log.info("cannot open a trunk to the server: %s", error)
            return
        self.state = SetupState.HANDSHAKING
        self.session.secure(sock, on_message=lambda c, m: c.close("unexpected message"),
                            on_close=lambda c, reason: self._failed(reason), on_handshake=self._on_handshake)

    def _failed(self, reason: str) -> None:
        self._finish()
        self.session.log.info("trunk set-up failed: %s", reason)

    def _on_handshake(self, conn: FramedConn) -> None:
        if self.session.number != self.number or not self.session.welcomed:
            self._finish()
            conn.close("its session is over")
            return
        peer = conn.peer
        sock, leftover = conn.detach()
        self._finish()
        self.on_ready(sock, leftover, peer)


class Trunks:
    """The agent's trunks: those of the current session, the retired ones, those being opened."""

    def __init__(self, loop: Loop, session: Session, targets: Targets) -> None:
        self.loop = loop
        self.session = session
        self.targets = targets
        self.current: list[Trunk] = []  # the current session's
        self.retired: set[Trunk] = set()  # of sessions that are over, closed with their last stream
        self.opening: set[TrunkSetup] = set()
        self.closed = False
        self._liveness: Timer | None = None

    def start(self) -> None:
        self._liveness = self.loop.call_later(self.session.interval, self._check)

    @property
    def streams(self) -> list[Stream]:
        return [s for t in self.current + list(self.retired) for s in t.streams.values()]

    def refill(self) -> None:
        """Keep the trunks the session's welcome asked for open or on their way."""
        session = self.session
        if self.closed or session.closed or not session.welcomed or session.server_addr is None:
            return
        wanted = min(MAX_TRUNKS, session.wanted)
        for _ in range(max(0, wanted - len(self.current) - len(self.opening))):
            self.opening.add(TrunkSetup(session, self._adopt, self.opening.discard))

    def _adopt(self, sock: ssl.SSLSocket, leftover: bytes, peer: str) -> None:
        session = self.session
        trunk = Trunk(self.loop, sock, leftover, name=f"to {peer}", on_open=self._on_stream_open,
                      on_close=self._on_trunk_close)
        fields = {"session": session.token} if session.token is not None else {}
        trunk.write(encode("trunk", proto=PROTO_VERSION, agent_id=session.agent_id, ping=1, window=1, pp=1, udp=1,
                            **fields))
        trunk.owner = session.number
        trunk.can_ping = session.trunk_ping
        self.current.append(trunk)

    def retire(self, reason: str) -> None:
        """The session is over: its trunks are not counted any more (the next session opens its
        own at once) and close when their last stream ends."""
        trunks, self.current = self.current, []
        for trunk in trunks:
            if trunk.streams:
                self.retired.add(trunk)
            trunk.retire(reason)

    def _check(self) -> None:
        """Every heartbeat interval, whether or not a session is up: each trunk's own liveness."""
        self._liveness = None
        if self.closed:
            return
        now = self.loop.time()
        for trunk in self.current + list(self.retired):
            trunk.check_alive(now, self.session.interval)
        self.refill()  # a set-up that failed since: tried again (a heartbeat interval apart)
        self._liveness = self.loop.call_later(self.session.interval, self._check)

    def _on_trunk_close(self, trunk: Trunk, reason: str) -> None:
        self.retired.discard(trunk)
        current = trunk in self.current
        if current:
            self.current.remove(trunk)
        if not self.closed:
            # on demand, the server closes idle trunks (and asks again when it needs them)
            by_server = self.session.on_demand and reason == "closed by peer"
            self.session.log.log(logging.DEBUG if reason.startswith("agent") or trunk.retired or by_server
                                 else logging.INFO, "trunk %s closed: %s", trunk.name, reason)
            if current and not by_server:
                config = self.session.config
                self.loop.call_later(backoff_delay(1, config.backoff_min, config.backoff_max), self.refill)

    # -- a stream: its target ------------------------------------------------------------------------
    def _on_stream_open(self, trunk: Trunk, sid: int, host: str, port: int, window: int | None = None,
                        origin: proxyproto.Origin | None = None, udp: float | None = None) -> None:
        if udp is not None:
            self._on_flow_open(trunk, sid, host, port, window, udp)
            return
        target = target_name(host, port)

        def ended(st: Stream, reason: str) -> None:
            self.session.log.log(logging.DEBUG if reason == "done" else logging.INFO,
                                 "stream %d to %s ended (%s): %d bytes to the target, %d back", sid, target, reason,
                                 st.nbytes_out, st.nbytes_in)
        # the stream exists while its target is dialled, so an ABORT meanwhile cancels the dial
        stream = Stream(trunk, sid, name=f"target {target}", on_close=ended)
        if window is not None:
            stream.send_window = window  # the first window the server's budget granted
        if origin is not None:
            stream.lead(proxyproto.header(origin))  # the target's first byte, whatever comes next

        def dialled(sock: socket.socket | None, error: str | None) -> None:
            stream.dialer = None
            if stream.closed or trunk.closed:
                if sock is not None:
                    self.loop.discard(sock)
                    sock.close()
                return
            if sock is None:
                self.session.log.warning("stream %d: cannot reach %s: %s", sid, target, error)
                trunk.control(mux.frame(mux.FAIL, sid, (error or "unknown error").encode("utf-8", "replace")[:1024]))
                stream.on_close = None
                stream.close("target unreachable", notify=False)
                return
            trunk.control(mux.frame(mux.READY, sid))
            stream.attach(sock, read_now=False, registered=True)
        stream.dialer = self.targets.dial(host, port, dialled, keep_registered=True)

    def _on_flow_open(self, trunk: Trunk, sid: int, host: str, port: int, window: int | None, idle: float) -> None:
        flow = UdpFlow(self.loop, self.session.log, trunk, sid, target_name(host, port), idle)
        if window is not None:
            flow.stream.send_window = window
        flow.stream.dialer = self.targets.dial_udp(host, port, flow.dialled)

    # -- ending --------------------------------------------------------------------------------------
    def close(self, reason: str) -> None:
        """Close every trunk, current and retired, and stop checking them.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._liveness:
            self._liveness.cancel()
        for trunk in self.current + list(self.retired):
            trunk.close(reason)


class UdpFlow:
    """A UDP flow's agent end: a DatagramStream and a UDP socket connected to the target (the
    stream's `sock`, closed with it); ends on its own `UDP_IDLE_MARGIN` after the server should have."""

    def __init__(self, loop: Loop, log: logging.Logger | logging.LoggerAdapter, trunk: Trunk, sid: int, target: str,
                 idle: float) -> None:
        self.loop, self.log, self.trunk, self.sid, self.target, self.idle = loop, log, trunk, sid, target, idle
        self.timer: Timer | None = None
        self.stream = DatagramStream(trunk, sid, f"udp target {target}", self._ended, self._deliver)

    def _deliver(self, datagram: bytes) -> None:
        sock = self.stream.sock
        try:
            if sock is None:
                raise OSError("not connected yet")
            sock.send(datagram)
        except OSError:  # a full socket buffer, or the target's ICMP error for an earlier one: UDP
            self.stream.dropped += 1

    def _readable(self, _mask: int) -> None:
        stream = self.stream
        for _ in range(UDP_RECV_BUDGET):
            if stream.closed or stream.sock is None:
                return
            try:
                n = stream.sock.recv_into(_UDP_BUF)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue  # ICMP for an earlier datagram: the target is not listening (yet)
                stream.close(f"{stream.name} read failed: {exc.strerror or exc}")
                return
            stream.send_datagram(_UDP_VIEW[:n])

    def _check(self) -> None:
        self.timer = None
        quiet = self.loop.time() - self.stream.last_active
        if quiet >= self.idle + UDP_IDLE_MARGIN:
            self.stream.close(f"idle for {quiet:.0f} s")
        else:
            self.timer = self.loop.call_later(self.idle + UDP_IDLE_MARGIN - quiet, self._check)

    def dialled(self, sock: socket.socket | None, error: str | None) -> None:
        stream, trunk = self.stream, self.trunk
        stream.dialer = None
        if stream.closed or trunk.closed:
            if sock is not None:
                sock.close()
            return
        if sock is None:
            self.log.warning("udp flow %d: cannot reach %s: %s", self.sid, self.target, error)
            trunk.control(mux.frame(mux.FAIL, self.sid, (error or "unknown error").encode("utf-8", "replace")[:1024]))
            stream.on_close = None
            stream.close("target unreachable", notify=False)
            return
        stream.sock, stream.mask = sock, READ
        self.loop.register(sock, READ, self._readable)
        trunk.control(mux.frame(mux.READY, self.sid))
        self.timer = self.loop.call_later(self.idle + UDP_IDLE_MARGIN, self._check)

    def _ended(self, stream: Stream, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.log.log(logging.DEBUG if reason.startswith(("aborted by peer", "done")) else logging.INFO,
                     "udp flow %d to %s ended (%s): %d datagrams to the target, %d back, %d dropped", self.sid,
                     self.target, reason, stream.datagrams_out, stream.datagrams_in, stream.dropped)
