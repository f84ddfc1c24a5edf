"""`Server`: anywhered's parts wired together, its life cycle, and the operations the API offers.

The composition root of the daemon: it builds the parts (settings.py, proxies.py, sessions.py,
paths.py, routing.py, limits.py, counters.py), tells each whom to hand things to, and owns what
spans them: start (bind everything or nothing), reload (all or nothing), drain, close, the state
file, and the operations behind the admin API (add, delete, enable and disable proxies,
disconnect agents: each change is saved before it is reported done).  The API and the metrics
are faces over `views.View`, a read-and-operate interface; neither imports this module.

It must not parse frames, place clients, or format HTTP; errors are `errors.OperationError`s,
which only the API maps to status codes.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import ssl
import time
from functools import partial
from typing import Any, Callable

from .. import state, tls
from ..admin import AdminServer, listen_unix
from ..audit import AuditLog
from ..common import __version__, human_bytes
from ..errors import NotFound, NotSaved
from ..loop import Loop, Timer
from ..net import Acceptor, format_addr, listen
from ..trunk import set_buffer_budget
from . import api, metrics
from .counters import Tally
from .limits import Limits
from .paths import TrunkPath, WarmPath
from .proxies import ACCEPT_BUDGET, Change, ProxyTable
from .proxy import Network, Proxy, parse_whitelist, proxies_from
from .ranges import find_range, label, route
from .routing import Router, reshape
from .sessions import AgentPort, AgentSession
from .settings import RELOADABLE, RESTART_ONLY, ServerConfig, check_welcome, read_token
from .views import View

log = logging.getLogger("anywhere.server")

POOL_SWEEP = 5.0  # seconds between sweeps of idle warm data connections
IDLE_SWEEP = 1.0  # seconds between sweeps of idle tunnels, rates, retired trunks, held refusals


class Server:
    def __init__(self, loop: Loop, config: ServerConfig) -> None:
        self.wall_time = time.time
        self.loop = loop
        self.config = config
        self.started_wall = self.wall_time()
        self.started = loop.time()
        self.global_nets: list[Network] = parse_whitelist(config.whitelist, "--wl")
        self.audit = AuditLog()
        self.api_token: str | None = None
        self._store = state.Store(config.state_dir)
        self.closed = False
        self.draining = False
        self._timers: list[Timer] = []
        self._next_id = secrets.randbits(30) + 1
        # set by the entry point: re-reads the configuration, returns the outcome or raises ConfigError
        self.reload_hook: Callable[[], dict] | None = None
        settings = lambda: self.config  # noqa: E731  (every part reads the settings in force)
        self.limits = Limits(loop.time, settings)
        self.tally = Tally(loop.time, lambda: self.audit)
        self.port = AgentPort(loop, settings, self.limits, self.wall_time)
        self.trunk_path = TrunkPath(loop, settings, self.port)
        self.warm_path = WarmPath(loop, settings, self.port)
        self.metrics = metrics.Metrics()
        self.router = Router(loop, settings, self.port, self.trunk_path, self.warm_path, self.limits, self.tally,
                             lambda: self.audit, lambda: self.global_nets, self.metrics.setup_seconds, self.new_id,
                             self.wall_time)
        self.proxies = ProxyTable(loop, settings, self.router.on_client, partial(reshape, self.router), self.router.udp.on_datagram)
        self.port.on_data = self.router.on_data
        self.port.on_trunk = self.trunk_path.add
        self.port.on_pool = self.warm_path.add
        self.port.on_session_end = self._on_session_end
        self.port.on_beat = self.trunk_path.check
        self.port.on_rtt = lambda agent_id, rtt: self.metrics.heartbeat_rtt.observe(rtt)
        self.port.on_fail = self.router.on_agent_fail
        self.recent_errors = metrics.RecentErrors()
        logging.getLogger("anywhere").addHandler(self.recent_errors)
        self.view = View(loop, settings, (self.started, self.started_wall), self.proxies, self.router, self)
        self.metrics.attach(self.view)
        self.admin = AdminServer(loop, api.Api(self.view, self.metrics.exposition).handle)

    # what tests and the entry point read: the parts' tables under their old names
    store = property(lambda self: self._store, lambda self, store: setattr(self, "_store", store))
    stats_dirty = property(lambda self: self.tally.dirty, lambda self, v: setattr(self.tally, "dirty", v))
    tunnels = property(lambda self: self.router.tunnels)
    pending = property(lambda self: self.router.pending)
    sessions = property(lambda self: self.port.sessions)

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, declared: list[tuple] | None = None) -> None:
        """Bind everything or raise (OSError, errors.CredentialError, errors.StateError, ValueError,
        errors.ConfigError for the `declared` proxies: (spec, file) read from proxies_dir, as prepare
        takes them); nothing stays half-open."""
        cfg = self.config
        try:
            check_welcome(cfg)
            self.port.ctx = tls.server_context(cfg.ca, cfg.cert, cfg.key)
            set_buffer_budget(cfg.buffer_budget)
            self.audit.open(cfg.audit_log)
            self.api_token = read_token(cfg.api_token_file) if cfg.api_listen else None
            stored, stats = self._store.load()
            self.tally.restore(stats)
            self.port.listeners = [Acceptor(self.loop, sock, self.port.on_connection, "the agent port", ACCEPT_BUDGET)
                                   for sock in listen(cfg.bind, cfg.port)]
            self.admin.configure(cfg.admin_timeout, cfg.admin_max_request, cfg.admin_group)
            self.admin.add_listener(listen_unix(cfg.admin_socket))
            self._open_rest_port()
            for spec in stored:
                proxy = self.proxies.restore(spec, self._store.file)
                if proxy is not None:
                    self.tally.known(proxy.name, proxy.agent_id)
            self._apply(self.proxies.prepare(declared or []))
            self._every(POOL_SWEEP, self.warm_path.sweep)
            self._every(lambda: self.config.stats_save_interval, self.save_stats)
            self._every(IDLE_SWEEP, self._sweep)
        except BaseException:
            self.close()
            raise
        where = ", ".join(format_addr(a.sock.getsockname()) for a in self.port.listeners)
        log.info("anywhered %s (server id %s) listening for agents on %s, admin socket %s",
                 __version__, cfg.server_id, where, cfg.admin_socket)
        if not self.global_nets:
            log.warning("no global whitelist (--wl): proxies without their own whitelist accept clients from any address")

    def _every(self, interval: float | Callable[[], float], work: Callable[[], None]) -> None:
        """Run `work` every `interval` seconds (read anew each time) until close."""
        seconds = interval if callable(interval) else (lambda: interval)
        slot = len(self._timers)

        def tick() -> None:
            work()
            self._timers[slot] = self.loop.call_later(seconds(), tick)

        self._timers.append(self.loop.call_later(seconds(), tick))

    def _open_rest_port(self) -> None:
        """The REST port (--api-port / api_listen): the same API on TCP, behind a bearer token."""
        for entry in self.config.api_listen:
            host, _, port = entry.rpartition(":")
            for sock in listen([host.strip("[]")], int(port)):
                where = format_addr(sock.getsockname())
                self.admin.add_listener(sock, token=lambda: self.api_token,
                                        public=lambda: (("/metrics",) if self.config.metrics_public else ())
                                        + (("/v1/proxies/*/health",) if self.config.health_public else ()))
                bound = sock.getsockname()[0]
                if bound in ("::", "0.0.0.0") or not ipaddress.ip_address(bound.split("%")[0]).is_loopback:
                    log.warning("REST API on %s without TLS: the bearer token and the answers cross the network in "
                                "clear; bind it to a loopback address or put it behind a TLS proxy", where)
                else:
                    log.info("REST API on %s", where)

    def reload(self, new: ServerConfig, declared: list[tuple] | None = None) -> dict:
        """Apply a new configuration to what can change at run time, and the `declared` proxies
        (spec, file) as a diff against the running ones (None: leave the proxies alone); all or nothing.

        The whitelist, timeouts, heartbeat, server id and credentials apply to new connections;
        agent sessions and live connections are kept; the buffer budget applies to the credit
        returned from now on, live streams' too.  Listening addresses need a restart and
        are reported as such.  Raises errors.CredentialError, ValueError or ConfigError (a declared
        proxy that clashes or whose port cannot be bound), and then changes nothing.
        """
        check_welcome(new)
        nets = parse_whitelist(new.whitelist, "whitelist")
        ctx: ssl.SSLContext = tls.server_context(new.ca, new.cert, new.key)
        token = read_token(new.api_token_file) if self.config.api_listen else None
        change = self.proxies.prepare(declared) if declared is not None else None
        try:
            audit = AuditLog(new.audit_log)  # opened first: a bad path refuses the reload
        except BaseException:
            if change is not None:
                change.release()
            raise
        old = self.config
        changed = [name for name in RELOADABLE if getattr(old, name) != getattr(new, name)]
        restart = [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
        for name in restart:
            setattr(new, name, getattr(old, name))  # keep reporting what is really in force
        self.port.ctx = ctx
        for session in self.sessions.values():
            session.heartbeat.interval = new.heartbeat  # from the next beat on
        self.global_nets = nets
        self.config = new
        self.api_token = token
        self.tally.flush_rejects(None)  # into the log they belong to
        self.audit.close()
        self.audit = audit
        self.admin.configure(new.admin_timeout, new.admin_max_request, new.admin_group)
        set_buffer_budget(new.buffer_budget)
        self._drop_denied()
        for name in restart:
            log.warning("reload: %s changed in the configuration; it takes effect at the next restart", name)
        log.info("configuration reloaded%s", f"; changed: {', '.join(changed)}" if changed else "; nothing changed")
        outcome: dict[str, Any] = {"changed": changed, "restart_required": restart}
        if change is not None:
            outcome["proxies"] = self._apply(change)
        return outcome

    def _apply(self, change: Change) -> dict:
        """Swap in a prepared declared set (logged by the table); the removed proxies' connections closed."""
        removed = {p.name for p in change.removed}
        summary: dict[str, Any] = self.proxies.commit(change)
        self.tally.know(change.added + [new for _, new in change.changed])
        summary["closed_connections"] = self.router.close_connections(
            lambda p, _a: p.file is not None and p.name in removed, "proxy removed from its file") if removed else 0
        return summary

    def begin_drain(self) -> None:
        """Stop accepting clients; live and pending connections may finish (the agent port stays open for them)."""
        if self.draining:
            return
        self.draining = True
        self._stop_accepting()
        log.info("draining: %d connection(s) live, %d waiting for their agent", len(self.tunnels), len(self.pending))

    def _stop_accepting(self) -> None:
        self.proxies.stop_accepting()
        self.router.accepting = self.port.accepting_hellos = False
        self.trunk_path.accepting = self.warm_path.accepting = False

    @property
    def drained(self) -> bool:
        return not self.tunnels and not self.pending

    def status_line(self) -> str:
        totals = self.tally.totals(self.tunnels.values())
        n = len(self.proxies)
        return (f"{len(self.sessions)} agent(s), {n} prox{'y' if n == 1 else 'ies'}, {len(self.tunnels)} connection(s), "
                f"{human_bytes(totals.bytes_in)} in, {human_bytes(totals.bytes_out)} out"
                + (" (draining)" if self.draining else ""))

    def close(self) -> None:
        """Stop everything: listeners, sessions, pending clients, tunnels, admin socket.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._stop_accepting()
        self.port.close()
        self.router.close()
        self.warm_path.close()
        self.trunk_path.close()
        for timer in self._timers:
            timer.cancel()
        self.save_stats(wait=True)
        self._store.close()
        self.tally.flush_rejects(None)
        self.audit.close()
        logging.getLogger("anywhere").removeHandler(self.recent_errors)
        self.router.close_tunnels()
        self.admin.close()

    def _sweep(self) -> None:
        now = self.loop.time()
        self.router.sweep_idle(now)
        self.limits.prune_rates(now)
        self.trunk_path.sweep(now)
        if self.tally.rejects_held:
            self.tally.flush_rejects(now)

    # -- agents ------------------------------------------------------------------------------------
    def _on_session_end(self, session: AgentSession, reason: str, current: bool) -> None:
        if current:
            self.warm_path.close_agent(session.agent_id, "agent session ended")
        self.trunk_path.retire(session, reason)

    def _drop_denied(self) -> None:
        """After a reload: drop connected agents that are denied now, with everything through them."""
        for agent_id, session in list(self.sessions.items()):
            denied = self.port.denied(session.conn)
            if denied:
                session.conn.send_and_close("error", "revoked", code="revoked",
                                            reason=f"this agent's certificate is revoked on this server ({denied})")
                closed = self.router.close_connections(lambda _p, a, gone=agent_id: a == gone, "agent revoked")
                log.warning("agent %s is denied now (%s): session dropped, %d connection(s) closed", agent_id, denied, closed)
        self.warm_path.close_denied()
        self.trunk_path.close_denied()

    def disconnect_agent(self, agent_id: str) -> int:
        session = self.sessions.get(agent_id)
        if session is None:
            raise NotFound(f"agent {agent_id} is not connected")
        session.conn.send_and_close("error", "disconnected by the operator", reason="disconnected by the operator",
                                    code="disconnected")
        closed = self.router.close_connections(lambda _p, a: a == agent_id, "agent disconnected by the operator")
        log.info("agent %s disconnected by the operator; %d connection(s) closed", agent_id, closed)
        return closed

    # -- proxies (each change saved before it is reported done) --------------------------------------------
    def _save(self, deleted: tuple[str, ...] = ()) -> None:
        """Write the state now (durable on return).  Raises OSError or errors.StateError: nothing was written."""
        self._store.save(self.proxies.stored(), self.tally.snapshot(self.proxies.by_name), deleted=deleted)
        self.tally.dirty = False

    def _not_saved(self, exc: Exception) -> NotSaved:
        return NotSaved(f"cannot save the state in {self.config.state_dir}: {getattr(exc, 'strerror', None) or exc}")

    def add_proxy(self, body: Any) -> Proxy | list[Proxy]:
        proxies, ranged = proxies_from(body)  # a port range: its proxies, bound and saved all or none
        self.proxies.add_all(proxies)
        self.tally.know(proxies)
        try:
            self._save()
        except (OSError, state.StateError) as exc:
            self.proxies.remove(*proxies)
            log.error("proxy %s not added: cannot save the state: %s", label(proxies), exc)
            raise self._not_saved(exc) from None
        log.info("proxy %s added: %s", label(proxies), route(proxies))
        return proxies if ranged else proxies[0]

    def find_proxy(self, key: str, protocol: str | None = None) -> Proxy:
        return self.proxies.find(key, protocol)

    def delete_proxy(self, key: str, protocol: str | None = None) -> tuple[Proxy | list[Proxy], int]:
        ranged = find_range(self.proxies.by_name, key, protocol)  # a range START-END naming no proxy: its ports'
        proxies = ranged or [self.proxies.find_made_by_api(key, "remove", protocol)]
        names = {proxy.name: self.proxies.by_name.pop(proxy.name) for proxy in proxies}
        try:
            self._save(deleted=tuple(names))
        except (OSError, state.StateError) as exc:
            self.proxies.by_name.update(names)
            raise self._not_saved(exc) from None
        self.proxies.close_listeners(*proxies)
        closed = self.router.close_connections(lambda p, _a: p.file is None and p.name in names, "proxy deleted")
        log.info("proxy %s deleted (port %s); %d connection(s) closed", label(proxies), label(proxies, "remote_port"),
                 closed)
        return (ranged or proxies[0]), closed

    def set_proxy_enabled(self, key: str, enabled: bool, protocol: str | None = None) -> Proxy:
        """Enable or disable a proxy made through the API (ProxyTable.set_enabled), saved."""
        proxy = self.proxies.find_made_by_api(key, f"set enabled = {'true' if enabled else 'false'}", protocol)
        if not self.proxies.set_enabled(proxy, enabled):
            return proxy
        try:
            self._save()
        except (OSError, state.StateError) as exc:
            log.error("proxy %s %s, but the state could not be saved: %s", proxy.name,
                      "enabled" if enabled else "disabled", exc)
        log.info("proxy %s %s (port %d)", proxy.name, "enabled" if enabled else "disabled: no new clients",
                 proxy.remote_port)
        return proxy

    # -- counters ----------------------------------------------------------------------------------------
    def save_stats(self, wait: bool = False) -> None:
        """Write the counters (with the proxies) if they changed: periodically in the background (the
        loop does not wait for the disk), at exit with `wait` (done when it returns)."""
        if not self.tally.dirty and not self._store.background_failed:
            return
        proxies, stats = self.proxies.stored(), self.tally.snapshot(self.proxies.by_name)
        try:
            if wait:
                self._store.save(proxies, stats)
            else:
                self._store.save_later(proxies, stats)
        except (OSError, state.StateError) as exc:
            log.error("cannot save the counters in %s: %s", self.config.state_dir, getattr(exc, "strerror", None) or exc)
            return
        self.tally.dirty = False
