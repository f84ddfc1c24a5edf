"""The admin API client: HTTP/JSON over anywhered's Unix socket, with `requests`.

Kept apart from ctl.py so that the daemons, which only build the command-line parser, never
import requests (about 10 MB per process).

It owns the HTTP session to the admin socket.  It must not be imported by the daemons, nor
retry a request on its own (``max_retries=0``).
"""

from __future__ import annotations

import socket
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .common import CtlError

BASE = "http://anywhered"
TIMEOUT = 30.0


# -- HTTP over a Unix socket -------------------------------------------------------------------------
class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, *args: Any, unix_path: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unix_path = unix_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        timeout = self.timeout if isinstance(self.timeout, (int, float)) else TIMEOUT
        sock.settimeout(timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        return sock


class _UnixPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _UnixConnection


class _UnixAdapter(HTTPAdapter):
    def __init__(self, path: str) -> None:
        super().__init__(max_retries=0)
        self._pool = _UnixPool("localhost", timeout=TIMEOUT, unix_path=path)

    def get_connection(self, url: Any, proxies: Any = None) -> _UnixPool:  # requests < 2.32
        return self._pool

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None, cert: Any = None) -> _UnixPool:
        return self._pool

    def close(self) -> None:
        self._pool.close()


class Client:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.session = requests.Session()
        self.session.trust_env = False  # no HTTP_PROXY for a Unix socket
        self.session.mount(BASE + "/", _UnixAdapter(socket_path))

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            resp = self.session.request(method, BASE + path, json=body, timeout=TIMEOUT)
        except requests.ConnectionError as exc:
            raise CtlError(f"cannot reach anywhered at {self.socket_path}: {_reason(exc)}") from None
        except requests.Timeout:
            raise CtlError(f"anywhered at {self.socket_path} did not answer within {TIMEOUT:.0f} s") from None
        try:
            data = resp.json()
        except ValueError:
            raise CtlError(f"anywhered answered {resp.status_code} with a body that is not JSON") from None
        if resp.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise CtlError(f"anywhered: {resp.status_code} {message or resp.reason}")
        return data


def _reason(exc: Exception) -> str:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, FileNotFoundError):
            return "no such socket (is anywhered running?)"
        if isinstance(cur, ConnectionRefusedError):
            return "connection refused (is anywhered running?)"
        if isinstance(cur, PermissionError):
            return "permission denied (run as root or as a member of group anywhere)"
        cur = cur.__cause__ or cur.__context__ or (cur.args[0] if cur.args and isinstance(cur.args[0], BaseException) else None)
    return str(exc)
