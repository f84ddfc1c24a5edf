"""anywhere (the agent): keep an admin connection to the server, dial targets when asked.

Theory of operation
-------------------
The agent keeps one admin connection: dial the server (resolving its name again on every
attempt), TLS with the server's certificate checked against the CA and the expected name,
``hello`` → ``welcome``.  Any failure schedules a new attempt after an exponential backoff
with jitter (1 s doubling up to 30 s, each delay drawn uniformly from its upper half), reset
once a session has been welcomed.  Heartbeats: ``ping`` every interval the server announced;
nothing received for three intervals means the server is gone and the agent reconnects.

On ``open`` {conn, host, port} the agent dials the target within `dial_timeout`.  If that fails
it sends ``fail`` at once, so the server closes the client without waiting for its timeout.
Otherwise it opens a data connection to the address its admin connection reached, sends
``data`` naming the connection and, on ``ready``, joins target and data connection in a
`Relay`.  Relays do not depend on the admin connection: they carry on if it drops.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
from dataclasses import dataclass, field
from typing import Callable

from . import tls
from .allow import Allowlist, parse_allowlist
from .common import __version__, printable
from .framed import FramedConn
from .loop import Loop, Timer
from .net import Dialer, format_addr, is_ip
from . import mux
from .relay import Relay
from .trunk import BUFFER_BUDGET, Stream, Trunk, set_buffer_budget
from .wire import MAX_TRUNKS, PROTO_VERSION, encode

log = logging.getLogger("anywhere.agent")


@dataclass
class AgentConfig:
    agent_id: str
    server_host: str
    server_port: int = 1111
    server_name: str | None = None
    ca: str = "credential/ca.crt"
    cert: str = "credential/client.crt"
    key: str = "credential/client.key"
    dial_timeout: float = 5.0
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    backoff_min: float = 1.0
    backoff_max: float = 30.0
    allow: list[str] = field(default_factory=lambda: ["*"])  # targets the server may ask for (see allow.py)
    buffer_budget: int = BUFFER_BUDGET  # bytes held for targets that read slower than their clients send


class Agent:
    def __init__(self, loop: Loop, config: AgentConfig) -> None:
        self.loop = loop
        self.config = config
        self.allowlist: Allowlist = parse_allowlist(config.allow)
        self.ctx: ssl.SSLContext | None = None
        self.conn: FramedConn | None = None
        self.dialer: Dialer | None = None
        self.server_addr: tuple | None = None
        self.connected = False
        self.heartbeat = 5.0
        self.server_id = ""
        self.failures = 0
        self.data_conns: set[_DataConn] = set()  # every data connection, whatever its state
        self.warm: set[_DataConn] = set()  # those waiting for the server's next open
        self.trunks: list[Trunk] = []  # the current session's (see trunk.py, Ownership)
        self.retired: set[Trunk] = set()  # of sessions that are over, closed with their last stream
        self.trunks_opening = 0
        self.session = 0  # counts sessions: a trunk belongs to the one it was opened in
        self.session_token: int | None = None  # the server's name for this session (welcome)
        self.trunk_ping = False  # the server understands PING on trunks
        self._liveness: Timer | None = None
        self.pool_target = 0  # warm data connections to keep, as the server's welcome asks
        self.server_peer = ""
        self._retry: Timer | None = None
        self._hb: Timer | None = None
        self._seq = 0
        self.closed = False

    @property
    def server_name(self) -> str:
        return self.config.server_name or self.config.server_host

    def start(self) -> None:
        self.ctx = tls.client_context(self.config.ca, self.config.cert, self.config.key)
        set_buffer_budget(self.config.buffer_budget)
        self._connect()
        self._liveness = self.loop.call_later(self.heartbeat, self._check_trunks)

    # -- admin connection --------------------------------------------------------------------------
    def _connect(self) -> None:
        self._retry = None
        if self.closed:
            return
        log.debug("connecting to %s:%d", self.config.server_host, self.config.server_port)
        self.dialer = Dialer(self.loop, self.config.server_host, self.config.server_port,
                             self.config.connect_timeout, self._on_dialled)

    def _on_dialled(self, sock: socket.socket | None, error: str | None) -> None:
        self.dialer = None
        if sock is None:
            self._schedule_retry(f"cannot reach the server: {error}")
            return
        assert self.ctx is not None  # set by start()
        self.server_addr = sock.getpeername()
        self.conn = FramedConn(self.loop, sock, self.ctx, server_side=False, peer=format_addr(self.server_addr),
                               server_hostname=self.server_name, on_message=self._on_message,
                               on_close=self._on_close, on_handshake=self._on_handshake,
                               handshake_timeout=self.config.handshake_timeout)

    def _on_handshake(self, conn: FramedConn) -> None:
        conn.send("hello", proto=PROTO_VERSION, agent_id=self.config.agent_id, version=__version__)

    def _on_message(self, conn: FramedConn, msg: dict) -> None:
        kind = msg["type"]
        if kind == "welcome":
            self._on_welcome(conn, msg)
        elif kind == "ping":
            conn.send("pong", seq=msg["seq"])
        elif kind == "pong":
            pass
        elif kind == "open" and self.connected:
            self._on_open(msg)
        elif kind == "error" and msg.get("code") == "replaced":
            # another process with our id took the session: do not fight it every second
            log.error("server %s: %s; another agent is running with id %s? retrying in at most %g s",
                      conn.peer, printable(msg["reason"]), self.config.agent_id, self.config.backoff_max)
            self.failures = max(self.failures, 30)
            conn.close("replaced by another session")
        elif kind == "error":
            reason = printable(msg["reason"])
            log.error("server %s refused this agent: %s", conn.peer, reason)
            conn.close(f"refused by the server: {reason}")
        else:
            log.warning("server %s sent an unexpected %r; closing the connection", conn.peer, kind)
            conn.close(f"unexpected {kind}")

    def _on_welcome(self, conn: FramedConn, msg: dict) -> None:
        if self.connected:
            conn.close("second welcome")
            return
        if msg["proto"] != PROTO_VERSION:
            conn.close(f"server speaks protocol {msg['proto']}, this agent {PROTO_VERSION}")
            return
        self.connected = True
        self.failures = 0
        self.heartbeat = max(0.05, float(msg["heartbeat"]))
        self.server_id = msg["server_id"]
        self.server_peer = conn.peer
        self.pool_target = msg["pool"]
        self.session += 1
        token = msg.get("session")
        self.session_token = token if isinstance(token, int) and not isinstance(token, bool) else None
        self.trunk_ping = msg.get("trunk_ping") == 1
        log.info("connected to server %s at %s as agent %s", self.server_id, conn.peer, self.config.agent_id)
        self._hb = self.loop.call_later(self.heartbeat, self._tick)
        self.refill()

    def _tick(self) -> None:
        conn = self.conn
        if conn is None or not conn.open:
            return
        if self.loop.time() - conn.last_rx > 3 * self.heartbeat:
            log.warning("no heartbeat from the server for %.0f s; reconnecting", 3 * self.heartbeat)
            conn.close("heartbeat timeout")
            return
        self._seq += 1
        conn.send("ping", seq=self._seq)
        self._hb = self.loop.call_later(self.heartbeat, self._tick)

    def _on_close(self, conn: FramedConn, reason: str) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        was_connected, self.connected = self.connected, False
        if self._hb:
            self._hb.cancel()
            self._hb = None
        if self.closed:
            return
        for data in list(self.warm):
            data.abort(None)  # warm ones go with the session; relays carry on
        self._retire_trunks("agent session lost")
        if was_connected:
            log.warning("lost the server at %s: %s", conn.peer, reason)
        self._schedule_retry(reason if was_connected else f"connection to {conn.peer} failed: {reason}")

    def _schedule_retry(self, reason: str) -> None:
        if self.closed:
            return
        self.failures += 1
        delay = backoff_delay(self.failures, self.config.backoff_min, self.config.backoff_max)
        log.warning("%s; retrying in %.1f s", reason, delay)
        self._retry = self.loop.call_later(delay, self._connect)

    def reload(self, new: AgentConfig) -> list[str]:
        """Apply a new configuration; all or nothing (raises tls.CredentialError and changes nothing).

        Relays are never touched.  If anything about reaching the server changed (address, name,
        id, credentials), the admin connection is re-established with the new settings now.
        """
        ctx = tls.client_context(new.ca, new.cert, new.key)
        allowlist = parse_allowlist(new.allow)
        self.allowlist = allowlist
        old = self.config
        changed = [f for f in vars(old) if getattr(old, f) != getattr(new, f)]
        self.ctx = ctx
        self.config = new
        set_buffer_budget(new.buffer_budget)
        reconnect = {"agent_id", "server_host", "server_port", "server_name", "ca", "cert", "key"} & set(changed)
        if reconnect and not self.closed:
            log.info("reload: %s changed; reconnecting to the server", ", ".join(sorted(reconnect)))
            self.failures = 0
            if self.conn is not None:
                conn, self.conn = self.conn, None
                self.connected = False
                if self._hb:
                    self._hb.cancel()
                    self._hb = None
                conn.close("reconnecting with a new configuration")
                self._retire_trunks("reconnecting with a new configuration")
            if self.dialer is not None:
                self.dialer.cancel()
                self.dialer = None
            if self._retry is not None:
                self._retry.cancel()
            self._connect()
        log.info("configuration reloaded%s", f"; changed: {', '.join(changed)}" if changed else "; nothing changed")
        return changed

    def status_line(self) -> str:
        where = f"{self.config.server_host}:{self.config.server_port}"
        state = f"connected to {self.server_id or where}" if self.connected else f"connecting to {where}"
        return f"agent {self.config.agent_id}: {state}, {len(self.relays)} connection(s)"

    # -- requests ------------------------------------------------------------------------------------
    def _on_open(self, msg: dict) -> None:
        _DataConn(self, msg)

    def report_failure(self, conn_id: int, reason: str) -> None:
        if self.conn is not None and self.conn.open:
            self.conn.send("fail", conn=conn_id, reason=reason)

    def dial_target(self, host: str, port: int, callback: Callable[[socket.socket | None, str | None], None],
                    keep_registered: bool = False) -> Dialer | None:
        """Dial a target the server asked for, within this agent's allowlist; `callback` and
        `keep_registered` as Dialer's."""
        target = f"[{printable(host, 255)}]:{port}" if ":" in host else f"{printable(host, 255)}:{port}"
        allowlist = self.allowlist
        timeout = self.config.dial_timeout
        literal = is_ip(host.split("%", 1)[0])
        if allowlist.permits_address(host, port) if literal else allowlist.permits_name(host, port):
            return Dialer(self.loop, host, port, timeout, callback, keep_registered=keep_registered)
        refused = f"{target} is not in this agent's allowlist (allow = {allowlist})"
        if literal or not allowlist.has_networks:
            self.loop.call_soon(callback, None, refused)
            return None
        # a name the list does not hold: dialled only at resolved addresses its networks allow
        return Dialer(self.loop, host, port, timeout, callback, refused=refused, keep_registered=keep_registered,
                      address_ok=lambda address: allowlist.permits_address(address, port))

    def refill(self) -> None:
        """Keep the trunks the server asked for (welcome's pool > 0) open or on their way."""
        if self.closed or not self.connected or self.server_addr is None:
            return
        wanted = min(MAX_TRUNKS, self.pool_target)
        for _ in range(max(0, wanted - len(self.trunks) - self.trunks_opening)):
            _TrunkSetup(self)

    def _on_trunk(self, trunk: Trunk) -> None:
        trunk.owner = self.session
        trunk.can_ping = self.trunk_ping
        self.trunks.append(trunk)

    def _on_trunk_close(self, trunk: Trunk, reason: str) -> None:
        self.retired.discard(trunk)
        current = trunk in self.trunks
        if current:
            self.trunks.remove(trunk)
        if not self.closed:
            log.log(logging.DEBUG if reason.startswith("agent") or trunk.retired else logging.INFO,
                    "trunk %s closed: %s", trunk.name, reason)
            if current:
                self.loop.call_later(backoff_delay(1, self.config.backoff_min, self.config.backoff_max), self.refill)

    def _retire_trunks(self, reason: str) -> None:
        """The session is over: its trunks are not counted any more (the next session opens its
        own at once) and close when their last stream ends."""
        trunks, self.trunks = self.trunks, []
        for trunk in trunks:
            if trunk.streams:
                self.retired.add(trunk)
            trunk.retire(reason)

    def _check_trunks(self) -> None:
        """Every heartbeat interval, whether or not a session is up: each trunk's own liveness."""
        self._liveness = None
        if self.closed:
            return
        now = self.loop.time()
        for trunk in self.trunks + list(self.retired):
            trunk.check_alive(now, self.heartbeat)
        self._liveness = self.loop.call_later(self.heartbeat, self._check_trunks)

    def _on_stream_open(self, trunk: Trunk, sid: int, host: str, port: int, window: int | None = None) -> None:
        target = f"[{printable(host, 255)}]:{port}" if ":" in host else f"{printable(host, 255)}:{port}"

        def ended(st: Stream, reason: str) -> None:
            log.log(logging.DEBUG if reason == "done" else logging.INFO,
                    "stream %d to %s ended (%s): %d bytes to the target, %d back", sid, target, reason,
                    st.nbytes_out, st.nbytes_in)
        # the stream exists while its target is dialled, so an ABORT meanwhile cancels the dial
        stream = Stream(trunk, sid, name=f"target {target}", on_close=ended)
        if window is not None:
            stream.send_window = window  # the first window the server's budget granted

        def dialled(sock: socket.socket | None, error: str | None) -> None:
            stream.dialer = None
            if stream.closed or trunk.closed:
                if sock is not None:
                    self.loop.discard(sock)
                    sock.close()
                return
            if sock is None:
                log.warning("stream %d: cannot reach %s: %s", sid, target, error)
                trunk.control(mux.frame(mux.FAIL, sid, (error or "unknown error").encode("utf-8", "replace")[:1024]))
                stream.on_close = None
                stream.close("target unreachable", notify=False)
                return
            trunk.control(mux.frame(mux.READY, sid))
            stream.attach(sock, read_now=False, registered=True)
        stream.dialer = self.dial_target(host, port, dialled, keep_registered=True)

    @property
    def relays(self) -> list:
        return [d.relay for d in self.data_conns if d.relay is not None] + \
            [s for t in self.trunks + list(self.retired) for s in t.streams.values()]

    # -- ending --------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._retry:
            self._retry.cancel()
        if self._hb:
            self._hb.cancel()
        if self._liveness:
            self._liveness.cancel()
        if self.dialer:
            self.dialer.cancel()
        if self.conn:
            self.conn.close("agent stopping")
        for data in list(self.data_conns):
            data.abort("agent stopping")
        for trunk in self.trunks + list(self.retired):
            trunk.close("agent stopping")


def backoff_delay(failures: int, low: float, high: float) -> float:
    """Exponential backoff with jitter: the n-th delay lies in [d/2, d], d = min(high, low * 2**(n-1))."""
    ceiling = min(high, low * (2 ** min(failures - 1, 30)))
    return max(low, random.uniform(ceiling / 2, ceiling))


class _TrunkSetup:
    """Dial the server, TLS, then say `trunk`: the connection becomes a Trunk."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.session = agent.session  # opened for this session: useless to any other
        agent.trunks_opening += 1
        self.done = False
        addr = agent.server_addr
        assert addr is not None  # refill() checks
        Dialer(agent.loop, addr[0], addr[1], agent.config.connect_timeout, self._on_server)

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.agent.trunks_opening -= 1

    def _on_server(self, sock: socket.socket | None, error: str | None) -> None:
        agent = self.agent
        if sock is None or agent.closed:
            self._finish()
            if sock is not None:
                sock.close()
            else:
                log.info("cannot open a trunk to the server: %s", error)
            return
        assert agent.ctx is not None  # the agent started
        FramedConn(agent.loop, sock, agent.ctx, server_side=False, peer=format_addr(sock.getpeername()),
                   server_hostname=agent.server_name, on_message=lambda c, m: c.close("unexpected message"),
                   on_close=lambda c, reason: self._failed(reason), on_handshake=self._on_handshake,
                   handshake_timeout=agent.config.handshake_timeout)

    def _failed(self, reason: str) -> None:
        self._finish()
        log.info("trunk set-up failed: %s", reason)

    def _on_handshake(self, conn: FramedConn) -> None:
        agent = self.agent
        if agent.session != self.session or not agent.connected:
            self._finish()
            conn.close("its session is over")
            return
        peer = conn.peer
        sock, leftover = conn.detach()
        self._finish()
        trunk = Trunk(agent.loop, sock, leftover, name=f"to {peer}", on_open=agent._on_stream_open,
                      on_close=agent._on_trunk_close)
        fields = {"session": agent.session_token} if agent.session_token is not None else {}
        trunk.write(encode("trunk", proto=PROTO_VERSION, agent_id=agent.config.agent_id, ping=1, window=1, **fields))
        agent._on_trunk(trunk)


class _DataConn:
    """A data connection of its own for one client (the fallback when there is no trunk):

    * requested (``open`` on the admin connection): dial the target, then the server, send
      ``data`` naming the connection, and on ``ready`` relay;
    * after a relay whose both directions ENDed cleanly, warm: on the server's next ``open``
      dial the target and answer ``ready`` (then relay) or ``fail`` (and stay warm).
    """

    def __init__(self, agent: Agent, request: dict) -> None:
        self.agent = agent
        self.loop = agent.loop
        self.conn_id = 0
        self.target = ""
        self.target_sock: socket.socket | None = None
        self.data: FramedConn | None = None
        self.dialer: Dialer | None = None
        self.relay: Relay | None = None
        self.state = "connecting"
        self.done = False
        agent.data_conns.add(self)
        self._dial_target(request)

    # -- the target -------------------------------------------------------------------------------
    def _dial_target(self, request: dict) -> None:
        self.conn_id = request["conn"]
        host, port = request["host"], request["port"]
        self.target = f"[{printable(host, 255)}]:{port}" if ":" in host else f"{printable(host, 255)}:{port}"
        self.dialer = self.agent.dial_target(host, port, self._on_target)

    def _on_target(self, sock: socket.socket | None, error: str | None) -> None:
        self.dialer = None
        if sock is None:
            reason = error or "unknown error"
            log.warning("connection %d: cannot reach %s: %s", self.conn_id, self.target, reason)
            if self.data is not None:  # warm: answer on this connection and stay warm
                self.data.send("fail", conn=self.conn_id, reason=reason)
                self._become_warm(self.data)
            else:
                self.agent.report_failure(self.conn_id, reason)
                self.abort(None)
            return
        self.target_sock = sock
        if self.data is not None:
            self.data.send("ready", conn=self.conn_id)
            self._join()
        else:
            self._dial_server()

    # -- the server ---------------------------------------------------------------------------------
    def _dial_server(self) -> None:
        addr = self.agent.server_addr
        if addr is None:
            self.abort("no server address yet")
            return
        self.dialer = Dialer(self.loop, addr[0], addr[1], self.agent.config.connect_timeout, self._on_server)

    def _on_server(self, sock: socket.socket | None, error: str | None) -> None:
        self.dialer = None
        if sock is None:
            self.abort(f"cannot open a data connection to the server: {error}")
            return
        assert self.agent.ctx is not None  # the agent started
        self.data = FramedConn(self.loop, sock, self.agent.ctx, server_side=False, peer=format_addr(sock.getpeername()),
                               server_hostname=self.agent.server_name, on_message=self._on_message,
                               on_close=self._on_data_close, on_handshake=self._on_handshake,
                               handshake_timeout=self.agent.config.handshake_timeout)

    def _on_handshake(self, conn: FramedConn) -> None:
        conn.send("data", proto=PROTO_VERSION, agent_id=self.agent.config.agent_id, conn=self.conn_id)

    def _become_warm(self, conn: FramedConn) -> None:
        self.state = "warm"
        self.conn_id = 0
        self.target = ""
        self.data = conn
        self.agent.warm.add(self)

    def _on_message(self, conn: FramedConn, msg: dict) -> None:
        kind = msg["type"]
        if self.state == "warm" and kind == "open":
            self.state = "dialing"
            self.agent.warm.discard(self)
            self.agent.refill()
            self._dial_target(msg)
        elif self.state == "connecting" and kind == "ready" and msg["conn"] == self.conn_id:
            self._join()
        elif kind == "error":
            self.abort(f"server refused the data connection: {printable(msg['reason'])}")
        else:
            self.abort(f"unexpected {kind} on a data connection in state {self.state}")

    def _join(self) -> None:
        conn, self.data = self.data, None
        assert conn is not None and self.target_sock is not None  # both dialled before joining
        sock, leftover = conn.detach()
        target, self.target_sock = self.target_sock, None
        self.state = "relaying"
        self.relay = Relay(self.loop, target, sock, b_framed=True, a_name=f"target {self.target}", b_name="server",
                           on_close=self._on_relay_close, reuse=True)
        self.relay.start(b_initial=leftover)

    def _on_relay_close(self, relay: Relay, reason: str) -> None:
        self.relay = None
        level = logging.DEBUG if reason in ("done", "agent stopping") else logging.INFO
        log.log(level, "connection %d to %s ended (%s): %d bytes to the target, %d back", self.conn_id, self.target,
                reason, relay.bytes_b_to_a, relay.bytes_a_to_b)
        if relay.handoff is None or self.agent.closed:
            self._finish()
            return
        sock, trailing = relay.handoff
        conn = FramedConn.resume(self.loop, sock, trailing, peer=self.agent.server_peer, identity=None,
                                 on_message=self._on_message, on_close=self._on_data_close)
        self._become_warm(conn)

    def _on_data_close(self, conn: FramedConn, reason: str) -> None:
        if conn is not self.data:
            return
        self.data = None
        if self.state == "warm":
            log.debug("warm data connection closed: %s", reason)
            self._finish()
            self.agent.refill()
        else:
            self.abort(f"data connection closed: {reason}")

    # -- ending -----------------------------------------------------------------------------------
    def abort(self, reason: str | None) -> None:
        """Give up on this data connection (and its target); `reason` None: already logged."""
        if self.done:
            return
        if reason is not None and reason != "agent stopping":
            log.warning("data connection%s: %s", f" {self.conn_id} to {self.target}" if self.conn_id else "", reason)
        if self.dialer:
            self.dialer.cancel()
            self.dialer = None
        if self.data:
            data, self.data = self.data, None
            data.close(reason or "aborted")
        if self.target_sock:
            self.target_sock.close()
            self.target_sock = None
        if self.relay:
            relay, self.relay = self.relay, None
            relay.close(reason or "aborted")
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.agent.warm.discard(self)
        self.agent.data_conns.discard(self)
