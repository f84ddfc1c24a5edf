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
from dataclasses import dataclass

from . import tls
from .common import __version__
from .framed import FramedConn
from .loop import Loop, Timer
from .net import Dialer, format_addr
from .relay import Relay
from .wire import PROTO_VERSION

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


class Agent:
    def __init__(self, loop: Loop, config: AgentConfig) -> None:
        self.loop = loop
        self.config = config
        self.ctx: ssl.SSLContext | None = None
        self.conn: FramedConn | None = None
        self.dialer: Dialer | None = None
        self.server_addr: tuple | None = None
        self.connected = False
        self.heartbeat = 5.0
        self.server_id = ""
        self.failures = 0
        self.relays: set[Relay] = set()
        self.setups: set[_DataSetup] = set()
        self._retry: Timer | None = None
        self._hb: Timer | None = None
        self._seq = 0
        self.closed = False

    @property
    def server_name(self) -> str:
        return self.config.server_name or self.config.server_host

    def start(self) -> None:
        self.ctx = tls.client_context(self.config.ca, self.config.cert, self.config.key)
        self._connect()

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
        elif kind == "error":
            log.error("server %s refused this agent: %s", conn.peer, msg["reason"])
            conn.close(f"refused by the server: {msg['reason']}")
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
        log.info("connected to server %s at %s as agent %s", self.server_id, conn.peer, self.config.agent_id)
        self._hb = self.loop.call_later(self.heartbeat, self._tick)

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
        old = self.config
        changed = [f for f in vars(old) if getattr(old, f) != getattr(new, f)]
        self.ctx = ctx
        self.config = new
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
        setup = _DataSetup(self, msg["conn"], msg["host"], msg["port"])
        self.setups.add(setup)

    def report_failure(self, conn_id: int, target: str, reason: str) -> None:
        log.warning("connection %d: cannot reach %s: %s", conn_id, target, reason)
        if self.conn is not None and self.conn.open:
            self.conn.send("fail", conn=conn_id, reason=reason)

    # -- ending --------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._retry:
            self._retry.cancel()
        if self._hb:
            self._hb.cancel()
        if self.dialer:
            self.dialer.cancel()
        if self.conn:
            self.conn.close("agent stopping")
        for setup in list(self.setups):
            setup.abort("agent stopping")
        for relay in list(self.relays):
            relay.close("agent stopping")


def backoff_delay(failures: int, low: float, high: float) -> float:
    """Exponential backoff with jitter: the n-th delay lies in [d/2, d], d = min(high, low * 2**(n-1))."""
    ceiling = min(high, low * (2 ** min(failures - 1, 30)))
    return max(low, random.uniform(ceiling / 2, ceiling))


class _DataSetup:
    """One requested connection: dial the target, then the data connection, then join them."""

    def __init__(self, agent: Agent, conn_id: int, host: str, port: int) -> None:
        self.agent = agent
        self.loop = agent.loop
        self.conn_id = conn_id
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.target_sock: socket.socket | None = None
        self.data: FramedConn | None = None
        self.dialer: Dialer | None = Dialer(self.loop, host, port, agent.config.dial_timeout, self._on_target)
        self.done = False

    def _on_target(self, sock: socket.socket | None, error: str | None) -> None:
        self.dialer = None
        if sock is None:
            self.agent.report_failure(self.conn_id, self.target, error or "unknown error")
            self._finish()
            return
        self.target_sock = sock
        addr = self.agent.server_addr
        if addr is None:
            self.abort("no server address")
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

    def _on_message(self, conn: FramedConn, msg: dict) -> None:
        if msg["type"] == "ready" and msg["conn"] == self.conn_id:
            sock, leftover = conn.detach()
            self.data = None
            target, self.target_sock = self.target_sock, None
            assert target is not None  # dialled before the data connection was opened
            relay = Relay(self.loop, target, sock, b_framed=True, a_name=f"target {self.target}",
                          b_name="server", on_close=self._on_relay_close)
            self.agent.relays.add(relay)
            self._finish()
            relay.start(b_initial=leftover)
        elif msg["type"] == "error":
            self.abort(f"server refused the data connection: {msg['reason']}")
        else:
            self.abort(f"unexpected {msg['type']} on the data connection")

    def _on_data_close(self, conn: FramedConn, reason: str) -> None:
        self.data = None
        self.abort(f"data connection closed: {reason}")

    def _on_relay_close(self, relay: Relay, reason: str) -> None:
        self.agent.relays.discard(relay)
        level = logging.DEBUG if reason in ("done", "agent stopping") else logging.INFO
        log.log(level, "connection %d to %s ended (%s): %d bytes to the target, %d back", self.conn_id, self.target,
                reason, relay.bytes_b_to_a, relay.bytes_a_to_b)

    def abort(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if reason != "agent stopping":
            log.warning("connection %d to %s: %s", self.conn_id, self.target, reason)
        if self.dialer:
            self.dialer.cancel()
            self.dialer = None
        if self.data:
            data, self.data = self.data, None
            data.close(reason)
        if self.target_sock:
            self.target_sock.close()
            self.target_sock = None
        self._finish()

    def _finish(self) -> None:
        self.done = True
        self.agent.setups.discard(self)
