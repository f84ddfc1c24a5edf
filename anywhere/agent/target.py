"""Dialing a target the server asked for, within this agent's allowlist.

Theory of operation
-------------------
Every data path (trunks.py, dataconns.py) reaches its target through `Targets.dial`, the one
place where the allowlist is applied:

* an address literal is dialled if the list permits that address and port;
* a name is dialled if the list holds that name (and port);
* a name the list does not hold is dialled only at those of its resolved addresses the list's
  networks permit (net.Dialer's ``address_ok``); if the list has no networks it is refused at once.

A refusal reaches the caller's callback like a failed dial, ``callback(None, reason)``, on a
later loop pass, and names the target and the list, so the server can tell its client's operator
why.  `allowlist` and `timeout` are replaced by a reload; dials already under way keep theirs.

UDP flows (`dial_udp`) pass the same list the same way; "dialling" is creating a UDP socket
connected to the first permitted address (a name is resolved in the loop's thread pool).

Rules: this module holds no connection, logs nothing and never talks to the server: answering
``fail`` is the data path's.  The host comes from the server: it is shown only through
`target_name` (printable, bounded).
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from ..allow import Allowlist
from ..common import printable
from ..loop import Loop
from ..net import UDP_RCVBUF, Dialer, hostport, is_ip

DialCallback = Callable[[socket.socket | None, str | None], None]


def target_name(host: str, port: int) -> str:
    """``host:port`` (``[v6]:port``) for logs and messages, with the server's `host` made printable and bounded."""
    return hostport(printable(host, 255), port)


class Targets:
    """The agent's way to its targets: the allowlist and the dial timeout."""

    def __init__(self, loop: Loop, allowlist: Allowlist, timeout: float) -> None:
        self.loop = loop
        self.allowlist = allowlist
        self.timeout = timeout

    def dial(self, host: str, port: int, callback: DialCallback, *, keep_registered: bool = False) -> Dialer | None:
        """Dial host:port if the allowlist permits it; `callback` and `keep_registered` as net.Dialer's.

        Returns the Dialer (cancel it to give up), or None when the target is refused outright
        (the callback then still comes, with the reason)."""
        allowlist = self.allowlist
        literal = is_ip(host.split("%", 1)[0])
        if allowlist.permits_address(host, port) if literal else allowlist.permits_name(host, port):
            return Dialer(self.loop, host, port, self.timeout, callback, keep_registered=keep_registered)
        refused = f"{target_name(host, port)} is not in this agent's allowlist (allow = {allowlist})"
        if literal or not allowlist.has_networks:
            self.loop.call_soon(callback, None, refused)
            return None
        # a name the list does not hold: dialled only at resolved addresses its networks allow
        return Dialer(self.loop, host, port, self.timeout, callback, refused=refused, keep_registered=keep_registered,
                      address_ok=lambda address: allowlist.permits_address(address, port))

    def dial_udp(self, host: str, port: int, callback: DialCallback) -> "UdpDial":
        """A non-blocking UDP socket connected to host:port if the allowlist permits it; `callback`
        as `dial`'s, always on a later loop pass.  Cancel the returned UdpDial to give up."""
        return UdpDial(self.loop, self.allowlist, host, port, callback)


class UdpDial:
    """One UDP target being reached: the allowlist, the name resolved if need be, a connected socket."""

    def __init__(self, loop: Loop, allowlist: Allowlist, host: str, port: int, callback: DialCallback) -> None:
        self.loop, self.callback, self.cancelled = loop, callback, False
        self.port = port
        literal = is_ip(host.split("%", 1)[0])
        refused = f"{target_name(host, port)} is not in this agent's allowlist (allow = {allowlist})"
        if allowlist.permits_address(host, port) if literal else allowlist.permits_name(host, port):
            ok: Callable[[str], bool] = lambda address: True  # noqa: E731
        elif literal or not allowlist.has_networks:
            loop.call_soon(self._done, None, refused)
            return
        else:
            ok = lambda address: allowlist.permits_address(address, port)  # noqa: E731
        self.refused, self.ok = refused, ok
        if literal:
            loop.call_soon(self._connect, [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)])
            return
        loop.run_in_thread(lambda: socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM), self._resolved)

    def _resolved(self, infos: Any, error: BaseException | None) -> None:
        if error is not None:
            self._done(None, f"cannot resolve {self.refused.split(' is not', 1)[0]}: {error}")
            return
        self._connect([(info[0], info[4][0]) for info in infos])

    def _connect(self, addresses: list[tuple[int, str]]) -> None:
        if self.cancelled:
            return
        last = self.refused
        for family, address in addresses:
            if not self.ok(address):
                continue
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
                sock.setblocking(False)
                sock.connect((address, self.port))
            except OSError as exc:
                sock.close()
                last = f"cannot reach {hostport(address, self.port)}: {exc.strerror or exc}"
                continue
            self._done(sock, None)
            return
        self._done(None, last)

    def _done(self, sock: socket.socket | None, error: str | None) -> None:
        if self.cancelled:
            if sock is not None:
                sock.close()
            return
        self.callback(sock, error)

    def cancel(self) -> None:
        self.cancelled = True
