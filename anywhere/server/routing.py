"""Routing: clients accepted on a proxy's port, waiting for their agent, then joined.

Owns the clients between accept and close: `Pending` (accepted, its agent asked, keyed by a
connection id) and `Tunnel` (joined: bytes flow through a `Relay` or a trunk `Stream`, both
`carrier.Carrier`s), with the counts the limits read.  An accepted client is checked against the
proxy's whitelist (or the global one) and the limits; then, if its agent has a session, it waits
while one of the data paths (paths.py: trunk, warm data connection, admin connection) places it.
A proxy with ``proxy_protocol`` takes the client's address and the one it dialled at accept
(`Pending.origin`, for the target's PROXY header) and is served only by trunks whose agent
announced ``pp`` (paths.py `TrunkPath.offer`, which fails it otherwise): any other path would
connect it without its header.
A proxy may have several agents (balance.py picks one per client).  When the agent asked fails
(it reports ``fail``: its target refused; its data path is lost; it does not answer within its
share of `data_timeout`), the next usable agent is asked, before the client has received a byte
(a proxy of several agents reads its client only once an agent has opened the target); with none
left, or after `data_timeout`, or with no agent online to begin with, the client is closed, with
the reason logged and counted.
Pending entries are kept here, not by the session: a data connection that arrives after its
agent's admin connection was replaced still finds its client.

Directions: "in" is client → target, "out" target → client, in every counter and listing (a
relay's or a stream's `bytes_a_to_b` is in: its side a is the client).

It must not bind ports or decide what a proxy is (proxies.py), nor speak to agents other than
through the paths and the data connection that names its client.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any, Callable

from .. import proxyproto
from ..audit import AuditLog
from ..framed import FramedConn
from ..loop import Loop, Timer
from ..net import accepted, client_ip, format_addr
from ..carrier import Carrier
from ..relay import Relay
from ..trunk import Stream
from .counters import Tally
from .limits import Limits
from .paths import TrunkPath, WarmPath
from .balance import Balancer
from .proxy import Network, Proxy, allowed
from .sessions import AgentPort, AgentSession, Role
from .settings import ServerConfig

log = logging.getLogger("anywhere.server")


@dataclass
class Pending:
    conn_id: int
    proxy: Proxy
    sock: socket.socket
    peer: str
    started: float
    timer: Timer | None = None
    warm: FramedConn | None = None  # the warm data connection asked to serve it, if any
    stream: Stream | None = None  # the trunk stream opened for it, if any
    agent_id: str = ""  # the agent asked now
    tried: list[str] | None = None  # the agents asked so far (a proxy of several agents)
    attempt: Timer | None = None  # this agent's share of data_timeout (a proxy of several agents)
    origin: Any = None  # proxyproto.Origin: the client and the address it dialled (a proxy with proxy_protocol)


@dataclass
class Tunnel:
    conn_id: int
    proxy: Proxy
    peer: str
    relay: Carrier  # a Relay (data connection) or a trunk Stream
    started: float
    started_wall: float
    agent_id: str  # the agent that carries it

    def to_dict(self, now: float) -> dict:
        return {"id": self.conn_id, "proxy": self.proxy.name, "agent_id": self.agent_id,
                "source": self.peer, "target": self.proxy.target, "remote_port": self.proxy.remote_port,
                "bytes_in": self.relay.bytes_a_to_b, "bytes_out": self.relay.bytes_b_to_a,
                "age": round(now - self.started, 3), "since": self.started_wall}


class Router:
    def __init__(self, loop: Loop, config: Callable[[], ServerConfig], port: AgentPort, trunks: TrunkPath,
                 warm: WarmPath, limits: Limits, tally: Tally, audit: Callable[[], AuditLog],
                 global_nets: Callable[[], list[Network]], setup_seconds: Any,
                 new_id: Callable[[], int], wall_time: Callable[[], float]) -> None:
        self.loop = loop
        self._config = config
        self.port = port
        self.trunks = trunks
        self.warm = warm
        self.limits = limits
        self.tally = tally
        self._audit = audit
        self._global_nets = global_nets
        self._setup_seconds = setup_seconds  # a histogram with a "proxy" label
        self._setup_children: dict[str, Any] = {}  # proxy name -> its setup_seconds child (labels() once)
        self._new_id = new_id
        self._wall_time = wall_time
        self.accepting = True  # False while draining: new clients are closed at once
        self.pending: dict[int, Pending] = {}
        self.tunnels: dict[int, Tunnel] = {}
        self.live_per_proxy: dict[str, int] = {}  # tunnels + pending clients per proxy
        self.pending_per_agent: dict[str, int] = {}
        self.balancer = Balancer(loop.time, self.unusable)
        trunks.router = warm.router = self

    def unusable(self, agent_id: str) -> str | None:
        """Why `agent_id` cannot take a client now: offline, or every trunk of it stale; None: it can."""
        if self.port.online(agent_id) is None:
            return "offline"
        trunks = self.trunks.trunks.get(agent_id)
        if trunks:
            now, hb = self.loop.time(), self._config().heartbeat
            if all(t.stale(now, hb) for t in trunks):
                return "no live trunk"
        return None

    # -- clients -----------------------------------------------------------------------------------------
    def on_client(self, proxy: Proxy, sock: socket.socket, addr: Any) -> None:
        accepted(sock)
        peer = format_addr(addr)
        if not self.accepting:
            _close(sock)
            return
        ip = client_ip(addr)
        nets = proxy.nets or self._global_nets()
        if nets and not allowed(ip, nets):
            which = "proxy's" if proxy.nets else "global"
            self._refuse(sock, proxy, "whitelist", peer, f"refused: not in the {which} whitelist")
            return
        agent = self.balancer.pick(proxy) if len(proxy.agent_ids) > 1 else proxy.agent_id
        limit = self.limits.over_limit(proxy, ip, len(self.tunnels) + len(self.pending),
                                       self.live_per_proxy.get(proxy.name, 0),
                                       self.pending_per_agent.get(agent or "", 0), agent)
        if limit:
            self._refuse(sock, proxy, "limit", peer, f"refused: {limit}")
            return
        session = self.port.online(agent) if agent else None
        if session is None:
            self._refuse(sock, proxy, "agent_offline", peer, f"closed: agent {proxy.agent_id} offline"
                         if len(proxy.agent_ids) == 1 else f"closed: no agent of {', '.join(proxy.agent_ids)} can serve")
            return
        try:
            origin = _origin(proxy, sock, addr)
        except (OSError, ValueError) as exc:
            log.warning("proxy %s: client %s closed: no address for its PROXY header: %s", proxy.name, peer, exc)
            _close(sock)
            return
        pending = Pending(self._new_id(), proxy, sock, peer, self.loop.time(), agent_id=session.agent_id,
                          origin=origin)
        pending.timer = self.loop.call_later(self._config().data_timeout, self._pending_timeout, pending.conn_id)
        self._add_pending(pending)
        self._ask(pending, session)

    def _ask(self, pending: Pending, session: AgentSession) -> None:
        """Ask the pending client's agent; with several agents, for its share of data_timeout only."""
        proxy = pending.proxy
        if len(proxy.agent_ids) > 1:
            pending.tried = (pending.tried or []) + [pending.agent_id]
            share = self._config().data_timeout / len(proxy.agent_ids)
            pending.attempt = self.loop.call_later(share, self._attempt_timeout, pending.conn_id, pending.agent_id)
        self.ask_agent(pending, session)

    def _attempt_timeout(self, conn_id: int, agent_id: str) -> None:
        pending = self.pending.get(conn_id)
        if pending is not None and pending.agent_id == agent_id:
            pending.attempt = None
            share = self._config().data_timeout / len(pending.proxy.agent_ids)
            self.attempt_failed(pending, f"agent {agent_id} did not answer within {share:g} s", "timeout")

    def attempt_failed(self, pending: Pending, reason: str, kind: str) -> None:
        """The agent asked for `pending` failed it: the next usable agent of the proxy, before the
        client has received anything; none left: the client is closed (`kind` counted)."""
        proxy = pending.proxy
        if len(proxy.agent_ids) == 1 or pending.conn_id not in self.pending:
            self.drop_pending(pending, reason, kind)
            return
        backoff = self.balancer.failed(proxy.name, pending.agent_id)
        _let_go(pending)
        agent = self.balancer.pick(proxy, pending.tried or ())
        session = self.port.online(agent) if agent else None
        if session is None:
            self.drop_pending(pending, f"{reason}; no other agent of {', '.join(proxy.agent_ids)} can serve", kind)
            return
        log.info("proxy %s: client %s: %s; agent %s skipped for %g s, trying agent %s", proxy.name, pending.peer,
                 reason, pending.agent_id, backoff, agent)
        self._move(pending, agent)
        self._ask(pending, session)

    def _move(self, pending: Pending, agent: str) -> None:
        old = pending.agent_id
        self.pending_per_agent[old] -= 1
        if not self.pending_per_agent[old]:
            del self.pending_per_agent[old]
        self.pending_per_agent[agent] = self.pending_per_agent.get(agent, 0) + 1
        self.balancer.released(pending.proxy.name, old)
        self.balancer.added(pending.proxy.name, agent)
        pending.agent_id = agent

    def _refuse(self, sock: socket.socket, proxy: Proxy, reason: str, peer: str, detail: str) -> None:
        _close(sock)
        self.limits.throttled_log(("client", proxy.name, reason, peer.rsplit(":", 1)[0]),
                                  f"proxy {proxy.name}: client {peer} {detail}")
        self.tally.reject(proxy, reason, peer, detail)

    def ask_agent(self, pending: Pending, session: AgentSession) -> None:
        """A trunk stream; without a trunk, `open` on a warm data connection, else on the admin connection."""
        if not self.trunks.offer(pending) and not self.warm.offer(pending):
            session.conn.send("open", conn=pending.conn_id, host=pending.proxy.local_ip, port=pending.proxy.local_port)


    # -- the per-client data connection --------------------------------------------------------------------
    def on_data(self, conn: FramedConn, msg: dict) -> None:
        """A data connection the agent dialed for one client (after `open` on its admin connection)."""
        pending = self.pending.get(msg["conn"])
        if pending is None or pending.agent_id != msg["agent_id"]:
            reason = f"no client is waiting for connection {msg['conn']}"
            log.info("data connection from agent %s (%s): %s", msg["agent_id"], conn.peer, reason)
            conn.send_and_close("error", reason, reason=reason)
            return
        self.take_pending(pending.conn_id)
        if pending.timer:
            pending.timer.cancel()
        conn.send("ready", conn=pending.conn_id)
        if not conn.open:
            _close(pending.sock)
            self._release_live(pending.proxy, pending.agent_id)
            return
        self.join(pending, conn)

    def join(self, pending: Pending, conn: FramedConn) -> None:
        """The client and a data connection that has opened its target: a Relay between them."""
        proxy, peer = pending.proxy, conn.peer
        conn.role = Role.HANDED
        data_sock, leftover = conn.detach()
        relay = Relay(self.loop, pending.sock, data_sock, b_framed=True, a_name=f"client {pending.peer}",
                      b_name=f"agent {pending.agent_id}", reuse=True,
                      on_close=lambda r, reason, cid=pending.conn_id: self._on_relay_close(cid, r, reason, peer))
        self.add_tunnel(pending, relay)
        relay.start(b_initial=leftover)

    # -- tunnels ---------------------------------------------------------------------------------------------
    def add_tunnel(self, pending: Pending, relay: Carrier) -> None:
        """Count and list a joined connection."""
        proxy, agent = pending.proxy, pending.agent_id
        if pending.attempt is not None:
            pending.attempt.cancel()
            pending.attempt = None
        self.balancer.succeeded(proxy.name, agent)
        setup = self._setup_children.get(proxy.name)
        if setup is None:
            setup = self._setup_children[proxy.name] = self._setup_seconds.labels(proxy.name)
        relay.on_first_byte = lambda r, started=pending.started: setup.observe(r.first_byte_at - started)
        if relay.first_byte_at is not None:  # bytes went ahead of READY: the path is whole only now
            setup.observe(self.loop.time() - pending.started)
        self.tunnels[pending.conn_id] = Tunnel(pending.conn_id, proxy, pending.peer, relay, pending.started,
                                               self._wall_time(), agent)
        self.tally.joined(proxy.name, agent)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection %d: %s joined to agent %s for %s", pending.conn_id, pending.peer, agent, proxy.target)

    def _on_relay_close(self, conn_id: int, relay: Relay, reason: str, data_peer: str) -> None:
        tunnel = self._closed(conn_id, relay, reason)
        if tunnel is not None and relay.handoff is not None:  # both directions ended: the data connection is warm again
            sock, trailing = relay.handoff
            agent_id = tunnel.agent_id
            conn = FramedConn.resume(self.loop, sock, trailing, peer=data_peer, identity=agent_id,
                                     on_message=self.port.on_message, on_close=self.port.on_close)
            conn.role = Role.IDLE
            self.warm.add(conn, agent_id)

    def on_stream_close(self, conn_id: int, stream: Stream, reason: str) -> None:
        pending = self.pending.get(conn_id)
        if pending is not None and pending.stream is stream:
            pending.stream = None
            if not reason.startswith(stream.name):  # else the client's own failure, named already
                reason = f"agent {pending.agent_id}: {reason}"
            lost = "agent_offline" if "data connection lost" in reason else None
            if len(pending.proxy.agent_ids) > 1:  # the client is not attached yet: another agent may take it
                self.attempt_failed(pending, reason, lost or "target_refused")
            else:
                self.drop_pending(pending, reason, lost)
            return
        self._closed(conn_id, stream, reason)

    def _closed(self, conn_id: int, relay: Carrier, reason: str) -> Tunnel | None:
        tunnel = self.tunnels.pop(conn_id, None)
        if tunnel is None:
            return None
        self._release_live(tunnel.proxy, tunnel.agent_id)
        proxy, bytes_in, bytes_out = tunnel.proxy, relay.bytes_a_to_b, relay.bytes_b_to_a
        self.tally.closed(proxy.name, tunnel.agent_id, bytes_in, bytes_out)
        duration = self.loop.time() - tunnel.started
        audit = self._audit()
        if audit.target:
            audit.write("connection", proxy=proxy.name, agent=tunnel.agent_id, source=tunnel.peer,
                        target=proxy.target, bytes_in=bytes_in, bytes_out=bytes_out, duration=round(duration, 3),
                        reason=reason)
        level = logging.INFO if reason in ("done", "server stopping") else logging.WARNING
        if log.isEnabledFor(level):
            log.log(level, "connection %d %s → %s via %s closed (%s): %d bytes in, %d out, %.1f s", conn_id,
                    tunnel.peer, proxy.target, proxy.name, reason, bytes_in, bytes_out, duration)
        return tunnel

    # -- pending clients --------------------------------------------------------------------------------------
    def _add_pending(self, pending: Pending) -> None:
        self.pending[pending.conn_id] = pending
        self.live_per_proxy[pending.proxy.name] = self.live_per_proxy.get(pending.proxy.name, 0) + 1
        agent = pending.agent_id
        self.pending_per_agent[agent] = self.pending_per_agent.get(agent, 0) + 1
        self.balancer.added(pending.proxy.name, agent)

    def take_pending(self, conn_id: int) -> Pending | None:
        """Remove a client from the waiting list (it is joined or dropped next); None if not waiting."""
        pending = self.pending.pop(conn_id, None)
        if pending is not None:
            agent = pending.agent_id
            self.pending_per_agent[agent] -= 1
            if not self.pending_per_agent[agent]:
                del self.pending_per_agent[agent]
        return pending

    def _release_live(self, proxy: Proxy, agent_id: str) -> None:
        self.live_per_proxy[proxy.name] -= 1
        if not self.live_per_proxy[proxy.name]:
            del self.live_per_proxy[proxy.name]
        self.balancer.released(proxy.name, agent_id)

    def _pending_timeout(self, conn_id: int) -> None:
        pending = self.pending.get(conn_id)
        if pending is not None:
            pending.timer = None
            self.drop_pending(pending, f"no data connection from agent {pending.agent_id} "
                                       f"within {self._config().data_timeout:g} s", "timeout")

    def on_agent_fail(self, agent_id: str, conn_id: int, reason: str) -> None:
        pending = self.pending.get(conn_id)
        if pending is None or pending.agent_id != agent_id:
            return
        self.attempt_failed(pending, f"agent {agent_id} could not reach {pending.proxy.target}: {reason}",
                            "target_refused")

    def drop_pending(self, pending: Pending, reason: str, kind: str | None = None) -> None:
        """Close a client that was never joined; `kind` is the rejection counted (None: not a rejection)."""
        if self.take_pending(pending.conn_id) is None:
            return  # already joined or dropped
        self._release_live(pending.proxy, pending.agent_id)
        if kind is not None:
            self.tally.reject(pending.proxy, kind, pending.peer, reason)
        if pending.timer:
            pending.timer.cancel()
        if pending.attempt is not None:
            pending.attempt.cancel()
        if pending.warm is not None and pending.warm.open:
            warm, pending.warm = pending.warm, None
            warm.close("its client is gone")  # its state is unknown now: do not reuse it
        if pending.stream is not None:
            stream, pending.stream = pending.stream, None
            stream.on_close = None
            stream.close("client gone")
        if reason != "server stopping":
            log.warning("proxy %s: client %s closed: %s", pending.proxy.name, pending.peer, reason)
        _close(pending.sock)

    # -- many at once ----------------------------------------------------------------------------------------
    def close_connections(self, which: Callable[[Proxy, str], bool], reason: str) -> int:
        """Close every client, waiting or joined, for which which(proxy, agent id) is true."""
        closed = 0
        for pending in [p for p in self.pending.values() if which(p.proxy, p.agent_id)]:
            self.drop_pending(pending, reason)
            closed += 1
        for tunnel in [t for t in self.tunnels.values() if which(t.proxy, t.agent_id)]:
            tunnel.relay.close(reason)
            closed += 1
        return closed

    def count(self, agent_id: str | None = None, proxy: Proxy | None = None) -> int:
        return sum(1 for t in self.tunnels.values()
                   if (agent_id is None or t.agent_id == agent_id) and (proxy is None or t.proxy is proxy))

    def sweep_idle(self, now: float) -> None:
        """Close tunneled connections idle longer than their proxy's (or the server's) idle_timeout."""
        default = self._config().idle_timeout
        for tunnel in list(self.tunnels.values()):
            timeout = tunnel.proxy.idle_timeout or default
            if timeout and now - tunnel.relay.last_active >= timeout:
                tunnel.relay.close(f"idle for {timeout:g} s")

    def close(self) -> None:
        for pending in list(self.pending.values()):
            self.drop_pending(pending, "server stopping")

    def close_tunnels(self) -> None:
        for tunnel in list(self.tunnels.values()):
            tunnel.relay.close("server stopping")


def _origin(proxy: Proxy, sock: socket.socket, addr: Any) -> proxyproto.Origin | None:
    """For a client of a proxy with proxy_protocol, its PROXY header's addresses: the client's, and
    the one it dialled (the accepted socket's own; a v4 client of a dual-stack listener as v4)."""
    if proxy.proxy_protocol is None:
        return None
    return proxyproto.origin(int(proxy.proxy_protocol[1]), addr[:2], sock.getsockname()[:2])


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _let_go(pending: Pending) -> None:
    """Let go of the failed agent's attempt, the client untouched (none of its bytes were read)."""
    if pending.attempt is not None:
        pending.attempt.cancel()
        pending.attempt = None
    if pending.stream is not None:
        stream, pending.stream = pending.stream, None
        stream.on_close = None
        stream.close("the client went to another agent")
    if pending.warm is not None:
        warm, pending.warm = pending.warm, None
        warm.close("its client went to another agent")


def reshape(router: Router, proxy: Proxy) -> None:
    """A reload gave the proxy a bandwidth limit or took it away: its live streams (trunks; the
    per-connection data path is not limited) go under its gates now, or under none."""
    gates = (proxy.shaper.up, proxy.shaper.down) if proxy.shaper is not None else (None, None)
    streams = [t.relay for t in router.tunnels.values() if t.proxy.name == proxy.name] + \
        [p.stream for p in router.pending.values() if p.proxy.name == proxy.name]
    for stream in streams:
        if isinstance(stream, Stream) and not stream.closed:
            stream.shape(*gates)
