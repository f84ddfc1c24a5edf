"""The admin API: HTTP/1.1 + JSON on a Unix socket and an optional TCP REST port, parsed on the loop with h11.

Theory of operation
-------------------
`AdminServer` accepts on one or more listening sockets (the Unix socket, optionally the TCP REST
port).  Each accepted connection is an `_AdminConn` that feeds bytes to an `h11.Connection` and
reacts to its events.  A request's body is collected up to `MAX_BODY` bytes (a larger
Content-Length gets 413 at once), parsed as JSON and handed as a `Request` (method, path, body,
and who asked: the peer's uid/gid/pid from SO_PEERCRED on the Unix socket, the address on TCP)
to the ``handler``, which returns ``(status, object)`` or raises `ApiError`.  Responses are JSON
(``{"error": "..."}`` for failures), or a `RawBody` such as the Prometheus exposition.  On a TCP
listener every request needs ``Authorization: Bearer <token>`` (compared in constant time),
except the paths the listener declares public.  Garbage gets a 400 (or h11's own 4xx) from the
protocol error, then a close.  Nothing one client does affects another or the daemon.

Rules:

* One answer at a time, in order, without recursion.  `_AdminConn._pump` is the only driver:
  while no answer is unsent it takes the next event from h11 and acts on it; an answer stops the
  loop until the socket has taken all of it.  So a pipelining client gets its answers in order,
  and a client that sends requests without reading answers finds us not reading either: the
  kernel's buffers fill and its sends block.  At most `EVENTS_PER_PASS` events are handled per
  loop pass; the rest wait for the next pass, so one pipelining client cannot hold the loop.
* Every buffer of a connection is bounded.  We read (at most `RECV_SIZE` bytes at a time) only
  when h11 needs data to complete an event and no answer is pending, so h11 holds at most
  `MAX_HEADERS` + `RECV_SIZE` bytes; a request head larger than `MAX_HEADERS` gets 431, whether
  it arrived in pieces (h11 counts those) or in one read (counted here); a body is kept up to
  the configured maximum; the output is one answer.
* A request must arrive whole within the request timeout, and an answer must be taken by the
  peer within it (the timer restarts with each answer): a slow, silent or non-reading client is
  dropped.
* A connection we close (after a 4xx that ends it) is closed gracefully: on TCP, closing with
  bytes of the peer unread sends a reset, which destroys the answers it has not read yet (a
  pipelining client loses the end of its answers, the 400 included).  So we shut our side down
  (FIN after the last answer), then read and drop what the peer still sends until it has
  acknowledged everything we sent, it closes, or `LINGER_TIME` passes (HTTP/1.1's "lingering
  close", RFC 9112 9.6); then close.
* Caps on connections, per listener kind: `MAX_UNIX_CONNS` on the Unix socket, `MAX_TCP_CONNS`
  on the REST port(s), and `MAX_TCP_PER_SOURCE` per client address there (an IPv6 client by its
  /64): clients of the REST port, which need no credential to connect, can never take the Unix
  socket's room away from anywherectl, nor one address every TCP slot.  A connection over a cap
  is closed at once; the first refusal of a run is logged, the rest are counted.
* What a peer controls (method, target, the path and query decoded from it, h11's messages about
  its bytes) reaches a log line or an error message only through `common.printable`; a target
  whose decoded path or query holds a control character gets 400 before any handler sees it.

It owns the HTTP side only: connections, h11, limits, authentication of the REST port.  It must
not know the API's routes or the daemon's state (the ``handler`` does; it answers with
``(status, object)`` or `ApiError`), nor let one client block another.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import hmac
import ipaddress
import json
import logging
import os
import pwd
import socket
import stat
import struct
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

import h11

from .common import has_control, printable
from .errors import AnywhereError
from .loop import READ, WRITE, Loop, Timer
from .net import Acceptor, client_ip, format_addr

log = logging.getLogger("anywhere.admin")

MAX_BODY = 64 * 1024
MAX_HEADERS = 16 * 1024  # request line and headers
RECV_SIZE = 16 * 1024  # one read
REQUEST_TIMEOUT = 10.0
REFUSAL_LOG_EVERY = 10.0  # seconds: 401s are logged once per source address this often
EVENTS_PER_PASS = 64  # h11 events handled per connection per loop pass
LINGER_TIME = 2.0  # seconds a closing TCP connection waits for the peer to take our last answers
LINGER_CHECK = 0.05  # seconds between looks at what the peer has not acknowledged yet
SIOCOUTQ = 0x5411  # linux/sockios.h (TIOCOUTQ): bytes of a TCP socket's send queue not yet acknowledged
MAX_UNIX_CONNS = 64
MAX_TCP_CONNS = 64
MAX_TCP_PER_SOURCE = 16



class ApiError(AnywhereError):
    """An HTTP answer other than 2xx, with its message: only this edge speaks in status codes
    (domain errors are errors.OperationError, mapped by server/api.py)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class RawBody:
    content_type: str
    data: bytes


@dataclass
class Caller:
    """Who sent a request: a local process (Unix socket) or a TCP peer holding the token."""
    transport: str  # "unix" or "tcp"
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    address: str = ""

    def __str__(self) -> str:
        if self.transport == "unix":
            try:
                user = pwd.getpwuid(self.uid).pw_name if self.uid is not None else "?"
            except KeyError:
                user = "?"
            return f"uid={self.uid}({user}) pid={self.pid}"
        return f"token@{self.address}"


@dataclass
class Request:
    method: str
    target: str
    body: Any
    caller: Caller
    path: str = ""
    query: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        split = urllib.parse.urlsplit(self.target)
        self.path = urllib.parse.unquote(split.path).rstrip("/") or "/"
        self.query = dict(urllib.parse.parse_qsl(split.query))


@dataclass
class Listener:
    sock: socket.socket
    acceptor: Acceptor | None
    token: Callable[[], str | None] | None = None  # None: no token needed (the Unix socket)
    public: Callable[[], tuple[str, ...]] = tuple  # paths served without the token (read per request;
    # a "*" segment matches any one segment: /v1/proxies/*/health)


Handler = Callable[[Request], tuple[int, Any]]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", data)


def listen_unix(path: str, mode: int = 0o660) -> socket.socket:
    """Bind the admin socket.  A stale socket file is replaced; a live one is an error."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o750, exist_ok=True)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: left over from a crash
        else:
            raise OSError(errno.EADDRINUSE, f"{path}: another anywhered is already listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot bind admin socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(64)
    sock.setblocking(False)
    return sock


class AdminServer:
    def __init__(self, loop: Loop, handler: Handler) -> None:
        self.loop = loop
        self.handler = handler
        self.listeners: list[Listener] = []
        self.conns: set[_AdminConn] = set()
        self.unix_paths: list[str] = []
        self.timeout = REQUEST_TIMEOUT
        self.max_body = MAX_BODY
        self.group: str | None = None  # besides root and our own uid, members of this group may connect
        self._token_refusals: dict[str, tuple[float, int]] = {}  # source → (last logged, left out since)
        self.refused: dict[str, int] = {"unix": 0, "tcp": 0}  # refusals over a cap since the last accept

    def refused_token(self, request: "Request", address: str, why: str) -> None:
        """Log a 401 at most once per source address every REFUSAL_LOG_EVERY seconds, then how many
        were left out: a client pipelining thousands of requests without a token writes a few lines."""
        source = address.rsplit(":", 1)[0]
        now = self.loop.time()
        last, left_out = self._token_refusals.get(source, (-REFUSAL_LOG_EVERY, 0))
        if now - last < REFUSAL_LOG_EVERY:
            self._token_refusals[source] = (last, left_out + 1)
            return
        if len(self._token_refusals) >= 10000:
            self._token_refusals.clear()
        self._token_refusals[source] = (now, 0)
        more = f" ({left_out} more from {source} in the last {REFUSAL_LOG_EVERY:g} s not logged)" if left_out else ""
        log.warning("REST request %s %s from %s refused: %s%s", printable(request.method), printable(request.path),
                    address, why, more)

    def configure(self, timeout: float, max_body: int, group: str | None) -> None:
        self.timeout, self.max_body, self.group = timeout, max_body, group

    def allowed(self, caller: "Caller") -> bool:
        """Root, the daemon's own user, or a member of `group` (by the caller's groups in /proc, or the group database)."""
        if caller.uid is None:
            return False
        if caller.uid in (0, os.getuid()):
            return True
        if not self.group:
            return False
        try:
            gid = grp.getgrnam(self.group).gr_gid
        except KeyError:
            return False
        if caller.gid == gid:
            return True
        try:
            with open(f"/proc/{caller.pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return str(gid) in line.split()[1:]
        except OSError:
            pass
        try:
            user = pwd.getpwuid(caller.uid).pw_name
        except KeyError:
            return False
        return user in grp.getgrgid(gid).gr_mem

    def add_listener(self, sock: socket.socket, token: Callable[[], str | None] | None = None,
                     public: Callable[[], tuple[str, ...]] = tuple) -> None:
        listener = Listener(sock, None, token, public)
        self.listeners.append(listener)
        if sock.family == socket.AF_UNIX:
            self.unix_paths.append(sock.getsockname())
        what = "the admin socket" if sock.family == socket.AF_UNIX else "the REST port"
        listener.acceptor = Acceptor(self.loop, sock, lambda c, a: self._on_accept(listener, c, a), what, budget=16)

    def _on_accept(self, listener: Listener, sock: socket.socket, addr: Any) -> None:
        kind = "unix" if sock.family == socket.AF_UNIX else "tcp"
        source = None if kind == "unix" else _source(addr)
        over = self._over_cap(kind, source)
        if over:
            self._refuse(kind, "on the admin socket" if kind == "unix" else f"from {format_addr(addr)}", over)
            sock.close()
            return
        if self.refused[kind]:
            log.warning("admin connections on %s accepted again after refusing %d",
                        "the admin socket" if kind == "unix" else "the REST port", self.refused[kind])
            self.refused[kind] = 0
        conn = _AdminConn(self, listener, sock, addr, source)
        self.conns.add(conn)
        if conn.caller.transport == "unix" and not self.allowed(conn.caller):
            log.warning("admin connection from %s refused: not root and not in group %s", conn.caller, self.group)
            conn.refuse(403, f"permission denied: run as root or as a member of group {self.group}")

    def _over_cap(self, kind: str, source: str | None) -> str:
        """Why a new connection of `kind` from `source` would exceed a cap ("" if it would not)."""
        if kind == "unix":
            if sum(1 for c in self.conns if c.source is None) >= MAX_UNIX_CONNS:
                return f"{MAX_UNIX_CONNS} connections already open on the admin socket"
            return ""
        tcp = [c for c in self.conns if c.source is not None]
        if len(tcp) >= MAX_TCP_CONNS:
            return f"{MAX_TCP_CONNS} connections already open on the REST port"
        if sum(1 for c in tcp if c.source == source) >= MAX_TCP_PER_SOURCE:
            return f"{MAX_TCP_PER_SOURCE} connections already open from {source}"
        return ""

    def _refuse(self, kind: str, where: str, why: str) -> None:
        """One log line for the first refusal of a run; the others are counted until an accept."""
        if not self.refused[kind]:
            log.warning("admin connection %s refused: %s (further refusals counted, not logged)", where, why)
        self.refused[kind] += 1

    def close(self) -> None:
        for listener in self.listeners:
            if listener.acceptor is not None:
                listener.acceptor.close()
        self.listeners.clear()
        for path in self.unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.unix_paths.clear()
        for conn in list(self.conns):
            conn.close()


class _AdminConn:
    def __init__(self, server: AdminServer, listener: Listener, sock: socket.socket, addr: Any,
                 source: str | None) -> None:
        self.server = server
        self.listener = listener
        self.loop = server.loop
        self.sock = sock
        self.source = source  # the client's address (IPv6: its /64) on TCP, for the caps; None on the Unix socket
        if sock.family == socket.AF_UNIX:
            try:
                pid, uid, gid = peer_credentials(sock)
            except OSError:
                pid = uid = gid = None
            self.caller = Caller("unix", uid=uid, gid=gid, pid=pid)
        else:
            self.caller = Caller("tcp", address=format_addr(addr))
        self.peer = str(self.caller)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        self.out = bytearray()  # the answer being sent: never more than one
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.closing = False  # close once `out` is sent; nothing more is read
        self.closed = False
        self.linger: Timer | None = None  # set while closing gracefully (see the module's rules)
        self.linger_end = 0.0
        self.resuming = False  # a _pump is scheduled for the next pass (the event budget ran out)
        self.buffered: int | None = None  # bytes h11 holds while we wait for a request head (None: not counted yet)
        self.mask = READ
        sock.setblocking(False)
        self.loop.register(sock, READ, self._on_event)
        self.timer: Timer = self.loop.call_later(server.timeout, self._on_timeout)

    # -- I/O -------------------------------------------------------------------------------------
    def _on_event(self, mask: int) -> None:
        if not mask:  # an error or hang-up while we wait for nothing: the scheduled _pump sees it
            return
        if self.linger is not None:
            self._drop_input()
            return
        if mask & READ and not self.closing:
            self._read()
        self._pump()

    def _read(self) -> None:
        """Feed h11 one read (EOF included); only called when h11 needs data and no answer is pending."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.h11.receive_data(data)
        if self.buffered is not None:
            self.buffered += len(data)

    def _pump(self) -> None:
        """The connection's only driver: send what is pending; while nothing is, handle h11's next
        event.  Returns when the peer must take our answer (WRITE only: we read nothing meanwhile),
        when h11 needs more bytes (READ), or when this pass's event budget is spent."""
        budget = EVENTS_PER_PASS
        while not self.closed:
            if self.out:
                try:
                    sent = self.sock.send(self.out)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self.close()
                    return
                del self.out[:sent]
                if self.out:
                    self._watch(WRITE)
                    return
            if self.closing:
                self._close_gracefully()
                return
            if budget == 0:
                self._watch(0)
                if not self.resuming:
                    self.resuming = True
                    self.loop.call_soon(self._resume)
                return
            budget -= 1
            if not self._step():
                self._watch(READ)
                return

    def _resume(self) -> None:
        self.resuming = False
        self._pump()

    def _watch(self, mask: int) -> None:
        if mask != self.mask and not self.closed:
            self.loop.modify(self.sock, mask, self._on_event)
            self.mask = mask

    def _step(self) -> bool:
        """Handle h11's next event; False when it needs more bytes from the peer."""
        try:
            event, head_size = self._next_event()
        except h11.RemoteProtocolError as exc:
            self._protocol_error(exc)
            return True
        if event is h11.NEED_DATA:
            return False
        if event is h11.PAUSED:
            # cannot happen while each request is answered at its end and the next cycle started
            # at once; should it, nothing more would be answered here
            self.closing = True
        elif isinstance(event, h11.Request):
            self.request = event
            self.body.clear()
            length = _content_length(event)
            if head_size > MAX_HEADERS:
                log.info("bad admin request from %s: request head of %d bytes exceeds %d", self.peer, head_size,
                         MAX_HEADERS)
                self._respond(431, {"error": f"request head of {head_size} bytes exceeds {MAX_HEADERS}"},
                              close=True, head=False)
            elif length is not None and length > self.server.max_body:
                self._respond(413, {"error": f"request body of {length} bytes exceeds {self.server.max_body}"},
                              close=True)
        elif isinstance(event, h11.Data):
            self.body += event.data
            if len(self.body) > self.server.max_body:
                self._respond(413, {"error": f"request body exceeds {self.server.max_body} bytes"}, close=True)
        elif isinstance(event, h11.EndOfMessage):
            self._dispatch()
        elif isinstance(event, h11.ConnectionClosed):
            self.close()
        return True

    def _next_event(self) -> tuple[Any, int]:
        """h11's next event, and for a Request the bytes its line and headers took.  h11 limits an
        incomplete head to MAX_HEADERS but parses a complete one of any size that one read brought:
        the caller enforces the limit with the size measured here.  What h11 holds is measured
        (a copy) once when a head is awaited and once when it is parsed, and counted in between
        (reads add to it, NEED_DATA takes nothing), so a peer sending byte by byte costs no copies."""
        if self.h11.their_state is not h11.IDLE:
            return self.h11.next_event(), 0
        if self.buffered is None:
            self.buffered = len(self.h11.trailing_data[0])
        event = self.h11.next_event()
        if not isinstance(event, h11.Request):
            return event, 0
        size = self.buffered - len(self.h11.trailing_data[0])
        self.buffered = None  # the body's events take what they take: measured again at the next head
        return event, size

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        log.info("bad admin request from %s: %s", self.peer, printable(exc))
        status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
        self._respond(status, {"error": f"bad request: {printable(exc)}"}, close=True, head=False)

    def _dispatch(self) -> None:
        request = self.request
        assert request is not None  # h11 only gives EndOfMessage after a Request
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        try:
            body = json.loads(self.body.decode("utf-8")) if self.body else None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self._respond(400, {"error": f"request body is not valid JSON: {exc.__class__.__name__}"})
            return
        try:
            request = Request(method, target, body, self.caller)
        except ValueError as exc:
            self._respond(400, {"error": f"request target is not a valid path: {printable(exc)}"})
            return
        if any(has_control(text) for text in (request.path, *request.query, *request.query.values())):
            log.info("bad admin request from %s: %s %s has control characters", self.peer, printable(method),
                     printable(request.path))
            self._respond(400, {"error": f"request target has control characters: {printable(request.path)}"})
            return
        try:
            self._authorize(request)
            status, obj = self.server.handler(request)
        except ApiError as exc:
            status, obj = exc.status, {"error": exc.message}
        except Exception:
            log.exception("admin handler failed for %s %s", printable(method), printable(target))
            status, obj = 500, {"error": "internal error; see the daemon's log"}
        self._respond(status, obj)

    def refuse(self, status: int, message: str) -> None:
        """Answer at once, whatever the peer sends, and close."""
        self._respond(status, {"error": message}, close=True, head=False)
        self._pump()

    def _authorize(self, request: Request) -> None:
        token_of = self.listener.token
        if token_of is None or any(_matches(request.path, pattern) for pattern in self.listener.public()):
            return
        expected = token_of()
        given = ""
        assert self.request is not None  # set before dispatch
        for name, value in self.request.headers:
            if name == b"authorization":
                scheme, _, credential = value.decode("latin-1").partition(" ")
                given = credential.strip() if scheme.lower() == "bearer" else ""
        if not expected or not given or not hmac.compare_digest(given.encode(), expected.encode()):
            self.server.refused_token(request, self.caller.address, "no bearer token" if not given else "wrong token")
            raise ApiError(401, "a valid bearer token is required (Authorization: Bearer TOKEN)")

    def _respond(self, status: int, obj: Any, close: bool = False, head: bool | None = None) -> None:
        """Queue one response (the caller's `_pump` sends it); to a HEAD request (`head` None: as
        the request says) the headers only."""
        if head is None:
            head = self.request is not None and self.request.method == b"HEAD"
        if isinstance(obj, RawBody):
            body, content_type = obj.data, obj.content_type
        else:
            body = (json.dumps(obj, indent=None, separators=(",", ":")) + "\n").encode("utf-8")
            content_type = "application/json"
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="anywhered"'))
        if close:
            headers.append(("Connection", "close"))
        try:
            out = self.h11.send(h11.Response(status_code=status, headers=headers)) or b""
            if not head:  # a response to HEAD has the headers of the GET, never a body
                out += self.h11.send(h11.Data(data=body)) or b""
            out += self.h11.send(h11.EndOfMessage()) or b""
            self.out += out
        except h11.LocalProtocolError:
            # h11 will not let us answer (the request line itself was unreadable, or a broken HEAD
            # request): write one minimal response by hand, nothing of h11's, and close
            self.out += b"HTTP/1.1 %d \r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (status, len(body)) + body
            close = True
        if close or self.h11.our_state is h11.MUST_CLOSE:
            self.closing = True
        else:
            try:
                self.h11.start_next_cycle()
                self.timer.cancel()
                self.timer = self.loop.call_later(self.server.timeout, self._on_timeout)
            except h11.LocalProtocolError:
                self.closing = True  # the client has not finished its request: close after replying

    def _close_gracefully(self) -> None:
        """Our last answer is in the kernel: FIN after it, then wait (dropping input) until the peer
        has it all, closes, or LINGER_TIME passes.  The Unix socket closes at once (no reset there)."""
        if self.sock.family == socket.AF_UNIX or self.closed:
            self.close()
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.timer.cancel()
        self.linger_end = self.loop.time() + LINGER_TIME
        self.linger = self.loop.call_later(0, self._linger_check)
        self._watch(READ)

    def _linger_check(self) -> None:
        self.linger = None
        if self.closed:
            return
        try:
            unacknowledged = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            unacknowledged = 0
        if unacknowledged == 0 or self.loop.time() >= self.linger_end:
            self.close()
            return
        self.linger = self.loop.call_later(LINGER_CHECK, self._linger_check)

    def _drop_input(self) -> None:
        """While lingering: read and drop what the peer sends (a few reads per event); its EOF closes."""
        for _ in range(8):
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            if not data:
                self.close()
                return

    def _on_timeout(self) -> None:
        if not self.closed:
            log.info("admin client %s timed out after %g s", self.peer, self.server.timeout)
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.loop.discard(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.conns.discard(self)


def _source(addr: Any) -> str:
    """The key of a TCP client for the per-source cap: its address, an IPv6 one by its /64."""
    ip = client_ip(addr)
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _matches(path: str, pattern: str) -> bool:
    """`path` is `pattern`, where a "*" segment of the pattern stands for exactly one segment."""
    got, want = path.split("/"), pattern.split("/")
    return len(got) == len(want) and all(w == "*" and g != "" or g == w for g, w in zip(got, want))
