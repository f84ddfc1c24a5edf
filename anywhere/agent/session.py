"""The agent's session with one server: its admin connection, kept up for as long as the agent runs.

Theory of operation
-------------------
An agent keeps one `Session` per server it is configured with (``server``, `ServerAddress`);
they know nothing of each other.  `Session` dials its server, resolving its name again on every
attempt (it may have moved), wraps the connection in TLS with the server's certificate checked
against the CA and the expected name, says ``hello`` and waits for ``welcome``.  Any failure,
and the loss of a welcomed session, schedules a new attempt after `backoff_delay` (1 s doubling
up to 30 s, each delay drawn from its upper half), reset once a session is welcomed.  A server that says another
process with this agent id replaced us is not fought every second: the next delay is the longest.

Once welcomed, a passive `heartbeat.Heartbeat` (the server pings every interval; the agent pings
only when it has not heard from it for one and a half) closes the connection after three silent
intervals.  With ``on_demand`` in the welcome, the server's ``trunks`` says how many trunks to keep
(`wanted`; none until it asks): ``on_trunks`` tells the owner.  The session then hands the server's ``open`` requests to
its owner (``on_open``) and tells it when the session starts (``on_welcome``) and when it is lost
(``on_lost``); the data paths do the rest (trunks.py, dataconns.py).

Every connection to the server goes through here: the paths dial `server_addr`, the address
this admin connection reached (not the name again: a session's connections all reach the same
server), with `connect_server`, and wrap it in TLS with `secure`.  What the last welcome said
(`number`, `token`, `pool`, `interval`, `trunk_ping`, ...) is kept after the session ends:
retired trunks still check their liveness at its interval, and data connections under way still
reach its server.

The admin connection's role is `state` (`SessionState`), the one record of where it stands.

Every line a session and its data paths log goes through its `log` (`ServerLog`), which names
the server: ``server b.example.net:1111: connected to server ...``.

Rules: the session carries no client data and holds no target; it never retires a trunk or
closes a data connection itself (``on_lost`` is the owner's).  Messages from the server are
quoted only through `printable`.
"""

from __future__ import annotations

import enum
import logging
import random
import socket
import ssl
from typing import Any, Callable

from ..common import __version__, printable
from ..framed import FramedConn
from ..heartbeat import Heartbeat
from ..loop import Loop, Timer
from ..net import Dialer, format_addr
from ..wire import PROTO_VERSION
from .settings import AgentConfig, ServerAddress

# what reaching a server depends on besides its address (a session's identity): a reload that
# changes one of these reconnects at once
RECONNECT_ON = frozenset({"agent_id", "server_name", "ca", "cert", "key"})
REPLACED_FAILURES = 30  # "replaced": wait as after this many failures, i.e. the longest delay


def backoff_delay(failures: int, low: float, high: float) -> float:
    """Exponential backoff with jitter: the n-th delay lies in [d/2, d], d = min(high, low * 2**(n-1))."""
    ceiling = min(high, low * (2 ** min(failures - 1, 30)))
    return max(low, random.uniform(ceiling / 2, ceiling))


class ServerLog(logging.LoggerAdapter):
    """The agent's logger, each line naming one server: ``server HOST:PORT: ...``."""

    def __init__(self, server: ServerAddress) -> None:
        super().__init__(logging.getLogger("anywhere.agent"), {})
        self.prefix = f"server {server}: "

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):  # the prefix as an argument: a '%' in it (fe80::1%eth0) is no format
            self.logger.log(level, "%s" + str(msg), self.prefix, *args, **kwargs)


class SessionState(enum.Enum):
    WAITING = "waiting"  # no admin connection: the next attempt is scheduled (or about to start)
    DIALING = "dialing"  # resolving the server's name, connecting
    HANDSHAKING = "handshaking"  # TLS, then ``hello``; waiting for ``welcome``
    WELCOMED = "welcomed"  # the session is up: heartbeats, ``open`` requests
    CLOSED = "closed"  # the agent is stopping: nothing more is tried


class Session:
    def __init__(self, loop: Loop, config: AgentConfig, server: ServerAddress, *, on_welcome: Callable[[], None],
                 on_lost: Callable[[], None], on_open: Callable[[dict], None],
                 on_trunks: Callable[[], None] = lambda: None) -> None:
        self.loop = loop
        self.config = config
        self.server = server
        self.log = ServerLog(server)
        self.on_welcome = on_welcome
        self.on_lost = on_lost
        self.on_open = on_open
        self.on_trunks = on_trunks
        self.ctx: ssl.SSLContext | None = None
        self.state = SessionState.WAITING
        self.conn: FramedConn | None = None
        self.dialer: Dialer | None = None
        self.failures = 0
        self._retry: Timer | None = None
        self._heartbeat: Heartbeat | None = None
        self.server_addr: tuple | None = None  # where the admin connection last reached the server
        # what the last welcome said
        self.server_id = ""
        self.server_peer = ""
        self.interval = 5.0  # the heartbeat interval
        self.pool = 0  # trunks the server asks this agent to keep
        self.number = 0  # counts welcomed sessions: a trunk belongs to the one it was opened in
        self.token: int | None = None  # the server's name for this session, sent in each trunk's hello
        self.trunk_ping = False  # the server understands PING on trunks
        self.on_demand = False  # trunks only when the server asks (``trunks``)
        self.wanted = 0  # the trunks to keep: `pool`, or on demand what the server last asked

    @property
    def welcomed(self) -> bool:
        return self.state is SessionState.WELCOMED

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    @property
    def agent_id(self) -> str:
        return self.config.agent_id

    @property
    def server_name(self) -> str:
        return self.config.server_name or self.server.host

    @property
    def retry_in(self) -> float | None:
        """Seconds until the next attempt, while one is scheduled."""
        if self._retry is None or self._retry.cancelled:
            return None
        return max(0.0, self._retry.deadline - self.loop.time())

    def start(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self._connect()

    # -- the admin connection ------------------------------------------------------------------------
    def _connect(self) -> None:
        self._retry = None
        if self.closed:
            return
        self.state = SessionState.DIALING
        self.log.debug("connecting")
        self.dialer = Dialer(self.loop, self.server.host, self.server.port, self.config.connect_timeout,
                             self._on_dialled)

    def _on_dialled(self, sock: socket.socket | None, error: str | None) -> None:
        self.dialer = None
        if sock is None:
            self._schedule_retry(f"cannot reach the server: {error}")
            return
        self.state = SessionState.HANDSHAKING
        self.server_addr = sock.getpeername()
        self.conn = self.secure(sock, on_message=self._on_message, on_close=self._on_close,
                                on_handshake=self._on_handshake)

    def _on_handshake(self, conn: FramedConn) -> None:
        conn.send("hello", proto=PROTO_VERSION, agent_id=self.config.agent_id, version=__version__, on_demand=1)

    def _on_message(self, conn: FramedConn, msg: dict) -> None:
        kind = msg["type"]
        if kind == "welcome":
            self._on_welcome(conn, msg)
        elif kind == "ping":
            conn.send("pong", seq=msg["seq"])
        elif kind == "pong":
            if self._heartbeat is not None:
                self._heartbeat.on_pong(msg["seq"])
        elif kind == "open" and self.welcomed:
            self.on_open(msg)
        elif kind == "trunks" and self.welcomed and self.on_demand:
            self.wanted = msg["count"]
            self.on_trunks()
        elif kind == "error" and msg.get("code") == "replaced":
            # another process with our id took the session: do not fight it every second
            self.log.error("%s (at %s); another agent is running with id %s? retrying in at most %g s",
                           printable(msg["reason"]), conn.peer, self.config.agent_id, self.config.backoff_max)
            self.failures = max(self.failures, REPLACED_FAILURES)
            conn.close("replaced by another session")
        elif kind == "error":
            reason = printable(msg["reason"])
            self.log.error("refused this agent (at %s): %s", conn.peer, reason)
            conn.close(f"refused by the server: {reason}")
        else:
            self.log.warning("sent an unexpected %r (at %s); closing the connection", kind, conn.peer)
            conn.close(f"unexpected {kind}")

    def _on_welcome(self, conn: FramedConn, msg: dict) -> None:
        if self.welcomed:
            conn.close("second welcome")
            return
        if msg["proto"] != PROTO_VERSION:
            conn.close(f"server speaks protocol {msg['proto']}, this agent {PROTO_VERSION}")
            return
        self.state = SessionState.WELCOMED
        self.failures = 0
        self.interval = max(0.05, float(msg["heartbeat"]))
        self.server_id = msg["server_id"]
        self.server_peer = conn.peer
        self.pool = msg["pool"]
        self.number += 1
        token = msg.get("session")
        self.token = token if isinstance(token, int) and not isinstance(token, bool) else None
        self.trunk_ping = msg.get("trunk_ping") == 1
        self.on_demand = msg.get("on_demand") == 1
        self.wanted = 0 if self.on_demand else self.pool
        self.log.info("connected to server %s at %s as agent %s", self.server_id, conn.peer, self.config.agent_id)
        self._heartbeat = Heartbeat(self.loop, conn, self.interval, on_timeout=self._on_silence, passive=True)
        self.on_welcome()

    def _on_silence(self, silence: float) -> None:
        self.log.warning("no heartbeat from the server for %.0f s; reconnecting", silence)

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None

    def _on_close(self, conn: FramedConn, reason: str) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        was_welcomed = self.welcomed
        self._stop_heartbeat()
        if self.closed:
            return
        self.state = SessionState.WAITING
        self.on_lost()
        if was_welcomed:
            self.log.warning("lost the server at %s: %s", conn.peer, reason)
        self._schedule_retry(reason if was_welcomed else f"connection to {conn.peer} failed: {reason}")

    def _schedule_retry(self, reason: str) -> None:
        if self.closed:
            return
        self.state = SessionState.WAITING
        self.failures += 1
        delay = backoff_delay(self.failures, self.config.backoff_min, self.config.backoff_max)
        self.log.warning("%s; retrying in %.1f s", reason, delay)
        self._retry = self.loop.call_later(delay, self._connect)

    def reconfigure(self, config: AgentConfig, ctx: ssl.SSLContext, changed: list[str]) -> bool:
        """Use `config` and `ctx` from now on.  If a setting in RECONNECT_ON `changed`, drop the
        admin connection (without ``on_lost``) and connect again at once; returns whether it did."""
        self.config = config
        self.ctx = ctx
        reconnect = RECONNECT_ON & set(changed)
        if not reconnect or self.closed:
            return False
        self.log.info("reload: %s changed; reconnecting to the server", ", ".join(sorted(reconnect)))
        self.failures = 0
        if self.conn is not None:
            conn, self.conn = self.conn, None
            self.state = SessionState.WAITING
            self._stop_heartbeat()
            conn.close("reconnecting with a new configuration")
        if self.dialer is not None:
            self.dialer.cancel()
            self.dialer = None
        if self._retry is not None:
            self._retry.cancel()
        self._connect()
        return True

    # -- for the data paths --------------------------------------------------------------------------
    def connect_server(self, callback: Callable[[socket.socket | None, str | None], None]) -> Dialer | None:
        """Dial the server at `server_addr`; None if no admin connection has reached it yet."""
        addr = self.server_addr
        if addr is None:
            return None
        return Dialer(self.loop, addr[0], addr[1], self.config.connect_timeout, callback)

    def secure(self, sock: socket.socket, *, on_message: Callable[[FramedConn, dict], None],
               on_close: Callable[[FramedConn, str], None],
               on_handshake: Callable[[FramedConn], None]) -> FramedConn:
        """TLS on `sock`, a connection to the server, checked as the admin connection is."""
        assert self.ctx is not None  # set by start()
        return FramedConn(self.loop, sock, self.ctx, server_side=False, peer=format_addr(sock.getpeername()),
                          server_hostname=self.server_name, on_message=on_message, on_close=on_close,
                          on_handshake=on_handshake, handshake_timeout=self.config.handshake_timeout)

    def report_failure(self, conn_id: int, reason: str) -> None:
        """Tell the server at once that the target of its ``open`` `conn_id` cannot be reached."""
        if self.conn is not None and self.conn.open:
            self.conn.send("fail", conn=conn_id, reason=reason)

    # -- ending --------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop for good: no more attempts; the admin connection is closed.  Idempotent."""
        if self.closed:
            return
        self.state = SessionState.CLOSED
        if self._retry:
            self._retry.cancel()
        self._stop_heartbeat()
        if self.dialer:
            self.dialer.cancel()
        if self.conn:
            self.conn.close("agent stopping")
