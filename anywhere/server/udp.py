"""UDP proxies: datagrams on a proxy's port, one flow per client address and port.

Theory of operation
-------------------
A proxy with ``protocol = udp`` binds UDP sockets (net.UdpListener) on its remote_port, on the same
addresses as TCP proxies (proxy_bind; "" is dual-stack).  remote_port is unique per protocol: a
UDP proxy may share its port number with a TCP proxy (the kernel keeps the two apart; DNS wants
53/udp and 53/tcp), under a name of its own, and `anywherectl proxy del PORT` then refuses to
guess (ranges.by_port: say which by name).  Each datagram's source
(address, port) is a flow (`Flow`): the first datagram of a new source is checked against the
whitelist (the proxy's, else the global one: a source it refuses gets nothing and opens no flow),
`max_flows` (beyond it, datagrams of new sources are dropped, counted as a ``limit`` rejection,
logged throttled) and the limits of routing, then routing places it like a TCP client (a
`routing.Pending` without a socket) on a trunk of its agent as a `trunk.DatagramStream`, OPEN
carrying ``udp`` (the flow's idle timeout).  Only a trunk whose agent said ``udp=1`` in its
``trunk`` message gets one; an agent that did not, or one without trunks (pool_size = 0, the
deprecated per-client data connections, which carry TCP only), fails the flow with a log line that
says so.  Datagrams of a flow waiting for its stream (the agent's trunks opened on demand, READY
not yet back) are held, at most `HOLD_DATAGRAMS` and `HOLD_BYTES`; beyond, dropped.

The trunk is reliable: nothing is lost or reordered inside the tunnel, but a datagram the agent's
link loses is sent again by TCP, so a lossy link adds delay instead of loss (as in frp and
rathole).  Datagrams are never buffered without bound: one that does not fit in its flow's send
window, or arrives while the trunk's queue is full, is dropped at the edge and counted
(`dropped`, per proxy; GET /v1/proxies ``datagrams_dropped``).

A flow ends after `udp_idle_timeout` seconds without a datagram either way (`sweep`, here; the
agent keeps its own timer as a backstop) by closing its stream (ABORT: the agent closes its UDP
socket), when killed (conn kill), or with its trunk.  Flows are listed and counted as connections
(routing's tunnels, marked ``protocol: udp``).

Rules: no buffer without a bound; nothing here decides which agent or trunk (routing, paths); the
listener socket is shared by all flows of a port and closed only with the proxy's listeners.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..dgram import MAX_DATAGRAM
from ..loop import Loop
from ..net import UdpListener, client_ip, format_addr
from .proxy import allowed

log = logging.getLogger("anywhere.server")

HOLD_DATAGRAMS = 8  # datagrams a flow holds while waiting for its stream
HOLD_BYTES = 64 * 1024
SWEEP = 0.5  # seconds between looks for idle flows (a flow ends within this much after its timeout)


class Flow:
    """One client address and port of a UDP proxy."""

    def __init__(self, proxy: Any, addr: Any, listener: UdpListener) -> None:
        self.proxy = proxy
        self.addr = addr
        self.peer = format_addr(addr)
        self.listener = listener  # where its replies are sent from (the socket its datagrams came to)
        self.stream: Any = None  # the DatagramStream, once READY
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.ended = False

    def deliver(self, datagram: bytes) -> None:
        """A datagram from the target: to the client."""
        self.listener.send(datagram, self.addr)

    def hold(self, datagram: bytes) -> bool:
        if len(self.held) >= HOLD_DATAGRAMS or self.held_bytes + len(datagram) > HOLD_BYTES:
            return False
        self.held.append(datagram)
        self.held_bytes += len(datagram)
        return True


class UdpFlows:
    """Every UDP flow of the server, by (proxy name, client address)."""

    def __init__(self, loop: Loop, router: Any, global_nets: Callable[[], list]) -> None:
        self.loop = loop
        self.router = router
        self._global_nets = global_nets
        self.flows: dict[tuple[str, Any], Flow] = {}
        self.per_proxy: dict[str, int] = {}
        self.dropped: dict[str, int] = {}  # per proxy: datagrams dropped at the edge
        self._sweep: Any = None  # armed while there are flows (an idle server has no timer for UDP)

    def _drop(self, proxy: Any, n: int = 1) -> None:
        self.dropped[proxy.name] = self.dropped.get(proxy.name, 0) + n

    def on_datagram(self, proxy: Any, datagram: bytes, addr: Any, listener: UdpListener) -> None:
        if len(datagram) > MAX_DATAGRAM:  # only over IPv6 (jumbo): not carried
            self._drop(proxy)
            return
        flow = self.flows.get((proxy.name, addr))
        if flow is not None:
            stream = flow.stream
            if stream is not None:
                if not stream.send_datagram(datagram):
                    self._drop(proxy)
            elif not flow.hold(datagram):
                self._drop(proxy)
            return
        router = self.router
        if not router.accepting:
            return
        peer, ip = format_addr(addr), client_ip(addr)
        nets = proxy.nets or self._global_nets()
        if nets and not allowed(ip, nets):  # checked again by routing; here so that it comes before max_flows
            which = "proxy's" if proxy.nets else "global"
            self._refuse(proxy, "whitelist", peer, f"refused: not in the {which} whitelist")
            return
        if self.per_proxy.get(proxy.name, 0) >= proxy.max_flows:
            self._refuse(proxy, "limit", peer, f"refused: the proxy has max_flows = {proxy.max_flows} UDP flows")
            return
        flow = Flow(proxy, addr, listener)
        flow.hold(datagram)
        self.flows[(proxy.name, addr)] = flow
        self.per_proxy[proxy.name] = self.per_proxy.get(proxy.name, 0) + 1
        if self._sweep is None:
            self._sweep = self.loop.call_later(SWEEP, self.sweep)
        router.admit(proxy, ip, peer, None, flow)

    def _refuse(self, proxy: Any, reason: str, peer: str, detail: str) -> None:
        """A datagram of a new source refused: counted, logged throttled, as routing does for clients."""
        self.router.limits.throttled_log(("client", proxy.name, reason, peer.rsplit(":", 1)[0]),
                                         f"proxy {proxy.name}: udp client {peer} {detail}")
        self.router.tally.reject(proxy, reason, peer, detail)

    def dropped_pending(self, pending: Any, reason: str, kind: str | None) -> None:
        """Routing gave up on a flow before its stream was open: logged throttled (a source that keeps
        sending is asked for again with each datagram), and forgotten."""
        if reason != "server stopping":
            self.router.limits.throttled_log(("flow", pending.proxy.name, kind, pending.peer.rsplit(":", 1)[0]),
                                             f"proxy {pending.proxy.name}: udp flow {pending.peer} closed: {reason}")
        self.end(pending.flow)

    def ready(self, flow: Flow, stream: Any) -> None:
        """Its stream is open (READY): what it held goes now."""
        flow.stream = stream
        held, flow.held, flow.held_bytes = flow.held, [], 0
        for datagram in held:
            if not stream.send_datagram(datagram):
                self._drop(flow.proxy)

    def end(self, flow: Flow) -> None:
        """The flow is over (its stream closed, or it was never placed): forget it."""
        if flow.ended:
            return
        flow.ended = True
        key = (flow.proxy.name, flow.addr)
        if self.flows.get(key) is flow:
            del self.flows[key]
            self.per_proxy[flow.proxy.name] -= 1
            if not self.per_proxy[flow.proxy.name]:
                del self.per_proxy[flow.proxy.name]
        flow.held = []

    def sweep(self) -> None:
        """Every SWEEP seconds while there are flows: those idle for their proxy's udp_idle_timeout end."""
        self._sweep = None
        now = self.loop.time()
        for flow in list(self.flows.values()):
            stream = flow.stream
            if stream is not None and now - stream.last_active >= flow.proxy.udp_idle_timeout:
                stream.close(f"idle for {flow.proxy.udp_idle_timeout:g} s")
        if self.flows:
            self._sweep = self.loop.call_later(SWEEP, self.sweep)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
