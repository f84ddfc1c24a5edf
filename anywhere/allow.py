"""The agent's own allowlist of targets: what a server may make this agent connect to.

``allow = 10.0.0.0/24:80, db.internal:5432, [fd00::5]:22, 192.168.1.7, *`` — each entry is an
IP address or CIDR, or a host name, with an optional ``:port`` (no port: any port).  ``*`` alone
allows everything (the opt-out).  An empty list allows nothing.

A request naming an IP address is allowed if a network entry contains it (with the port).  A
request naming a host is allowed if a name entry matches it (case-insensitively, with the
port); otherwise it is resolved and only the addresses a network entry allows are dialled, so
a name cannot be used to reach an address the list does not cover.

It owns the list's syntax and its decisions, pure functions of the list and the request.  It
must not resolve names nor dial (the agent's Dialer does, asking `permits_address` per address);
host names follow `net.HOSTNAME_RE`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .net import HOSTNAME_RE, hostport


@dataclass(frozen=True)
class Entry:
    net: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    name: str | None
    port: int | None

    def __str__(self) -> str:
        what = str(self.net) if self.net is not None else self.name
        if self.port is None:
            return what or ""
        return hostport(what or "", self.port)  # an IPv6 network has a colon: in brackets


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6 or v6/cidr]:port
        host, _, rest = entry[1:].partition("]")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"{entry!r}: expected ]:PORT after the IPv6 address")
        return host, _port(entry, rest[1:])
    if entry.count(":") == 1:  # v4, v4/cidr or a name, with a port
        host, _, port = entry.partition(":")
        return host, _port(entry, port)
    return entry, None  # no port, or a bare IPv6 address / network


def _port(entry: str, text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{entry!r}: port {text!r} must be 1..65535")
    return int(text)


def parse_allowlist(items: list[str]) -> "Allowlist":
    """ValueError names the entry that is not an address, network or host name."""
    entries: list[Entry] = []
    everything = False
    for item in items:
        item = item.strip()
        if item == "*":
            everything = True
            continue
        host, port = _split_port(item)
        try:
            entries.append(Entry(ipaddress.ip_network(host, strict=False), None, port))
            continue
        except ValueError:
            pass
        if not HOSTNAME_RE.match(host) or "/" in host:
            raise ValueError(f"{item!r} is not an IP address, CIDR or host name (with an optional :PORT)")
        entries.append(Entry(None, host.lower(), port))
    return Allowlist(entries, everything)


class Allowlist:
    def __init__(self, entries: list[Entry], everything: bool) -> None:
        self.entries = entries
        self.everything = everything
        self._decided: dict[tuple[str, int], bool] = {}  # the list never changes: answers are kept

    def permits_address(self, address: str, port: int) -> bool:
        if self.everything:
            return True
        key = (address, port)
        verdict = self._decided.get(key)
        if verdict is None:
            if len(self._decided) >= 4096:
                self._decided.clear()
            verdict = self._decided[key] = self._permits_address(address, port)
        return verdict

    def _permits_address(self, address: str, port: int) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(e.net is not None and ip.version == e.net.version and ip in e.net and e.port in (None, port)
                   for e in self.entries)

    def permits_name(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.lower().rstrip(".")
        return any(e.name == host and e.port in (None, port) for e in self.entries)

    @property
    def has_networks(self) -> bool:
        return self.everything or any(e.net is not None for e in self.entries)

    def __str__(self) -> str:
        shown = ["*"] if self.everything else []
        return ", ".join(shown + [str(e) for e in self.entries]) or "(empty: nothing allowed)"
