"""The PROXY protocol (HAProxy's, versions 1 and 2) toward a target: the header, sans-IO.

A proxy with ``proxy_protocol = v1 | v2`` tells its target who the real client is: the agent
writes one header into the target connection as soon as it is open, before any byte in either
direction (a target that speaks first, like SSH or SMTP, reads the header before it hears
anything, since it is the first thing it receives).  The spec:
https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt.

* v1, text, at most 107 bytes: ``PROXY TCP4 SRC DST SPORT DPORT\\r\\n`` (TCP6 for IPv6).
* v2, binary: the 12-byte signature ``\\r\\n\\r\\n\\0\\r\\nQUIT\\n``, 0x21 (version 2, command
  PROXY), the family and transport (0x11 TCP over IPv4, 0x21 TCP over IPv6), the length of what
  follows (2 bytes, big-endian: 12 or 36), then source address, destination address, source
  port, destination port (network order).  No TLVs.

Source is the client's address and port as the server accepted it; destination the address and
port the client dialled (the accepted socket's own address).  An IPv4 client of a dual-stack
listener is seen as ``::ffff:a.b.c.d``: both addresses are given as IPv4 then (`plain`), never
as mapped IPv6.  The two always share a family (a connection's two ends do); a mixed pair (which
only a broken caller makes) is refused.

How the addresses travel from server to agent: three fields of the trunk's OPEN (mux.py)
``"pp": 1 | 2, "src": [IP, PORT], "dst": [IP, PORT]`` (`open_fields`), sent only to an agent
whose trunk announced ``pp=1``.  The agent checks them (`parse_open_fields`): bounded, literal
addresses of one family, ports 0..65535; anything else fails that stream (FAIL), never the trunk.

Rules: no I/O, no logging; every input from the peer is checked before use and errors are
ValueError with a bounded message.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, NamedTuple

VERSIONS = ("v1", "v2")  # a proxy's proxy_protocol; off is None (absent, null or "off" where it is given)
OFF = "off"
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_PROXY = 0x21  # version 2 << 4 | command PROXY
TCP4, TCP6 = 0x11, 0x21  # AF_INET / AF_INET6 << 4 | STREAM
V1_MAX = 107  # the longest v1 line, CRLF included (the spec's figure)
_MAX_IP_TEXT = 45  # the longest IPv6 text form (with an embedded IPv4 tail)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Origin(NamedTuple):
    """What a PROXY header says: its version (1 or 2), the client (source) and the address it dialled."""

    version: int
    src: tuple[Address, int]
    dst: tuple[Address, int]


def parse_version(value: Any) -> str | None:
    """A proxy's proxy_protocol as given (file, flag, API): "v1" or "v2"; None for off (None, "off").
    ValueError otherwise (the caller names where it came from)."""
    if value is None or value == OFF:
        return None
    if value in VERSIONS:
        return value
    raise ValueError("must be v1, v2 or off")


def plain(ip: str | Address) -> Address:
    """An address as a PROXY header gives it: an IPv4-mapped IPv6 address (a v4 client of a
    dual-stack listener) as IPv4; a scope id dropped."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0] if isinstance(ip, str) else ip)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id is not None:
            return ipaddress.IPv6Address(addr.compressed.split("%", 1)[0])
    return addr


def origin(version: int, src: tuple[Any, int], dst: tuple[Any, int]) -> Origin:
    """An Origin from (ip, port) pairs as sockets give them (getpeername / getsockname; IPv6 tuples
    may carry flowinfo and scope id after the port).  ValueError if they are not one family."""
    s_ip, d_ip = plain(src[0]), plain(dst[0])
    if s_ip.version != d_ip.version:
        raise ValueError(f"source {s_ip} and destination {d_ip} are not of one address family")
    if version not in (1, 2):
        raise ValueError(f"PROXY protocol version {version!r} is not 1 or 2")
    for port in (src[1], dst[1]):
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port {port!r} is not 0..65535")
    return Origin(version, (s_ip, src[1]), (d_ip, dst[1]))


def header(o: Origin) -> bytes:
    """The header bytes for `o`, v1 or v2 by its version."""
    (s_ip, s_port), (d_ip, d_port) = o.src, o.dst
    if o.version == 1:
        family = "TCP4" if s_ip.version == 4 else "TCP6"
        return f"PROXY {family} {s_ip.compressed} {d_ip.compressed} {s_port} {d_port}\r\n".encode("ascii")
    body = s_ip.packed + d_ip.packed + struct.pack("!HH", s_port, d_port)
    return SIGNATURE + struct.pack("!BBH", V2_PROXY, TCP4 if s_ip.version == 4 else TCP6, len(body)) + body


# -- OPEN's fields ---------------------------------------------------------------------------------------
def open_fields(o: Origin) -> dict[str, Any]:
    """The fields OPEN carries for a stream whose target gets a header (see the module's docstring)."""
    return {"pp": o.version, "src": [o.src[0].compressed, o.src[1]], "dst": [o.dst[0].compressed, o.dst[1]]}


def parse_open_fields(data: dict[str, Any]) -> Origin | None:
    """The Origin an OPEN's decoded JSON asks for; None when it has no "pp" (no header).
    ValueError, with a bounded message, for anything malformed."""
    version = data.get("pp")
    if version is None:
        if "src" in data or "dst" in data:
            raise ValueError("OPEN has src/dst without pp")
        return None
    if isinstance(version, bool) or version not in (1, 2):
        raise ValueError("OPEN pp must be 1 or 2")
    ends = []
    for key in ("src", "dst"):
        value = data.get(key)
        if not isinstance(value, list) or len(value) != 2:
            raise ValueError(f"OPEN {key} must be [IP, PORT]")
        ip, port = value
        if not isinstance(ip, str) or not 0 < len(ip) <= _MAX_IP_TEXT or "%" in ip:
            raise ValueError(f"OPEN {key} address must be an IP address literal")
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"OPEN {key} address must be an IP address literal") from None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"OPEN {key} port must be 0..65535")
        ends.append((addr, port))
    return origin(version, ends[0], ends[1])
