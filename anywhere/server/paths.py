"""The data paths: how a waiting client reaches its agent, one class per path.

A client accepted on a proxy's port is a `routing.Pending` until its agent has opened the target;
then it is a `routing.Tunnel`.  Three paths get it there, tried in this order (`Router.ask_agent`):

  1. `TrunkPath` (the default): a stream on one of the agent's trunks, long-lived TLS connections
     that carry many clients (trunk.py).  OPEN goes out at once and the client's first bytes
     follow it, no round trip.  A trunk belongs to one agent session (`owner`): when the session
     ends or is replaced its trunks are retired (no new client, closed with their last stream);
     a trunk opened for an earlier session is refused.  No client is ever placed on a trunk known
     to be stale: with every trunk stale it is held (`waiting`) until one is live again, or
     `data_timeout`.  New streams go to the oldest live trunk until it is known to be fast; then
     to the least busy live one (trunk.py, Scheduling).
     Trunks on demand (an agent welcomed with ``on_demand``, sessions.py): the agent opens its
     trunks only when asked.  A client for an agent with fewer live trunks than `pool_size` asks
     for them (``trunks``, again a heartbeat later while still short); with none yet it is held
     (`waiting`) until the first joins.  Once none of an agent's trunks has carried a stream for
     `trunk_idle_timeout`, the agent is told ``trunks`` 0 and they are closed here: only this
     side opens streams, so none can be on its way.  A trunk the agent opens while not asked is
     refused.
  2. `WarmPath`: an idle data connection of the agent (with `pool_size = 0` an agent uses a data
     connection of its own per client, and one whose client closed cleanly comes back warm; a
     ``pool`` first frame also offers one) is sent ``open``; it answers ``ready`` (then it is
     joined to the client by a `Relay`) or ``fail``.
  3. The admin connection: ``open`` on it; the agent dials a new data connection that names the
     client (``data``), handled by `Router.on_data`.

A client of a proxy with ``proxy_protocol`` goes only on a trunk whose agent announced ``pp``
(its OPEN carries the PROXY header's addresses, mux.py); with only older trunks it fails at once
(another agent of the proxy may take it), logged once per agent session as well as per client;
the other two paths never take it: with no trunk at all it fails here too.

It must not accept clients, check limits, or count them (routing does); each path only places a
pending client, or says it could not.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

from .. import mux
from ..common import printable
from ..framed import FramedConn
from ..loop import Loop
from ..trunk import Stream, Trunk
from ..wire import MAX_TRUNKS
from .sessions import AgentPort, AgentSession, Role
from .settings import ServerConfig

log = logging.getLogger("anywhere.server")


class Routing(Protocol):
    """What a path may ask of routing (routing.Router)."""

    pending: dict[int, Any]

    def take_pending(self, conn_id: int) -> Any: ...
    def drop_pending(self, pending: Any, reason: str, kind: str | None = None) -> None: ...
    def add_tunnel(self, pending: Any, relay: Any) -> None: ...
    def join(self, pending: Any, conn: FramedConn) -> None: ...
    def ask_agent(self, pending: Any, session: AgentSession) -> None: ...
    def on_agent_fail(self, agent_id: str, conn_id: int, reason: str) -> None: ...
    def attempt_failed(self, pending: Any, reason: str, kind: str) -> None: ...
    def on_stream_close(self, conn_id: int, stream: Stream, reason: str) -> None: ...


class TrunkPath:
    """The agents' trunks (per agent, the current session's), retired trunks, and held clients."""

    def __init__(self, loop: Loop, config: Callable[[], ServerConfig], port: AgentPort) -> None:
        self.loop = loop
        self._config = config
        self.port = port
        self.router: Routing = None  # type: ignore[assignment]  # set by the composition root
        self.accepting = True  # False while draining: new trunks are closed
        self.trunks: dict[str, list[Trunk]] = {}  # per agent, the current session's trunks
        self.retired: set[Trunk] = set()  # of sessions that are over, closed with their last stream
        self.waiting: dict[str, list[int]] = {}  # per agent, clients held while every trunk is stale
        self.pp_warned: dict[str, AgentSession] = {}  # per agent, the session told too old for proxy_protocol

    def add(self, conn: FramedConn, msg: dict) -> None:
        """A trunk joins the agent's current session; one opened for a session that is over (its
        `session` names another) is refused, so a stale path never takes new clients."""
        agent_id = msg["agent_id"]
        session = self.port.sessions.get(agent_id)
        if not self.accepting or session is None:
            conn.close("not needed")
            return
        token = msg.get("session")
        if token is not None and token != session.token:
            log.info("trunk from agent %s (%s) refused: opened for an earlier session", agent_id, conn.peer)
            conn.close("earlier session")
            return
        if session.on_demand and session.wanted == 0:  # opened before it heard it is not wanted now
            conn.close("not needed")
            return
        trunks = self.trunks.setdefault(agent_id, [])
        if len(trunks) >= max(min(self._config().pool_size, MAX_TRUNKS), 1) * 2:  # an agent keeps MAX_TRUNKS at most
            conn.close("too many trunks")
            return
        peer = conn.peer
        conn.role = Role.HANDED
        sock, leftover = conn.detach()
        trunk = Trunk(self.loop, sock, leftover, name=f"{agent_id}@{peer}", on_close=self._on_close)
        trunk.owner = session
        trunk.can_ping = msg.get("ping") == 1
        trunk.takes_window = msg.get("window") == 1
        trunk.takes_pp = msg.get("pp") == 1
        trunks.append(trunk)
        log.debug("trunk from agent %s (%s) up; %d now", agent_id, peer, len(trunks))
        self.serve_waiting(agent_id)

    def _on_close(self, trunk: Trunk, reason: str) -> None:
        session = trunk.owner
        trunks = self.trunks.get(session.agent_id, [])
        if trunk in trunks:
            trunks.remove(trunk)
            if not trunks:
                del self.trunks[session.agent_id]
                self.serve_waiting(session.agent_id)  # none left: the other paths take them
        self.retired.discard(trunk)
        if reason not in ("server stopping", "agent session ended", "idle"):
            log.info("trunk %s closed: %s", trunk.name, reason)

    def retire(self, session: AgentSession, reason: str) -> None:
        """The session is over: its trunks take no new client and close with their last stream."""
        if self.pp_warned.get(session.agent_id) is session:
            del self.pp_warned[session.agent_id]
        trunks = self.trunks.get(session.agent_id, [])
        mine = [t for t in trunks if t.owner is session]
        if not mine:
            return
        trunks[:] = [t for t in trunks if t.owner is not session]
        if not trunks:
            del self.trunks[session.agent_id]
        for trunk in mine:
            if trunk.streams:
                self.retired.add(trunk)
            trunk.retire(reason)

    def check(self, session: AgentSession) -> None:
        """Every heartbeat of `session`: the liveness of its trunks, then the clients held for one."""
        now, hb = self.loop.time(), self._config().heartbeat
        for trunk in list(self.trunks.get(session.agent_id, ())):
            trunk.check_alive(now, hb)
        if self.waiting.get(session.agent_id):
            self._want(session, now, hb)  # asked, and still none: ask again
        self.serve_waiting(session.agent_id)

    def _want(self, session: AgentSession, now: float, hb: float) -> None:
        """On demand: ask `session`'s agent for its trunks if it has fewer live ones than wanted and
        has not been asked for them within a heartbeat."""
        if not session.on_demand:
            return
        wanted = min(self._config().pool_size, MAX_TRUNKS)
        live = sum(1 for t in self.trunks.get(session.agent_id, ()) if not t.stale(now, hb))
        if live < wanted and (session.wanted != wanted or now - session.asked_at >= hb):
            session.ask_trunks(wanted)

    def serve_waiting(self, agent_id: str) -> None:
        """Clients held while every trunk of their agent was stale: to a live trunk now, or, with no
        trunk left at all, to the other data paths; still none live: they keep waiting."""
        waiting = self.waiting.pop(agent_id, None)
        if not waiting:
            return
        session = self.port.online(agent_id)
        for conn_id in waiting:
            pending = self.router.pending.get(conn_id)
            if pending is None or pending.stream is not None or pending.warm is not None or pending.agent_id != agent_id:
                continue  # gone, or served another way (or by another agent) meanwhile
            if session is None:
                self.waiting.setdefault(agent_id, []).append(conn_id)  # until data_timeout
                continue
            self.router.ask_agent(pending, session)

    def offer(self, pending: Any) -> bool:
        """Place `pending` on a live trunk of its agent, or hold it while all are stale; False if the
        agent has no trunk at all (a client with a PROXY header's origin fails then: no other path
        may take it)."""
        proxy, agent_id = pending.proxy, pending.agent_id
        trunks = self.trunks.get(agent_id)
        now, hb = self.loop.time(), self._config().heartbeat
        session = self.port.online(agent_id)
        if session is not None and session.on_demand:
            self._want(session, now, hb)
            if not trunks:  # held until the first one joins (add), or data_timeout
                self.waiting.setdefault(agent_id, []).append(pending.conn_id)
                return True
        if not trunks:
            if pending.origin is None:
                return False
            # the other paths (the deprecated per-client data connections) carry no PROXY header
            self.router.attempt_failed(pending, f"agent {agent_id} has no trunk (pool_size = 0?): proxy_protocol "
                                                "needs one (the per-client data connections carry no PROXY header)",
                                       "target_refused")
            return True
        live = [t for t in trunks if not t.stale(now, hb)]
        if not live:  # never on a trunk known to be stale: held for a live one (or data_timeout)
            self.waiting.setdefault(agent_id, []).append(pending.conn_id)
            return True
        if pending.origin is not None:
            live = [t for t in live if t.takes_pp]
            if not live:
                self._too_old(pending)
                return True
        if not live[0].fast:  # a slow link, or not known to be fast yet: one trunk carries all (trunk.py, Scheduling)
            trunk = live[0]
        else:  # a fast path: the least busy trunk
            trunk = min(live, key=lambda t: len(t.streams) + (t.out_bytes >> 16))
        router, conn_id = self.router, pending.conn_id
        stream = Stream(trunk, trunk.new_stream_id(), name=f"client {pending.peer}",
                        on_close=lambda st, reason: router.on_stream_close(conn_id, st, reason))
        stream.on_ready = lambda: self._on_ready(conn_id, stream)
        stream.on_fail = lambda reason: router.on_agent_fail(agent_id, conn_id, reason)
        stream.send_window = mux.EARLY_WINDOW  # until READY (see mux.py)
        pending.stream = stream
        if proxy.shaper is not None:  # a bandwidth limit: the proxy's gates (shaper.py)
            stream.shape(proxy.shaper.up, proxy.shaper.down)
        window = stream.grant_first_window() if trunk.takes_window else None  # under the buffer budget
        trunk.control(mux.open_frame(stream.sid, proxy.local_ip, proxy.local_port, window, pending.origin))
        if len(proxy.agent_ids) == 1:  # no round trip: the client's first bytes follow OPEN
            stream.attach(pending.sock, read_now=False)
        # else the client is read only once an agent has its target (READY): until then another
        # agent may take it over, and none of its bytes may have gone to the one that failed
        return True

    def _too_old(self, pending: Any) -> None:
        """A client of a proxy with proxy_protocol, and its agent's live trunks do not announce
        ``pp``: connected, it would reach its target without the header.  Failed instead."""
        agent_id = pending.agent_id
        session = self.port.online(agent_id)
        if session is not None and self.pp_warned.get(agent_id) is not session:
            self.pp_warned[agent_id] = session
            log.warning("agent %s (version %s) is too old for proxy_protocol (its trunks do not announce pp): "
                        "its clients of proxies with proxy_protocol (the first: proxy %s) are closed until it is upgraded",
                        agent_id, printable(session.version, 64), pending.proxy.name)
        self.router.attempt_failed(pending, f"agent {agent_id} is too old for proxy_protocol", "target_refused")

    def _on_ready(self, conn_id: int, stream: Stream) -> None:
        pending = self.router.take_pending(conn_id)
        if pending is None:
            stream.close("client gone")
            return
        if pending.timer:
            pending.timer.cancel()
        pending.stream = None
        self.router.add_tunnel(pending, stream)
        if stream.sock is None:  # held back until now (a proxy of several agents)
            stream.attach(pending.sock)
        stream.open_window(mux.WINDOW_SIZE - mux.EARLY_WINDOW)

    def sweep(self, now: float) -> None:
        """Every IDLE_SWEEP: retired trunks' liveness; forget held clients that are gone; on demand,
        close the trunks of agents that have had no stream for trunk_idle_timeout."""
        cfg = self._config()
        for trunk in list(self.retired):
            trunk.check_alive(now, cfg.heartbeat)
        if cfg.trunk_idle_timeout > 0:
            for agent_id, trunks in list(self.trunks.items()):
                session = trunks[0].owner
                if not session.on_demand or self.waiting.get(agent_id) or any(t.streams for t in trunks) \
                        or now - max(t.idle_since for t in trunks) < cfg.trunk_idle_timeout:
                    continue
                log.debug("agent %s: no stream on its trunks for %g s; closing them (closed: idle)", agent_id,
                          cfg.trunk_idle_timeout)
                if session.conn.open:
                    session.ask_trunks(0)
                for trunk in list(trunks):
                    trunk.close("idle")
        for agent_id in list(self.waiting):
            held = [cid for cid in self.waiting[agent_id] if cid in self.router.pending]
            if held:
                self.waiting[agent_id] = held
            else:
                del self.waiting[agent_id]

    def all(self) -> list[Trunk]:
        return [t for trunks in self.trunks.values() for t in trunks] + list(self.retired)

    def close_denied(self) -> None:
        for trunk in self.all():
            if self.port.denied(trunk.owner.conn):  # a revoked agent's trunks close at once, retired ones too
                trunk.close("agent revoked")

    def close(self) -> None:
        for trunk in self.all():
            trunk.close("server stopping")


class WarmPath:
    """Idle per-client data connections, per agent, most recent last."""

    def __init__(self, loop: Loop, config: Callable[[], ServerConfig], port: AgentPort) -> None:
        self.loop = loop
        self._config = config
        self.port = port
        self.router: Routing = None  # type: ignore[assignment]  # set by the composition root
        self.accepting = True  # False while draining: new ones are closed
        self.warm: dict[str, list[FramedConn]] = {}
        self.asked: dict[FramedConn, int] = {}  # connections asked to open, → the client's conn id
        port.handlers[Role.IDLE] = (self._on_idle_message, self._on_idle_close)
        port.handlers[Role.ASKED] = (self._on_reply, self._on_lost)

    def add(self, conn: FramedConn, agent_id: str) -> None:
        conns = self.warm.setdefault(agent_id, [])
        if not self.accepting or agent_id not in self.port.sessions or len(conns) >= self._config().pool_max:
            conn.close("not needed")
            return
        self.port.adopt(conn, Role.IDLE)
        conn.identity = agent_id
        conn.idle_since = self.loop.time()
        conns.append(conn)

    def offer(self, pending: Any) -> bool:
        conns = self.warm.get(pending.agent_id)
        if not conns:
            return False
        conn = conns.pop()
        pending.warm = conn
        conn.role = Role.ASKED
        self.asked[conn] = pending.conn_id
        conn.send("open", conn=pending.conn_id, host=pending.proxy.local_ip, port=pending.proxy.local_port)
        return True

    def _on_idle_message(self, conn: FramedConn, msg: dict) -> None:
        log.warning("agent %s sent %r on an idle data connection; closing it", conn.identity, msg["type"])
        conn.close(f"unexpected {msg['type']}")

    def _on_idle_close(self, conn: FramedConn, reason: str) -> None:
        conns = self.warm.get(conn.identity or "", [])
        if conn in conns:
            conns.remove(conn)

    def _on_reply(self, conn: FramedConn, msg: dict) -> None:
        conn_id = self.asked.get(conn, 0)
        pending = self.router.pending.get(conn_id)
        kind = msg["type"]
        if pending is None:  # the client is gone (timeout): the answer comes too late
            conn.close("late answer")
            return
        if kind == "ready" and msg["conn"] == conn_id:
            del self.asked[conn]
            self.router.take_pending(conn_id)
            if pending.timer:
                pending.timer.cancel()
            self.router.join(pending, conn)
        elif kind == "fail" and msg["conn"] == conn_id:
            del self.asked[conn]
            pending.warm = None
            self.add(conn, pending.agent_id)
            self.router.on_agent_fail(pending.agent_id, conn_id, msg["reason"])
        else:
            log.warning("agent %s answered %r to open on a data connection; closing it", conn.identity, kind)
            conn.close(f"unexpected {kind}")

    def _on_lost(self, conn: FramedConn, reason: str) -> None:
        conn_id = self.asked.pop(conn, 0)
        pending = self.router.pending.get(conn_id)
        if pending is None or pending.warm is not conn:
            return
        pending.warm = None
        session = self.port.online(pending.agent_id)
        if session is None:
            self.router.attempt_failed(pending, f"agent {pending.agent_id} went offline", "agent_offline")
            return
        log.info("connection %d: warm data connection lost (%s); asking agent %s again", conn_id, reason,
                 pending.agent_id)
        self.router.ask_agent(pending, session)

    def sweep(self) -> None:
        """Close idle data connections beyond pool_size that have idled for pool_idle_timeout."""
        now, cfg = self.loop.time(), self._config()
        for conns in self.warm.values():
            extra = len(conns) - cfg.pool_size
            for conn in list(conns):  # oldest first
                if extra <= 0:
                    break
                if now - conn.idle_since >= cfg.pool_idle_timeout:
                    conn.close("idle")
                    extra -= 1

    def count(self, agent_id: str | None = None) -> int:
        if agent_id is not None:
            return len(self.warm.get(agent_id, ()))
        return sum(len(c) for c in self.warm.values())

    def close_agent(self, agent_id: str, reason: str) -> None:
        for conn in list(self.warm.get(agent_id, ())):
            conn.close(reason)

    def close_denied(self) -> None:
        for conns in self.warm.values():
            for conn in list(conns):
                if self.port.denied(conn):
                    conn.close("agent revoked")

    def close(self) -> None:
        for conns in list(self.warm.values()):
            for conn in list(conns):
                conn.close("server stopping")
