"""Proxies: the running set and its public listeners (what a proxy is and how one is validated:
proxy.py).

Owns the table of proxies (`ProxyTable`): uniqueness of names and of (remote port, protocol) (a
tcp and a udp proxy may share a port number: DNS wants 53/udp and 53/tcp; the agent port is TCP,
so a udp proxy may take its number), binding and closing their listeners, the stored entries
that are not valid (kept as they are, written back in every save), and the retry of proxies whose
port could not be bound.  An accepted client is handed to the `on_client` callback it was built
with; what happens to it then (limits, agents, data paths) is not its business, and it never
closes a tunneled connection or writes the state file itself (the server does both, in order:
saved first, then reported done).

A stored proxy whose port cannot be bound at start (busy, or the agent port now) stays, marked
failed with the reason: listed, counted, saved, retried every `PROXY_RETRY` seconds until its
port is free, and ``enable`` tries it at once.

Proxies come from two sources: the API (`file` None; stored in the state directory) and the files
of proxies_dir (`file` set; never stored: the files are their home; see declared.py).  A declared
set is applied in two steps so that a reload is all or nothing: `prepare` checks it against the
running proxies and binds every port it newly needs (any problem: nothing bound, nothing changed,
ConfigError naming file, section, key and value), then `commit` swaps it in, handing a port's
listening sockets over from the proxy that had it to the one that keeps it, and closing the ports
no longer wanted (so a moved proxy's new port is bound before its old one closes).  A proxy whose
target changed is a new object: the live connections keep the old one, with the target they were
opened to.  A proxy's bandwidth limit (its `Shaper`, shaper.py) is the same object across such
changes: a new rate applies in place to every live connection (the router re-shapes them when a
limit comes or goes: `on_reshape`).

A port range (ranges.py) is expanded into single proxies before any of them reaches the table;
`add_all` adds them all or none.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from ..common import printable
from ..errors import ConfigError, Conflict, Invalid, NotFound
from ..loop import Loop, Timer
from ..net import Acceptor, UdpListener, listen
from ..shaper import Shaper
from ..state import entry_name
from .proxy import Proxy, validate_proxy
from .ranges import by_port, capped, name_hint, on_port, port_order
from .settings import ServerConfig

log = logging.getLogger("anywhere.server")

ACCEPT_BUDGET = 64  # connections accepted per listener per loop pass
PROXY_RETRY = 2.0  # seconds between tries to bind the port of a failed proxy


def _kind(proxy: Proxy) -> int:
    return socket.SOCK_DGRAM if proxy.protocol == "udp" else socket.SOCK_STREAM


@dataclass
class Change:
    """A declared set checked against the running proxies, the ports it newly needs bound (not yet
    accepting): `ProxyTable.commit` applies it, `release` drops it."""

    added: list[Proxy] = field(default_factory=list)
    removed: list[Proxy] = field(default_factory=list)
    changed: list[tuple[Proxy, Proxy]] = field(default_factory=list)  # (running, declared)
    unchanged: list[Proxy] = field(default_factory=list)
    bound: dict[tuple[int, str], list[socket.socket]] = field(default_factory=dict)  # by (port, protocol)

    def release(self) -> None:
        for socks in self.bound.values():
            for sock in socks:
                sock.close()
        self.bound.clear()

    def summary(self) -> dict[str, list[str]]:
        return {"added": [p.name for p in self.added], "removed": [p.name for p in self.removed],
                "changed": [new.name for _, new in self.changed], "unchanged": [p.name for p in self.unchanged]}


class ProxyTable:
    """The proxies by name, their listeners, and the stored entries that are not valid."""

    def __init__(self, loop: Loop, config: Callable[[], ServerConfig],
                 on_client: Callable[[Proxy, socket.socket, Any], None],
                 on_reshape: Callable[[Proxy], None] = lambda _proxy: None,
                 on_datagram: Callable[[Proxy, bytes, Any, UdpListener], None] | None = None) -> None:
        self.loop = loop
        self._config = config
        self.on_client = on_client
        self.on_reshape = on_reshape  # a limit came or went: the live connections follow (routing.reshape)
        self.on_datagram = on_datagram  # a UDP proxy's datagrams (udp.UdpFlows)
        self.by_name: dict[str, Proxy] = {}
        self.unrestored: list[Any] = []  # stored entries not valid: not served, written back as they are
        self.accepting = True  # False while draining or closed: no listener is bound again
        self._retry_timer: Timer | None = None  # armed while a proxy has failed

    def __iter__(self) -> Any:
        return iter(self.by_name.values())

    def __len__(self) -> int:
        return len(self.by_name)

    def find(self, key: str, protocol: str | None = None) -> Proxy:
        """By name, else by remote port (of `protocol`, if given); `NotFound` otherwise.  A name with a
        protocol that is not its proxy's: `Conflict` saying so."""
        proxy = self.by_name.get(key)
        digits = key.isascii() and key.isdigit()
        if proxy is None and digits:
            proxy = by_port(self.by_name.values(), key, protocol)  # Conflict if a tcp and a udp proxy share it
        if proxy is None:
            kind = f"{protocol} " if protocol else ""
            raise NotFound(f"no proxy named {key} (and no {kind}proxy on remote port {key})" if digits
                           else f"no proxy named {key}")
        if protocol not in (None, proxy.protocol):
            raise Conflict(f"proxy {proxy.name} is a {proxy.protocol} proxy, not {protocol}")
        return proxy

    def find_made_by_api(self, key: str, what: str, protocol: str | None = None) -> Proxy:
        """`find`, for a change through the API: Conflict if the proxy is declared in a file."""
        proxy = self.find(key, protocol)
        if proxy.file is not None:
            raise Conflict(f"proxy {proxy.name} is declared in {proxy.file}: {what} it there and reload "
                           "(anywherectl reload)")
        return proxy

    def _check_new(self, proxy: Proxy, what: str = "a proxy named {} already exists") -> None:
        same = self.by_name.get(proxy.name)
        if same is not None:
            raise Conflict(what.format(proxy.name) + (f" (declared in {same.file})" if same.file else "")
                           + name_hint(same, proxy))
        other = next(iter(on_port(self.by_name.values(), proxy.remote_port, proxy.protocol)), None)
        if other is not None:
            raise Conflict(f"remote port {proxy.remote_port} is already used by proxy {other.name}"
                           + (f" (declared in {other.file})" if other.file else ""))

    def add_all(self, proxies: list[Proxy]) -> None:
        """Add one proxy or a range's: every one checked (name, port, not the agent port) and bound (if
        enabled) before all are listed; a `Conflict` naming every port in the way changes nothing."""
        problems: list[str] = []
        agent_port = self._config().port
        for proxy in proxies:
            try:
                self._check_new(proxy)
            except Conflict as exc:
                problems.append(exc.message)
            if proxy.remote_port == agent_port and proxy.protocol == "tcp":  # the agent port is TCP only
                problems.append(f"remote port {proxy.remote_port} is the agent port")
        for proxy in proxies if not problems else []:
            try:
                if proxy.enabled:
                    self.listen(proxy)
            except Conflict as exc:
                problems.append(exc.message)
        if problems:
            self.close_listeners(*proxies)
            if len(proxies) == 1:
                raise Conflict(problems[0])
            shown = problems[:10] + ([f"and {len(problems) - 10} more"] if len(problems) > 10 else [])
            raise Conflict(f"none of the {len(proxies)} proxies of the range added: " + "; ".join(shown))
        self.by_name.update((proxy.name, proxy) for proxy in proxies)
        for proxy in proxies:
            shape(self.loop, proxy)

    def remove(self, *proxies: Proxy) -> None:
        """Unlist and close (a proxy, or a range's): an `add_all` undone."""
        for proxy in proxies:
            self.close_listeners(proxy)
            self.by_name.pop(proxy.name, None)

    def restore(self, spec: Any, store_file: str) -> Proxy | None:
        """A stored entry: served if it can be; else kept failed (retried), or kept as it is if not valid."""
        try:
            proxy = validate_proxy(spec)
            self._check_new(proxy, "a proxy named {} is stored twice")
        except (Invalid, Conflict) as exc:
            self.unrestored.append(spec)
            log.error("stored proxy %s in %s not served: %s; its entry is kept as it is (fix it in the file, or "
                      "delete it there, while anywhered is stopped)", printable(entry_name(spec) or spec, 200), store_file,
                      printable(exc.message))
            return None
        self.by_name[proxy.name] = proxy
        shape(self.loop, proxy)
        if proxy.enabled and not self.try_listen(proxy):
            log.error("proxy %s restored but not serving: %s; retried every %g s (or: anywherectl proxy enable %s)",
                      proxy.name, proxy.failed, PROXY_RETRY, proxy.name)
            return proxy
        log.info("proxy %s restored%s: port %d → agent %s → %s", proxy.name, "" if proxy.enabled else " (disabled)",
                 proxy.remote_port, proxy.agent_id, proxy.target)
        return proxy

    def listen(self, proxy: Proxy) -> None:
        """Bind the proxy's port on every proxy_bind address; `Conflict` with the reason if not."""
        config = self._config()
        if proxy.remote_port == config.port and proxy.protocol == "tcp":  # stored; the agent port changed since
            raise Conflict(f"remote port {proxy.remote_port} is the agent port")
        try:
            socks = listen(config.proxy_bind, proxy.remote_port, kind=_kind(proxy))
        except OSError as exc:
            raise Conflict(f"cannot listen on remote port {proxy.remote_port}: {exc.strerror or exc}") from None
        proxy.listeners = [self._acceptor(proxy, sock) for sock in socks]

    def _acceptor(self, proxy: Proxy, sock: socket.socket) -> Any:
        if proxy.protocol == "udp":
            return UdpListener(self.loop, sock, self._handler(proxy), f"udp port {proxy.remote_port}")
        return Acceptor(self.loop, sock, self._handler(proxy), f"port {proxy.remote_port}", ACCEPT_BUDGET)

    def _handler(self, proxy: Proxy) -> Callable[..., None]:
        if proxy.protocol == "udp":
            on_datagram = self.on_datagram
            if on_datagram is None:
                raise Conflict(f"proxy {proxy.name}: this server does not carry UDP")
            return lambda datagram, addr, listener: on_datagram(proxy, datagram, addr, listener)
        return lambda conn, addr: self.on_client(proxy, conn, addr)

    # -- proxies declared in files: a reload's diff, in two steps -----------------------------------
    def prepare(self, declared: list[tuple[Any, ...]]) -> Change:
        """Check the declared set (spec, file), or (spec, file, section, remote_range) for a proxy of a
        range (declared.py), against the running proxies and bind every port it newly needs.  Raises
        ConfigError naming every problem; then nothing is bound or changed."""
        wanted: dict[str, Proxy] = {}
        problems: list[str] = []
        port = self._config().port
        api = [p for p in self.by_name.values() if p.file is None]
        for spec, file, *declared_as in declared:
            proxy = validate_proxy(spec)
            proxy.file = file
            if declared_as:
                proxy.section, proxy.remote_range = declared_as
            wanted[proxy.name] = proxy
            if any(p.name == proxy.name for p in api):
                problems.append(f"{proxy.where()}: a proxy named {proxy.name} was made through the API; delete it "
                                f"there (anywherectl proxy del {proxy.name}) or give this section another name")
            other = next(iter(on_port(api, proxy.remote_port, proxy.protocol)), None)
            if other is not None:
                problems.append(f"{proxy.where('remote_port')}: already used by proxy {other.name}, made through the API")
            if proxy.remote_port == port and proxy.protocol == "tcp":
                problems.append(f"{proxy.where('remote_port')}: is the agent port")
        if problems:
            raise ConfigError(capped(problems))
        change = Change()
        running = {p.name: p for p in self.by_name.values() if p.file is not None}
        for name, proxy in wanted.items():
            old = running.get(name)
            if old is None:
                change.added.append(proxy)
            elif old.to_dict() == proxy.to_dict() and old.file == proxy.file:
                change.unchanged.append(old)
            else:
                change.changed.append((old, proxy))
        change.removed = [p for name, p in running.items() if name not in wanted]
        held = {(p.remote_port, p.protocol) for p in running.values() if p.listeners}
        for proxy in self._serving(change):
            key = (proxy.remote_port, proxy.protocol)
            if key in held or key in change.bound:
                continue
            try:
                change.bound[key] = listen(self._config().proxy_bind, proxy.remote_port, kind=_kind(proxy))
            except OSError as exc:
                problems.append(f"{proxy.where('remote_port')}: {exc.strerror or exc}")  # "cannot listen on ..."
        if problems:
            change.release()
            raise ConfigError(capped(problems))
        return change

    def _serving(self, change: Change) -> list[Proxy]:
        """The proxies of the declared set that should be listening once it is applied."""
        if not self.accepting:
            return []
        return [p for p in change.unchanged + [new for _, new in change.changed] + change.added if p.enabled]

    def commit(self, change: Change) -> dict[str, Any]:
        """Swap a prepared set in: listeners handed over by port, the ports no longer wanted closed;
        each change logged (first: the running proxies take some new values in place).  Returns the names
        added, removed, changed and unchanged."""
        self._log(change)
        held: dict[tuple[int, str], list[Any]] = {}
        for proxy in change.removed + [old for old, _ in change.changed] + change.unchanged:
            if proxy.listeners:
                held[(proxy.remote_port, proxy.protocol)] = proxy.listeners
                proxy.listeners = []
        for proxy in change.removed:
            del self.by_name[proxy.name]
        for old, new in change.changed:
            old.idle_timeout = new.idle_timeout  # the live connections through it take the new timeout too
            new.shaper, limited = old.shaper, old.shaper is not None  # one limit for old and new connections
            shape(self.loop, new)
            old.bandwidth, old.shaper = new.bandwidth, new.shaper
            old.udp_idle_timeout = new.udp_idle_timeout  # and its live UDP flows their new one
            self.by_name[new.name] = new
            if limited != (new.shaper is not None):
                self.on_reshape(new)
        for proxy in change.added:
            self.by_name[proxy.name] = proxy
            shape(self.loop, proxy)
        for proxy in self._serving(change):
            key = (proxy.remote_port, proxy.protocol)
            listeners = held.pop(key, None)
            if listeners is None:
                proxy.listeners = [self._acceptor(proxy, sock) for sock in change.bound.pop(key)]
                continue
            for acceptor in listeners:
                acceptor.handle = self._handler(proxy)
            proxy.listeners = listeners
        for listeners in held.values():
            for acceptor in listeners:
                acceptor.close()
        change.release()  # nothing is left there; safe if anything was
        return change.summary()

    @staticmethod
    def _log(change: Change) -> None:
        for proxy in change.removed:
            log.info("proxy %s removed (no longer declared in %s): port %d closed", proxy.name, proxy.file,
                     proxy.remote_port)
        for old, proxy in change.changed:
            before, after = old.to_dict(), proxy.to_dict()
            log.info("proxy %s changed (%s): %s", proxy.name, proxy.file, ", ".join(
                f"{k} {before.get(k, '-')} → {after.get(k, '-')}" for k in {**before, **after}
                if before.get(k) != after.get(k)) or f"moved from {old.file}")
        for proxy in change.added:
            log.info("proxy %s declared in %s: port %d → agent %s → %s%s", proxy.name, proxy.file, proxy.remote_port,
                     proxy.agent_id, proxy.target, "" if proxy.enabled else " (disabled)")
        if change.added or change.removed or change.changed:
            log.info("proxies declared in files: %d added, %d removed, %d changed, %d unchanged", len(change.added),
                     len(change.removed), len(change.changed), len(change.unchanged))

    def try_listen(self, proxy: Proxy) -> bool:
        """Bind an enabled proxy's port; if that fails the proxy is marked failed, and retried."""
        try:
            self.listen(proxy)
        except Conflict as exc:
            proxy.failed = exc.message
            if self._retry_timer is None:
                self._retry_timer = self.loop.call_later(PROXY_RETRY, self._retry_failed)
            return False
        proxy.failed = None
        return True

    def set_enabled(self, proxy: Proxy, enabled: bool) -> bool:
        """Enable or disable; True if that changed the proxy (then it is to be saved).  Enabling a
        failed one tries its port now: Conflict with the reason if it is still busy."""
        if enabled and proxy.enabled and proxy.failed and self.accepting:
            if not self.try_listen(proxy):
                raise Conflict(f"proxy {proxy.name} is still not serving: {proxy.failed}; retried every "
                               f"{PROXY_RETRY:g} s")
            log.info("proxy %s enabled: remote port %d bound; serving (agent %s → %s)", proxy.name, proxy.remote_port,
                     proxy.agent_id, proxy.target)
            return False
        if proxy.enabled == enabled:
            return False
        if enabled and self.accepting:
            self.listen(proxy)
        elif not enabled:
            self.close_listeners(proxy)
            proxy.failed = None
        proxy.enabled = enabled
        return True

    def _retry_failed(self) -> None:
        self._retry_timer = None
        if not self.accepting:
            return
        for proxy in [p for p in self.by_name.values() if p.failed and p.enabled]:
            if self.try_listen(proxy):
                log.info("proxy %s: remote port %d could be bound now; serving (agent %s → %s)", proxy.name,
                         proxy.remote_port, proxy.agent_id, proxy.target)

    @staticmethod
    def close_listeners(*proxies: Proxy) -> None:
        for proxy in proxies:
            for acceptor in proxy.listeners:
                acceptor.close()
            proxy.listeners = []

    def stop_accepting(self) -> None:
        """Drain or close: every listener closed, none bound again (the proxies stay listed)."""
        self.accepting = False
        for proxy in self.by_name.values():
            self.close_listeners(proxy)
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None

    def state(self, proxy: Proxy) -> str:
        """listening, disabled, failed (enabled, its port not bound: see proxy.failed) or draining."""
        if not proxy.enabled:
            return "disabled"
        if proxy.failed:
            return "failed"
        return "listening" if self.accepting else "draining"

    def stored(self) -> list[Any]:
        """What the state file holds: the proxies made through the API by remote port, then the entries
        not valid, as they were (declared proxies live in their files)."""
        made = [p for p in self.by_name.values() if p.file is None]
        return [p.to_dict() for p in sorted(made, key=port_order)] + self.unrestored


def shape(loop: Loop, proxy: Proxy) -> None:
    """Give the proxy the shaper its bandwidth needs: a new one, the same at a new rate, or none
    (the old one's timers cancelled; its streams are re-shaped by the router: routing.reshape)."""
    if proxy.bandwidth and proxy.shaper is None:
        proxy.shaper = Shaper(loop, proxy.bandwidth, proxy.name)
    elif proxy.bandwidth:
        proxy.shaper.set_bandwidth(proxy.bandwidth)
    elif proxy.shaper is not None:
        proxy.shaper.up.release()
        proxy.shaper.down.release()
        proxy.shaper = None
