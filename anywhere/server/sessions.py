"""The agent port (1111): mutual-TLS connections, what each one is, and agent sessions.

Owns every connection on the agent port until it is handed over, and the agents' sessions.
Each connection has an explicit `Role` (`conn.role`), and its frames and close are dispatched by
it (`AgentPort.handlers`): nothing depends on which callback was assigned last.

    HANDSHAKE ─TLS done─► HELLO ─hello───► ADMIN    an agent session's admin connection
                                ├─trunk───► handed to routing (a trunk; see trunk.py)
                                ├─data────► handed to routing (one client's data connection)
                                ├─pool────► IDLE     a warm data connection, waiting (routing)
                                └─refused─► CLOSING  an error frame, then closed
    IDLE ─open─► ASKED ─ready─► handed to routing; ─fail─► IDLE again

Before its first frame a connection counts against `max_unauthenticated` (and, per source
address, `max_unauthenticated_per_source`) and must send it within `handshake_timeout` of the
TLS handshake.  The first frame's protocol version and claimed agent id (against the
certificate's identity) are checked, then the deny list.  ``hello`` makes it the admin connection
of an `AgentSession` and replaces any older session of the same agent at once (the old one is
closed; its trunks are retired by routing, nothing else is touched).

*Heartbeats*: anywhered pings every `heartbeat` seconds and declares the agent dead after three
intervals with nothing received; an agent of this version pings only when it has heard nothing
for a while (heartbeat.py, passive), older ones every interval too.

*Trunks on demand*: an agent that offers it in its hello (``on_demand``) is welcomed with
``on_demand`` when `trunk_idle_timeout` and `pool_size` are not 0: it opens no trunk until routing
asks for them (`AgentSession.ask_trunks`, when a client comes), and routing closes them after
`trunk_idle_timeout` without a client (paths.py, TrunkPath).  An idle agent thus holds one TLS
connection here, its admin connection.  Joined connections do not depend on the admin connection and
carry on through its loss.

It must not place clients or touch their sockets (routing does); it learns of data, trunk and
pool connections only to hand them over.
"""

from __future__ import annotations

import enum
import logging
import secrets
import socket
import ssl
from typing import Any, Callable

from .. import tls
from ..common import printable
from ..framed import FramedConn
from ..heartbeat import Heartbeat
from ..loop import Loop
from ..net import Acceptor, accepted, format_addr
from ..wire import PROTO_VERSION
from .limits import Limits
from .settings import ServerConfig

log = logging.getLogger("anywhere.server")

FIRST_FRAMES = ("hello", "data", "pool", "trunk")


class Role(enum.Enum):
    HANDSHAKE = "handshake"  # TLS handshake under way
    HELLO = "hello"  # handshake done, first frame due within handshake_timeout
    ADMIN = "admin"  # an agent session's admin connection
    IDLE = "idle"  # a warm data connection, waiting to be asked
    ASKED = "asked"  # a warm data connection asked to open a client's target
    CLOSING = "closing"  # refused or done: only its close is left
    HANDED = "handed"  # its socket was handed over (a trunk, a relay): no frames come here


class AgentSession:
    """One connected agent: its admin connection and heartbeats."""

    def __init__(self, port: "AgentPort", conn: FramedConn, agent_id: str, version: str) -> None:
        self.port = port
        self.conn = conn
        self.agent_id = agent_id
        self.version = version
        self.address = conn.peer
        self.since = port.wall_time()
        self.rtt: float | None = None
        self.last_pong: float | None = None
        self.token = secrets.randbits(62) + 1  # in welcome; the agent's trunks name it (their owner)
        self.on_demand = False  # its trunks are opened when asked (`ask_trunks`), see the module docstring
        self.wanted = 0  # on demand: the trunks last asked for
        self.asked_at = float("-inf")  # ... and when
        self.heartbeat = Heartbeat(port.loop, conn, port.config().heartbeat, on_timeout=self._silent,
                                   after_beat=lambda: port.on_beat(self))

    def _silent(self, silence: float) -> None:
        log.warning("agent %s (%s): no heartbeat for %.0f s; closing its session", self.agent_id, self.address, silence)

    def on_message(self, conn: FramedConn, msg: dict) -> None:
        kind = msg["type"]
        if kind == "ping":
            conn.send("pong", seq=msg["seq"])
        elif kind == "pong":
            rtt = self.heartbeat.on_pong(msg["seq"])
            if rtt is not None:
                self.rtt, self.last_pong = rtt, self.port.wall_time()
                self.port.on_rtt(self.agent_id, rtt)
        elif kind == "fail":
            self.port.on_fail(self.agent_id, msg["conn"], printable(msg["reason"]))
        else:
            log.warning("agent %s (%s) sent an unexpected %r on its admin connection; closing it",
                        self.agent_id, self.address, kind)
            conn.close(f"unexpected {kind}")

    def ask_trunks(self, count: int) -> None:
        """On demand: tell the agent to keep `count` trunks (0: they are being closed for idleness)."""
        self.wanted, self.asked_at = count, self.port.loop.time()
        self.conn.send("trunks", count=count)

    def stop(self) -> None:
        self.heartbeat.stop()


Handler = Callable[[FramedConn, dict], None]
Closer = Callable[[FramedConn, str], None]


class AgentPort:
    """The agent port's listeners, the connections before their first frame, and the sessions.

    The composition root sets the hand-over callbacks (`on_data`, `on_trunk`, `on_pool`), what a
    session's end means for routing (`on_session_end`), and the per-role `handlers` of IDLE and
    ASKED connections (routing's warm pool).
    """

    def __init__(self, loop: Loop, config: Callable[[], ServerConfig], limits: Limits,
                 wall_time: Callable[[], float]) -> None:
        self.loop = loop
        self.config = config
        self.limits = limits
        self.wall_time = wall_time
        self.ctx: ssl.SSLContext | None = None
        self.listeners: list[Acceptor] = []
        self.handshaking: dict[FramedConn, str] = {}  # agent-port connections before their hello → source IP
        self.handshaking_per_ip: dict[str, int] = {}
        self.handshakes = 0  # TLS handshakes completed
        self.sessions: dict[str, AgentSession] = {}  # the current session of every agent
        self.admins: dict[FramedConn, AgentSession] = {}  # every admin connection's session, replaced ones too
        self.accepting_hellos = True  # False while draining: new sessions are refused
        # set by the composition root
        self.on_data: Handler = _unset
        self.on_trunk: Handler = _unset
        self.on_pool: Callable[[FramedConn, str], None] = _unset
        self.on_session_end: Callable[[AgentSession, str, bool], None] = _unset
        self.on_beat: Callable[[AgentSession], None] = _unset
        self.on_rtt: Callable[[str, float], None] = _unset
        self.on_fail: Callable[[str, int, str], None] = _unset
        self.handlers: dict[Role, tuple[Handler, Closer]] = {
            Role.HANDSHAKE: (self._unexpected, self._on_early_close),
            Role.HELLO: (self._on_first_frame, self._on_early_close),
            Role.ADMIN: (self._on_admin_message, self._on_admin_close),
            Role.CLOSING: (self._unexpected, self._on_quiet_close),
            Role.HANDED: (self._unexpected, self._on_quiet_close),
        }

    # -- dispatch by role ------------------------------------------------------------------------------
    def on_message(self, conn: FramedConn, msg: dict) -> None:
        self.handlers[conn.role][0](conn, msg)

    def on_close(self, conn: FramedConn, reason: str) -> None:
        self.handlers[conn.role][1](conn, reason)

    def adopt(self, conn: FramedConn, role: Role) -> None:
        """Dispatch `conn`'s frames and close by `role` from now on (a resumed data connection)."""
        conn.role = role
        conn.on_message = self.on_message
        conn.on_close = self.on_close

    def _unexpected(self, conn: FramedConn, msg: dict) -> None:
        log.warning("connection from %s (%s) sent %r; closing it", conn.peer, conn.role.value, msg["type"])
        conn.role = Role.CLOSING
        conn.close(f"unexpected {msg['type']}")

    @staticmethod
    def _on_quiet_close(conn: FramedConn, reason: str) -> None:
        log.debug("connection from %s closed: %s", conn.peer, reason)

    # -- accepting ---------------------------------------------------------------------------------------
    def on_connection(self, sock: socket.socket, addr: Any) -> None:
        cfg = self.config()
        if len(self.handshaking) >= cfg.max_unauthenticated:
            self.limits.limited("agent port", f"{len(self.handshaking)} connections still in their handshake "
                                f"(max_unauthenticated = {cfg.max_unauthenticated})")
            sock.close()
            return
        ip = str(addr[0])
        per_source = min(cfg.max_unauthenticated_per_source, max(1, cfg.max_unauthenticated // 2))
        if self.handshaking_per_ip.get(ip, 0) >= per_source:
            self.limits.limited(f"agent port from {ip}", f"{per_source} connections from {ip} still in their "
                                f"handshake (max_unauthenticated_per_source = {cfg.max_unauthenticated_per_source}, "
                                f"and at most half of max_unauthenticated = {cfg.max_unauthenticated})")
            sock.close()
            return
        accepted(sock)
        assert self.ctx is not None  # set in start() before the listener exists
        conn = FramedConn(self.loop, sock, self.ctx, server_side=True, peer=format_addr(addr),
                          on_message=self.on_message, on_close=self.on_close,
                          on_handshake=self._on_handshake, handshake_timeout=cfg.handshake_timeout)
        conn.role = Role.HANDSHAKE
        self.handshaking[conn] = ip
        self.handshaking_per_ip[ip] = self.handshaking_per_ip.get(ip, 0) + 1

    def _on_handshake(self, conn: FramedConn) -> None:
        self.handshakes += 1
        conn.role = Role.HELLO  # the first frame must follow within the same timeout
        conn.set_deadline(self.config().handshake_timeout, self._hello_timeout)

    def _hello_timeout(self, conn: FramedConn) -> None:
        if conn in self.handshaking:
            log.warning("connection from %s sent no hello within %.0f s; closing it", conn.peer,
                        self.config().handshake_timeout)
            conn.close("hello timeout")

    def _authenticated(self, conn: FramedConn) -> None:
        """`conn` leaves the pre-hello count (closed, or its first frame arrived)."""
        ip = self.handshaking.pop(conn, None)
        if ip is not None:
            left = self.handshaking_per_ip[ip] - 1
            if left:
                self.handshaking_per_ip[ip] = left
            else:
                del self.handshaking_per_ip[ip]

    def _on_early_close(self, conn: FramedConn, reason: str) -> None:
        self._authenticated(conn)
        if reason != "server stopping":
            log.warning("connection from %s (%s) closed before its hello: %s", conn.peer, conn.identity or "no certificate", reason)

    def _refuse(self, conn: FramedConn, message: str, reason: str, **extra: Any) -> None:
        conn.role = Role.CLOSING
        conn.send_and_close("error", message, reason=reason, **extra)

    def _on_first_frame(self, conn: FramedConn, msg: dict) -> None:
        self._authenticated(conn)
        conn.clear_deadline()
        conn.role = Role.CLOSING  # until a handler below gives it another
        kind = msg["type"]
        if kind in FIRST_FRAMES and msg["proto"] != PROTO_VERSION:
            reason = f"protocol version {msg['proto']} is not supported (this server speaks {PROTO_VERSION})"
            log.warning("refusing %s from %s: %s", kind, conn.peer, reason)
            self._refuse(conn, reason, reason)
            return
        if kind not in FIRST_FRAMES:
            log.warning("connection from %s started with %r instead of a hello; closing it", conn.peer, kind)
            self._refuse(conn, "bad first message", f"expected hello or data, got {kind}")
            return
        if msg["agent_id"] != conn.identity:
            reason = (f"agent id '{printable(msg['agent_id'], 64)}' does not match the identity of its certificate "
                      f"('{printable(conn.identity, 64)}'); refused")
            log.warning("refusing %s from %s: %s", kind, conn.peer, reason)
            self._refuse(conn, reason, reason)
            return
        denied = self.denied(conn)
        if denied:
            log.warning("refusing %s from %s: agent %s is denied (%s)", kind, conn.peer, conn.identity, denied)
            self._refuse(conn, "revoked", f"this agent's certificate is revoked on this server ({denied})",
                         code="revoked")
            return
        if kind == "hello":
            self._on_hello(conn, msg)
        elif kind == "pool":
            self.on_pool(conn, msg["agent_id"])
        elif kind == "trunk":
            self.on_trunk(conn, msg)
        else:
            self.on_data(conn, msg)

    # -- sessions ----------------------------------------------------------------------------------------
    def _on_hello(self, conn: FramedConn, msg: dict) -> None:
        agent_id, cfg = msg["agent_id"], self.config()
        if not self.accepting_hellos:
            self._refuse(conn, "server stopping", "the server is stopping; try again shortly")
            return
        old = self.sessions.get(agent_id)
        if old is None and len(self.sessions) >= cfg.max_agents:
            self.limits.limited("agents", f"agent {agent_id} from {conn.peer} refused: max_agents = {cfg.max_agents}")
            self._refuse(conn, "too many agents", "this server has reached its maximum of agents")
            return
        version = printable(msg["version"], 64)
        session = AgentSession(self, conn, agent_id, version)
        self.sessions[agent_id] = session  # replace first: the old session's close then changes nothing
        conn.role = Role.ADMIN
        self.admins[conn] = session
        if old is not None:
            healthy = old.conn.open and self.loop.time() - old.conn.last_rx < cfg.heartbeat
            log.log(logging.WARNING if healthy else logging.INFO,
                    "agent %s connected from %s; replacing its session from %s%s", agent_id, conn.peer, old.address,
                    " which was still alive: are two agents running with the same id?" if healthy else "")
            reason = f"replaced by a new session of agent {agent_id} from {conn.peer}"
            self.on_session_end(old, "its agent session was replaced", False)
            old.conn.send_and_close("error", reason, reason=reason, code="replaced")
        session.on_demand = msg.get("on_demand") == 1 and cfg.pool_size > 0 and cfg.trunk_idle_timeout > 0
        extra = {"on_demand": 1} if session.on_demand else {}
        conn.send("welcome", proto=PROTO_VERSION, server_id=cfg.server_id, heartbeat=cfg.heartbeat,
                  pool=cfg.pool_size, session=session.token, trunk_ping=1, **extra)
        log.info("agent %s connected from %s (version %s)", agent_id, conn.peer, version)

    def _on_admin_message(self, conn: FramedConn, msg: dict) -> None:
        session = self.admins.get(conn)
        if session is not None:
            session.on_message(conn, msg)

    def _on_admin_close(self, conn: FramedConn, reason: str) -> None:
        session = self.admins.pop(conn, None)
        if session is None:
            return
        session.stop()
        current = self.sessions.get(session.agent_id) is session
        if current:
            del self.sessions[session.agent_id]
            if reason != "server stopping":
                log.info("agent %s (%s) disconnected: %s", session.agent_id, session.address, reason)
        self.on_session_end(session, "agent session ended", current)

    def online(self, agent_id: str) -> AgentSession | None:
        """The agent's session if its admin connection is open."""
        session = self.sessions.get(agent_id)
        return session if session is not None and session.conn.open else None

    # -- deny ----------------------------------------------------------------------------------------------
    def denied(self, conn: FramedConn) -> str | None:
        deny = self.config().deny
        ids = {e for e in deny if not e.lower().startswith("serial:")}
        serials = {tls.normalize_serial(e[7:]) for e in deny if e.lower().startswith("serial:")}
        if conn.identity in ids:
            return f"id {conn.identity} in deny"
        if conn.serial is not None and conn.serial in serials:
            return f"certificate serial {conn.serial} in deny"
        return None

    def close(self) -> None:
        for acceptor in self.listeners:
            acceptor.close()
        self.listeners = []
        for conn in list(self.handshaking):
            conn.close("server stopping")
        for session in list(self.sessions.values()):
            session.conn.close("server stopping")


def _unset(*_args: Any) -> None:
    raise RuntimeError("AgentPort: a hand-over callback was not set by the composition root")
