"""Counters the daemon keeps, their persistence, and their Prometheus exposition.

Per proxy: bytes in (client → target) and out, connections total, rejections by reason.  Per
agent: bytes and connections.  Live connections add their current byte counts when asked, so
a scrape in the middle of a long transfer sees it move.  The totals survive a reload (they are
in memory) and a restart (the server saves them in its state file, see `Server.save_stats`).

Prometheus: a custom collector reads these at scrape time (no second copy of the numbers),
and two histograms (connection set-up time, heartbeat round trip) live in the same registry;
`exposition()` renders it with prometheus_client's own text format.  Nothing here starts a
thread or an HTTP server: the admin API serves GET /metrics on the loop.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .common import __version__
from .trunk import buffer_usage

if TYPE_CHECKING:
    from .server import Server

REASONS = ("whitelist", "limit", "agent_offline", "target_refused", "timeout")


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


class RecentErrors(logging.Handler):
    """The last warnings and errors of the daemon, for `anywherectl status`."""

    def __init__(self, size: int = 10) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[dict] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append({"time": record.created, "level": record.levelname, "message": record.getMessage()})
        except Exception:  # never let logging break the daemon
            self.handleError(record)


class _Collector:
    def __init__(self, server: "Server") -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        server = self.server
        live_proxy: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        live_agent: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        for tunnel in server.tunnels.values():
            for table, key in ((live_proxy, tunnel.proxy.name), (live_agent, tunnel.proxy.agent_id)):
                row = table[key]
                row[0] += tunnel.relay.bytes_a_to_b
                row[1] += tunnel.relay.bytes_b_to_a
                row[2] += 1
        info = InfoMetricFamily("anywhere_build", "Version and server id of this anywhered")
        info.add_metric([], {"version": __version__, "server_id": server.config.server_id})
        yield info
        yield GaugeMetricFamily("anywhere_uptime_seconds", "Seconds since anywhered started",
                                value=time.monotonic() - server.started)
        usage = buffer_usage()
        yield GaugeMetricFamily("anywhere_buffered_bytes", "Bytes held for clients that read slower than their "
                                "target sends, all connections together", value=usage["held"])
        yield GaugeMetricFamily("anywhere_buffer_committed_bytes", "Bytes held, or in flight or allowed under "
                                "credit returned to agents: what buffer_budget bounds", value=usage["committed"])
        yield GaugeMetricFamily("anywhere_buffer_budget_bytes", "The configured buffer_budget", value=usage["budget"])
        p_in = CounterMetricFamily("anywhere_proxy_bytes_in", "Bytes from clients to the target", labels=["proxy", "agent"])
        p_out = CounterMetricFamily("anywhere_proxy_bytes_out", "Bytes from the target to clients", labels=["proxy", "agent"])
        p_conns = CounterMetricFamily("anywhere_proxy_connections", "Tunneled connections established", labels=["proxy", "agent"])
        p_active = GaugeMetricFamily("anywhere_proxy_connections_active", "Tunneled connections open now", labels=["proxy", "agent"])
        p_rej = CounterMetricFamily("anywhere_proxy_rejections", "Clients refused or closed before joining, by reason",
                                    labels=["proxy", "agent", "reason"])
        p_up = GaugeMetricFamily("anywhere_proxy_enabled", "1 if the proxy accepts clients", labels=["proxy", "agent"])
        for name, counters in sorted(server.proxy_stats.items()):
            proxy = server.proxies.get(name)
            agent = proxy.agent_id if proxy else counters_agent(server, name)
            live = live_proxy.get(name, [0, 0, 0])
            labels = [name, agent]
            p_in.add_metric(labels, counters.bytes_in + live[0])
            p_out.add_metric(labels, counters.bytes_out + live[1])
            p_conns.add_metric(labels, counters.connections)
            p_active.add_metric(labels, live[2])
            for reason, count in counters.rejected.items():
                p_rej.add_metric(labels + [reason], count)
            p_up.add_metric(labels, 1 if proxy is not None and proxy.enabled and not proxy.failed else 0)
        yield from (p_in, p_out, p_conns, p_active, p_rej, p_up)
        a_in = CounterMetricFamily("anywhere_agent_bytes_in", "Bytes sent towards the agent's targets", labels=["agent"])
        a_out = CounterMetricFamily("anywhere_agent_bytes_out", "Bytes from the agent's targets", labels=["agent"])
        a_conns = CounterMetricFamily("anywhere_agent_connections", "Tunneled connections through the agent", labels=["agent"])
        a_active = GaugeMetricFamily("anywhere_agent_connections_active", "Open connections through the agent", labels=["agent"])
        a_up = GaugeMetricFamily("anywhere_agent_connected", "1 if the agent has a session", labels=["agent"])
        a_rtt = GaugeMetricFamily("anywhere_agent_heartbeat_rtt_seconds", "Last heartbeat round trip", labels=["agent"])
        a_warm = GaugeMetricFamily("anywhere_agent_warm_data_connections", "Idle data connections ready", labels=["agent"])
        for agent_id in sorted(set(server.agent_stats) | set(server.sessions)):
            counters = server.agent_stats.get(agent_id, Counters())
            live = live_agent.get(agent_id, [0, 0, 0])
            a_in.add_metric([agent_id], counters.bytes_in + live[0])
            a_out.add_metric([agent_id], counters.bytes_out + live[1])
            a_conns.add_metric([agent_id], counters.connections)
            a_active.add_metric([agent_id], live[2])
            session = server.sessions.get(agent_id)
            a_up.add_metric([agent_id], 1 if session is not None else 0)
            if session is not None and session.rtt is not None:
                a_rtt.add_metric([agent_id], session.rtt)
            a_warm.add_metric([agent_id], len(server.warm.get(agent_id, ())))
        yield from (a_in, a_out, a_conns, a_active, a_up, a_rtt, a_warm)


def counters_agent(server: "Server", proxy_name: str) -> str:
    """The agent of a proxy that no longer exists (its counters stay until restart)."""
    return server.proxy_agents.get(proxy_name, "")


class Metrics:
    """The registry: the collector above plus the two histograms."""

    def __init__(self, server: "Server") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(server))
        self.setup_seconds = Histogram(
            "anywhere_connection_setup_seconds", "From accepting a client to the first byte relayed",
            labelnames=["proxy"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.heartbeat_rtt = Histogram(
            "anywhere_heartbeat_rtt_seconds", "Heartbeat round trip on agents' admin connections",
            labelnames=["agent"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def exposition(self) -> tuple[str, bytes]:
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)
