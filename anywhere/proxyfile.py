"""The proxies.d file format (issue 16): one INI section per proxy, named by the section.

    [web]
    agent = agent-1
    local_ip = 10.0.0.2
    local_port = 80
    remote_port = 8080
    #whitelist = 203.0.113.0/24, 2001:db8::/32
    #idle_timeout = 0
    #proxy_protocol = off
    #bandwidth = 10mbit
    #enabled = true

A port range declares one proxy per port, each named SECTION:PORT (PORT the remote port), with
local ports in the same order, or the one local port for all (at most config.MAX_PORT_RANGE
ports; all bound or none, like every reload):

    [web]
    agent = agent-1
    local_ip = 10.0.0.2
    remote_port = 30000-30009
    local_port = 40000-40009

``proxy_protocol = v1 | v2`` has the agent send the target a PROXY protocol header
(proxyproto.py); off (the default) is the key left out, or ``off``, and is left out when written.

Owns the keys of a section (`PROXY_SPEC`, a configobj spec checked with config.py's checks),
how a section maps to the API's proxy fields (`to_api`) and back (`render`, which writes API
proxies as such a file: `anywherectl proxy export`, and check-config's listing).  Shared by the
server, which reads the files (server/declared.py), and by the operator's command, which writes
them; it reads and writes no file itself.  etc/proxies.d/example.conf, shipped in the packages,
shows the format.
"""

from __future__ import annotations

from typing import Any

from .config import format_bandwidth

# one section per proxy; the keys without a default are required, and one of agent or agents
PROXY_SPEC = """
[__many__]
agent = agentid(default=None)
agents = agentids(default=None)
balance = balance(default=least-connections)
local_ip = host()
local_port = port_range()
remote_port = port_range()
whitelist = networks(default=list())
idle_timeout = seconds_or_off(at_most=604800, default=0)
proxy_protocol = proxy_protocol(default=off)
bandwidth = bandwidth(default=0)
enabled = boolean(default=True)
""".strip().splitlines()

def agents_problem(values: dict[str, Any]) -> str | None:
    """What is wrong with a checked section's agent keys: exactly one of agent and agents."""
    if values["agent"] is None and values["agents"] is None:
        return "agent: is required (or agents = ID, ID, ... for several)"
    if values["agent"] is not None and values["agents"] is not None:
        return f"agent = {values['agent']}: give agent or agents, not both"
    return None


def to_api(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """A checked section (defaults filled, `agents_problem` None) as the fields the API takes; a port
    range stays its text "START-END", as the API takes it too (server/ranges.py `expand`)."""
    agents = values["agents"] or [values["agent"]]
    return {"name": name, "agent_id": agents[0], "agent_ids": list(agents), "balance": values["balance"],
            "local_ip": values["local_ip"],
            "local_port": values["local_port"], "remote_port": values["remote_port"],
            "whitelist": list(values["whitelist"]), "idle_timeout": values["idle_timeout"],
            "bandwidth": values["bandwidth"], "enabled": values["enabled"]} | (
        {"proxy_protocol": values["proxy_protocol"]} if values["proxy_protocol"] != "off" else {})


def render(proxies: list[dict[str, Any]], header: str = "") -> str:
    """API-shaped proxies as a proxies.d file: one section each, the optional keys only when they
    differ from their default (so the file says what the operator chose).  Proxies made through the
    API by a range are one proxy each by then, and are written one section each."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for proxy in proxies:
        if lines:
            lines.append("")
        agents = proxy.get("agent_ids") or [proxy["agent_id"]]
        lines.append(f"[{proxy['name']}]")
        lines.append(f"agents = {', '.join(agents)}" if len(agents) > 1 else f"agent = {agents[0]}")
        if proxy.get("balance", "least-connections") != "least-connections":
            lines.append(f"balance = {proxy['balance']}")
        lines += [f"local_ip = {proxy['local_ip']}", f"local_port = {proxy['local_port']}",
                  f"remote_port = {proxy['remote_port']}"]
        if proxy.get("whitelist"):
            lines.append("whitelist = " + ", ".join(proxy["whitelist"]))
        if proxy.get("idle_timeout"):
            lines.append(f"idle_timeout = {proxy['idle_timeout']:g}")
        if proxy.get("proxy_protocol") not in (None, "off"):
            lines.append(f"proxy_protocol = {proxy['proxy_protocol']}")
        if proxy.get("bandwidth"):
            lines.append(f"bandwidth = {format_bandwidth(proxy['bandwidth'])}")
        if proxy.get("enabled") is False:
            lines.append("enabled = false")
    return "\n".join(lines) + "\n"
