"""The admin API's routes: what anywherectl (and the REST port, and Prometheus) can ask of anywhered.

| request                                   | does                                                   |
|-------------------------------------------|--------------------------------------------------------|
| GET    /metrics                           | Prometheus text exposition                             |
| GET    /v1/status                         | summary: id, version, uptime, counts, bytes, last errors |
| GET    /v1/agents                         | agents with session, RTT, connections, bytes           |
| POST   /v1/agents/ID/disconnect           | close that agent's session and everything through it   |
| GET    /v1/proxies                        | proxies with their state and counters                  |
| POST   /v1/proxies                        | add one (validated, bound, saved) → 201                |
| DELETE /v1/proxies/NAME                   | delete one, closing its listener and connections       |
| POST   /v1/proxies/NAME/disable|enable    | stop / resume accepting without deleting; enable binds |
|                                           | a failed proxy's port now (409 if it is still busy)    |
| GET    /v1/connections                    | live connections                                       |
| DELETE /v1/connections/ID                 | kill one connection                                    |
| DELETE /v1/connections?proxy=NAME         | kill every connection of a proxy                       |
| POST   /v1/reload                         | re-read the configuration                              |

Every request that changes something is written to the audit log with who asked and the outcome.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from .admin import ApiError, RawBody, Request
from .common import __version__, printable
from .trunk import buffer_usage

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("anywhere.server")


class Api:
    def __init__(self, server: "Server") -> None:
        self.server = server

    def handle(self, request: Request) -> tuple[int, Any]:
        try:
            status, body = self._route(request)
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
            content_type, data = self.server.metrics.exposition()
            return 200, RawBody(content_type, data)
        parts = path.strip("/").split("/")
        if parts[:1] != ["v1"] or len(parts) < 2:
            raise ApiError(404, f"no such endpoint {printable(path)}; try /v1/status")
        resource, rest = parts[1], parts[2:]
        routes: dict[tuple[str, str, int, str], Callable[[], tuple[int, Any]]] = {
            ("GET", "status", 0, ""): self.status,
            ("GET", "agents", 0, ""): self.agents,
            ("POST", "agents", 2, "disconnect"): lambda: self.disconnect_agent(rest[0]),
            ("GET", "proxies", 0, ""): self.proxies,
            ("POST", "proxies", 0, ""): lambda: self.add_proxy(request.body),
            ("DELETE", "proxies", 1, ""): lambda: self.delete_proxy(rest[0]),
            ("POST", "proxies", 2, "disable"): lambda: self.enable_proxy(rest[0], False),
            ("POST", "proxies", 2, "enable"): lambda: self.enable_proxy(rest[0], True),
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
        s = self.server
        totals = s.totals()
        usage = buffer_usage()
        return 200, {"server_id": s.config.server_id, "version": __version__,
                     "uptime": round(s.loop.time() - s.started, 3), "started": s.started_wall,
                     "agents": len(s.sessions), "proxies": len(s.proxies),
                     "proxies_failed": sorted(p.name for p in s.proxies.values() if p.failed),
                     "connections": len(s.tunnels),
                     "pending": len(s.pending), "bytes_in": totals.bytes_in, "bytes_out": totals.bytes_out,
                     "connections_total": totals.connections, "rejected": totals.rejected,
                     "warm_data_connections": sum(len(c) for c in s.warm.values()), "tls_handshakes": s.handshakes,
                     "trunks": sum(len(t) for t in s.trunks.values()), "retired_trunks": len(s.retired_trunks),
                     "buffered_bytes": usage["held"], "buffer_committed_bytes": usage["committed"],
                     "buffer_budget": usage["budget"],
                     "draining": s.draining, "last_errors": list(s.recent_errors.records)}

    def agents(self) -> tuple[int, Any]:
        return 200, {"agents": [self.server.agent_info(a) for a in sorted(self.server.sessions)]}

    def proxies(self) -> tuple[int, Any]:
        return 200, {"proxies": [self.server.proxy_info(p) for p in
                                 sorted(self.server.proxies.values(), key=lambda p: p.remote_port)]}

    def connections(self) -> tuple[int, Any]:
        now = self.server.loop.time()
        return 200, {"connections": [t.to_dict(now) for t in
                                     sorted(self.server.tunnels.values(), key=lambda t: t.conn_id)]}

    # -- changing --------------------------------------------------------------------------------------
    def add_proxy(self, body: Any) -> tuple[int, Any]:
        return 201, {"proxy": self.server.add_proxy(body).to_dict()}

    def delete_proxy(self, key: str) -> tuple[int, Any]:
        proxy, closed = self.server.delete_proxy(key)
        return 200, {"deleted": proxy.name, "closed_connections": closed}

    def enable_proxy(self, key: str, enabled: bool) -> tuple[int, Any]:
        proxy = self.server.set_proxy_enabled(key, enabled)
        return 200, {"proxy": proxy.to_dict()}

    def kill_connection(self, key: str) -> tuple[int, Any]:
        if not (key.isascii() and key.isdigit()) or int(key) not in self.server.tunnels:
            raise ApiError(404, f"no live connection {key}")
        self.server.tunnels[int(key)].relay.close("killed by the operator")
        return 200, {"killed": [int(key)]}

    def kill_proxy_connections(self, name: str | None) -> tuple[int, Any]:
        if not name:
            raise ApiError(400, "say which connections: DELETE /v1/connections/ID or /v1/connections?proxy=NAME")
        proxy = self.server.find_proxy(name)
        ids = [cid for cid, t in self.server.tunnels.items() if t.proxy is proxy]
        for cid in ids:
            self.server.tunnels[cid].relay.close("killed by the operator")
        return 200, {"killed": sorted(ids)}

    def disconnect_agent(self, agent_id: str) -> tuple[int, Any]:
        closed = self.server.disconnect_agent(agent_id)
        return 200, {"disconnected": agent_id, "closed_connections": closed}

    def reload(self) -> tuple[int, Any]:
        if self.server.reload_hook is None:
            raise ApiError(501, "this server was started without a configuration to reload")
        return 200, self.server.reload_hook()

