"""The server's counters: per proxy and per agent, stored and live, and refusals audited.

Owns `Counters` (bytes in, client → target, and out; connections; rejections by reason) and
`Tally`, the tables the daemon keeps: per proxy, per agent, and which agent a proxy (perhaps
deleted since) belonged to.  Closed connections are added when they close; live ones add their
current byte counts when asked (`live`), so every reader (status, proxy and agent lists,
/metrics) sees a long transfer move, from one sum (`Tally.proxy_row`, `Tally.agent_row`).

Refusals are audited in aggregate: the first of a (proxy, reason, source address) at once, the
ones after it within `LOG_THROTTLE` seconds as one record with their count (`reject`,
`flush_rejects`), so a flood cannot flood the audit log.

It must not decide anything about a connection (that is routing's) and does no I/O but the
audit records; the counters reach the state file through the server's save.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Protocol

from ..audit import AuditLog

REASONS = ("whitelist", "limit", "agent_offline", "target_refused", "timeout")
LOG_THROTTLE = 10.0  # seconds: refusals of one kind from one source after the first, audited as one record
MAX_HELD = 100_000  # keys of refusals held back at most (then all are written)


@dataclass
class Counters:
    bytes_in: int = 0
    bytes_out: int = 0
    connections: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})

    def add(self, bytes_in: int, bytes_out: int) -> None:
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Counters":
        out = cls()
        if not isinstance(data, dict):
            return out
        for name in ("bytes_in", "bytes_out", "connections"):
            value = data.get(name)
            if isinstance(value, int) and value >= 0:
                setattr(out, name, value)
        rejected = data.get("rejected")
        if isinstance(rejected, dict):
            for reason in REASONS:
                value = rejected.get(reason)
                if isinstance(value, int) and value >= 0:
                    out.rejected[reason] = value
        return out


class Live(Protocol):
    """What the tally reads of a live connection (routing.Tunnel)."""

    proxy: Any  # .name, .agent_id
    relay: Any  # .bytes_a_to_b, .bytes_b_to_a


@dataclass
class Row:
    """Stored counters plus the live connections' bytes: what every reader shows."""

    bytes_in: int
    bytes_out: int
    connections_total: int
    active: int
    rejected: dict[str, int]


def live(tunnels: Iterable[Live]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per proxy and per agent: [bytes in, bytes out, connections] of the live connections."""
    by_proxy: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    by_agent: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for tunnel in tunnels:
        relay = tunnel.relay
        for row in (by_proxy[tunnel.proxy.name], by_agent[tunnel.agent_id]):
            row[0] += relay.bytes_a_to_b
            row[1] += relay.bytes_b_to_a
            row[2] += 1
    return by_proxy, by_agent


class Tally:
    def __init__(self, now: Callable[[], float], audit: Callable[[], AuditLog]) -> None:
        self._now = now
        self._audit = audit
        self.proxies: dict[str, Counters] = {}
        self.agents: dict[str, Counters] = {}
        self.proxy_agents: dict[str, str] = {}  # proxy name → agent id, kept for deleted proxies' counters
        self.dirty = False
        # (proxy, reason, source ip) → [first refusal's time, refusals since, agent, target, detail]
        self.rejects_held: dict[tuple, list] = {}

    @staticmethod
    def _get(table: dict[str, Counters], key: str) -> Counters:
        counters = table.get(key)
        if counters is None:
            counters = table[key] = Counters()
        return counters

    def restore(self, stats: dict) -> None:
        for table, key in ((self.proxies, "proxies"), (self.agents, "agents")):
            stored = stats.get(key)
            if isinstance(stored, dict):
                for name, counters in stored.items():
                    table[str(name)] = Counters.from_dict(counters)

    def snapshot(self, proxy_names: Iterable[str]) -> dict:
        names = set(proxy_names)
        return {"proxies": {name: c.to_dict() for name, c in self.proxies.items() if name in names},
                "agents": {agent: c.to_dict() for agent, c in self.agents.items()}}

    def known(self, proxy_name: str, agent_id: str) -> None:
        self.proxy_agents[proxy_name] = agent_id

    def know(self, proxies: Iterable[Any]) -> None:
        """`known` for each proxy (a range's, a reload's)."""
        for proxy in proxies:
            self.proxy_agents[proxy.name] = proxy.agent_id

    def joined(self, proxy_name: str, agent_id: str) -> None:
        self._get(self.proxies, proxy_name).connections += 1
        self._get(self.agents, agent_id).connections += 1
        self.proxy_agents[proxy_name] = agent_id
        self.dirty = True

    def closed(self, proxy_name: str, agent_id: str, bytes_in: int, bytes_out: int) -> None:
        self._get(self.proxies, proxy_name).add(bytes_in, bytes_out)
        self._get(self.agents, agent_id).add(bytes_in, bytes_out)
        self.dirty = True

    # -- reading: stored + live ----------------------------------------------------------------------------
    def totals(self, tunnels: Iterable[Live]) -> Counters:
        total = Counters()
        for counters in self.proxies.values():
            total.add(counters.bytes_in, counters.bytes_out)
            total.connections += counters.connections
            for reason, count in counters.rejected.items():
                total.rejected[reason] += count
        for tunnel in tunnels:
            total.add(tunnel.relay.bytes_a_to_b, tunnel.relay.bytes_b_to_a)
        return total

    @staticmethod
    def _row(counters: Counters | None, now: list[int] | None) -> Row:
        counters = counters or Counters()
        now = now or [0, 0, 0]
        return Row(counters.bytes_in + now[0], counters.bytes_out + now[1], counters.connections, now[2],
                   dict(counters.rejected))

    def proxy_row(self, name: str, by_proxy: dict[str, list[int]]) -> Row:
        return self._row(self.proxies.get(name), by_proxy.get(name))

    def agent_row(self, agent_id: str, by_agent: dict[str, list[int]]) -> Row:
        return self._row(self.agents.get(agent_id), by_agent.get(agent_id))

    # -- refusals ------------------------------------------------------------------------------------------
    def reject(self, proxy: Any, reason: str, peer: str, detail: str) -> None:
        """Count a refused client and audit it: the first refusal of a (proxy, reason, source address)
        at once, the ones after it within LOG_THROTTLE seconds as one record with their count."""
        self._get(self.proxies, proxy.name).rejected[reason] += 1
        self.dirty = True
        audit = self._audit()
        if not audit.target:
            return
        key = (proxy.name, reason, peer.rsplit(":", 1)[0].strip("[]"))
        held = self.rejects_held.get(key)
        if held is not None:
            held[1] += 1
            return
        audit.write("connection", proxy=proxy.name, agent=proxy.agent_id, source=peer, target=proxy.target,
                    bytes_in=0, bytes_out=0, duration=0.0, reason=reason, detail=detail)
        if len(self.rejects_held) >= MAX_HELD:
            self.flush_rejects(None)
        self.rejects_held[key] = [self._now(), 0, proxy.agent_id, proxy.target, detail]

    def flush_rejects(self, now: float | None) -> None:
        """Audit the refusals held back since their key's first one (all of them when `now` is None)."""
        audit = self._audit()
        for key, (first, count, agent, target, detail) in list(self.rejects_held.items()):
            if now is not None and now - first < LOG_THROTTLE:
                continue
            del self.rejects_held[key]
            if count:
                name, reason, source = key
                audit.write("connection", proxy=name, agent=agent, source=source, target=target, bytes_in=0,
                            bytes_out=0, duration=0.0, reason=reason, detail=detail, count=count,
                            note=f"{count} more refused like this within {LOG_THROTTLE:.0f} s of the first")
