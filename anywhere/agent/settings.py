"""The agent's settings: `AgentConfig`, the one home of every agent default and range.

Theory of operation
-------------------
Each field of `AgentConfig` is one setting with its default.  A field made with `setting()` is
also a key of the ``[agent]`` section (/etc/anywhere/agents/NAME.conf) and names the key's check:
a validate function of config.py with its bounds, e.g. ``size(1M, 1T)``.  Everything else is
derived from the fields, so a default or a range is written once:

* `AGENT_SPEC`, the configspec a file is checked against: the keys in field order, each with
  its check and the field's default;
* each flag's argparse type and the range and default its help shows (``config.flag_type`` and
  ``config.describe`` over AGENT_SPEC, in agent_cli.py): a flag accepts what the file accepts;
* the settings in effect (`resolve`): the defaults, then the file, then the flags given;
  check-config prints them, field by field.

Fields without a key (connect_timeout, backoff_min, backoff_max) are fixed: not configurable.
Two defaults depend on where the settings come from and are resolved here, not in the fields:
``allow`` is empty (nothing allowed) in a file but `COMMAND_LINE_ALLOW` without ``--config``
(the original's behaviour), and ``ca``/``cert``/``key`` are found beside the agent (`CREDENTIALS`,
common.default_credential) or, with a file, named after the agent id.

Rules: nothing here opens a socket or starts anything; the only file read besides the
configuration is the certificate, for its identity.  Every error is a ``config.ConfigError``
that names the file (or "the command line"), and for a key its section, key and value.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, NamedTuple

from .. import config as configuration
from .. import tls
from ..common import default_credential, valid_agent_id
from ..net import hostport, is_ip, split_hostport
from ..trunk import BUFFER_BUDGET

SECTION = "agent"
COMMAND_LINE_ALLOW = ["*"]  # allow without --config: the original's behaviour (warned about at start)
CREDENTIALS = {"ca": "ca.crt", "cert": "client.crt", "key": "client.key"}  # credential/NAME without --config


def setting(check: str, default: Any = MISSING, *, key: str | None = None) -> Any:
    """A field that is also a key of [agent] (named `key`, default: the field's name), checked by `check`."""
    metadata = {"check": check, "key": key}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class ServerAddress(NamedTuple):
    """One server of the agent's: one entry of ``server``, with its port filled in."""

    host: str  # as given, an IP address written the usual way, a name in lower case
    port: int

    def __str__(self) -> str:
        return hostport(self.host, self.port)


@dataclass
class AgentConfig:
    agent_id: str = setting("agentid")  # required: the file's NAME, else the certificate's identity
    servers: list[ServerAddress] = setting("servers", key="server")  # required: one session with each
    server_port: int = setting("port", 1111)  # of an entry of ``server`` without one
    server_name: str | None = setting("host", None)  # None: each server's own host
    ca: str | None = setting("path", None)  # None: CREDENTIALS, found by `resolve`
    cert: str | None = setting("path", None)
    key: str | None = setting("path", None)
    dial_timeout: float = setting("seconds", 5.0)  # seconds to reach a target
    connect_timeout: float = 10.0  # seconds to reach the server (TCP)
    handshake_timeout: float = setting("seconds", 10.0)  # TLS with the server
    backoff_min: float = 1.0  # reconnecting: see session.backoff_delay
    backoff_max: float = 30.0
    allow: list[str] = setting("allowlist", [])  # targets the server may ask for (see allow.py)
    buffer_budget: int = setting("size(1M, 1T)", BUFFER_BUDGET)  # bytes held for targets slower than their clients
    log_level: str = setting("loglevel", "info")


def _keys() -> list[tuple[str, Field]]:
    """(key, field) for every field that is a key, in field order."""
    return [(f.metadata["key"] or f.name, f) for f in fields(AgentConfig) if "check" in f.metadata]


def _default(f: Field) -> Any:
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


def _spec_value(check: str, value: Any) -> str:
    """A default as configspec syntax: None, list(), 5 (not 5.0), 256M for a size."""
    if value is None:
        return "None"
    if isinstance(value, list):
        return f"list({', '.join(value)})"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if check.startswith("size") and isinstance(value, int):
        for unit, scale in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
            if value and value % scale == 0:
                return f"{value // scale}{unit}"
    return str(value)


def _spec() -> list[str]:
    lines = [f"[{SECTION}]"]
    for key, f in _keys():
        check = f.metadata["check"]
        name, paren, args = check.partition("(")
        args = args.rstrip(")")
        default = f"default={_spec_value(check, _default(f))}"
        lines.append(f"{key} = {name}({args + ', ' if paren and args else ''}{default})")
    return lines


AGENT_SPEC: list[str] = _spec()  # e.g. "server_port = port(default=1111)", one line per key


def defaults() -> dict[str, Any]:
    """{key: default} for every key of [agent]: what an empty file gives."""
    return {key: _default(f) for key, f in _keys()}


def agent_config(path: str, name: str | None, overrides: dict[str, Any], required: bool = True) -> tuple[dict[str, Any], str]:
    """The settings of the file at `path` by key, defaults filled, `overrides` (not None) on top;
    the agent id defaults to `name`.  Returns them and `path`.  Raises ConfigError."""
    values = configuration.read(path, AGENT_SPEC, required=required)[SECTION]
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("agent_id") is None and name:
        values["agent_id"] = name
    return values, path


def server_addresses(text: str, port: int) -> list[ServerAddress]:
    """The servers of a ``server`` value (checked by config.check_servers), in order, an entry
    without a port on `port`.  ValueError naming an entry listed twice."""
    servers: dict[ServerAddress, bool] = {}  # whether its entry gave a port
    for item in (part for part in text.split(",") if part.strip()):
        host, own_port = split_hostport(item)
        host = str(ipaddress.ip_address(host)) if is_ip(host) else host.lower()
        server = ServerAddress(host, own_port or port)
        if server in servers:
            why = "" if own_port and servers[server] else f" (an entry without a port is on port {port})"
            raise ValueError(f"{server} is listed twice{why}")
        servers[server] = own_port is not None
    return list(servers)


def certificate_identity(cert_path: str) -> str | None:
    """The commonName of a PEM certificate file, or None if it cannot be read."""
    try:
        with open(cert_path, "rb") as f:
            return tls.certificate_common_name(f.read())
    except (OSError, ValueError):
        return None


def resolve(path: str | None, overrides: dict[str, Any]) -> AgentConfig:
    """The settings in effect: defaults < the file at `path` (if any) < `overrides` (the flags
    given, by key; None: not given).  Checks that the agent id is valid and matches its
    certificate, when that can be read.  Raises ConfigError."""
    if path:
        name = os.path.basename(path)
        values, _ = agent_config(path, name[:-5] if name.endswith(".conf") else name, overrides, required=True)
    else:
        values = defaults() | {"allow": list(COMMAND_LINE_ALLOW)}
        values.update({k: v for k, v in overrides.items() if v is not None})
    where = path or "the command line"
    if not values.get("server"):
        raise configuration.ConfigError([f"{where}: no server: give -s HOST" + (" or set server in [agent]" if path else "")])
    try:
        servers = server_addresses(values["server"], values["server_port"])
    except ValueError as exc:
        given = f"-s {values['server']}" if overrides.get("server") is not None else f"{path} [{SECTION}] server = {values['server']}"
        raise configuration.ConfigError([f"{given}: {exc}"]) from None
    ca = values.get("ca") or default_credential(CREDENTIALS["ca"])
    if path and not values.get("cert"):
        base = os.path.join(os.path.dirname(ca), values["agent_id"])
        cert, key = values.get("cert") or base + ".crt", values.get("key") or base + ".key"
    else:
        cert = values.get("cert") or default_credential(CREDENTIALS["cert"])
        key = values.get("key") or default_credential(CREDENTIALS["key"])
    identity = certificate_identity(cert)
    agent_id = values.get("agent_id") or identity
    if not agent_id:
        raise configuration.ConfigError([f"{where}: no agent id given and no identity readable from {cert}"])
    if not valid_agent_id(agent_id):
        raise configuration.ConfigError([f"{where}: agent id {agent_id!r} is not valid: 1-64 letters, digits, '.', '_' or '-'"])
    if identity is not None and identity != agent_id:
        raise configuration.ConfigError([
            f"{where}: agent id {agent_id!r} does not match the identity of {cert} ({identity!r}); the server "
            f"would refuse it. Issue a certificate for {agent_id!r} (anywherectl credentials issue {agent_id} DIR)"])
    settings = {f.name: values[key] for key, f in _keys()}
    settings.update(agent_id=agent_id, servers=servers, ca=os.path.abspath(ca), cert=os.path.abspath(cert), key=os.path.abspath(key),
                    allow=list(values["allow"]))
    return AgentConfig(**settings)
