"""anywhered's settings: `ServerConfig`, the one home of every key's check, default and help.

Owns the server's configuration keys.  Each field of `ServerConfig` declares its configspec
check (with its range and default, in validate's syntax, e.g. ``count(1, 100000, default=1000)``),
the help of the flag that overrides it, and whether a change needs a restart.  Everything else is
derived from that, so a default or a range is written once:
  * the field's default is the spec's default, converted by the key's own check;
  * `SERVER_SPEC`, the configspec anywhered.conf is checked against (config.py reads it);
  * the flags' types and help (`flag_help`: the key's range and default, from config.describe);
  * check-config's listing (every field), and the reload's outcome (`RELOADABLE`, `RESTART_ONLY`).
Where the wire protocol bounds a value (heartbeat, pool size, ports) the check takes the bound
from wire.py, so whatever passes check-config can be sent to every agent.

It must not open sockets or files other than the configuration and the token file, and knows
nothing of the server's running state.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from validate import Validator

from .. import config as configuration
from .. import wire
from ..errors import ConfigError

DEFAULT_SERVER_CONFIG = "/etc/anywhere/anywhered.conf"
_VALIDATOR = Validator(configuration.CHECKS)


def setting(check: str, help: str = "", *, restart: bool = False) -> Any:
    """A configuration key: its configspec `check` (default included), the help of the flag that
    overrides it, and whether a change takes effect only at the next start."""
    default = _VALIDATOR.get_default_value(check)
    return field(default_factory=lambda: copy.copy(default), metadata={"check": check, "help": help, "restart": restart})


@dataclass
class ServerConfig:
    """anywhered's settings; the defaults are the spec's (see the module docstring)."""

    port: int = setting("port(default=1111)", "agent port", restart=True)
    bind: list[str] = setting("addresses(default=list())", "addresses for the agent port, comma-separated "
                          "(default: all, v4+v6)", restart=True)
    proxy_bind: list[str] = setting("addresses(default=list())", "addresses for proxy ports, comma-separated "
                                "(default: all, v4+v6)", restart=True)
    server_id: str = setting("name(default=anywhered)", "this server's id, told to agents")
    ca: str | None = setting("path(default=None)", "CA certificate (default credential/ca.crt)")
    cert: str | None = setting("path(default=None)", "server certificate (default credential/server.crt)")
    key: str | None = setting("path(default=None)", "server private key (default credential/server.key)")
    whitelist: list[str] = setting("networks(default=list())", "global whitelist: comma-separated IPs/CIDRs, v4 or v6 "
                               "(none: open)")
    admin_socket: str = setting("path(default=/run/anywhere/anywhered.sock)", "admin API socket", restart=True)
    state_dir: str = setting("path(default=/var/lib/anywhere)", "where proxies are stored", restart=True)
    proxies_dir: str = setting("path(default=/etc/anywhere/proxies.d)", "directory of proxies declared as files "
                           "(*.conf, one section per proxy), applied at start and on every reload")
    stats_save_interval: float = setting("seconds(default=30)", "seconds between writes of the counters")
    data_timeout: float = setting("seconds(default=10)", "seconds to wait for the agent's data connection")
    handshake_timeout: float = setting("seconds(default=10)", "TLS handshake and hello timeout in seconds")
    heartbeat: float = setting(f"seconds(at_most={wire.MAX_HEARTBEAT}, default=5)", "heartbeat interval in seconds")
    drain_timeout: float = setting("seconds(default=10)", "seconds live connections may finish on SIGTERM")
    pool_size: int = setting(f"count(0, {wire.MAX_POOL}, default=2)", "trunks (multiplexed data connections) each "
                         f"agent is asked to keep ({{range}}; an agent keeps at most {wire.MAX_TRUNKS}; 0: a data "
                         "connection of its own per client)")
    pool_max: int = setting("count(0, 65536, default=256)", "idle data connections kept per agent at most")
    pool_idle_timeout: float = setting("seconds(default=60)", "idle data connections beyond pool_size are closed "
                                   "after this")
    trunk_idle_timeout: float = setting("seconds_or_off(default=60)", "an agent's trunks are opened when a client "
                                    "comes and closed after this long without one (0: kept open always, as "
                                    "agents older than this server do)")
    max_connections: int = setting("count(1, 1000000, default=10000)", "live tunneled connections in total")
    max_connections_per_proxy: int = setting("count(1, 1000000, default=2000)", "live connections per proxy")
    rate_limit: int = setting("count(0, 1000000, default=60000)", "new clients a minute from one source address, "
                          "per proxy, sustained (0: no limit)")
    rate_burst: int = setting("count(1, 1000000, default=2000)", "of which this many may come at once (at most "
                          "rate_limit)")
    max_agents: int = setting("count(1, 100000, default=10000)", "agents connected at once")
    max_pending_per_agent: int = setting("count(1, 100000, default=512)", "clients waiting for their agent's data "
                                     "connection")
    max_unauthenticated: int = setting("count(1, 100000, default=1000)", "agent-port connections still in their "
                                   "handshake or hello")
    max_unauthenticated_per_source: int = setting("count(1, 100000, default=500)", "of those, from one address "
                                              "(never more than half of max_unauthenticated)")
    buffer_budget: int = setting("size(1M, 1T, default=256M)", "memory for data that clients are slow to read, over "
                             "all connections; beyond it the agent is asked to wait (nothing is lost)")
    idle_timeout: float = setting("seconds_or_off(default=0)", "close tunneled connections idle this long (0: never); "
                              "a proxy may set its own")
    admin_timeout: float = setting("seconds(default=10)", "seconds an admin request may take to arrive")
    admin_max_request: int = setting("count(1024, 16777216, default=65536)", "largest admin request in bytes")
    deny: list[str] = setting("denylist(default=list())", "agent ids, or serial:HEX, refused and dropped")
    admin_group: str = setting("name(default=anywhere)", "besides root, members may use the admin socket")
    audit_log: str = setting('audit(default="")', "audit log: journal, or an absolute file path (default: off)")
    api_listen: list[str] = setting("endpoints(default=list())", "REST port: HOST:PORT, ...; empty: off", restart=True)
    api_token_file: str | None = setting("path(default=None)", "file (mode 0600) holding the REST API's bearer token")
    metrics_public: bool = setting("boolean(default=False)", "/metrics on the REST port without the token")
    health_public: bool = setting("boolean(default=False)", "GET /v1/proxies/NAME/health on the REST port without "
                              "the token (for load balancers' health checks)")
    log_level: str = setting("loglevel(default=info)", "log level")

    def __post_init__(self) -> None:
        self.bind = list(self.bind) or [""]  # none given: every address
        self.proxy_bind = list(self.proxy_bind) or [""]


SERVER_SPEC = ["[server]"] + [f"{f.name} = {f.metadata['check']}" for f in fields(ServerConfig)]
RESTART_ONLY = tuple(f.name for f in fields(ServerConfig) if f.metadata["restart"])
RELOADABLE = tuple(f.name for f in fields(ServerConfig) if not f.metadata["restart"])


def flag_help(name: str, text: str | None = None) -> str:
    """The help of the flag that overrides key `name`: its text, then its range and default (or
    where the text says {range})."""
    meta = next(f.metadata for f in fields(ServerConfig) if f.name == name)
    described, text = configuration.describe(SERVER_SPEC, name), text or meta["help"]
    if "{range}" in text:  # the range goes there, not at the end
        return text.replace("{range}", described)
    return text + (f" ({described})" if described else "")


def flag_type(name: str) -> Any:
    """The argparse type of the flag that overrides key `name`: that key's own check and bounds."""
    return configuration.flag_type(SERVER_SPEC, name)


def server_config(path: str, overrides: dict[str, Any], required: bool = False) -> ServerConfig:
    """The server's settings: the file (if any) over the defaults, then `overrides` (flags given)
    on top.  Raises ConfigError naming file, section, key and value (or the flag)."""
    values = configuration.read(path, SERVER_SPEC, required=required)["server"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = replace(ServerConfig(), **values)
    if config.pool_max < config.pool_size:
        if overrides.get("pool_size") is not None:  # --pool-size set it: name the flag, not a key the file may lack
            raise ConfigError([f"--pool-size {config.pool_size}: must be at most pool_max ({config.pool_max}; "
                               f"raise pool_max in [server] of {path})"])
        raise ConfigError([f"{path} [server] pool_max = {config.pool_max}: must be at least pool_size ({config.pool_size})"])
    return config


def deprecated(config: ServerConfig) -> list[str]:
    """What in `config` is deprecated, one line each, for the log at start and reload and for
    check-config: accepted for this release, gone in the next."""
    notes = []
    if config.pool_size == 0:
        notes.append("pool_size = 0 (a data connection of its own per client, no trunks) is deprecated and goes in "
                     "the next release: against trunks it made 4x fewer new connections a second, half the 1 KiB "
                     "requests at c100, and 17x the memory per idle connection (bench/run.py --paths "
                     "anywhere,anywhere-conn); use pool_size 1 or more (the default is 2)")
    return notes


def check_welcome(config: ServerConfig) -> None:
    """ValueError unless the welcome this configuration makes can be sent (wire.py's ranges).

    Checked at start and reload, so that no agent's hello can go unanswered for a bad setting.
    """
    try:
        wire.encode("welcome", proto=wire.PROTO_VERSION, server_id=config.server_id, heartbeat=config.heartbeat,
                    pool=config.pool_size)
    except ValueError as exc:
        raise ValueError(f"agents could not be welcomed with this configuration ({exc}): heartbeat must be more "
                         f"than 0 and at most {wire.MAX_HEARTBEAT} seconds, pool_size 0..{wire.MAX_POOL}") from None


def read_token(path: str | None) -> str:
    """The REST port's bearer token: the first line of a file that only its owner may read."""
    if not path:
        raise ValueError("the REST port needs a token: set api_token_file (a file of mode 0600)")
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as exc:
        raise ValueError(f"api_token_file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ValueError(f"api_token_file {path}: mode {oct(mode & 0o777)[2:]} lets others read the token; use 0600")
    if len(token) < 16:
        raise ValueError(f"api_token_file {path}: the token must be at least 16 characters")
    return token
