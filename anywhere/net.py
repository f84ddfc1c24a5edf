"""Sockets on the loop: listeners (dual-stack), non-blocking dials with a deadline, addresses.

`listen()` binds one socket per address; with no host it binds ``::`` with IPV6_V6ONLY off,
which takes IPv4 and IPv6 clients on one socket, and falls back to ``0.0.0.0`` on a host
without IPv6.  `Dialer` resolves a name (in the loop's resolver thread, since getaddrinfo
has no non-blocking form; IP literals skip the thread), then tries each address in turn with
a non-blocking connect, all within one deadline, and calls back exactly once.

It owns sockets until it hands them over (a listener to its `Acceptor`, a dialled socket to the
callback) and the address rules: `HOSTNAME_RE` (what counts as a host name), `hostport()` and
`format_addr()` (how an address is written).  It must not know any protocol, nor block: names
are resolved in the loop's thread pool, never on the loop.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import logging
import re
from typing import Any, Callable

from .loop import READ, WRITE, Loop, Timer

log = logging.getLogger("anywhere.net")

HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")

Address = tuple  # (host, port) or (host, port, flowinfo, scope_id)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: list[str]) -> list[Network]:
    """IP addresses and CIDRs, v4 and v6 (an address is its /32 or /128; host bits are ignored):
    the one parser of whitelists, for the configuration and the API alike.  ValueError whose
    argument is the first entry that is neither; each caller words its own message."""
    nets: list[Network] = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except (ValueError, TypeError, AttributeError):
            raise ValueError(entry) from None
    return nets


@functools.lru_cache(maxsize=4096)
def is_ip(host: str) -> bool:  # asked for every dialled target: the answers are kept
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def hostport(host: str, port: int) -> str:
    """``[2001:db8::1]:80``, ``127.0.0.1:80``, ``name:80``: an IPv6 address (anything with a colon)
    in brackets.  `host` is written as given: quote peer input (common.printable) first."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_hostport(text: str) -> tuple[str, int | None]:
    """The inverse of `hostport`, with the port optional: ``name``, ``name:1111``, ``192.0.2.1``,
    ``192.0.2.1:1111``, ``2001:db8::1``, ``[2001:db8::1]``, ``[2001:db8::1]:1111`` -> (host, port
    or None); brackets only around an IPv6 address.  ValueError saying what is wrong, for the caller
    to put after the entry it names."""
    text = text.strip()
    port: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not is_ip(host.split("%", 1)[0]) or ":" not in host or (rest and not rest.startswith(":")):
            raise ValueError("in brackets goes an IPv6 address, e.g. [2001:db8::1] or [2001:db8::1]:1111")
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text
    if not (is_ip(host.split("%", 1)[0]) or HOSTNAME_RE.fullmatch(host)):
        raise ValueError("the host must be a host name or an IP address (an IPv6 address with a port in "
                         "brackets: [2001:db8::1]:1111)")
    if port is None:
        return host, None
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError("the port must be 1..65535")
    return host, int(port)


def format_addr(addr: Address) -> str:
    """A socket address as logs and the API show it; an IPv4 client on a dual-stack socket as IPv4."""
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and is_ip(host[7:]):
        host = host[7:]
    return hostport(host, port)


def client_ip(addr: Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return _client_ip(addr[0])


@functools.lru_cache(maxsize=4096)
def _client_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:  # parsed once per address
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def accepted(sock: socket.socket) -> None:
    """Make an accepted socket non-blocking.  It has TCP_NODELAY already: Linux copies it from the
    listener, which `listen()` sets it on (one system call less per connection)."""
    sock.setblocking(False)


@functools.lru_cache(maxsize=4096)
def _literal_addrs(host: str, port: int) -> tuple[Address, ...]:
    return tuple(info[4] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_NUMERICHOST))


FD_PRESSURE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_PAUSE = 0.5


class Acceptor:
    """Accepts on one listening socket, at most `budget` connections per readiness event.

    Out of file descriptors (EMFILE/ENFILE) the pending connection cannot be accepted, and a
    level-triggered listener would wake the loop again at once: a busy loop.  So the listener is
    taken off the loop for `ACCEPT_PAUSE` seconds, then tried again, with one log line per
    episode; it recovers by itself once descriptors are free.
    """

    def __init__(self, loop: Loop, sock: socket.socket, handle: Callable[[socket.socket, Any], None], what: str,
                 budget: int = 64) -> None:
        self.loop, self.sock, self.handle, self.what, self.budget = loop, sock, handle, what, budget
        self.paused: Timer | None = None
        self.refused = 0
        loop.register(sock, READ, self._on_ready)

    def _on_ready(self, _mask: int) -> None:
        for _ in range(self.budget):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in FD_PRESSURE:
                    self._pause(exc)
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    log.warning("accept on %s failed: %s", self.what, exc.strerror or exc)
                return
            if self.refused:
                log.warning("accepting on %s again after running out of file descriptors", self.what)
                self.refused = 0
            self.handle(conn, addr)

    def _pause(self, exc: OSError) -> None:
        if not self.refused:
            log.error("accept on %s: %s; pausing it for %.1f s (raise LimitNOFILE or lower the limits)",
                      self.what, exc.strerror, ACCEPT_PAUSE)
        self.refused += 1
        self.loop.unregister(self.sock)
        self.paused = self.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self.paused = None
        self.loop.register(self.sock, READ, self._on_ready)

    def close(self) -> None:
        """Stop accepting and close the listening socket; idempotent."""
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None
        self.loop.unregister(self.sock)
        self.sock.close()


# A UDP socket's receive buffer (a proxy's, and the agent's socket of a flow): what arrives while
# the loop is busy elsewhere waits there, and beyond it the kernel drops.  Linux's default (208 KiB)
# lost 0.1% of iperf3 -u at 200 Mbit/s in the proxy's socket; the kernel caps this at rmem_max
# (4 MiB on Debian's defaults), and charges only what is queued.
UDP_RCVBUF = 4 << 20


def listen(hosts: list[str] | tuple[str, ...], port: int, backlog: int = 1024,
           kind: int = socket.SOCK_STREAM) -> list[socket.socket]:
    """Bind listeners on every host ("" or "::" means every address, v4 and v6); `kind`
    SOCK_DGRAM: bound UDP sockets instead (a UDP proxy's).

    Raises OSError (with the address in its message) if any bind fails; nothing stays open then.
    """
    socks: list[socket.socket] = []
    try:
        for host in hosts or [""]:
            if host in ("", "::", "*"):
                socks.append(_listen_any(port, backlog, kind))
                continue
            infos = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)
            seen = set()
            for family, _type, _proto, _name, sockaddr in infos:
                if sockaddr[:2] not in seen:
                    seen.add(sockaddr[:2])
                    socks.append(_bind(family, sockaddr, backlog, v6only=True, kind=kind))
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def _listen_any(port: int, backlog: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    if socket.has_ipv6:
        try:
            return _bind(socket.AF_INET6, ("::", port), backlog, v6only=False, kind=kind)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
    return _bind(socket.AF_INET, ("0.0.0.0", port), backlog, v6only=True, kind=kind)


def _bind(family: int, sockaddr: Address, backlog: int, v6only: bool, kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {format_addr(sockaddr)}: {exc.strerror}") from None
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
            sock.listen(backlog)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def resolve(host: str, port: int) -> list[Address]:
    """Blocking getaddrinfo, for the resolver thread."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4] for info in infos]


class Dialer:
    """Connect to host:port within `timeout` seconds; `callback(sock, None)` or `callback(None, reason)`."""

    def __init__(self, loop: Loop, host: str, port: int, timeout: float,
                 callback: Callable[[socket.socket | None, str | None], None],
                 address_ok: Callable[[str], bool] | None = None, refused: str = "",
                 keep_registered: bool = False) -> None:
        """`address_ok`: only resolved addresses it accepts are dialled; if none, fail with `refused`.
        `keep_registered`: the connected socket is handed over still registered with the loop
        (for WRITE, to this dialer), and the callback must re-register or unregister it: one
        selector change less for a caller that registers it anyway."""
        self.keep_registered = keep_registered
        self.loop = loop
        self.address_ok = address_ok
        self.refused = refused
        self.host = host
        self.port = port
        self.callback: Callable[[socket.socket | None, str | None], None] | None = callback
        self.sock: socket.socket | None = None
        self.addrs: list[Address] = []
        self.last_error = "no address"
        self.timer: Timer = loop.call_later(timeout, self._on_timeout)
        if is_ip(host.split("%", 1)[0]):
            loop.call_soon(self._resolve_literal)  # never call back from inside __init__
        else:
            loop.run_in_thread(lambda: resolve(host, port), self._on_resolved)

    def _resolve_literal(self) -> None:
        try:
            addrs, error = list(_literal_addrs(self.host, self.port)), None  # a literal never changes: cached
        except OSError as exc:
            addrs, error = None, exc
        self._on_resolved(addrs, error)

    def _on_resolved(self, addrs: list[Address] | None, error: BaseException | None) -> None:
        if self.callback is None:
            return
        if error is not None or not addrs:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error or "no address")
            self._finish(None, f"cannot resolve {self.host}: {reason}")
            return
        self.addrs = list(addrs)
        if self.address_ok is not None:
            self.addrs = [a for a in self.addrs if self.address_ok(a[0])]
            if not self.addrs:
                self._finish(None, self.refused or f"no allowed address for {self.host}")
                return
        self._next()

    def _next(self) -> None:
        while self.addrs:
            addr = self.addrs.pop(0)
            family = socket.AF_INET6 if len(addr) == 4 else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # no extra call to set it
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(addr)
            if err in (0, errno.EINPROGRESS):
                self.sock = sock
                self.loop.register(sock, WRITE, self._on_writable)
                return
            sock.close()
            self.last_error = f"{format_addr(addr)}: {os.strerror(err)}"
        self._finish(None, self.last_error)

    def _on_writable(self, _mask: int) -> None:
        sock = self.sock
        assert sock is not None  # registered only while dialling (our own state)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            if not self.keep_registered:
                self.loop.unregister(sock)
            self.sock = None
            self._finish(sock, None)
            return
        self.loop.discard(sock)
        try:
            peer = format_addr(sock.getpeername())
        except OSError:
            peer = f"{self.host}:{self.port}"
        self.last_error = os.strerror(err)
        if self.addrs:
            self.last_error = f"{peer}: {os.strerror(err)}"
        sock.close()
        self.sock = None
        self._next()

    def _on_timeout(self) -> None:
        self._finish(None, f"timed out connecting to {self.host}:{self.port}")

    def cancel(self) -> None:
        self.callback = None
        self._cleanup()

    def _cleanup(self) -> None:
        self.timer.cancel()
        if self.sock is not None:
            self.loop.discard(self.sock)
            self.sock.close()
            self.sock = None

    def _finish(self, sock: socket.socket | None, reason: str | None) -> None:
        callback, self.callback = self.callback, None
        self._cleanup()
        if callback is None:
            if sock is not None:
                self.loop.discard(sock)
                sock.close()
            return
        callback(sock, reason)


RECV_BUDGET = 64  # datagrams read per UDP listener per loop pass
_RECV_BUF = bytearray(65536)
_RECV_VIEW = memoryview(_RECV_BUF)


class UdpListener:
    """One bound UDP socket (a UDP proxy's, server/udp.py): reads at most `RECV_BUDGET` datagrams
    per readiness event, `handle(datagram, addr, self)` each; `send` drops what the kernel refuses."""

    def __init__(self, loop: Loop, sock: socket.socket, handle: Callable[[bytes, Any, "UdpListener"], None],
                 what: str) -> None:
        self.loop, self.sock, self.handle, self.what = loop, sock, handle, what
        self.closed = False
        loop.register(sock, READ, self._on_ready)

    def _on_ready(self, _mask: int) -> None:
        for _ in range(RECV_BUDGET):
            if self.closed:
                return
            try:
                n, addr = self.sock.recvfrom_into(_RECV_BUF)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors of earlier sends (ECONNREFUSED...): nothing to do
                if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    log.debug("recvfrom on %s: %s", self.what, exc.strerror or exc)
                continue
            self.handle(bytes(_RECV_VIEW[:n]), addr, self)

    def send(self, datagram: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(datagram, addr)
        except OSError:
            pass  # UDP: a datagram the kernel will not take (full buffer, unreachable) is lost

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.close_socket(self.sock, True)
