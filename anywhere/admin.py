"""The admin API: HTTP/1.1 + JSON on a Unix socket, parsed on the loop with h11.

Theory of operation
-------------------
`AdminServer` accepts on one or more listening sockets (the Unix socket, later optionally TCP).
Each accepted connection is an `_AdminConn` that feeds bytes to an `h11.Connection` and reacts to
its events.  A request's body is collected up to `MAX_BODY` bytes (a larger Content-Length gets
413 at once), parsed as JSON and handed as a `Request` (method, path, body, and who asked: the
peer's uid/gid/pid from SO_PEERCRED on the Unix socket, the address on TCP) to the ``handler``,
which returns ``(status, object)`` or raises `ApiError`.  Responses are JSON (``{"error": "..."}``
for failures), or a `RawBody` such as the Prometheus exposition.  On a TCP listener every
request needs ``Authorization: Bearer <token>`` (compared in constant time), except the paths
the listener declares public.  A request must arrive whole within `REQUEST_TIMEOUT` seconds (a slow or silent
client is dropped), and garbage gets a 400 from h11's own protocol error, then a close.  Nothing
one client does affects another or the daemon.
"""

from __future__ import annotations

import errno
import grp
import hmac
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

from .loop import READ, WRITE, Loop, Timer
from .net import Acceptor

log = logging.getLogger("anywhere.admin")

MAX_BODY = 64 * 1024
MAX_HEADERS = 16 * 1024
REQUEST_TIMEOUT = 10.0
MAX_CONNS = 64


class ApiError(Exception):
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
    public: Callable[[], tuple[str, ...]] = tuple  # paths served without the token (read per request)


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
        if len(self.conns) >= MAX_CONNS:
            log.warning("admin connection refused: %d already open", MAX_CONNS)
            sock.close()
            return
        conn = _AdminConn(self, listener, sock, addr)
        self.conns.add(conn)
        if conn.caller.transport == "unix" and not self.allowed(conn.caller):
            log.warning("admin connection from %s refused: not root and not in group %s", conn.caller, self.group)
            conn.refuse(403, f"permission denied: run as root or as a member of group {self.group}")

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
    def __init__(self, server: AdminServer, listener: Listener, sock: socket.socket, addr: Any) -> None:
        self.server = server
        self.listener = listener
        self.loop = server.loop
        self.sock = sock
        if sock.family == socket.AF_UNIX:
            try:
                pid, uid, gid = peer_credentials(sock)
            except OSError:
                pid = uid = gid = None
            self.caller = Caller("unix", uid=uid, gid=gid, pid=pid)
        else:
            from .net import format_addr
            self.caller = Caller("tcp", address=format_addr(addr))
        self.peer = str(self.caller)
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        self.out = bytearray()
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.closing = False
        self.closed = False
        self.mask = READ
        sock.setblocking(False)
        self.loop.register(sock, READ, self._on_event)
        self.timer: Timer = self.loop.call_later(server.timeout, self._on_timeout)

    # -- I/O -------------------------------------------------------------------------------------
    def _on_event(self, mask: int) -> None:
        if mask & WRITE:
            self._flush()
        if mask & READ and not self.closed and not self.closing:
            self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        try:
            self.h11.receive_data(data)
        except h11.RemoteProtocolError as exc:
            self._protocol_error(exc)
            return
        self._process()

    def _process(self) -> None:
        while not self.closed and not self.closing:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is h11.NEED_DATA:
                if self.h11.their_state is h11.DONE and self.h11.our_state is h11.DONE:
                    return
                return
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = event
                self.body.clear()
                length = _content_length(event)
                if length is not None and length > self.server.max_body:
                    self._respond(413, {"error": f"request body of {length} bytes exceeds {self.server.max_body}"},
                                  close=True)
                    return
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > self.server.max_body:
                    self._respond(413, {"error": f"request body exceeds {self.server.max_body} bytes"}, close=True)
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        log.info("bad admin request from %s: %s", self.peer, exc)
        status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
        self._respond(status, {"error": f"bad request: {exc}"}, close=True, head=False)

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
            self._respond(400, {"error": f"request target is not a valid path: {exc}"})
            return
        try:
            self._authorize(request)
            status, obj = self.server.handler(request)
        except ApiError as exc:
            status, obj = exc.status, {"error": exc.message}
        except Exception:
            log.exception("admin handler failed for %s %s", method, target)
            status, obj = 500, {"error": "internal error; see the daemon's log"}
        self._respond(status, obj)

    def refuse(self, status: int, message: str) -> None:
        """Answer at once, whatever the peer sends, and close."""
        self._respond(status, {"error": message}, close=True, head=False)

    def _authorize(self, request: Request) -> None:
        token_of = self.listener.token
        if token_of is None or request.path in self.listener.public():
            return
        expected = token_of()
        given = ""
        assert self.request is not None  # set before dispatch
        for name, value in self.request.headers:
            if name == b"authorization":
                scheme, _, credential = value.decode("latin-1").partition(" ")
                given = credential.strip() if scheme.lower() == "bearer" else ""
        if not expected or not given or not hmac.compare_digest(given.encode(), expected.encode()):
            log.warning("REST request %s %s from %s refused: %s", request.method, request.path, self.caller.address,
                        "no bearer token" if not given else "wrong token")
            raise ApiError(401, "a valid bearer token is required (Authorization: Bearer TOKEN)")

    def _respond(self, status: int, obj: Any, close: bool = False, head: bool | None = None) -> None:
        """Send one response; to a HEAD request (`head` None: as the request says) the headers only."""
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
        self._flush()

    def _flush(self) -> None:
        if self.closed:
            return
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            del self.out[:sent]
        if not self.out and self.closing:
            self.close()
            return
        mask = (WRITE if self.out else 0) | (0 if self.closing else READ)
        if mask != self.mask:
            self.loop.modify(self.sock, mask, self._on_event)
            self.mask = mask
        if not self.out and not self.closing:
            self._process()  # a pipelined request may be waiting in h11's buffer

    def _on_timeout(self) -> None:
        if not self.closed:
            log.info("admin client %s timed out after %g s", self.peer, self.server.timeout)
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        self.loop.discard(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.conns.discard(self)


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
