"""anywherectl: the operator's command.  Talks HTTP/JSON to anywhered's admin socket with `requests`.

The same verbs serve `anywhered proxy|agent ...` (the original's command lines): see
`add_admin_commands()`.  Output is a readable table, or the daemon's JSON with ``--json``;
errors from the daemon are printed as they came and the exit status is 1; a daemon that is
not running gets one line naming the socket.

It is an entry point: it parses, calls the admin API (client.py) and prints.  It must not import
a daemon (server.py, agent.py) nor hold any state of its own; `requests` is imported only when a
command runs, so the daemons can build these parsers without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable

from urllib.parse import quote

from . import proxyfile, proxyproto
from .common import (DEFAULT_ADMIN_SOCKET, MAX_PORT_RANGE, CredentialsError, CtlError, human_bytes, parse_port_range,
                     port_arg, port_range_arg, version_line)
from .config import (MAX_FLOWS, MAX_FLOWS_LIMIT, MAX_UDP_IDLE, PROTOCOLS, UDP_IDLE_TIMEOUT, ValidateError, check_count,
                     check_seconds, flag_type, format_bandwidth)


def __getattr__(name: str) -> Any:
    """Client, BASE, ... live in client.py (imported only when a command talks to the daemon)."""
    if name in ("Client", "BASE", "TIMEOUT", "_UnixAdapter"):
        from . import client
        return getattr(client, name)
    raise AttributeError(name)


# -- output ------------------------------------------------------------------------------------------
def _client(socket_path: str) -> Any:
    from .client import Client
    return Client(socket_path)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    header = [title for _, title in columns]
    body = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _since(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(render(data))


# -- verbs -------------------------------------------------------------------------------------------
def cmd_proxy_add(args: argparse.Namespace) -> None:
    agents = [a.strip() for a in args.agent_id.split(",") if a.strip()]
    body: dict[str, Any] = {"local_ip": args.local_ip, "local_port": args.local_port, "remote_port": args.remote_port}
    if len(agents) == 1:
        body["agent_id"] = agents[0]
    else:  # several agents: each client goes to one of them (--balance)
        body["agent_ids"] = agents
    if args.balance:
        body["balance"] = args.balance
    if args.proxy_protocol:
        body["proxy_protocol"] = args.proxy_protocol
    if args.bandwidth is not None:
        body["bandwidth"] = args.bandwidth  # bits a second, checked by the file's own check
    if args.protocol:
        body["protocol"] = args.protocol
    if args.udp_idle_timeout is not None:
        body["udp_idle_timeout"] = args.udp_idle_timeout
    if args.max_flows is not None:
        body["max_flows"] = args.max_flows
    if args.wl:
        body["whitelist"] = [e.strip() for e in args.wl.split(",") if e.strip()]
    if args.name:
        body["name"] = args.name
    remote, local = (parse_port_range(str(v)) for v in (args.remote_port, args.local_port))
    if isinstance(local, tuple) and (not isinstance(remote, tuple) or local[1] - local[0] != remote[1] - remote[0]):
        raise CtlError(f"--local-port {args.local_port}: a range of local ports needs --remote-port to be a range of "
                       "the same length (or give a single local port for all)")
    data = _client(args.admin_socket).call("POST", "/v1/proxies", body)
    if "proxies" in data:  # a range: one proxy per remote port
        ps = data["proxies"]
        first, last = ps[0], ps[-1]
        agents = ", ".join(first.get("agent_ids") or [first["agent_id"]])
        local = first["local_port"] if first["local_port"] == last["local_port"] else \
            f"{first['local_port']}-{last['local_port']}"
        _emit(args, data, lambda _d: f"{len(ps)} proxies added, {first['name']} … {last['name']}: ports "
                                     f"{first['remote_port']}-{last['remote_port']} → agent {agents} → "
                                     f"{first['local_ip']}:{local}")
        return
    p = data["proxy"]
    agents = ", ".join(p.get("agent_ids") or [p["agent_id"]])
    udp = "udp " if p.get("protocol") == "udp" else ""
    pp = f" (PROXY protocol {p['proxy_protocol']})" if p.get("proxy_protocol") else ""
    limit = f" (bandwidth {format_bandwidth(p['bandwidth'])} each way)" if p.get("bandwidth") else ""
    _emit(args, data, lambda _d: f"proxy {p['name']} added: {udp}port {p['remote_port']} → agent {agents} → "
                                 f"{p['local_ip']}:{p['local_port']}{pp}{limit}")


def cmd_proxy_list(args: argparse.Namespace) -> None:
    data = _client(args.admin_socket).call("GET", "/v1/proxies")
    rows = [dict(p, rejected=sum(p.get("rejected", {}).values()), bytes_in=human_bytes(p.get("bytes_in", 0)),
                 bytes_out=human_bytes(p.get("bytes_out", 0)), agent_id=",".join(p.get("agent_ids") or [p["agent_id"]]),
                 bandwidth=format_bandwidth(p["bandwidth"]) if p.get("bandwidth") else "-")
            for p in data["proxies"]]
    failed = [f"proxy {p['name']} failed: {p['failed']}" for p in data["proxies"] if p.get("failed")]
    failed += [f"proxy {p['name']} ({p['balance']}): " + ", ".join(
        f"{a['agent_id']} {a['state']}" + (f" {a['backoff']:g} s" if a["state"] == "backing off" else "")
        + f" ({a['connections']} live, {a['connections_total']} total)" for a in p["agents"])
        for p in data["proxies"] if len(p.get("agents", ())) > 1]
    failed += [f"proxy {p['name']}: PROXY protocol {p['proxy_protocol']} to its target" for p in data["proxies"]
               if p.get("proxy_protocol")]
    _emit(args, data, lambda d: "\n".join([table(rows, [
        ("name", "NAME"), ("agent_id", "AGENT"), ("agent_online", "ONLINE"), ("enabled", "ENABLED"),
        ("state", "STATE"), ("remote_port", "REMOTE PORT"), ("local_ip", "LOCAL IP"), ("local_port", "LOCAL PORT"),
        ("whitelist", "WHITELIST"), ("bandwidth", "BANDWIDTH"), ("connections", "CONNS"), ("connections_total", "TOTAL"),
        ("rejected", "REJECTED"), ("bytes_in", "IN"), ("bytes_out", "OUT"), ("protocol", "PROTO"), ("source", "SOURCE")])]
        + ([""] + failed if failed else [])))


def cmd_proxy_export(args: argparse.Namespace) -> None:
    """The proxies made through the API (all, or those named) as a proxies.d file, on stdout."""
    proxies = _client(args.admin_socket).call("GET", "/v1/proxies")["proxies"]
    if args.names:
        by_key = {p["name"]: p for p in proxies} | {str(p["remote_port"]): p for p in proxies}
        unknown = [n for n in args.names if n not in by_key]
        if unknown:
            raise CtlError(f"no proxy named {', '.join(unknown)}")
        for key in args.names:  # a tcp and a udp proxy may share a port: a port alone does not say which
            shared = [f"{p['name']} ({p.get('protocol', 'tcp')})" for p in proxies if str(p["remote_port"]) == key]
            if len(shared) > 1:
                raise CtlError(f"remote port {key} is used by two proxies, {' and '.join(shared)}: say which by "
                               "its name")
        declared = [f"{by_key[n]['name']} ({by_key[n]['source'][5:]})" for n in args.names
                    if by_key[n].get("source", "api") != "api"]
        if declared:
            raise CtlError(f"already declared in a file: {', '.join(declared)}")
        chosen = list({by_key[n]["name"]: by_key[n] for n in args.names}.values())
    else:
        chosen = [p for p in proxies if p.get("source", "api") == "api"]
    header = ("Proxies made through the API, exported by anywherectl proxy export.\n"
              "To manage them as files: save this as /etc/anywhere/proxies.d/NAME.conf, delete them through\n"
              "the API (anywherectl proxy del NAME), then reload (systemctl reload anywhered).")
    if args.json:
        print(json.dumps({"proxies": chosen}, indent=2, sort_keys=True))
    else:
        print(proxyfile.render(chosen, header), end="")


def cmd_proxy_del(args: argparse.Namespace) -> None:
    key = args.name if args.name else (str(args.remote_port) if args.remote_port else None)
    if key is None:
        raise CtlError("name the proxy: NAME or --remote-port PORT")
    data = _client(args.admin_socket).call("DELETE", "/v1/proxies/" + quote(key, safe="") + _protocol(args))
    if isinstance(data["deleted"], list):  # a range of remote ports
        _emit(args, data, lambda d: f"{len(d['deleted'])} prox{'y' if len(d['deleted']) == 1 else 'ies'} deleted "
                                    f"({d['deleted'][0]} … {d['deleted'][-1]}); {d['closed_connections']} "
                                    "connection(s) closed")
        return
    _emit(args, data, lambda d: f"proxy {d['deleted']} deleted; {d['closed_connections']} connection(s) closed")


def _protocol(args: argparse.Namespace) -> str:
    """The query that selects proxies of one protocol (--protocol), or none."""
    return f"?protocol={args.protocol}" if args.protocol else ""


def cmd_agent_list(args: argparse.Namespace) -> None:
    data = _client(args.admin_socket).call("GET", "/v1/agents")
    rows = [dict(a, connected_since=_since(a.get("connected_since")), bytes_in=human_bytes(a.get("bytes_in", 0)),
                 bytes_out=human_bytes(a.get("bytes_out", 0))) for a in data["agents"]]
    _emit(args, data, lambda _d: table(rows, [
        ("agent_id", "AGENT"), ("address", "ADDRESS"), ("connected_since", "CONNECTED SINCE"),
        ("rtt_ms", "RTT MS"), ("connections", "CONNS"), ("bytes_in", "IN"), ("bytes_out", "OUT"),
        ("version", "VERSION")]))


def cmd_conn_list(args: argparse.Namespace) -> None:
    data = _client(args.admin_socket).call("GET", "/v1/connections")
    _emit(args, data, lambda d: table(d["connections"], [
        ("id", "ID"), ("proxy", "PROXY"), ("agent_id", "AGENT"), ("source", "SOURCE"),
        ("target", "TARGET"), ("bytes_in", "BYTES IN"), ("bytes_out", "BYTES OUT"), ("age", "AGE S"), ("protocol", "PROTO")]))



def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def render_status(d: dict) -> str:
    rejected = ", ".join(f"{k} {v}" for k, v in d["rejected"].items() if v) or "none"
    lines = [
        f"anywhered {d['version']}, server id {d['server_id']}, up {_duration(d['uptime'])}"
        + (" (draining)" if d.get("draining") else ""),
        f"agents:      {d['agents']} connected",
        f"proxies:     {d['proxies']}" + (f" ({len(d['proxies_failed'])} failed: {', '.join(d['proxies_failed'])})"
                                              if d.get("proxies_failed") else ""),
        f"connections: {d['connections']} live, {d['connections_total']} in all; "
        f"{d['warm_data_connections']} warm data connection(s)",
        f"bytes:       {human_bytes(d['bytes_in'])} in, {human_bytes(d['bytes_out'])} out",
        f"rejected:    {rejected}",
        "last errors:" + ("" if d["last_errors"] else " none"),
    ]
    if "buffered_bytes" in d:  # not from a server older than the buffer budget
        mib = [d[k] / 2**20 for k in ("buffered_bytes", "buffer_committed_bytes", "buffer_budget")]
        lines.insert(-2, f"buffered:    {mib[0]:.1f} MiB for clients slow to read, {mib[1]:.1f} MiB committed "
                         f"of a {mib[2]:.0f} MiB budget")
    for e in d["last_errors"]:
        lines.append(f"  {_since(e['time'])} {e['level']}: {e['message']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> None:
    _emit(args, _client(args.admin_socket).call("GET", "/v1/status"), render_status)


def cmd_conn_kill(args: argparse.Namespace) -> None:
    if (args.id is None) == (args.proxy is None):
        raise CtlError("say which: conn kill ID, or conn kill --proxy NAME")
    client = _client(args.admin_socket)
    if args.id is not None:
        data = client.call("DELETE", f"/v1/connections/{args.id}")
    else:
        data = client.call("DELETE", "/v1/connections?proxy=" + quote(args.proxy, safe=""))
    _emit(args, data, lambda d: f"killed {len(d['killed'])} connection(s)" +
          (f": {', '.join(str(i) for i in d['killed'])}" if d["killed"] else ""))


def cmd_agent_disconnect(args: argparse.Namespace) -> None:
    data = _client(args.admin_socket).call("POST", f"/v1/agents/{quote(args.agent_id, safe='')}/disconnect")
    _emit(args, data, lambda d: f"agent {d['disconnected']} disconnected; {d['closed_connections']} connection(s) closed")


def cmd_proxy_enable(args: argparse.Namespace) -> None:
    verb = "enable" if args.enable else "disable"
    data = _client(args.admin_socket).call("POST", f"/v1/proxies/{quote(args.name, safe='')}/{verb}{_protocol(args)}")
    _emit(args, data, lambda d: f"proxy {d['proxy']['name']} {verb}d")


def cmd_reload(args: argparse.Namespace) -> None:
    data = _client(args.admin_socket).call("POST", "/v1/reload")

    def render(d: dict) -> str:
        lines = [f"reloaded {d.get('config', '')}: " + (f"changed {', '.join(d['changed'])}" if d["changed"] else "nothing changed")]
        if d.get("restart_required"):
            lines.append(f"not applied until a restart: {', '.join(d['restart_required'])}")
        p = d.get("proxies")
        if p is not None:
            done = [f"{verb} {', '.join(p[verb])}" for verb in ("added", "removed", "changed") if p.get(verb)]
            lines.append("proxies declared in files: " + ("; ".join(done) if done else "no change")
                         + f"; {len(p.get('unchanged', []))} unchanged"
                         + (f"; {p['closed_connections']} connection(s) closed" if p.get("closed_connections") else ""))
        return "\n".join(lines)
    _emit(args, data, render)


def cmd_credentials_init(args: argparse.Namespace) -> None:
    from . import credentials
    paths = credentials.init(args.dir, args.server_name, args.server_ip or [], force=args.force)
    print("wrote " + ", ".join(paths))
    print(f"keep {args.dir}/ca.key private: it is only needed to issue agent certificates")


def cmd_credentials_issue(args: argparse.Namespace) -> None:
    from . import credentials
    paths = credentials.issue(args.agent_id, args.dir, basename=args.basename, force=args.force)
    print("wrote " + ", ".join(paths))


# -- argument parsing --------------------------------------------------------------------------------
def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin-socket", default=DEFAULT_ADMIN_SOCKET, metavar="PATH",
                        help=f"anywhered's admin socket (default {DEFAULT_ADMIN_SOCKET})")
    common.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    return common


_port = port_arg  # the name older callers use


def _udp_idle(text: str) -> float:
    try:
        return check_seconds(text, MAX_UDP_IDLE)
    except ValidateError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _max_flows(text: str) -> int:
    try:
        return check_count(text, 1, MAX_FLOWS_LIMIT)
    except ValidateError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def add_admin_commands(sub: Any) -> None:
    """The proxy/agent/conn verbs, shared by anywherectl and anywhered."""
    common = _common()
    proxy = sub.add_parser("proxy", help="add, list or delete proxies").add_subparsers(dest="verb", metavar="VERB", required=True)
    add = proxy.add_parser("add", parents=[common], help="add a proxy: REMOTE PORT on the server → agent → LOCAL IP:PORT")
    add.add_argument("--agent-id", required=True, help="the agent that reaches the target; several, comma-separated: "
                     "each client goes to one of them, and to the next if it fails")
    add.add_argument("--balance", choices=("least-connections", "round-robin", "failover"),
                     help="with several agents: how a client's agent is chosen (default least-connections; "
                          "failover: the first listed that can serve)")
    add.add_argument("--proxy-protocol", choices=(*proxyproto.VERSIONS, proxyproto.OFF),
                     help="send the target a PROXY protocol header (HAProxy's, v1 text or v2 binary) naming the "
                          "client's address and port, before any other byte (default off)")
    add.add_argument("--local-ip", required=True, help="the target's address as seen from the agent")
    add.add_argument("--local-port", required=True, type=port_range_arg, help="the target's port; with a range of "
                     "remote ports, a range of the same length (or one port for all)")
    add.add_argument("--remote-port", required=True, type=port_range_arg, help="the public port on the server, or a "
                     f"range START-END (at most {MAX_PORT_RANGE} ports): one proxy per port, all added or none")
    add.add_argument("--protocol", choices=PROTOCOLS, help="tcp (the default) or udp: datagrams, one flow per client "
                     "address and port, carried whole over the agent's trunks")
    add.add_argument("--udp-idle-timeout", type=_udp_idle, metavar="SECONDS",
                     help=f"udp: a flow ends after this many seconds without a datagram either way (default "
                          f"{UDP_IDLE_TIMEOUT:g}; more than 0, at most {MAX_UDP_IDLE})")
    add.add_argument("--max-flows", type=_max_flows, metavar="N",
                     help=f"udp: flows at once; datagrams from new sources beyond it are dropped (default {MAX_FLOWS}; "
                          f"1..{MAX_FLOWS_LIMIT})")
    add.add_argument("--wl", help="this proxy's whitelist: comma-separated IPs/CIDRs (default: the global one)")
    add.add_argument("--name", help="the proxy's name (default AGENT:REMOTE_PORT); with a range, each is NAME:PORT "
                     "(default AGENT:PORT)")
    add.add_argument("--bandwidth", type=flag_type(proxyfile.PROXY_SPEC, "bandwidth"), metavar="RATE",
                     help="a limit per direction for all the proxy's connections together, e.g. 10mbit (kbit, mbit, "
                          "gbit: powers of 1000; 8kbit..100gbit); default (or 0, off): unlimited")
    add.set_defaults(func=cmd_proxy_add)
    lst = proxy.add_parser("list", parents=[common], help="list proxies")
    lst.set_defaults(func=cmd_proxy_list)
    export = proxy.add_parser("export", parents=[common], help="print proxies made through the API as a "
                              "proxies.d file (all, or those named)")
    export.add_argument("names", nargs="*", metavar="NAME", help="a proxy's name (or its remote port)")
    export.set_defaults(func=cmd_proxy_export)
    dele = proxy.add_parser("del", aliases=["delete", "rm"], parents=[common], help="delete a proxy and close its connections")
    dele.add_argument("name", nargs="?", help="the proxy's name (or its remote port; or a range START-END: every "
                      "proxy on those remote ports)")
    dele.add_argument("--remote-port", type=port_range_arg, help="the proxy's remote port, or a range START-END: "
                      "every proxy on those ports, made through the API, all or none")
    dele.add_argument("--protocol", choices=("tcp", "udp"), help="only the proxy (or the range's proxies) of this "
                      "protocol, where a tcp and a udp proxy share a remote port")
    dele.add_argument("--agent-id", help=argparse.SUPPRESS)  # accepted for the original's command lines
    dele.set_defaults(func=cmd_proxy_del)
    for verb in ("enable", "disable"):
        p = proxy.add_parser(verb, parents=[common], help=f"{verb} a proxy (disabled: no new clients, not deleted)")
        p.add_argument("name", help="the proxy's name (or its remote port)")
        p.add_argument("--protocol", choices=("tcp", "udp"), help="only the proxy of this protocol, where a tcp "
                       "and a udp proxy share the remote port")
        p.set_defaults(func=cmd_proxy_enable, enable=verb == "enable")
    agent = sub.add_parser("agent", help="list agents").add_subparsers(dest="verb", metavar="VERB", required=True)
    agent.add_parser("list", parents=[common], help="list connected agents").set_defaults(func=cmd_agent_list)
    disc = agent.add_parser("disconnect", parents=[common], help="close an agent's session and its connections")
    disc.add_argument("agent_id", metavar="ID")
    disc.set_defaults(func=cmd_agent_disconnect)
    conn = sub.add_parser("conn", help="list live connections").add_subparsers(dest="verb", metavar="VERB", required=True)
    conn.add_parser("list", parents=[common], help="list live tunneled connections").set_defaults(func=cmd_conn_list)
    kill = conn.add_parser("kill", parents=[common], help="close a live connection (ID), or every one of a proxy")
    kill.add_argument("id", nargs="?", type=int, metavar="ID")
    kill.add_argument("--proxy", metavar="NAME", help="kill every connection of this proxy")
    kill.set_defaults(func=cmd_conn_kill)
    sub.add_parser("reload", parents=[common], help="make the daemon re-read its configuration; fails if it is refused"
                   ).set_defaults(func=cmd_reload)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anywherectl", description="Drive anywhered over its admin socket.")
    parser.add_argument("--version", action="version", version=version_line("anywherectl"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_admin_commands(sub)
    sub.add_parser("status", parents=[_common()], help="the daemon's summary").set_defaults(func=cmd_status)
    cred = sub.add_parser("credentials", help="make a CA and certificates").add_subparsers(dest="verb", metavar="VERB", required=True)
    init = cred.add_parser("init", help="make DIR/ca.{crt,key} and DIR/server.{crt,key}")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--server-name", required=True, help="the name agents dial (DNS name or IP), put in the server certificate")
    init.add_argument("--server-ip", action="append", metavar="IP", help="an extra IP address SAN (repeatable)")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(func=cmd_credentials_init)
    issue = cred.add_parser("issue", help="make DIR/AGENT_ID.{crt,key}, signed by DIR/ca.key")
    issue.add_argument("agent_id", metavar="AGENT_ID")
    issue.add_argument("dir", metavar="DIR")
    issue.add_argument("--basename", help="file name without extension (default AGENT_ID; 'client' for the original layout)")
    issue.add_argument("--force", action="store_true", help="overwrite existing files")
    issue.set_defaults(func=cmd_credentials_issue)
    return parser


def run(args: argparse.Namespace, prog: str) -> int:
    try:
        args.func(args)
    except (CtlError, CredentialsError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args, "anywherectl")


if __name__ == "__main__":
    sys.exit(main())
