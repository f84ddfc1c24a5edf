"""Which of a proxy's agents takes a new client, and each agent's passive health for each proxy.

A proxy has one agent or several (`Proxy.agent_ids`, issue 17).  `Balancer.pick` chooses among
the agents usable now: online, and with a live trunk unless it has no trunk at all (then a data
connection or the admin connection's ``open`` serves), and not yet tried for this client.  By the
proxy's `balance`:

  least-connections  the fewest live connections of this proxy (joined or waiting); ties go round
                     the list, so sequential short clients spread too (the default)
  round-robin        the next in the list after the last one chosen
  failover           the first listed: the others only while it cannot serve

Passive health: an agent that failed a client of the proxy (its target refused, no answer within
the attempt's share of data_timeout, its data path lost) is skipped for that proxy during a
back-off of BACKOFF_FIRST seconds, doubled by each failure in a row up to BACKOFF_MAX, and tried
again after it; a client joined through it ends the back-off.  When every usable agent is backing
off they are tried anyway, the one whose back-off ends first first: a likely failure beats a
certain refusal.

It owns the per-(proxy, agent) counts and back-offs; it must not touch sockets or sessions (what
"usable" means comes from the router, as a function).
"""

from __future__ import annotations

from typing import Any, Callable

BACKOFF_FIRST = 2.0  # seconds an agent that failed a proxy's client is skipped for that proxy
BACKOFF_MAX = 30.0


class Balancer:
    def __init__(self, now: Callable[[], float], unusable: Callable[[str], str | None]) -> None:
        self._now = now
        self._unusable = unusable  # agent id → why it cannot take a client now (None: it can)
        self.live: dict[tuple[str, str], int] = {}  # (proxy, agent) → joined + waiting clients
        self.joined: dict[tuple[str, str], int] = {}  # (proxy, agent) → clients joined since start
        self._turn: dict[str, int] = {}  # proxy → index of the agent chosen last (round robin)
        self._backoff: dict[tuple[str, str], tuple[float, float]] = {}  # → (until, length)

    def pick(self, proxy: Any, tried: list[str] | tuple[str, ...] = ()) -> str | None:
        """The agent for a new client of `proxy` (or for its next try); None if no agent can take it."""
        ids = proxy.agent_ids
        if len(ids) == 1:
            return None if ids[0] in tried or self._unusable(ids[0]) else ids[0]
        usable = [a for a in ids if a not in tried and not self._unusable(a)]
        if not usable:
            return None
        now = self._now()
        healthy = [a for a in usable if self.backoff_left(proxy.name, a, now) == 0]
        if not healthy:
            return min(usable, key=lambda a: self._backoff[(proxy.name, a)][0])
        if proxy.balance == "failover":
            return healthy[0]
        start = self._turn.get(proxy.name, -1) + 1
        ring = sorted(healthy, key=lambda a: (ids.index(a) - start) % len(ids))  # from the one after the last
        if proxy.balance == "least-connections":
            ring.sort(key=lambda a: self.live.get((proxy.name, a), 0))  # stable: ties keep the ring's order
        chosen = ring[0]
        self._turn[proxy.name] = ids.index(chosen)
        return chosen

    def backoff_left(self, proxy_name: str, agent_id: str, now: float | None = None) -> float:
        entry = self._backoff.get((proxy_name, agent_id))
        if entry is None:
            return 0.0
        return max(0.0, entry[0] - (self._now() if now is None else now))

    def failed(self, proxy_name: str, agent_id: str) -> float:
        """An agent failed a client of the proxy: its back-off there starts (or doubles); its length."""
        key = (proxy_name, agent_id)
        previous = self._backoff.get(key)
        length = BACKOFF_FIRST if previous is None else min(BACKOFF_MAX, previous[1] * 2)
        self._backoff[key] = (self._now() + length, length)
        return length

    def added(self, proxy_name: str, agent_id: str) -> None:
        key = (proxy_name, agent_id)
        self.live[key] = self.live.get(key, 0) + 1

    def released(self, proxy_name: str, agent_id: str) -> None:
        key = (proxy_name, agent_id)
        self.live[key] -= 1
        if not self.live[key]:
            del self.live[key]

    def succeeded(self, proxy_name: str, agent_id: str) -> None:
        key = (proxy_name, agent_id)
        self.joined[key] = self.joined.get(key, 0) + 1
        self._backoff.pop(key, None)

    def states(self, proxy: Any) -> list[dict]:
        """Each agent of the proxy: online, backing off (with the seconds left) or offline; its counts."""
        now, rows = self._now(), []
        for agent_id in proxy.agent_ids:
            why = self._unusable(agent_id)
            left = self.backoff_left(proxy.name, agent_id, now)
            state = why or ("backing off" if left else "online")
            rows.append({"agent_id": agent_id, "state": state, "backoff": round(left, 1),
                         "connections": self.live.get((proxy.name, agent_id), 0),
                         "connections_total": self.joined.get((proxy.name, agent_id), 0)})
        return rows

    def forget(self, proxy_name: str) -> None:
        """A proxy deleted or removed: its turn and back-offs go (the counts go with their clients)."""
        self._turn.pop(proxy_name, None)
        for key in [k for k in self._backoff if k[0] == proxy_name]:
            del self._backoff[key]
        for key in [k for k in self.joined if k[0] == proxy_name]:
            del self.joined[key]
