"""`View`: what the admin API and the metrics may read and do, over the server's parts.

Owns the read side of the daemon as plain data (status, agents, proxies, connections, and the
rows /metrics exposes), computed from the parts' tables with one sum of stored and live counters
(counters.py), and forwards the operations to `Operations` (the server: core.Server satisfies it,
this module does not import it).  api.py and metrics.py see only this: a narrow interface, so
neither they nor this module import the daemon back.

It must not change anything itself: every change goes through an operation of the server,
which saves it before it is reported done.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

from ..audit import AuditLog
from ..common import __version__
from ..loop import Loop
from ..trunk import buffer_usage
from .counters import Tally, live
from .paths import TrunkPath, WarmPath
from .proxies import ProxyTable
from .proxy import Proxy
from .ranges import port_order
from .routing import Router
from .sessions import AgentPort
from .settings import ServerConfig


class Operations(Protocol):
    """The changes the API may ask for (core.Server)."""

    audit: AuditLog
    draining: bool
    reload_hook: Callable[[], dict] | None
    recent_errors: Any

    def add_proxy(self, body: Any) -> Proxy | list[Proxy]: ...
    def delete_proxy(self, key: str, protocol: str | None = None) -> tuple[Proxy | list[Proxy], int]: ...
    def set_proxy_enabled(self, key: str, enabled: bool, protocol: str | None = None) -> Proxy: ...
    def disconnect_agent(self, agent_id: str) -> int: ...


class View:
    def __init__(self, loop: Loop, config: Callable[[], ServerConfig], started: tuple[float, float],
                 proxies: ProxyTable, router: Router, ops: Operations) -> None:
        self.loop, self._config, self.ops = loop, config, ops
        self.started, self.started_wall = started  # loop time, wall time
        self.proxies_table, self.router = proxies, router
        # the parts routing works with, read here too
        self.port: AgentPort = router.port
        self.trunks: TrunkPath = router.trunks
        self.warm: WarmPath = router.warm
        self.tally: Tally = router.tally

    # -- reading -----------------------------------------------------------------------------------------
    def status(self) -> dict:
        router = self.router
        totals = self.tally.totals(router.tunnels.values())
        usage = buffer_usage()
        return {"server_id": self._config().server_id, "version": __version__,
                "uptime": round(self.loop.time() - self.started, 3), "started": self.started_wall,
                "agents": len(self.port.sessions), "proxies": len(self.proxies_table),
                "proxies_failed": sorted(p.name for p in self.proxies_table if p.failed),
                "connections": len(router.tunnels),
                "pending": len(router.pending), "bytes_in": totals.bytes_in, "bytes_out": totals.bytes_out,
                "connections_total": totals.connections, "rejected": totals.rejected,
                "warm_data_connections": self.warm.count(), "tls_handshakes": self.port.handshakes,
                "trunks": sum(len(t) for t in self.trunks.trunks.values()), "retired_trunks": len(self.trunks.retired),
                "buffered_bytes": usage["held"], "buffer_committed_bytes": usage["committed"],
                "buffer_budget": usage["budget"],
                "draining": self.ops.draining, "last_errors": list(self.ops.recent_errors.records)}

    def agents(self) -> list[dict]:
        _, by_agent = live(self.router.tunnels.values())
        return [self._agent(a, by_agent) for a in sorted(self.port.sessions)]

    def _agent(self, agent_id: str, by_agent: dict[str, list[int]]) -> dict:
        session = self.port.sessions[agent_id]
        row = self.tally.agent_row(agent_id, by_agent)
        trunks, now, hb = self.trunks.trunks.get(agent_id, ()), self.loop.time(), self._config().heartbeat
        return {"agent_id": agent_id, "address": session.address, "version": session.version,
                "connected_since": session.since, "rtt_ms": None if session.rtt is None else round(session.rtt * 1000, 3),
                "last_heartbeat": session.last_pong, "connections": row.active, "connections_total": row.connections_total,
                "bytes_in": row.bytes_in, "bytes_out": row.bytes_out,
                "warm": self.warm.count(agent_id), "trunks": len(trunks),
                "trunks_stale": sum(1 for t in trunks if t.stale(now, hb)),
                "trunk_rtt_ms": [None if t.rtt is None else round(t.rtt * 1000, 3) for t in trunks]}

    def proxies(self) -> list[dict]:
        by_proxy, _ = live(self.router.tunnels.values())
        out = []
        for proxy in sorted(self.proxies_table, key=port_order):
            row = self.tally.proxy_row(proxy.name, by_proxy)
            item = proxy.to_dict()
            item.update(state=self.proxies_table.state(proxy), failed=proxy.failed, source=proxy.source,
                        bandwidth=proxy.bandwidth,
                        health=self.health(proxy))
            agents = self.router.balancer.states(proxy)
            item.update(agent_ids=list(proxy.agent_ids), balance=proxy.balance, proxy_protocol=proxy.proxy_protocol,
                        agents=agents,
                        agent_online=any(a["state"] in ("online", "backing off") for a in agents),
                        connections=row.active,
                        connections_total=row.connections_total, rejected=row.rejected,
                        bytes_in=row.bytes_in, bytes_out=row.bytes_out, protocol=proxy.protocol)
            if proxy.protocol == "udp":
                udp = self.router.udp
                item.update(udp_idle_timeout=proxy.udp_idle_timeout, max_flows=proxy.max_flows,
                            flows=udp.per_proxy.get(proxy.name, 0) if udp else 0,
                            datagrams_dropped=udp.dropped.get(proxy.name, 0) if udp else 0)
            out.append(item)
        return out

    def health(self, proxy: Proxy) -> str | None:
        """None if the proxy can serve a client now (enabled, listening, an agent online with a live
        trunk or a data path; with proxy_protocol, trunks that announce it); else why not, in one line
        (for load balancers: GET .../health)."""
        if not proxy.enabled:
            return "proxy disabled"
        state = self.proxies_table.state(proxy)
        if state != "listening":
            return f"proxy {state}" + (f": {proxy.failed}" if proxy.failed else "")
        why = {a: self.trunks.unusable(a) or self._too_old(proxy, a) for a in proxy.agent_ids}
        if any(reason is None for reason in why.values()):
            return None
        return "no agent can serve: " + ", ".join(f"{a} {reason}" for a, reason in why.items())

    def _too_old(self, proxy: Proxy, agent_id: str) -> str | None:
        """For a proxy with proxy_protocol: whether the agent's trunks all fail to announce it (paths.py)."""
        trunks = self.trunks.trunks.get(agent_id)
        if proxy.proxy_protocol is None or not trunks or any(t.takes_pp for t in trunks):
            return None
        return "too old for proxy_protocol"

    def connections(self) -> list[dict]:
        now = self.loop.time()
        return [t.to_dict(now) for t in sorted(self.router.tunnels.values(), key=lambda t: t.conn_id)]

    # -- for /metrics ------------------------------------------------------------------------------------
    def server_id(self) -> str:
        return self._config().server_id

    def uptime(self) -> float:
        return self.loop.time() - self.started

    def proxy_rows(self) -> Iterator[tuple[str, str, Any, bool]]:
        """(proxy name, agent, Row, accepting) for every proxy with counters, deleted ones too."""
        by_proxy, _ = live(self.router.tunnels.values())
        for name in sorted(self.tally.proxies):
            proxy = self.proxies_table.by_name.get(name)
            agent = proxy.agent_id if proxy else self.tally.proxy_agents.get(name, "")
            up = proxy is not None and proxy.enabled and not proxy.failed
            yield name, agent, self.tally.proxy_row(name, by_proxy), up

    def agent_rows(self) -> Iterator[tuple[str, Any, bool, float | None, int]]:
        """(agent, Row, connected, heartbeat RTT, warm data connections) for every agent known."""
        _, by_agent = live(self.router.tunnels.values())
        for agent_id in sorted(set(self.tally.agents) | set(self.port.sessions)):
            session = self.port.sessions.get(agent_id)
            yield (agent_id, self.tally.agent_row(agent_id, by_agent), session is not None,
                   None if session is None else session.rtt, self.warm.count(agent_id))

    # -- doing (each forwarded to the server) ------------------------------------------------------------
    @property
    def audit(self) -> AuditLog:
        return self.ops.audit

    @property
    def reload_hook(self) -> Callable[[], dict] | None:
        return self.ops.reload_hook

    def add_proxy(self, body: Any) -> Proxy | list[Proxy]:
        return self.ops.add_proxy(body)

    def delete_proxy(self, key: str, protocol: str | None = None) -> tuple[Proxy | list[Proxy], int]:
        return self.ops.delete_proxy(key, protocol)

    def set_proxy_enabled(self, key: str, enabled: bool, protocol: str | None = None) -> Proxy:
        return self.ops.set_proxy_enabled(key, enabled, protocol)

    def disconnect_agent(self, agent_id: str) -> int:
        return self.ops.disconnect_agent(agent_id)

    def find_proxy(self, key: str, protocol: str | None = None) -> Proxy:
        return self.proxies_table.find(key, protocol)

    def kill(self, conn_ids: list[int]) -> None:
        for cid in conn_ids:
            self.router.tunnels[cid].relay.close("killed by the operator")

    def connection_ids(self, proxy: Proxy | None = None) -> list[int]:
        return sorted(cid for cid, t in self.router.tunnels.items() if proxy is None or t.proxy.name == proxy.name)
