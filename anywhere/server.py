"""anywhered: agents in on the agent port, clients in on each proxy's public port, joined.

Theory of operation
-------------------
*Agent port* (1111): every connection is mutual TLS (`FramedConn`).  Its first control frame
decides what it is.  ``hello`` makes it the admin connection of an `AgentSession` — after the id
it claims has been checked against its certificate's identity — and replaces any older session
of the same agent at once (the old connection is closed, nothing else is touched).  ``data``
names a pending client connection; the server answers ``ready`` and hands both sockets to a
`Relay`.  A connection that sends neither within the hello timeout is dropped.

*Proxy ports*: each `Proxy` owns its listeners.  An accepted client is checked against the
proxy's whitelist (or the global one); then, if its agent has a session, it becomes a
`Pending` entry (keyed by a connection id) and the agent is sent ``open``.  The pending client
is closed, with the reason logged, when the agent reports ``fail``, when no data connection
arrives within `data_timeout`, or when the agent is offline to begin with.  Pending entries are
kept by the server, not the session: a data connection that arrives after its agent's admin
connection was replaced still finds its client.

*Heartbeats*: each side pings every `heartbeat` seconds and declares the peer dead after three
intervals with nothing received.  Joined data connections do not depend on the admin
connection and carry on through its loss.

*Admin API*: the methods ``api_*`` are the operations behind `admin.py`'s routes; they raise
`ApiError` with a 4xx status for bad requests, and every change to the proxies is saved
(`state.py`) before it is reported as done.

*Stored proxies*: a stored proxy whose port cannot be bound at start (busy, or the agent port
now) stays, marked failed with the reason: listed, counted, saved, retried every
`PROXY_RETRY` seconds until its port is free, and ``enable`` tries it at once.  A stored entry
that is not valid is not served but is kept as it is, and written back in every save.  Only
``delete`` removes a proxy from the state file (`state.Store` refuses a save that loses one).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable

from . import state, tls
from .admin import AdminServer, ApiError, listen_unix
from .api import Api
from .audit import AuditLog
from .common import __version__
from .common import printable, valid_agent_id
from .framed import FramedConn
from .loop import Loop, Timer
from .net import HOSTNAME_RE, Acceptor, accepted, client_ip, format_addr, is_ip, listen
from . import mux
from .relay import Relay
from .trunk import BUFFER_BUDGET, Stream, Trunk, set_buffer_budget
from .stats import Counters, Metrics, RecentErrors
from .wire import MAX_HEARTBEAT, MAX_POOL, MAX_TRUNKS, PROTO_VERSION, encode

log = logging.getLogger("anywhere.server")

ACCEPT_BUDGET = 64
POOL_SWEEP = 5.0
IDLE_SWEEP = 1.0
LOG_THROTTLE = 10.0
MAX_RATE_ENTRIES = 100_000
PROXY_RETRY = 2.0  # seconds between tries to bind the port of a failed proxy
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class ServerConfig:
    port: int = 1111
    bind: list[str] = field(default_factory=lambda: [""])
    proxy_bind: list[str] = field(default_factory=lambda: [""])
    server_id: str = "anywhered"
    ca: str = "credential/ca.crt"
    cert: str = "credential/server.crt"
    key: str = "credential/server.key"
    whitelist: list[str] = field(default_factory=list)
    admin_socket: str = "/run/anywhere/anywhered.sock"
    state_dir: str = "/var/lib/anywhere"
    data_timeout: float = 10.0
    heartbeat: float = 5.0
    handshake_timeout: float = 10.0
    pool_size: int = 2  # trunks each agent keeps (at most 16); 0: a data connection per client
    pool_max: int = 256  # idle data connections kept per agent at most (reused ones included)
    pool_idle_timeout: float = 60.0  # idle ones beyond pool_size are closed after this
    audit_log: str = ""  # "", "journal" or a file
    api_listen: list[str] = field(default_factory=list)  # REST port: ["HOST:PORT", ...]; empty: off
    api_token_file: str | None = None
    metrics_public: bool = False
    # limits: each bites with a log line and a "limit" rejection
    max_connections: int = 10000  # live tunneled connections in total
    max_connections_per_proxy: int = 2000
    rate_limit: int = 60000  # new clients a minute from one source address, per proxy, sustained (0: no limit)
    rate_burst: int = 2000  # of which this many may come at once (a token bucket; at most rate_limit)
    max_agents: int = 1000
    max_pending_per_agent: int = 512  # clients waiting for their agent's data connection
    max_unauthenticated: int = 1000  # agent-port connections still in their handshake or hello
    max_unauthenticated_per_source: int = 500  # of those, from one address (never more than half of the above)
    buffer_budget: int = BUFFER_BUDGET  # bytes held for clients that read slower than their target sends
    idle_timeout: float = 0.0  # close tunneled connections idle this long (0: never); a proxy may set its own
    admin_timeout: float = 10.0
    admin_max_request: int = 65536
    deny: list[str] = field(default_factory=list)  # agent ids, or serial:HEX, refused and dropped
    admin_group: str = "anywhere"  # besides root (and our own user), members may use the admin socket
    stats_save_interval: float = 30.0  # the counters are written this often (in the background)


def parse_whitelist(entries: Any, what: str = "whitelist") -> list[Network]:
    """IPs and CIDRs (v4 and v6), as a list or one comma-separated string.  ValueError names the bad one."""
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [e for e in entries.split(",") if e.strip()]
    if not isinstance(entries, list):
        raise ValueError(f"{what} must be a list of IP addresses or CIDRs")
    nets: list[Network] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"{what} entry {entry!r} is not an IP address or CIDR")
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{what} entry {entry.strip()!r} is not an IP address or CIDR") from None
    return nets


def check_welcome(config: ServerConfig) -> None:
    """ValueError unless the welcome this configuration makes can be sent (wire.py's ranges).

    Checked at start and reload, so that no agent's hello can go unanswered for a bad setting.
    """
    try:
        encode("welcome", proto=PROTO_VERSION, server_id=config.server_id, heartbeat=config.heartbeat,
               pool=config.pool_size)
    except ValueError as exc:
        raise ValueError(f"agents could not be welcomed with this configuration ({exc}): heartbeat must be more "
                         f"than 0 and at most {MAX_HEARTBEAT} seconds, pool_size 0..{MAX_POOL}") from None


def read_token(path: str | None) -> str:
    """The REST port's bearer token: the first line of a file that only its owner may read."""
    if not path:
        raise ValueError("the REST port needs a token: set api_token_file (a file of mode 0600)")
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as exc:
        raise ValueError(f"api_token_file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ValueError(f"api_token_file {path}: mode {oct(mode & 0o777)[2:]} lets others read the token; use 0600")
    if len(token) < 16:
        raise ValueError(f"api_token_file {path}: the token must be at least 16 characters")
    return token


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _why(exc: Exception) -> str:
    return str(getattr(exc, "strerror", None) or exc)


def allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in nets)


@dataclass
class Proxy:
    name: str
    agent_id: str
    local_ip: str
    local_port: int
    remote_port: int
    whitelist: list[str]
    enabled: bool = True
    idle_timeout: float = 0.0  # 0: the server's idle_timeout
    nets: list[Network] = field(repr=False, default_factory=list)
    listeners: list[Acceptor] = field(repr=False, default_factory=list)
    failed: str | None = None  # enabled but not listening: why (retried; not stored)

    def to_dict(self) -> dict:
        return {"name": self.name, "agent_id": self.agent_id, "local_ip": self.local_ip,
                "local_port": self.local_port, "remote_port": self.remote_port, "whitelist": list(self.whitelist),
                "enabled": self.enabled, "idle_timeout": self.idle_timeout}

    @property
    def target(self) -> str:
        return f"[{self.local_ip}]:{self.local_port}" if ":" in self.local_ip else f"{self.local_ip}:{self.local_port}"


def validate_proxy(spec: Any) -> Proxy:
    """A Proxy from an API body or the state file; ApiError(400) names the bad field."""
    if not isinstance(spec, dict):
        raise ApiError(400, "the body must be a JSON object describing the proxy")
    known = {"name", "agent_id", "local_ip", "local_port", "remote_port", "whitelist", "enabled", "idle_timeout"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
    agent_id = spec.get("agent_id")
    if not isinstance(agent_id, str) or not valid_agent_id(agent_id):
        raise ApiError(400, f"agent_id {agent_id!r} is not valid: 1-64 letters, digits, '.', '_' or '-'")
    local_ip = spec.get("local_ip")
    if not isinstance(local_ip, str) or not (is_ip(local_ip) or HOSTNAME_RE.fullmatch(local_ip)):
        raise ApiError(400, f"local_ip {local_ip!r} is not an IP address or host name")
    ports = {}
    for key in ("local_port", "remote_port"):
        value = spec.get(key)
        if isinstance(value, str) and (value.isascii() and value.isdigit()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise ApiError(400, f"{key} {value!r} must be a port number 1..65535")
        ports[key] = value
    whitelist_raw = spec.get("whitelist") or []
    try:
        nets = parse_whitelist(whitelist_raw)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    whitelist = [str(n) for n in nets]
    name = spec.get("name") or f"{agent_id}:{ports['remote_port']}"
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or (name.isascii() and name.isdigit()):
        raise ApiError(400, f"name {name!r} is not valid: 1-64 letters, digits, '.', '_', ':' or '-', not all digits")
    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ApiError(400, f"enabled {enabled!r} must be true or false")
    idle = spec.get("idle_timeout", 0)
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 <= idle <= 86400 * 7:
        raise ApiError(400, f"idle_timeout {idle!r} must be a number of seconds 0..604800 (0: the server's default)")
    return Proxy(name=name, agent_id=agent_id, local_ip=local_ip, local_port=ports["local_port"], enabled=enabled,
                 remote_port=ports["remote_port"], whitelist=whitelist, nets=nets, idle_timeout=float(idle))


class AgentSession:
    """One connected agent: its admin connection and heartbeats."""

    def __init__(self, server: "Server", conn: FramedConn, agent_id: str, version: str) -> None:
        self.server = server
        self.conn = conn
        self.agent_id = agent_id
        self.version = version
        self.address = conn.peer
        self.since = server.wall_time()
        self.rtt: float | None = None
        self.last_pong: float | None = None
        self._seq = 0
        self._ping_sent: dict[int, float] = {}
        self.token = secrets.randbits(62) + 1  # in welcome; the agent's trunks name it (their owner)
        self._timer: Timer = server.loop.call_later(server.config.heartbeat, self._tick)

    def _tick(self) -> None:
        loop, hb = self.server.loop, self.server.config.heartbeat
        if not self.conn.open:
            return
        if loop.time() - self.conn.last_rx > 3 * hb:
            log.warning("agent %s (%s): no heartbeat for %.0f s; closing its session", self.agent_id, self.address, 3 * hb)
            self.conn.close("heartbeat timeout")
            return
        self._seq += 1
        self._ping_sent = {self._seq: loop.time()}
        self.conn.send("ping", seq=self._seq)
        self._timer = loop.call_later(hb, self._tick)
        self.server.check_trunks(self)

    def on_message(self, conn: FramedConn, msg: dict) -> None:
        kind = msg["type"]
        if kind == "ping":
            conn.send("pong", seq=msg["seq"])
        elif kind == "pong":
            sent = self._ping_sent.pop(msg["seq"], None)
            if sent is not None:
                self.rtt = self.server.loop.time() - sent
                self.last_pong = self.server.wall_time()
                self.server.metrics.heartbeat_rtt.labels(self.agent_id).observe(self.rtt)
        elif kind == "fail":
            self.server.on_agent_fail(self.agent_id, msg["conn"], printable(msg["reason"]))
        else:
            log.warning("agent %s (%s) sent an unexpected %r on its admin connection; closing it",
                        self.agent_id, self.address, kind)
            conn.close(f"unexpected {kind}")

    def stop(self) -> None:
        self._timer.cancel()

    def to_dict(self) -> dict:
        return {"agent_id": self.agent_id, "address": self.address, "version": self.version,
                "connected_since": self.since, "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
                "connections": self.server.count_connections(agent_id=self.agent_id),
                "warm": len(self.server.warm.get(self.agent_id, ()))}


@dataclass
class Pending:
    conn_id: int
    proxy: Proxy
    sock: socket.socket
    peer: str
    started: float
    timer: Timer | None = None
    warm: FramedConn | None = None  # the warm data connection asked to serve it, if any
    stream: Any = None  # the trunk stream opened for it, if any


@dataclass
class Tunnel:
    conn_id: int
    proxy: Proxy
    peer: str
    relay: Relay
    started: float
    started_wall: float

    def to_dict(self, now: float) -> dict:
        return {"id": self.conn_id, "proxy": self.proxy.name, "agent_id": self.proxy.agent_id,
                "source": self.peer, "target": self.proxy.target, "remote_port": self.proxy.remote_port,
                "bytes_in": self.relay.bytes_a_to_b, "bytes_out": self.relay.bytes_b_to_a,
                "age": round(now - self.started, 3), "since": self.started_wall}


class Server:
    def __init__(self, loop: Loop, config: ServerConfig) -> None:
        import time as _time
        self.wall_time = _time.time
        self.loop = loop
        self.config = config
        self.started_wall = self.wall_time()
        self.started = loop.time()
        self.ctx: ssl.SSLContext | None = None
        self.global_nets = parse_whitelist(config.whitelist, "--wl")
        self.agent_listeners: list[Acceptor] = []
        self.handshaking: dict[FramedConn, str] = {}  # agent-port connections before their hello → source IP
        self.handshaking_per_ip: dict[str, int] = {}
        self.sessions: dict[str, AgentSession] = {}
        self.proxies: dict[str, Proxy] = {}
        self.store = state.Store(config.state_dir)
        self.unrestored: list[Any] = []  # stored entries not valid: not served, written back as they are
        self._retry_timer: Timer | None = None  # armed while a proxy has failed
        self.pending: dict[int, Pending] = {}
        self.tunnels: dict[int, Tunnel] = {}
        self.warm: dict[str, list[FramedConn]] = {}  # per agent, idle data connections, most recent last
        self.trunks: dict[str, list[Trunk]] = {}  # per agent, the current session's trunks
        self.retired_trunks: set[Trunk] = set()  # of sessions that are over, closed with their last stream
        self.waiting_for_trunk: dict[str, list[int]] = {}  # per agent, clients held while every trunk is stale
        self.handshakes = 0  # TLS handshakes completed on the agent port
        self.proxy_stats: dict[str, Counters] = {}
        self.agent_stats: dict[str, Counters] = {}
        self.proxy_agents: dict[str, str] = {}  # proxy name → agent id, kept for deleted proxies' counters
        self.stats_dirty = False
        self.live_per_proxy: dict[str, int] = {}  # tunnels + pending clients per proxy
        self.pending_per_agent: dict[str, int] = {}
        self.rates: dict[tuple, tuple[float, float]] = {}  # (proxy, source ip) → (tokens, when counted)
        self.log_throttle: dict[tuple, tuple[float, int]] = {}
        # (proxy, reason, source ip) → [first refusal's time, refusals since, agent, target, detail]
        self.rejects_held: dict[tuple, list] = {}
        self.metrics = Metrics(self)
        self._setup_children: dict[str, Any] = {}  # proxy name -> its setup_seconds child (labels() once)
        self.recent_errors = RecentErrors()
        logging.getLogger("anywhere").addHandler(self.recent_errors)
        self.audit = AuditLog()
        self.api_token: str | None = None
        self.admin = AdminServer(loop, Api(self).handle)
        self._next_id = secrets.randbits(30) + 1
        self.closed = False
        self.draining = False
        # set by the entry point: re-reads the configuration, returns the outcome or raises ApiError
        self.reload_hook: Callable[[], dict] | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind everything or raise (OSError, tls.CredentialError, state.StateError, ValueError); nothing stays
        half-open."""
        try:
            check_welcome(self.config)
            self.ctx = tls.server_context(self.config.ca, self.config.cert, self.config.key)
            set_buffer_budget(self.config.buffer_budget)
            self.audit.open(self.config.audit_log)
            self.api_token = read_token(self.config.api_token_file) if self.config.api_listen else None
            stored, stats = self.store.load()
            self._restore_stats(stats)
            self.agent_listeners = [Acceptor(self.loop, sock, self._on_agent_conn, "the agent port", ACCEPT_BUDGET)
                                    for sock in listen(self.config.bind, self.config.port)]
            self.admin.configure(self.config.admin_timeout, self.config.admin_max_request, self.config.admin_group)
            self.admin.add_listener(listen_unix(self.config.admin_socket))
            self._open_rest_port()
            for spec in stored:
                self._restore_proxy(spec)
            self._sweep_timer = self.loop.call_later(POOL_SWEEP, self._sweep_warm)
            self._stats_timer = self.loop.call_later(self.config.stats_save_interval, self._stats_tick)
            self._idle_timer = self.loop.call_later(IDLE_SWEEP, self._sweep_idle)
        except BaseException:
            self.close()
            raise
        where = ", ".join(format_addr(a.sock.getsockname()) for a in self.agent_listeners)
        log.info("anywhered %s (server id %s) listening for agents on %s, admin socket %s",
                 __version__, self.config.server_id, where, self.config.admin_socket)
        if not self.global_nets:
            log.warning("no global whitelist (--wl): proxies without their own whitelist accept clients from any address")

    def _restore_stats(self, stats: dict) -> None:
        for table, key in ((self.proxy_stats, "proxies"), (self.agent_stats, "agents")):
            stored = stats.get(key)
            if isinstance(stored, dict):
                for name, counters in stored.items():
                    table[str(name)] = Counters.from_dict(counters)

    def _open_rest_port(self) -> None:
        """The REST port (--api-port / api_listen): the same API on TCP, behind a bearer token."""
        for entry in self.config.api_listen:
            host, _, port = entry.rpartition(":")
            host = host.strip("[]")
            for sock in listen([host], int(port)):
                where = format_addr(sock.getsockname())
                self.admin.add_listener(sock, token=lambda: self.api_token,
                                        public=lambda: ("/metrics",) if self.config.metrics_public else ())
                bound = sock.getsockname()[0]
                if bound in ("::", "0.0.0.0") or not ipaddress.ip_address(bound.split("%")[0]).is_loopback:
                    log.warning("REST API on %s without TLS: the bearer token and the answers cross the network in "
                                "clear; bind it to a loopback address or put it behind a TLS proxy", where)
                else:
                    log.info("REST API on %s", where)

    def _restore_proxy(self, spec: Any) -> None:
        """A stored entry: served if it can be; else kept failed (retried), or kept as it is if not valid."""
        try:
            proxy = validate_proxy(spec)
            if proxy.name in self.proxies:
                raise ApiError(409, f"a proxy named {proxy.name} is stored twice")
            other = next((p for p in self.proxies.values() if p.remote_port == proxy.remote_port), None)
            if other is not None:
                raise ApiError(409, f"remote port {proxy.remote_port} is already used by proxy {other.name}")
        except ApiError as exc:
            self.unrestored.append(spec)
            log.error("stored proxy %s in %s not served: %s; its entry is kept as it is (fix it in the file, or "
                      "delete it there, while anywhered is stopped)", printable(state.entry_name(spec) or spec, 200),
                      self.store.file, printable(exc.message))
            return
        self.proxies[proxy.name] = proxy
        self.proxy_agents[proxy.name] = proxy.agent_id
        if proxy.enabled and not self._try_listen(proxy):
            log.error("proxy %s restored but not serving: %s; retried every %g s (or: anywherectl proxy enable %s)",
                      proxy.name, proxy.failed, PROXY_RETRY, proxy.name)
            return
        log.info("proxy %s restored%s: port %d → agent %s → %s", proxy.name, "" if proxy.enabled else " (disabled)",
                 proxy.remote_port, proxy.agent_id, proxy.target)

    def _try_listen(self, proxy: Proxy) -> bool:
        """Bind an enabled proxy's port; if that fails the proxy is marked failed, and retried."""
        try:
            self._listen(proxy)
        except ApiError as exc:
            proxy.failed = exc.message
            if self._retry_timer is None:
                self._retry_timer = self.loop.call_later(PROXY_RETRY, self._retry_failed)
            return False
        proxy.failed = None
        return True

    def _retry_failed(self) -> None:
        self._retry_timer = None
        if self.draining or self.closed:
            return
        for proxy in [p for p in self.proxies.values() if p.failed and p.enabled]:
            if self._try_listen(proxy):
                log.info("proxy %s: remote port %d could be bound now; serving (agent %s → %s)", proxy.name,
                         proxy.remote_port, proxy.agent_id, proxy.target)

    # -- reload and drain ------------------------------------------------------------------------
    RESTART_ONLY = ("port", "bind", "proxy_bind", "admin_socket", "state_dir", "api_listen")

    def reload(self, new: ServerConfig) -> dict:
        """Apply a new configuration to what can change at run time; all or nothing.

        The whitelist, timeouts, heartbeat, server id and credentials apply to new connections;
        agent sessions and live connections are kept; the buffer budget applies to the credit
        returned from now on, live streams' too.  Listening addresses need a restart and
        are reported as such.  Raises tls.CredentialError or ValueError, and then changes nothing.
        """
        check_welcome(new)
        nets = parse_whitelist(new.whitelist, "whitelist")
        ctx = tls.server_context(new.ca, new.cert, new.key)
        token = read_token(new.api_token_file) if self.config.api_listen else None
        audit = AuditLog(new.audit_log)  # opened first: a bad path refuses the reload
        old = self.config
        changed = [name for name in ("server_id", "ca", "cert", "key", "whitelist", "data_timeout", "heartbeat",
                                     "handshake_timeout", "pool_size", "pool_max", "pool_idle_timeout", "audit_log",
                                     "api_token_file", "metrics_public", "max_connections", "max_connections_per_proxy",
                                     "rate_limit", "rate_burst", "max_agents", "max_pending_per_agent",
                                     "max_unauthenticated", "max_unauthenticated_per_source",
                                     "idle_timeout", "admin_timeout", "admin_max_request", "deny", "admin_group",
                                     "stats_save_interval", "buffer_budget")
                   if getattr(old, name) != getattr(new, name)]
        restart = [name for name in self.RESTART_ONLY if getattr(old, name) != getattr(new, name)]
        for name in restart:
            setattr(new, name, getattr(old, name))  # keep reporting what is really in force
        self.ctx = ctx
        self.global_nets = nets
        self.config = new
        self.api_token = token
        self._flush_rejects(None)  # into the log they belong to
        self.audit.close()
        self.audit = audit
        self.admin.configure(new.admin_timeout, new.admin_max_request, new.admin_group)
        set_buffer_budget(new.buffer_budget)
        self._drop_denied()
        for name in restart:
            log.warning("reload: %s changed in the configuration; it takes effect at the next restart", name)
        log.info("configuration reloaded%s", f"; changed: {', '.join(changed)}" if changed else "; nothing changed")
        return {"changed": changed, "restart_required": restart}

    def begin_drain(self) -> None:
        """Stop accepting clients; live and pending connections may finish (the agent port stays open for them)."""
        if self.draining:
            return
        self.draining = True
        for proxy in self.proxies.values():
            self._close_listeners(proxy)
        log.info("draining: %d connection(s) live, %d waiting for their agent", len(self.tunnels), len(self.pending))

    @property
    def drained(self) -> bool:
        return not self.tunnels and not self.pending

    def status_line(self) -> str:
        totals = self.totals()
        return (f"{len(self.sessions)} agent(s), {len(self.proxies)} prox{'y' if len(self.proxies) == 1 else 'ies'}, "
                f"{len(self.tunnels)} connection(s), {human_bytes(totals.bytes_in)} in, {human_bytes(totals.bytes_out)} out"
                + (" (draining)" if self.draining else ""))

    def close(self) -> None:
        """Stop everything: listeners, sessions, pending clients, tunnels, admin socket.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        for acceptor in self.agent_listeners:
            acceptor.close()
        self.agent_listeners = []
        for proxy in list(self.proxies.values()):
            self._close_listeners(proxy)
        for conn in list(self.handshaking):
            conn.close("server stopping")
        for session in list(self.sessions.values()):
            session.conn.close("server stopping")
        for pending in list(self.pending.values()):
            self._drop_pending(pending, "server stopping")
        for conns in list(self.warm.values()):
            for conn in list(conns):
                conn.close("server stopping")
        for trunk in [t for trunks in self.trunks.values() for t in trunks] + list(self.retired_trunks):
            trunk.close("server stopping")
        for name in ("_sweep_timer", "_stats_timer", "_idle_timer", "_retry_timer"):
            timer = getattr(self, name, None)
            if timer is not None:
                timer.cancel()
        self.save_stats(wait=True)
        self.store.close()
        self._flush_rejects(None)
        self.audit.close()
        logging.getLogger("anywhere").removeHandler(self.recent_errors)
        for tunnel in list(self.tunnels.values()):
            tunnel.relay.close("server stopping")
        self.admin.close()

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # -- agent port ------------------------------------------------------------------------------
    def _on_agent_conn(self, sock: socket.socket, addr: Any) -> None:
        cfg = self.config
        if len(self.handshaking) >= cfg.max_unauthenticated:
            self._limited("agent port", f"{len(self.handshaking)} connections still in their handshake "
                          f"(max_unauthenticated = {cfg.max_unauthenticated})")
            sock.close()
            return
        ip = str(addr[0])
        per_source = min(cfg.max_unauthenticated_per_source, max(1, cfg.max_unauthenticated // 2))
        if self.handshaking_per_ip.get(ip, 0) >= per_source:
            self._limited(f"agent port from {ip}", f"{per_source} connections from {ip} still in their handshake "
                          f"(max_unauthenticated_per_source = {cfg.max_unauthenticated_per_source}, and at most half of "
                          f"max_unauthenticated = {cfg.max_unauthenticated})")
            sock.close()
            return
        accepted(sock)
        assert self.ctx is not None  # set in start() before the listener exists
        conn = FramedConn(self.loop, sock, self.ctx, server_side=True, peer=format_addr(addr),
                          on_message=self._on_first_message, on_close=self._on_early_close,
                          on_handshake=self._on_handshake, handshake_timeout=self.config.handshake_timeout)
        self.handshaking[conn] = ip
        self.handshaking_per_ip[ip] = self.handshaking_per_ip.get(ip, 0) + 1

    def _on_handshake(self, conn: FramedConn) -> None:
        self.handshakes += 1
        # the TLS handshake is done; the first frame must follow within the same timeout
        conn._timer = self.loop.call_later(self.config.handshake_timeout, self._hello_timeout, conn)

    def _hello_timeout(self, conn: FramedConn) -> None:
        conn._timer = None
        if conn in self.handshaking:
            log.warning("connection from %s sent no hello within %.0f s; closing it", conn.peer, self.config.handshake_timeout)
            conn.close("hello timeout")

    def _authenticated(self, conn: FramedConn) -> None:
        """`conn` leaves the pre-hello count (closed, or its first frame arrived)."""
        ip = self.handshaking.pop(conn, None)
        if ip is not None:
            left = self.handshaking_per_ip[ip] - 1
            if left:
                self.handshaking_per_ip[ip] = left
            else:
                del self.handshaking_per_ip[ip]

    def _on_early_close(self, conn: FramedConn, reason: str) -> None:
        self._authenticated(conn)
        if reason != "server stopping":
            log.warning("connection from %s (%s) closed before its hello: %s", conn.peer, conn.identity or "no certificate", reason)

    def _on_first_message(self, conn: FramedConn, msg: dict) -> None:
        self._authenticated(conn)
        if conn._timer:
            conn._timer.cancel()
            conn._timer = None
        conn.on_close = self._on_quiet_close
        kind = msg["type"]
        if kind in ("hello", "data", "pool", "trunk") and msg["proto"] != PROTO_VERSION:
            reason = f"protocol version {msg['proto']} is not supported (this server speaks {PROTO_VERSION})"
            log.warning("refusing %s from %s: %s", kind, conn.peer, reason)
            conn.send_and_close("error", reason, reason=reason)
            return
        if kind not in ("hello", "data", "pool", "trunk"):
            log.warning("connection from %s started with %r instead of a hello; closing it", conn.peer, kind)
            conn.send_and_close("error", "bad first message", reason=f"expected hello or data, got {kind}")
            return
        if msg["agent_id"] != conn.identity:
            reason = (f"agent id '{printable(msg['agent_id'], 64)}' does not match the identity of its certificate "
                      f"('{printable(conn.identity, 64)}'); refused")
            log.warning("refusing %s from %s: %s", kind, conn.peer, reason)
            conn.send_and_close("error", reason, reason=reason)
            return
        denied = self._denied(conn)
        if denied:
            log.warning("refusing %s from %s: agent %s is denied (%s)", kind, conn.peer, conn.identity, denied)
            conn.send_and_close("error", "revoked", reason=f"this agent's certificate is revoked on this server ({denied})",
                                code="revoked")
            return
        if kind == "hello":
            self._on_hello(conn, msg)
        elif kind == "pool":
            self._add_warm(conn, msg["agent_id"])
        elif kind == "trunk":
            self._add_trunk(conn, msg)
        else:
            self._on_data(conn, msg)

    def _on_quiet_close(self, conn: FramedConn, reason: str) -> None:
        log.debug("connection from %s closed: %s", conn.peer, reason)

    def _on_hello(self, conn: FramedConn, msg: dict) -> None:
        agent_id = msg["agent_id"]
        if self.draining:
            conn.send_and_close("error", "server stopping", reason="the server is stopping; try again shortly")
            return
        old = self.sessions.get(agent_id)
        if old is None and len(self.sessions) >= self.config.max_agents:
            self._limited("agents", f"agent {agent_id} from {conn.peer} refused: max_agents = {self.config.max_agents}")
            conn.send_and_close("error", "too many agents", reason="this server has reached its maximum of agents")
            return
        version = printable(msg["version"], 64)
        session = AgentSession(self, conn, agent_id, version)
        self.sessions[agent_id] = session  # replace first: the old session's close then changes nothing
        conn.on_message = session.on_message
        conn.on_close = lambda c, reason, s=session: self._on_session_close(s, reason)
        if old is not None:
            healthy = old.conn.open and self.loop.time() - old.conn.last_rx < self.config.heartbeat
            log.log(logging.WARNING if healthy else logging.INFO,
                    "agent %s connected from %s; replacing its session from %s%s", agent_id, conn.peer, old.address,
                    " which was still alive: are two agents running with the same id?" if healthy else "")
            reason = f"replaced by a new session of agent {agent_id} from {conn.peer}"
            self._retire_trunks(old, "its agent session was replaced")
            old.conn.send_and_close("error", reason, reason=reason, code="replaced")
        conn.send("welcome", proto=PROTO_VERSION, server_id=self.config.server_id, heartbeat=self.config.heartbeat,
                  pool=self.config.pool_size, session=session.token, trunk_ping=1)
        log.info("agent %s connected from %s (version %s)", agent_id, conn.peer, version)

    def _on_session_close(self, session: AgentSession, reason: str) -> None:
        session.stop()
        if self.sessions.get(session.agent_id) is session:
            del self.sessions[session.agent_id]
            for conn in list(self.warm.get(session.agent_id, ())):
                conn.close("agent session ended")
            if reason != "server stopping":
                log.info("agent %s (%s) disconnected: %s", session.agent_id, session.address, reason)
        self._retire_trunks(session, "agent session ended")

    def _on_data(self, conn: FramedConn, msg: dict) -> None:
        pending = self.pending.get(msg["conn"])
        if pending is None or pending.proxy.agent_id != msg["agent_id"]:
            reason = f"no client is waiting for connection {msg['conn']}"
            log.info("data connection from agent %s (%s): %s", msg["agent_id"], conn.peer, reason)
            conn.send_and_close("error", reason, reason=reason)
            return
        self._take_pending(pending.conn_id)
        if pending.timer:
            pending.timer.cancel()
        conn.send("ready", conn=pending.conn_id)
        if not conn.open:
            self._close_client(pending.sock)
            self._release_live(pending.proxy)
            return
        self._join(pending, conn)

    def _join(self, pending: Pending, conn: FramedConn) -> None:
        proxy = pending.proxy
        peer = conn.peer
        data_sock, leftover = conn.detach()
        relay = Relay(self.loop, pending.sock, data_sock, b_framed=True, a_name=f"client {pending.peer}",
                      b_name=f"agent {proxy.agent_id}", reuse=True,
                      on_close=lambda r, reason, cid=pending.conn_id: self._on_tunnel_close(cid, r, reason, peer))
        self._add_tunnel(pending, relay)
        relay.start(b_initial=leftover)

    def _add_tunnel(self, pending: Pending, relay: Any) -> None:
        """Count and list a joined connection; `relay` is a Relay or a trunk Stream."""
        proxy = pending.proxy
        setup = self._setup_children.get(proxy.name)
        if setup is None:
            setup = self._setup_children[proxy.name] = self.metrics.setup_seconds.labels(proxy.name)
        relay.on_first_byte = lambda r, started=pending.started: setup.observe(r.first_byte_at - started)
        if relay.first_byte_at is not None:  # bytes went ahead of READY: the path is whole only now
            setup.observe(self.loop.time() - pending.started)
        self.tunnels[pending.conn_id] = Tunnel(pending.conn_id, proxy, pending.peer, relay, pending.started,
                                               self.wall_time())
        for counters in (self._counters(self.proxy_stats, proxy.name),
                         self._counters(self.agent_stats, proxy.agent_id)):
            counters.connections += 1
        self.proxy_agents[proxy.name] = proxy.agent_id
        self.stats_dirty = True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection %d: %s joined to agent %s for %s", pending.conn_id, pending.peer, proxy.agent_id,
                      proxy.target)

    @staticmethod
    def _counters(table: dict[str, Counters], key: str) -> Counters:
        counters = table.get(key)
        if counters is None:
            counters = table[key] = Counters()
        return counters

    def _on_tunnel_close(self, conn_id: int, relay: Relay, reason: str, data_peer: str) -> None:
        tunnel = self.tunnels.pop(conn_id, None)
        if tunnel is None:
            return
        self._release_live(tunnel.proxy)
        if relay.handoff is not None:  # both directions ended: the data connection is warm again
            sock, trailing = relay.handoff
            agent_id = tunnel.proxy.agent_id
            conn = FramedConn.resume(self.loop, sock, trailing, peer=data_peer, identity=agent_id,
                                     on_message=self._on_warm_message, on_close=self._on_warm_close)
            self._add_warm(conn, agent_id)
        proxy, bytes_in, bytes_out = tunnel.proxy, relay.bytes_a_to_b, relay.bytes_b_to_a
        self._counters(self.proxy_stats, proxy.name).add(bytes_in, bytes_out)
        self._counters(self.agent_stats, proxy.agent_id).add(bytes_in, bytes_out)
        self.stats_dirty = True
        duration = self.loop.time() - tunnel.started
        if self.audit.target:
            self.audit.write("connection", proxy=proxy.name, agent=proxy.agent_id, source=tunnel.peer,
                             target=proxy.target, bytes_in=bytes_in, bytes_out=bytes_out, duration=round(duration, 3),
                             reason=reason)
        level = logging.INFO if reason in ("done", "server stopping") else logging.WARNING
        if log.isEnabledFor(level):
            log.log(level, "connection %d %s → %s via %s closed (%s): %d bytes in, %d out, %.1f s", conn_id,
                    tunnel.peer, proxy.target, proxy.name, reason, bytes_in, bytes_out, duration)

    # -- proxy ports -------------------------------------------------------------------------------
    def _open_proxy(self, proxy: Proxy) -> None:
        if proxy.name in self.proxies:
            raise ApiError(409, f"a proxy named {proxy.name} already exists")
        for other in self.proxies.values():
            if other.remote_port == proxy.remote_port:
                raise ApiError(409, f"remote port {proxy.remote_port} is already used by proxy {other.name}")
        if proxy.remote_port == self.config.port:
            raise ApiError(409, f"remote port {proxy.remote_port} is the agent port")
        if proxy.enabled:
            self._listen(proxy)
        self.proxies[proxy.name] = proxy
        self.proxy_agents[proxy.name] = proxy.agent_id

    def _listen(self, proxy: Proxy) -> None:
        if proxy.remote_port == self.config.port:  # a stored proxy, and the agent port changed since
            raise ApiError(409, f"remote port {proxy.remote_port} is the agent port")
        try:
            socks = listen(self.config.proxy_bind, proxy.remote_port)
        except OSError as exc:
            raise ApiError(409, f"cannot listen on remote port {proxy.remote_port}: {exc.strerror or exc}") from None
        proxy.listeners = [Acceptor(self.loop, sock, lambda c, a, p=proxy: self._on_client(p, c, a),
                                    f"port {proxy.remote_port}", ACCEPT_BUDGET) for sock in socks]

    def _close_listeners(self, proxy: Proxy) -> None:
        for acceptor in proxy.listeners:
            acceptor.close()
        proxy.listeners = []

    def _on_client(self, proxy: Proxy, sock: socket.socket, addr: Any) -> None:
        accepted(sock)
        peer = format_addr(addr)
        if self.draining:
            self._close_client(sock)
            return
        ip = client_ip(addr)
        nets = proxy.nets or self.global_nets
        if nets and not allowed(ip, nets):
            which = "proxy's" if proxy.nets else "global"
            self._refuse(sock, proxy, "whitelist", peer, f"refused: not in the {which} whitelist")
            return
        limit = self._over_limit(proxy, ip)
        if limit:
            self._refuse(sock, proxy, "limit", peer, f"refused: {limit}")
            return
        session = self.sessions.get(proxy.agent_id)
        if session is None or not session.conn.open:
            self._refuse(sock, proxy, "agent_offline", peer, f"closed: agent {proxy.agent_id} offline")
            return
        pending = Pending(self.new_id(), proxy, sock, peer, self.loop.time())
        pending.timer = self.loop.call_later(self.config.data_timeout, self._pending_timeout, pending.conn_id)
        self._add_pending(pending)
        self._ask_agent(pending, session)

    def _ask_agent(self, pending: Pending, session: AgentSession) -> None:
        """Open a stream on the agent's least busy trunk; without one, send `open` on a warm data
        connection, else on the admin connection."""
        proxy = pending.proxy
        trunks = self.trunks.get(proxy.agent_id)
        warm = self.warm.get(proxy.agent_id)
        if trunks:
            now, hb = self.loop.time(), self.config.heartbeat
            live = [t for t in trunks if not t.stale(now, hb)]
            if not live:  # never on a trunk known to be stale: held for a live one (or data_timeout)
                self.waiting_for_trunk.setdefault(proxy.agent_id, []).append(pending.conn_id)
                return
            if live[0].slow:  # a slow link: one trunk carries all, the others stand by (trunk.py, Scheduling)
                trunk = live[0]
            else:  # the least busy trunk
                trunk = min(live, key=lambda t: len(t.streams) + (t.out_bytes >> 16))
            stream = Stream(trunk, trunk.new_stream_id(), name=f"client {pending.peer}",
                            on_close=lambda st, reason, cid=pending.conn_id: self._on_stream_close(cid, st, reason))
            stream.on_ready = lambda cid=pending.conn_id, st=stream: self._on_stream_ready(cid, st)
            stream.on_fail = lambda reason, cid=pending.conn_id: self.on_agent_fail(proxy.agent_id, cid, reason)
            stream.send_window = mux.EARLY_WINDOW  # until READY (see mux.py)
            pending.stream = stream
            window = stream.grant_first_window() if trunk.takes_window else None  # under the buffer budget
            trunk.control(mux.open_frame(stream.sid, proxy.local_ip, proxy.local_port, window))
            stream.attach(pending.sock, read_now=False)  # no round trip: the client's first bytes follow OPEN
        elif warm:
            conn = warm.pop()
            pending.warm = conn
            conn.on_message = lambda c, m, cid=pending.conn_id: self._on_warm_reply(c, m, cid)
            conn.on_close = lambda c, reason, cid=pending.conn_id: self._on_warm_lost(c, reason, cid)
            conn.send("open", conn=pending.conn_id, host=proxy.local_ip, port=proxy.local_port)
        else:
            session.conn.send("open", conn=pending.conn_id, host=proxy.local_ip, port=proxy.local_port)

    # -- trunks ----------------------------------------------------------------------------------------
    def _add_trunk(self, conn: FramedConn, msg: dict) -> None:
        """A trunk joins the agent's current session; one opened for a session that is over (its
        `session` names another) is refused, so a stale path never takes new clients."""
        agent_id = msg["agent_id"]
        session = self.sessions.get(agent_id)
        if self.draining or session is None:
            conn.close("not needed")
            return
        token = msg.get("session")
        if token is not None and token != session.token:
            log.info("trunk from agent %s (%s) refused: opened for an earlier session", agent_id, conn.peer)
            conn.close("earlier session")
            return
        trunks = self.trunks.setdefault(agent_id, [])
        if len(trunks) >= max(min(self.config.pool_size, MAX_TRUNKS), 1) * 2:  # an agent keeps MAX_TRUNKS at most
            conn.close("too many trunks")
            return
        peer = conn.peer
        sock, leftover = conn.detach()
        trunk = Trunk(self.loop, sock, leftover, name=f"{agent_id}@{peer}", on_close=self._on_trunk_close)
        trunk.owner = session
        trunk.can_ping = msg.get("ping") == 1
        trunk.takes_window = msg.get("window") == 1
        trunks.append(trunk)
        log.debug("trunk from agent %s (%s) up; %d now", agent_id, peer, len(trunks))
        self._serve_waiting(agent_id)

    def _on_trunk_close(self, trunk: Trunk, reason: str) -> None:
        session = trunk.owner
        trunks = self.trunks.get(session.agent_id, [])
        if trunk in trunks:
            trunks.remove(trunk)
            if not trunks:
                del self.trunks[session.agent_id]
                self._serve_waiting(session.agent_id)  # none left: the other paths take them
        self.retired_trunks.discard(trunk)
        if reason not in ("server stopping", "agent session ended"):
            log.info("trunk %s closed: %s", trunk.name, reason)

    def _retire_trunks(self, session: AgentSession, reason: str) -> None:
        """The session is over: its trunks take no new client and close with their last stream."""
        trunks = self.trunks.get(session.agent_id, [])
        mine = [t for t in trunks if t.owner is session]
        if not mine:
            return
        trunks[:] = [t for t in trunks if t.owner is not session]
        if not trunks:
            del self.trunks[session.agent_id]
        for trunk in mine:
            if trunk.streams:
                self.retired_trunks.add(trunk)
            trunk.retire(reason)

    def check_trunks(self, session: AgentSession) -> None:
        """Every heartbeat of `session`: the liveness of its trunks, then the clients held for one."""
        now, hb = self.loop.time(), self.config.heartbeat
        for trunk in list(self.trunks.get(session.agent_id, ())):
            trunk.check_alive(now, hb)
        self._serve_waiting(session.agent_id)

    def _serve_waiting(self, agent_id: str) -> None:
        """Clients held while every trunk of their agent was stale: to a live trunk now, or, with no
        trunk left at all, to the other data paths; still none live: they keep waiting."""
        waiting = self.waiting_for_trunk.pop(agent_id, None)
        if not waiting:
            return
        session = self.sessions.get(agent_id)
        for conn_id in waiting:
            pending = self.pending.get(conn_id)
            if pending is None or pending.stream is not None or pending.warm is not None:
                continue  # gone, or served another way meanwhile
            if session is None or not session.conn.open:
                self.waiting_for_trunk.setdefault(agent_id, []).append(conn_id)  # until data_timeout
                continue
            self._ask_agent(pending, session)

    def _on_stream_ready(self, conn_id: int, stream: Stream) -> None:
        pending = self._take_pending(conn_id)
        if pending is None:
            stream.close("client gone")
            return
        if pending.timer:
            pending.timer.cancel()
        pending.stream = None
        self._add_tunnel(pending, stream)
        stream.open_window(mux.WINDOW_SIZE - mux.EARLY_WINDOW)

    def _on_stream_close(self, conn_id: int, stream: Stream, reason: str) -> None:
        pending = self.pending.get(conn_id)
        if pending is not None and pending.stream is stream:
            pending.stream = None
            if not reason.startswith(stream.name):  # else the client's own failure, named already
                reason = f"agent {pending.proxy.agent_id}: {reason}"
            self._drop_pending(pending, reason,
                               "agent_offline" if reason.startswith("data connection lost") else None)
            return
        self._on_tunnel_close(conn_id, stream, reason, "")

    # -- warm data connections ---------------------------------------------------------------------
    def _add_warm(self, conn: FramedConn, agent_id: str) -> None:
        conns = self.warm.setdefault(agent_id, [])
        if self.draining or agent_id not in self.sessions or len(conns) >= self.config.pool_max:
            conn.close("not needed")
            return
        conn.on_message = self._on_warm_message
        conn.on_close = self._on_warm_close
        conn.identity = agent_id
        conn.idle_since = self.loop.time()
        conns.append(conn)

    def _on_warm_message(self, conn: FramedConn, msg: dict) -> None:
        log.warning("agent %s sent %r on an idle data connection; closing it", conn.identity, msg["type"])
        conn.close(f"unexpected {msg['type']}")

    def _on_warm_close(self, conn: FramedConn, reason: str) -> None:
        conns = self.warm.get(conn.identity or "", [])
        if conn in conns:
            conns.remove(conn)

    def _on_warm_reply(self, conn: FramedConn, msg: dict, conn_id: int) -> None:
        pending = self.pending.get(conn_id)
        kind = msg["type"]
        if pending is None:  # the client is gone (timeout): the answer comes too late
            conn.close("late answer")
            return
        if kind == "ready" and msg["conn"] == conn_id:
            self._take_pending(conn_id)
            if pending.timer:
                pending.timer.cancel()
            self._join(pending, conn)
        elif kind == "fail" and msg["conn"] == conn_id:
            pending.warm = None
            self._add_warm(conn, pending.proxy.agent_id)
            self.on_agent_fail(pending.proxy.agent_id, conn_id, msg["reason"])
        else:
            log.warning("agent %s answered %r to open on a data connection; closing it", conn.identity, kind)
            conn.close(f"unexpected {kind}")

    def _on_warm_lost(self, conn: FramedConn, reason: str, conn_id: int) -> None:
        pending = self.pending.get(conn_id)
        if pending is None or pending.warm is not conn:
            return
        pending.warm = None
        session = self.sessions.get(pending.proxy.agent_id)
        if session is None or not session.conn.open:
            self._drop_pending(pending, f"agent {pending.proxy.agent_id} went offline", "agent_offline")
            return
        log.info("connection %d: warm data connection lost (%s); asking agent %s again", conn_id, reason,
                 pending.proxy.agent_id)
        self._ask_agent(pending, session)

    def _sweep_warm(self) -> None:
        """Close idle data connections beyond pool_size that have idled for pool_idle_timeout."""
        now = self.loop.time()
        for conns in self.warm.values():
            extra = len(conns) - self.config.pool_size
            for conn in list(conns):  # oldest first
                if extra <= 0:
                    break
                if now - conn.idle_since >= self.config.pool_idle_timeout:
                    conn.close("idle")
                    extra -= 1
        self._sweep_timer = self.loop.call_later(POOL_SWEEP, self._sweep_warm)

    def _add_pending(self, pending: Pending) -> None:
        self.pending[pending.conn_id] = pending
        self.live_per_proxy[pending.proxy.name] = self.live_per_proxy.get(pending.proxy.name, 0) + 1
        agent = pending.proxy.agent_id
        self.pending_per_agent[agent] = self.pending_per_agent.get(agent, 0) + 1

    def _take_pending(self, conn_id: int) -> Pending | None:
        """Remove a client from the waiting list (it is joined or dropped next); None if not waiting."""
        pending = self.pending.pop(conn_id, None)
        if pending is not None:
            agent = pending.proxy.agent_id
            self.pending_per_agent[agent] -= 1
            if not self.pending_per_agent[agent]:
                del self.pending_per_agent[agent]
        return pending

    def _release_live(self, proxy: Proxy) -> None:
        self.live_per_proxy[proxy.name] -= 1
        if not self.live_per_proxy[proxy.name]:
            del self.live_per_proxy[proxy.name]

    def _pending_timeout(self, conn_id: int) -> None:
        pending = self.pending.get(conn_id)
        if pending is not None:
            pending.timer = None
            self._drop_pending(pending, f"no data connection from agent {pending.proxy.agent_id} "
                                        f"within {self.config.data_timeout:g} s", "timeout")

    def on_agent_fail(self, agent_id: str, conn_id: int, reason: str) -> None:
        pending = self.pending.get(conn_id)
        if pending is None or pending.proxy.agent_id != agent_id:
            return
        self._drop_pending(pending, f"agent {agent_id} could not reach {pending.proxy.target}: {reason}", "target_refused")

    def _drop_pending(self, pending: Pending, reason: str, kind: str | None = None) -> None:
        """Close a client that was never joined; `kind` is the rejection counted (None: not a rejection)."""
        if self._take_pending(pending.conn_id) is None:
            return  # already joined or dropped
        self._release_live(pending.proxy)
        if kind is not None:
            self._reject(pending.proxy, kind, pending.peer, reason)
        if pending.timer:
            pending.timer.cancel()
        if pending.warm is not None and pending.warm.open:
            warm, pending.warm = pending.warm, None
            warm.close("its client is gone")  # its state is unknown now: do not reuse it
        if pending.stream is not None:
            stream, pending.stream = pending.stream, None
            stream.on_close = None
            stream.close("client gone")
        if reason != "server stopping":
            log.warning("proxy %s: client %s closed: %s", pending.proxy.name, pending.peer, reason)
        self._close_client(pending.sock)

    @staticmethod
    def _close_client(sock: socket.socket) -> None:
        try:
            sock.close()
        except OSError:
            pass

    # -- queries -------------------------------------------------------------------------------------
    def count_connections(self, agent_id: str | None = None, proxy: str | None = None) -> int:
        return sum(1 for t in self.tunnels.values()
                   if (agent_id is None or t.proxy.agent_id == agent_id) and (proxy is None or t.proxy.name == proxy))

    def _snapshot(self) -> tuple[list[Any], dict]:
        """The proxies (then the stored entries not valid, as they were: never changed) and the counters,
        as plain data the loop does not touch again (state.Store may write it from its thread)."""
        stats = {"proxies": {name: c.to_dict() for name, c in self.proxy_stats.items() if name in self.proxies},
                 "agents": {agent: c.to_dict() for agent, c in self.agent_stats.items()}}
        proxies = [p.to_dict() for p in sorted(self.proxies.values(), key=lambda p: p.remote_port)]
        return proxies + self.unrestored, stats

    def _save(self, deleted: tuple[str, ...] = ()) -> None:
        """Write the state now (durable on return).  Raises OSError or state.StateError: nothing was written."""
        proxies, stats = self._snapshot()
        self.store.save(proxies, stats, deleted=deleted)
        self.stats_dirty = False

    # -- operations behind the admin API (api.py) ------------------------------------------------------
    def add_proxy(self, body: Any) -> Proxy:
        proxy = validate_proxy(body)
        self._open_proxy(proxy)
        try:
            self._save()
        except (OSError, state.StateError) as exc:
            self._close_listeners(proxy)
            del self.proxies[proxy.name]
            log.error("proxy %s not added: cannot save the state: %s", proxy.name, exc)
            raise ApiError(500, f"cannot save the state in {self.config.state_dir}: {_why(exc)}") from None
        log.info("proxy %s added: port %d → agent %s → %s%s", proxy.name, proxy.remote_port, proxy.agent_id,
                 proxy.target, f" (whitelist {','.join(proxy.whitelist)})" if proxy.whitelist else "")
        return proxy

    def find_proxy(self, key: str) -> Proxy:
        proxy = self.proxies.get(key)
        if proxy is None and (key.isascii() and key.isdigit()):
            proxy = next((p for p in self.proxies.values() if p.remote_port == int(key)), None)
        if proxy is None:
            raise ApiError(404, f"no proxy named {key} (and no proxy on remote port {key})" if (key.isascii() and key.isdigit())
                           else f"no proxy named {key}")
        return proxy

    def delete_proxy(self, key: str) -> tuple[Proxy, int]:
        proxy = self.find_proxy(key)
        del self.proxies[proxy.name]
        try:
            self._save(deleted=(proxy.name,))
        except (OSError, state.StateError) as exc:
            self.proxies[proxy.name] = proxy
            raise ApiError(500, f"cannot save the state in {self.config.state_dir}: {_why(exc)}") from None
        self._close_listeners(proxy)
        closed = self._close_connections(lambda p: p is proxy, "proxy deleted")
        log.info("proxy %s deleted (port %d); %d connection(s) closed", proxy.name, proxy.remote_port, closed)
        return proxy, closed

    def set_proxy_enabled(self, key: str, enabled: bool) -> Proxy:
        """Enable or disable a proxy.  Enabling a failed one tries its port now: 409 with the reason if it is still busy."""
        proxy = self.find_proxy(key)
        if enabled and proxy.enabled and proxy.failed and not self.draining:
            if not self._try_listen(proxy):
                raise ApiError(409, f"proxy {proxy.name} is still not serving: {proxy.failed}; retried every "
                                    f"{PROXY_RETRY:g} s")
            log.info("proxy %s enabled: remote port %d bound; serving (agent %s → %s)", proxy.name, proxy.remote_port,
                     proxy.agent_id, proxy.target)
            return proxy
        if proxy.enabled == enabled:
            return proxy
        if enabled and not self.draining:
            self._listen(proxy)
        elif not enabled:
            self._close_listeners(proxy)
            proxy.failed = None
        proxy.enabled = enabled
        try:
            self._save()
        except (OSError, state.StateError) as exc:
            log.error("proxy %s %s, but the state could not be saved: %s", proxy.name,
                      "enabled" if enabled else "disabled", exc)
        log.info("proxy %s %s (port %d)", proxy.name, "enabled" if enabled else "disabled: no new clients",
                 proxy.remote_port)
        return proxy

    def disconnect_agent(self, agent_id: str) -> int:
        session = self.sessions.get(agent_id)
        if session is None:
            raise ApiError(404, f"agent {agent_id} is not connected")
        session.conn.send_and_close("error", "disconnected by the operator", reason="disconnected by the operator",
                                    code="disconnected")
        closed = self._close_connections(lambda p: p.agent_id == agent_id, "agent disconnected by the operator")
        log.info("agent %s disconnected by the operator; %d connection(s) closed", agent_id, closed)
        return closed

    def _close_connections(self, which: Callable[[Proxy], bool], reason: str) -> int:
        closed = 0
        for pending in [p for p in self.pending.values() if which(p.proxy)]:
            self._drop_pending(pending, reason)
            closed += 1
        for tunnel in [t for t in self.tunnels.values() if which(t.proxy)]:
            tunnel.relay.close(reason)
            closed += 1
        return closed

    # -- limits -------------------------------------------------------------------------------------------
    def _over_limit(self, proxy: Proxy, ip: Any) -> str | None:
        """Why a new client of `proxy` from `ip` must be refused, or None."""
        cfg = self.config
        if len(self.tunnels) + len(self.pending) >= cfg.max_connections:
            return f"max_connections = {cfg.max_connections} reached"
        live = self.live_per_proxy.get(proxy.name, 0)
        if live >= cfg.max_connections_per_proxy:
            return f"max_connections_per_proxy = {cfg.max_connections_per_proxy} reached"
        if self.pending_per_agent.get(proxy.agent_id, 0) >= cfg.max_pending_per_agent:
            return f"agent {proxy.agent_id} already has {cfg.max_pending_per_agent} clients waiting (max_pending_per_agent)"
        if cfg.rate_limit:
            # a token bucket per (proxy, source address): rate_limit a minute sustained, bursts of
            # rate_burst (never more than rate_limit); a source that has been quiet has a full bucket
            now = self.loop.time()
            key = (proxy.name, ip)
            burst = min(cfg.rate_burst, cfg.rate_limit)
            entry = self.rates.get(key)
            tokens = burst if entry is None else min(burst, entry[0] + (now - entry[1]) * cfg.rate_limit / 60.0)
            if tokens < 1.0:
                self.rates[key] = (tokens, now)
                return (f"more than {cfg.rate_limit} connections a minute (bursts of {burst}) from {ip} "
                        f"(rate_limit)")
            if entry is None and len(self.rates) >= MAX_RATE_ENTRIES:
                self._prune_rates(now, force=True)
            self.rates[key] = (tokens - 1.0, now)
        return None

    def _prune_rates(self, now: float, force: bool = False) -> None:
        """Forget sources whose bucket has filled up again (they start full anyway); bounded memory
        under a spoofed-source flood."""
        cfg = self.config
        rate = cfg.rate_limit / 60.0
        burst = min(cfg.rate_burst, cfg.rate_limit)
        for key, (tokens, when) in list(self.rates.items()):
            if not rate or tokens + (now - when) * rate >= burst:
                del self.rates[key]
        if force and len(self.rates) >= MAX_RATE_ENTRIES:
            self.rates.clear()

    def _refuse(self, sock: socket.socket, proxy: Proxy, reason: str, peer: str, detail: str) -> None:
        self._close_client(sock)
        self._throttled_log(("client", proxy.name, reason, peer.rsplit(":", 1)[0]),
                            f"proxy {proxy.name}: client {peer} {detail}")
        self._reject(proxy, reason, peer, detail)

    def _limited(self, what: str, detail: str) -> None:
        self._throttled_log(("limit", what), f"limit on {what}: {detail}")

    def _throttled_log(self, key: tuple, message: str) -> None:
        """At most one warning per key every LOG_THROTTLE seconds, then a count of what was left out."""
        now = self.loop.time()
        last, suppressed = self.log_throttle.get(key, (-LOG_THROTTLE, 0))
        if now - last < LOG_THROTTLE:
            self.log_throttle[key] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more like it in the last {LOG_THROTTLE:.0f} s not logged)" if suppressed else ""
        log.warning("%s%s", message, more)
        if len(self.log_throttle) >= MAX_RATE_ENTRIES:
            self.log_throttle.clear()
        self.log_throttle[key] = (now, 0)

    def _denied(self, conn: FramedConn) -> str | None:
        ids = {e for e in self.config.deny if not e.lower().startswith("serial:")}
        serials = {tls.normalize_serial(e[7:]) for e in self.config.deny if e.lower().startswith("serial:")}
        if conn.identity in ids:
            return f"id {conn.identity} in deny"
        if conn.serial is not None and conn.serial in serials:
            return f"certificate serial {conn.serial} in deny"
        return None

    def _drop_denied(self) -> None:
        """After a reload: drop connected agents that are denied now, with everything through them."""
        for agent_id, session in list(self.sessions.items()):
            denied = self._denied(session.conn)
            if denied:
                session.conn.send_and_close("error", "revoked", code="revoked",
                                            reason=f"this agent's certificate is revoked on this server ({denied})")
                closed = self._close_connections(lambda p, a=agent_id: p.agent_id == a, "agent revoked")
                log.warning("agent %s is denied now (%s): session dropped, %d connection(s) closed", agent_id, denied, closed)
        for conns in self.warm.values():
            for conn in list(conns):
                if self._denied(conn):
                    conn.close("agent revoked")
        for trunk in [t for trunks in self.trunks.values() for t in trunks] + list(self.retired_trunks):
            if self._denied(trunk.owner.conn):  # a revoked agent's trunks close at once, retired ones too
                trunk.close("agent revoked")

    def _sweep_idle(self) -> None:
        now = self.loop.time()
        for tunnel in list(self.tunnels.values()):
            timeout = tunnel.proxy.idle_timeout or self.config.idle_timeout
            if timeout and now - tunnel.relay.last_active >= timeout:
                tunnel.relay.close(f"idle for {timeout:g} s")
        self._prune_rates(now)
        for trunk in list(self.retired_trunks):
            trunk.check_alive(now, self.config.heartbeat)
        for agent_id in list(self.waiting_for_trunk):
            held = [cid for cid in self.waiting_for_trunk[agent_id] if cid in self.pending]
            if held:
                self.waiting_for_trunk[agent_id] = held
            else:
                del self.waiting_for_trunk[agent_id]
        if self.rejects_held:
            self._flush_rejects(now)
        self._idle_timer = self.loop.call_later(IDLE_SWEEP, self._sweep_idle)

    # -- counters ----------------------------------------------------------------------------------------
    def _reject(self, proxy: Proxy, reason: str, peer: str, detail: str) -> None:
        """Count a refused client and audit it: the first refusal of a (proxy, reason, source address)
        at once, the ones after it within LOG_THROTTLE seconds as one record with their count."""
        self._counters(self.proxy_stats, proxy.name).rejected[reason] += 1
        self.stats_dirty = True
        if not self.audit.target:
            return
        key = (proxy.name, reason, peer.rsplit(":", 1)[0].strip("[]"))
        held = self.rejects_held.get(key)
        if held is not None:
            held[1] += 1
            return
        self.audit.write("connection", proxy=proxy.name, agent=proxy.agent_id, source=peer, target=proxy.target,
                         bytes_in=0, bytes_out=0, duration=0.0, reason=reason, detail=detail)
        if len(self.rejects_held) >= MAX_RATE_ENTRIES:
            self._flush_rejects(None)
        self.rejects_held[key] = [self.loop.time(), 0, proxy.agent_id, proxy.target, detail]

    def _flush_rejects(self, now: float | None) -> None:
        """Audit the refusals held back since their key's first one (all of them when `now` is None)."""
        for key, (first, count, agent, target, detail) in list(self.rejects_held.items()):
            if now is not None and now - first < LOG_THROTTLE:
                continue
            del self.rejects_held[key]
            if count:
                name, reason, source = key
                self.audit.write("connection", proxy=name, agent=agent, source=source, target=target, bytes_in=0,
                                 bytes_out=0, duration=0.0, reason=reason, detail=detail, count=count,
                                 note=f"{count} more refused like this within {LOG_THROTTLE:.0f} s of the first")

    def totals(self) -> Counters:
        total = Counters()
        for counters in self.proxy_stats.values():
            total.add(counters.bytes_in, counters.bytes_out)
            total.connections += counters.connections
            for reason, count in counters.rejected.items():
                total.rejected[reason] += count
        for tunnel in self.tunnels.values():
            total.add(tunnel.relay.bytes_a_to_b, tunnel.relay.bytes_b_to_a)
        return total

    def proxy_info(self, proxy: Proxy) -> dict:
        counters = self.proxy_stats.get(proxy.name, Counters())
        live = [t for t in self.tunnels.values() if t.proxy is proxy]
        item = proxy.to_dict()
        item.update(state=self.proxy_state(proxy), failed=proxy.failed)
        item.update(agent_online=proxy.agent_id in self.sessions, connections=len(live),
                    connections_total=counters.connections, rejected=dict(counters.rejected),
                    bytes_in=counters.bytes_in + sum(t.relay.bytes_a_to_b for t in live),
                    bytes_out=counters.bytes_out + sum(t.relay.bytes_b_to_a for t in live))
        return item

    def proxy_state(self, proxy: Proxy) -> str:
        """listening, disabled, failed (enabled, its port not bound: see proxy.failed) or draining."""
        if not proxy.enabled:
            return "disabled"
        if proxy.failed:
            return "failed"
        return "draining" if self.draining else "listening"

    def agent_info(self, agent_id: str) -> dict:
        session = self.sessions[agent_id]
        counters = self.agent_stats.get(agent_id, Counters())
        trunks, now = self.trunks.get(agent_id, ()), self.loop.time()
        live = [t for t in self.tunnels.values() if t.proxy.agent_id == agent_id]
        return {"agent_id": agent_id, "address": session.address, "version": session.version,
                "connected_since": session.since, "rtt_ms": None if session.rtt is None else round(session.rtt * 1000, 3),
                "last_heartbeat": session.last_pong, "connections": len(live), "connections_total": counters.connections,
                "bytes_in": counters.bytes_in + sum(t.relay.bytes_a_to_b for t in live),
                "bytes_out": counters.bytes_out + sum(t.relay.bytes_b_to_a for t in live),
                "warm": len(self.warm.get(agent_id, ())), "trunks": len(trunks),
                "trunks_stale": sum(1 for t in trunks if t.stale(now, self.config.heartbeat)),
                "trunk_rtt_ms": [None if t.rtt is None else round(t.rtt * 1000, 3) for t in trunks]}

    def save_stats(self, wait: bool = False) -> None:
        """Write the counters (with the proxies) if they changed: periodically in the background (the
        loop does not wait for the disk), at exit with `wait` (done when it returns)."""
        if not self.stats_dirty and not self.store.background_failed:
            return
        proxies, stats = self._snapshot()
        try:
            if wait:
                self.store.save(proxies, stats)
            else:
                self.store.save_later(proxies, stats)
        except (OSError, state.StateError) as exc:
            log.error("cannot save the counters in %s: %s", self.config.state_dir, _why(exc))
            return
        self.stats_dirty = False

    def _stats_tick(self) -> None:
        self.save_stats()
        self._stats_timer = self.loop.call_later(self.config.stats_save_interval, self._stats_tick)
