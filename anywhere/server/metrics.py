"""Prometheus exposition of the server's counters, and the recent errors `status` shows.

Owns the registry: a custom collector that reads `Source` (views.View) at scrape time, so there is
no second copy of the numbers, and two histograms (connection set-up time, heartbeat round trip)
in the same registry; `exposition()` renders it with prometheus_client's own text format.  The
counters themselves live in counters.py.  Nothing here starts a thread or an HTTP server: the
admin API serves GET /metrics on the loop.  It must not import the daemon: it sees only `Source`.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Iterator, Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..common import __version__
from ..trunk import buffer_usage


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


class Source(Protocol):
    """What the collector reads at scrape time (views.View)."""

    def server_id(self) -> str: ...
    def uptime(self) -> float: ...
    def proxy_rows(self) -> Iterator[tuple[str, str, Any, bool]]: ...
    def agent_rows(self) -> Iterator[tuple[str, Any, bool, float | None, int]]: ...


class _Collector:
    def __init__(self) -> None:
        self.source: Source | None = None

    def collect(self) -> Iterator[Any]:
        source = self.source
        if source is None:
            return
        info = InfoMetricFamily("anywhere_build", "Version and server id of this anywhered")
        info.add_metric([], {"version": __version__, "server_id": source.server_id()})
        yield info
        yield GaugeMetricFamily("anywhere_uptime_seconds", "Seconds since anywhered started", value=source.uptime())
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
        for name, agent, row, up in source.proxy_rows():
            labels = [name, agent]
            p_in.add_metric(labels, row.bytes_in)
            p_out.add_metric(labels, row.bytes_out)
            p_conns.add_metric(labels, row.connections_total)
            p_active.add_metric(labels, row.active)
            for reason, count in row.rejected.items():
                p_rej.add_metric(labels + [reason], count)
            p_up.add_metric(labels, 1 if up else 0)
        yield from (p_in, p_out, p_conns, p_active, p_rej, p_up)
        a_in = CounterMetricFamily("anywhere_agent_bytes_in", "Bytes sent towards the agent's targets", labels=["agent"])
        a_out = CounterMetricFamily("anywhere_agent_bytes_out", "Bytes from the agent's targets", labels=["agent"])
        a_conns = CounterMetricFamily("anywhere_agent_connections", "Tunneled connections through the agent", labels=["agent"])
        a_active = GaugeMetricFamily("anywhere_agent_connections_active", "Open connections through the agent", labels=["agent"])
        a_up = GaugeMetricFamily("anywhere_agent_connected", "1 if the agent has a session", labels=["agent"])
        a_rtt = GaugeMetricFamily("anywhere_agent_heartbeat_rtt_seconds", "Last heartbeat round trip", labels=["agent"])
        a_warm = GaugeMetricFamily("anywhere_agent_warm_data_connections", "Idle data connections ready", labels=["agent"])
        for agent_id, row, connected, rtt, warm in source.agent_rows():
            a_in.add_metric([agent_id], row.bytes_in)
            a_out.add_metric([agent_id], row.bytes_out)
            a_conns.add_metric([agent_id], row.connections_total)
            a_active.add_metric([agent_id], row.active)
            a_up.add_metric([agent_id], 1 if connected else 0)
            if rtt is not None:
                a_rtt.add_metric([agent_id], rtt)
            a_warm.add_metric([agent_id], warm)
        yield from (a_in, a_out, a_conns, a_active, a_up, a_rtt, a_warm)


class Metrics:
    """The registry: the collector above plus the two histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _Collector()
        self.registry.register(self._collector)
        self.setup_seconds = Histogram(
            "anywhere_connection_setup_seconds", "From accepting a client to the first byte relayed",
            labelnames=["proxy"], registry=self.registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        # all agents together: one histogram per agent would be 17 series each (a fleet's scrape
        # grew by 85,000 lines at 5,000 agents); each agent's last round trip is a gauge above
        self.heartbeat_rtt = Histogram(
            "anywhere_heartbeat_rtt_seconds", "Heartbeat round trip on agents' admin connections, all agents "
            "together (each agent's last: anywhere_agent_heartbeat_rtt_seconds)", registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def attach(self, source: Source) -> None:
        """What the collector reads from now on (set once the server's parts exist)."""
        self._collector.source = source

    def exposition(self) -> tuple[str, bytes]:
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)
