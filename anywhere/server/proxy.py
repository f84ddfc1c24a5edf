"""What a proxy is (`Proxy`) and how one is validated, from an API body, a stored entry or a
proxies.d section (`validate_proxy`; a port range is expanded first, `proxies_from`).

It owns the fields of a proxy and their checks, one place for every source: `Invalid` names the
bad field.  It binds nothing and knows no table (proxies.py owns the running set and listeners).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from .. import proxyproto
from ..common import printable, valid_agent_id
from ..config import BALANCE_MODES, MAX_AGENTS_PER_PROXY, MAX_BANDWIDTH, MIN_BANDWIDTH, parse_bandwidth
from ..errors import Invalid
from ..net import HOSTNAME_RE, Acceptor, Network, hostport, is_ip, parse_networks
from ..shaper import Shaper
from .ranges import expand

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
FIELDS = ("name", "agent_id", "agent_ids", "balance", "local_ip", "local_port", "remote_port", "whitelist", "enabled",
          "idle_timeout", "proxy_protocol", "bandwidth")



def parse_whitelist(entries: Any, what: str = "whitelist") -> list[Network]:
    """IPs and CIDRs (v4 and v6), as a list or one comma-separated string.  ValueError names the bad one."""
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [e for e in entries.split(",") if e.strip()]
    if not isinstance(entries, list):
        raise ValueError(f"{what} must be a list of IP addresses or CIDRs")
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"{what} entry {entry!r} is not an IP address or CIDR")
    try:
        return parse_networks(entries)
    except ValueError as exc:
        raise ValueError(f"{what} entry {exc.args[0].strip()!r} is not an IP address or CIDR") from None


def allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list[Network]) -> bool:
    return any(ip.version == net.version and ip in net for net in nets)


@dataclass
class Proxy:
    name: str
    agent_id: str
    local_ip: str
    local_port: int
    remote_port: int
    whitelist: list[str]
    enabled: bool = True
    idle_timeout: float = 0.0  # 0: the server's idle_timeout
    nets: list[Network] = field(repr=False, default_factory=list)
    listeners: list[Acceptor] = field(repr=False, default_factory=list)
    failed: str | None = None  # enabled but not listening: why (retried; not stored)
    file: str | None = None  # declared in this proxies.d file; None: made through the API
    agent_ids: list[str] = field(default_factory=list)  # every agent, agent_id first (balance.py)
    balance: str = "least-connections"
    section: str | None = None  # declared by a range: the proxies.d section (named by `name` otherwise)
    remote_range: str | None = None  # declared by a range: its remote_port, "30000-30009"
    proxy_protocol: str | None = None  # "v1" or "v2": the agent sends the target a PROXY header; None: off
    bandwidth: int = 0  # bits a second, each way, all its connections together; 0: unlimited
    shaper: Shaper | None = field(repr=False, default=None)  # while bandwidth is set (ProxyTable.shape)

    def __post_init__(self) -> None:
        if not self.agent_ids:
            self.agent_ids = [self.agent_id]

    @property
    def source(self) -> str:
        return "api" if self.file is None else f"file:{self.file}"

    def where(self, key: str = "") -> str:
        """How a problem with a declared proxy names it: FILE [NAME] KEY = VALUE; for one of a range,
        FILE [SECTION] remote_port = START-END: port PORT."""
        head = f"{self.file} [{self.section or self.name}]"
        if key == "remote_port" and self.remote_range:
            return f"{head} remote_port = {self.remote_range}: port {self.remote_port}"
        return head + (f" {key} = {getattr(self, key)}" if key else "")

    def to_dict(self) -> dict:
        spec = {"name": self.name, "agent_id": self.agent_id, "local_ip": self.local_ip,
                "local_port": self.local_port, "remote_port": self.remote_port, "whitelist": list(self.whitelist),
                "enabled": self.enabled, "idle_timeout": self.idle_timeout}
        if len(self.agent_ids) > 1:  # a proxy of one agent keeps the form older versions read
            spec.update(agent_ids=list(self.agent_ids), balance=self.balance)
        if self.proxy_protocol is not None:  # off is left out: what older versions stored and read
            spec["proxy_protocol"] = self.proxy_protocol
        if self.bandwidth:  # an unlimited proxy keeps the form older versions read
            spec["bandwidth"] = self.bandwidth
        return spec

    @property
    def target(self) -> str:
        return hostport(self.local_ip, self.local_port)


def validate_proxy(spec: Any) -> Proxy:
    """A Proxy from an API body or the state file; `Invalid` names the bad field."""
    if not isinstance(spec, dict):
        raise Invalid("the body must be a JSON object describing the proxy")
    unknown = sorted(set(spec) - set(FIELDS))
    if unknown:
        raise Invalid(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(FIELDS))}")
    agent_ids = _agent_ids(spec)
    agent_id = agent_ids[0]
    balance = spec.get("balance", "least-connections")
    if balance not in BALANCE_MODES:
        raise Invalid(f"balance {balance!r} must be one of {', '.join(BALANCE_MODES)}")
    local_ip = spec.get("local_ip")
    if not isinstance(local_ip, str) or not (is_ip(local_ip) or HOSTNAME_RE.fullmatch(local_ip)):
        raise Invalid(f"local_ip {local_ip!r} is not an IP address or host name")
    ports = {}
    for key in ("local_port", "remote_port"):
        value = spec.get(key)
        if isinstance(value, str) and (value.isascii() and value.isdigit()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise Invalid(f"{key} {value!r} must be a port number 1..65535")
        ports[key] = value
    try:
        nets = parse_whitelist(spec.get("whitelist") or [])
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    name = spec.get("name") or f"{agent_id}:{ports['remote_port']}"
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or (name.isascii() and name.isdigit()):
        raise Invalid(f"name {name!r} is not valid: 1-64 letters, digits, '.', '_', ':' or '-', not all digits")
    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise Invalid(f"enabled {enabled!r} must be true or false")
    idle = spec.get("idle_timeout", 0)
    if isinstance(idle, bool) or not isinstance(idle, (int, float)) or not 0 <= idle <= 86400 * 7:
        raise Invalid(f"idle_timeout {idle!r} must be a number of seconds 0..604800 (0: the server's default)")
    pp = spec.get("proxy_protocol")
    try:
        proxy_protocol = proxyproto.parse_version(pp)
    except ValueError:
        raise Invalid(f"proxy_protocol {printable(repr(pp), 80)} must be \"v1\", \"v2\", \"off\" or null (off)") from None
    # TCP is the only protocol today; a UDP proxy (issue 19) is to refuse proxy_protocol here, by name
    bandwidth = spec.get("bandwidth", 0)
    if isinstance(bandwidth, str):
        bandwidth = 0 if bandwidth.strip().lower() in ("0", "off", "") else parse_bandwidth(bandwidth)
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, int) or \
            not (bandwidth == 0 or MIN_BANDWIDTH <= bandwidth <= MAX_BANDWIDTH):
        raise Invalid(f"bandwidth {spec.get('bandwidth')!r} must be bits a second {MIN_BANDWIDTH}..{MAX_BANDWIDTH} or "
                      "a rate like \"10mbit\" (kbit, mbit, gbit: powers of 1000); 0: unlimited")
    return Proxy(name=name, agent_id=agent_id, local_ip=local_ip, local_port=ports["local_port"], enabled=enabled,
                 remote_port=ports["remote_port"], whitelist=[str(n) for n in nets], nets=nets, idle_timeout=float(idle),
                 agent_ids=agent_ids, balance=balance, proxy_protocol=proxy_protocol, bandwidth=bandwidth)


def proxies_from(body: Any) -> tuple[list[Proxy], bool]:
    """The proxies of an API body: one, or a port range's (ranges.expand), and whether it was a range."""
    specs = expand(body)
    return [validate_proxy(spec) for spec in specs], specs[0] is not body


def _agent_ids(spec: dict) -> list[str]:
    """The proxy's agents: "agent_ids" (a list), or "agent_id" (one); both: agent_id comes first."""
    agent_id, agent_ids = spec.get("agent_id"), spec.get("agent_ids")
    if agent_ids is None:
        if not isinstance(agent_id, str) or not valid_agent_id(agent_id):
            raise Invalid(f"agent_id {agent_id!r} is not valid: 1-64 letters, digits, '.', '_' or '-'")
        return [agent_id]
    if not isinstance(agent_ids, list) or not 1 <= len(agent_ids) <= MAX_AGENTS_PER_PROXY:
        raise Invalid(f"agent_ids must be a list of 1 to {MAX_AGENTS_PER_PROXY} agent ids")
    for item in agent_ids:
        if not isinstance(item, str) or not valid_agent_id(item):
            raise Invalid(f"agent_ids: {item!r} is not valid: 1-64 letters, digits, '.', '_' or '-'")
    if len(set(agent_ids)) != len(agent_ids):
        raise Invalid("agent_ids names an agent twice")
    if agent_id is not None and agent_id != agent_ids[0]:
        raise Invalid(f"agent_id {agent_id!r} must be the first of agent_ids (or leave agent_id out)")
    return list(agent_ids)
