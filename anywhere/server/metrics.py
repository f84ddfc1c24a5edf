"""Prometheus exposition of the server's counters, and the recent errors `status` shows.

Owns the exposition: `render` reads `Source` (views.View) at scrape time, so there is no second
copy of the numbers, and writes the server's families in the text format itself (see `render`);
two histograms (connection set-up time, heartbeat round trip) live in a prometheus_client
registry, written after them by its generate_latest.  The
counters themselves live in counters.py.  Nothing here starts a thread or an HTTP server: the
admin API serves GET /metrics on the loop.  It must not import the daemon: it sees only `Source`.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Iterator, Protocol

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

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


def _esc(value: str) -> str:
    """A label value as the text format quotes it (as prometheus_client does)."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value


def _num(value: float) -> str:
    """A sample value as prometheus_client writes it (Go's float format); small whole numbers,
    nearly all of them, without the call."""
    if type(value) is int and 0 <= value < 1_000_000:
        return f"{value}.0"
    return floatToGoString(value)


class _Family:
    """One metric family's lines: its HELP and TYPE, then a sample per label set."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name + "_total" if kind == "counter" else name
        self.lines = [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {kind}"]

    def add(self, labels: str, value: float) -> None:
        """`labels`: already rendered, with braces ("" for none; see `_labels`)."""
        self.lines.append(f"{self.name}{labels} {_num(value)}")


def _labels(**values: str) -> str:
    """Rendered once per agent or proxy and reused by every family: sorted by name, escaped."""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(values.items())) + "}"


def _traffic(of: str, bytes_in: str, bytes_out: str, connections: str, active: str) -> list[_Family]:
    """The four families a proxy and an agent both have, in this order (`_add_traffic`)."""
    return [_Family(f"anywhere_{of}_bytes_in", "counter", bytes_in),
            _Family(f"anywhere_{of}_bytes_out", "counter", bytes_out),
            _Family(f"anywhere_{of}_connections", "counter", connections),
            _Family(f"anywhere_{of}_connections_active", "gauge", active)]


def _add_traffic(families: list[_Family], labels: str, row: Any) -> None:
    for family, value in zip(families, (row.bytes_in, row.bytes_out, row.connections_total, row.active)):
        family.add(labels, value)


def render(source: "Source") -> str:
    """The server's own families in the text format, written here rather than through
    prometheus_client's families and generate_latest: at 5,000 agents that took 1.1 s of the loop
    per scrape (a call per sample to escape its labels and format its value), this about a
    fifth.  The output is byte for byte what prometheus_client wrote (tests/test_observe.py)."""
    out = _Family("anywhere_build_info", "gauge", "Version and server id of this anywhered")
    out.add(_labels(version=__version__, server_id=source.server_id()), 1)
    families = [out]

    def gauge(name: str, help_text: str, value: float) -> None:
        family = _Family(name, "gauge", help_text)
        family.add("", value)
        families.append(family)
    gauge("anywhere_uptime_seconds", "Seconds since anywhered started", source.uptime())
    usage = buffer_usage()
    gauge("anywhere_buffered_bytes", "Bytes held for clients that read slower than their target sends, all "
          "connections together", usage["held"])
    gauge("anywhere_buffer_committed_bytes", "Bytes held, or in flight or allowed under credit returned to agents: "
          "what buffer_budget bounds", usage["committed"])
    gauge("anywhere_buffer_budget_bytes", "The configured buffer_budget", usage["budget"])
    proxies = _traffic("proxy", "Bytes from clients to the target", "Bytes from the target to clients",
                       "Tunneled connections established", "Tunneled connections open now")
    p_rej = _Family("anywhere_proxy_rejections", "counter", "Clients refused or closed before joining, by reason")
    p_up = _Family("anywhere_proxy_enabled", "gauge", "1 if the proxy accepts clients")
    for name, agent, row, up in source.proxy_rows():
        labels = _labels(proxy=name, agent=agent)
        _add_traffic(proxies, labels, row)
        for reason, count in row.rejected.items():
            p_rej.add(_labels(proxy=name, agent=agent, reason=reason), count)
        p_up.add(labels, 1 if up else 0)
    families += proxies + [p_rej, p_up]
    agents = _traffic("agent", "Bytes sent towards the agent's targets", "Bytes from the agent's targets",
                      "Tunneled connections through the agent", "Open connections through the agent")
    a_up = _Family("anywhere_agent_connected", "gauge", "1 if the agent has a session")
    a_rtt = _Family("anywhere_agent_heartbeat_rtt_seconds", "gauge", "Last heartbeat round trip")
    a_warm = _Family("anywhere_agent_warm_data_connections", "gauge", "Idle data connections ready")
    for agent_id, row, connected, rtt, warm in source.agent_rows():
        labels = _labels(agent=agent_id)
        _add_traffic(agents, labels, row)
        a_up.add(labels, 1 if connected else 0)
        if rtt is not None:
            a_rtt.add(labels, rtt)
        a_warm.add(labels, warm)
    families += agents + [a_up, a_rtt, a_warm]
    return "".join(line + "\n" for family in families for line in family.lines)


class Metrics:
    """The registry: the collector above plus the two histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.source: Source | None = None
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
        self.source = source

    def exposition(self) -> tuple[str, bytes]:
        """The server's families (`render`), then the histograms (prometheus_client's own)."""
        own = render(self.source).encode("utf-8") if self.source is not None else b""
        return CONTENT_TYPE_LATEST, own + generate_latest(self.registry)
