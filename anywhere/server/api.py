"""The admin API's routes: what anywherectl (and the REST port, and Prometheus) can ask of anywhered.

| request                                   | does                                                   |
|-------------------------------------------|--------------------------------------------------------|
| GET    /metrics                           | Prometheus text exposition                             |
| GET    /v1/status                         | summary: id, version, uptime, counts, bytes, last errors |
| GET    /v1/agents                         | agents with session, RTT, connections, bytes           |
| POST   /v1/agents/ID/disconnect           | close that agent's session and everything through it   |
| GET    /v1/proxies                        | proxies with their state and counters                  |
| POST   /v1/proxies                        | add one (validated, bound, saved) → 201 {"proxy"}; a  |
|                                           | remote_port range "A-B" adds one per port, all or none |
|                                           | → 201 {"proxies": [...]} (409 naming the ports)        |
| DELETE /v1/proxies/NAME                   | delete one, closing its listener and connections; a    |
|                                           | range START-END (naming no proxy) deletes every proxy  |
|                                           | on those remote ports, all or none; a port (or range)  |
|                                           | a tcp and a udp proxy share is 409, naming both        |
| POST   /v1/proxies/NAME/disable|enable    | stop / resume accepting without deleting; enable binds |
|                                           | a failed proxy's port now (409 if it is still busy)    |
| GET    /v1/proxies/NAME/health            | 200 if the proxy can serve a client now, else 503; a   |
|                                           | one-line JSON reason (health_public: without token)    |
| ...?protocol=tcp|udp (the three above)    | only proxies of that protocol: a port (or range) a tcp |
|                                           | and a udp proxy share names one; a name of the other   |
|                                           | protocol is 409; another value is 400                  |
| GET    /v1/connections                    | live connections                                       |
| DELETE /v1/connections/ID                 | kill one connection                                    |
| DELETE /v1/connections?proxy=NAME         | kill every connection of a proxy                       |
| POST   /v1/reload                         | re-read the configuration                              |

Every request that changes something is written to the audit log with who asked and the outcome.
The routes are a face over `Operations` (views.View): this module maps HTTP to it and its errors
back to HTTP (`errors.Invalid` 400, `NotFound` 404, `Conflict` 409, `NotSaved` 500, a refused
reload's `ConfigError` 422), and must not import the daemon or reach into its parts.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

from ..admin import ApiError, RawBody, Request
from ..common import printable
from ..errors import ConfigError, Conflict, Invalid, NotFound, NotSaved, OperationError
from .ranges import protocol_value

log = logging.getLogger("anywhere.server")


STATUS = {Invalid: 400, NotFound: 404, Conflict: 409, NotSaved: 500}


class Operations(Protocol):
    """What the routes read and do (views.View)."""

    audit: Any
    reload_hook: Callable[[], dict] | None

    def status(self) -> dict: ...
    def agents(self) -> list[dict]: ...
    def proxies(self) -> list[dict]: ...
    def connections(self) -> list[dict]: ...
    def add_proxy(self, body: Any) -> Any: ...
    def delete_proxy(self, key: str, protocol: str | None = None) -> tuple[Any, int]: ...
    def set_proxy_enabled(self, key: str, enabled: bool, protocol: str | None = None) -> Any: ...
    def disconnect_agent(self, agent_id: str) -> int: ...
    def find_proxy(self, key: str, protocol: str | None = None) -> Any: ...
    def health(self, proxy: Any) -> str | None: ...
    def connection_ids(self, proxy: Any = None) -> list[int]: ...
    def kill(self, conn_ids: list[int]) -> None: ...


class Api:
    def __init__(self, server: Operations, exposition: Callable[[], tuple[str, bytes]]) -> None:
        self.server = server
        self.exposition = exposition

    def handle(self, request: Request) -> tuple[int, Any]:
        try:
            try:
                status, body = self._route(request)
            except OperationError as exc:
                raise ApiError(STATUS.get(type(exc), 400), exc.message) from None
            except ConfigError as exc:
                raise ApiError(422, str(exc)) from None
        except ApiError as exc:
            if request.method != "GET":
                self._audit(request, exc.status, exc.message)
            raise
        if request.method != "GET":
            self._audit(request, status, None)
        return status, body

    def _audit(self, request: Request, status: int, error: str | None) -> None:
        path = printable(request.path)
        query = {printable(k, 64): printable(v) for k, v in request.query.items()} or None
        self.server.audit.write("admin", who=str(request.caller), method=printable(request.method, 16), path=path,
                                query=query, status=status, error=error)
        if request.method != "GET":
            log.info("admin: %s %s%s by %s → %d%s", printable(request.method, 16), path,
                     f"?{'&'.join(f'{k}={v}' for k, v in query.items())}" if query else "",
                     request.caller, status, f" ({error.splitlines()[0]})" if error else "")

    def _route(self, request: Request) -> tuple[int, Any]:
        path, method = request.path, request.method
        if path == "/metrics":
            if method != "GET":
                raise ApiError(405, f"method {printable(method, 16)} not allowed on {printable(path)}")
            content_type, data = self.exposition()
            return 200, RawBody(content_type, data)
        parts = path.strip("/").split("/")
        if parts[:1] != ["v1"] or len(parts) < 2:
            raise ApiError(404, f"no such endpoint {printable(path)}; try /v1/status")
        resource, rest = parts[1], parts[2:]
        protocol = lambda: protocol_value(request.query.get("protocol"))  # noqa: E731 (?protocol=tcp|udp)
        routes: dict[tuple[str, str, int, str], Callable[[], tuple[int, Any]]] = {
            ("GET", "status", 0, ""): self.status,
            ("GET", "agents", 0, ""): self.agents,
            ("POST", "agents", 2, "disconnect"): lambda: self.disconnect_agent(rest[0]),
            ("GET", "proxies", 0, ""): self.proxies,
            ("POST", "proxies", 0, ""): lambda: self.add_proxy(request.body),
            ("DELETE", "proxies", 1, ""): lambda: self.delete_proxy(rest[0], protocol()),
            ("POST", "proxies", 2, "disable"): lambda: self.enable_proxy(rest[0], False, protocol()),
            ("POST", "proxies", 2, "enable"): lambda: self.enable_proxy(rest[0], True, protocol()),
            ("GET", "proxies", 2, "health"): lambda: self.health(rest[0], protocol()),
            ("GET", "connections", 0, ""): self.connections,
            ("DELETE", "connections", 1, ""): lambda: self.kill_connection(rest[0]),
            ("DELETE", "connections", 0, ""): lambda: self.kill_proxy_connections(request.query.get("proxy")),
            ("POST", "reload", 0, ""): self.reload,
        }
        verb = rest[1] if len(rest) == 2 else ""
        route = routes.get((method, resource, len(rest), verb))
        if route is None:
            if any(key[1] == resource and key[2] == len(rest) and key[3] == verb for key in routes):
                raise ApiError(405, f"method {printable(method, 16)} not allowed on {printable(path)}")
            raise ApiError(404, f"no such endpoint {printable(path)}")
        return route()

    # -- reading ---------------------------------------------------------------------------------------
    def status(self) -> tuple[int, Any]:
        return 200, self.server.status()

    def agents(self) -> tuple[int, Any]:
        return 200, {"agents": self.server.agents()}

    def proxies(self) -> tuple[int, Any]:
        return 200, {"proxies": self.server.proxies()}

    def connections(self) -> tuple[int, Any]:
        return 200, {"connections": self.server.connections()}

    def health(self, key: str, protocol: str | None = None) -> tuple[int, Any]:
        proxy = self.server.find_proxy(key, protocol)
        why = self.server.health(proxy)
        if why is None:
            return 200, {"proxy": proxy.name, "status": "ok"}
        return 503, {"proxy": proxy.name, "status": "unavailable", "reason": why}

    # -- changing --------------------------------------------------------------------------------------
    def add_proxy(self, body: Any) -> tuple[int, Any]:
        added = self.server.add_proxy(body)
        if isinstance(added, list):  # a port range
            return 201, {"proxies": [proxy.to_dict() for proxy in added]}
        return 201, {"proxy": added.to_dict()}

    def delete_proxy(self, key: str, protocol: str | None = None) -> tuple[int, Any]:
        proxy, closed = self.server.delete_proxy(key, protocol)
        if isinstance(proxy, list):  # a range of remote ports
            return 200, {"deleted": [p.name for p in proxy], "closed_connections": closed}
        return 200, {"deleted": proxy.name, "closed_connections": closed}

    def enable_proxy(self, key: str, enabled: bool, protocol: str | None = None) -> tuple[int, Any]:
        proxy = self.server.set_proxy_enabled(key, enabled, protocol)
        return 200, {"proxy": proxy.to_dict()}

    def kill_connection(self, key: str) -> tuple[int, Any]:
        if not (key.isascii() and key.isdigit()) or int(key) not in self.server.connection_ids():
            raise ApiError(404, f"no live connection {key}")
        self.server.kill([int(key)])
        return 200, {"killed": [int(key)]}

    def kill_proxy_connections(self, name: str | None) -> tuple[int, Any]:
        if not name:
            raise ApiError(400, "say which connections: DELETE /v1/connections/ID or /v1/connections?proxy=NAME")
        ids = self.server.connection_ids(self.server.find_proxy(name))
        self.server.kill(ids)
        return 200, {"killed": ids}

    def disconnect_agent(self, agent_id: str) -> tuple[int, Any]:
        closed = self.server.disconnect_agent(agent_id)
        return 200, {"disconnected": agent_id, "closed_connections": closed}

    def reload(self) -> tuple[int, Any]:
        if self.server.reload_hook is None:
            raise ApiError(501, "this server was started without a configuration to reload")
        return 200, self.server.reload_hook()

