"""Port ranges (issue 19): one proxy per port of a range START-END.

A remote_port "30000-30009" (at most common.MAX_PORT_RANGE, 1,000 ports) with a local_port range of
the same length, or one local port for all, declares one proxy per port, named NAME:PORT (PORT the
remote port; NAME the proxies.d section, or the API body's name; without a name each is AGENT:PORT,
as a single proxy is).  Once expanded they are proxies like any other: listed, counted, enabled,
deleted and stored one by one (the state file holds each, so an older version reads it, and
deleting one leaves the others).  A range is all or nothing: a declared one goes through
ProxyTable.prepare like every declared proxy, one made through the API through ProxyTable.add_all
(every port checked and bound first, then all listed; any problem: nothing bound, a Conflict
naming the ports).

This module turns a range into the specs of its proxies (`expand`: the same for a proxies.d
section, through proxyfile.to_api, and for an API body), says what is wrong with one in words an
operator reads (`pairing_problem`), finds the proxies of a range to delete (`find_range`: every one
made through the API on those remote ports, of one protocol if asked; none if one is declared in a
file, or if a tcp and a udp proxy share one of them and no protocol says which), and keeps a refused range's problems to a few lines (`capped`).  It
also finds proxies by remote port for the table (`on_port`, `by_port`): a tcp and a udp proxy may
share a port number, so a port alone may name two, and then it names neither (a Conflict naming
both) unless a protocol (`protocol_value`: ?protocol=tcp|udp, --protocol) says which.  It holds no state and imports no other module of the server.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..common import parse_port_range
from ..errors import Conflict, Invalid, NotFound


def port_value(value: Any) -> int | tuple[int, int] | Any:
    """A port field as given: a range "START-END" as (START, END) (ValueError says what is wrong); an
    int or other value as it is (validate_proxy checks it)."""
    if isinstance(value, str) and "-" in value:
        return parse_port_range(value)
    return value


def pairing_problem(remote: Any, local: Any) -> tuple[str, str] | None:
    """(key, what is wrong) when local_port does not pair with remote_port, each a port or a
    (START, END) range: a local range needs a remote range of the same length."""
    if not isinstance(local, tuple):
        return None
    if not isinstance(remote, tuple):
        return "local_port", "a range of local ports needs remote_port to be a range of the same length"
    have, want = local[1] - local[0] + 1, remote[1] - remote[0] + 1
    if have != want:
        return "local_port", (f"a range of {have} ports, and remote_port = {remote[0]}-{remote[1]} is {want}: give "
                              "a range of the same length, or a single local port for all")
    return None


def expand(spec: Any) -> list[Any]:
    """An API body (or a proxies.d section as proxyfile.to_api gives it) as the specs of its proxies:
    one per remote port of a range "START-END" (named NAME:PORT, or left unnamed: AGENT:PORT), each
    with its own local port (a local range, in order) or the one local port; a body without a range
    as itself.  `Invalid` names the bad field; each spec is still to be validated (validate_proxy)."""
    if not isinstance(spec, dict):
        return [spec]
    ports = {}
    for key in ("remote_port", "local_port"):
        try:
            ports[key] = port_value(spec.get(key))
        except ValueError as exc:
            raise Invalid(f"{key} {spec.get(key)!r}: {exc}") from None
    remote, local = ports["remote_port"], ports["local_port"]
    wrong = pairing_problem(remote, local)
    if wrong:
        raise Invalid(f"{wrong[0]} {spec.get(wrong[0])!r}: {wrong[1]}")
    if not isinstance(remote, tuple):
        return [spec]
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise Invalid(f"name {name!r} is not valid: 1-64 letters, digits, '.', '_', ':' or '-', not all digits")
    if name and len(f"{name}:{remote[1]}") > 64:
        raise Invalid(f"name {name!r} is too long for a range: each proxy is named NAME:PORT, at most 64 characters "
                      f"({name}:{remote[1]} is {len(f'{name}:{remote[1]}')})")
    specs = []
    for i, port in enumerate(range(remote[0], remote[1] + 1)):
        one = dict(spec, remote_port=port, local_port=local[0] + i if isinstance(local, tuple) else local)
        if name:
            one["name"] = f"{name}:{port}"
        specs.append(one)
    return specs


PROTOCOLS = ("tcp", "udp")


def protocol_value(value: Any) -> str | None:
    """The protocol a request selects proxies by (?protocol=tcp|udp), None for either; `Invalid` names
    a bad value."""
    if value is None or value in PROTOCOLS:
        return value
    raise Invalid(f"protocol {value!r} must be tcp or udp")


def find_range(by_name: dict[str, Any], key: str, protocol: str | None = None) -> list[Any] | None:
    """For a key that names no proxy and is a range START-END: the proxies (of `protocol`, or of either)
    on its remote ports, all made through the API (a deletion's; `NotFound` if none, `Conflict` naming
    the ones declared in a file).  None if the key is a name or not a range."""
    if key in by_name or "-" not in key:
        return None
    try:
        ports = parse_port_range(key)
    except ValueError:
        return None
    if not isinstance(ports, tuple):
        return None
    low, high = ports
    found = sorted((p for p in by_name.values() if low <= p.remote_port <= high and protocol in (None, p.protocol)),
                   key=port_order)
    if not found:
        raise NotFound(f"no proxy named {key} (and no {protocol + ' ' if protocol else ''}proxy on remote ports {key})")
    ports_of: dict[int, list[Any]] = {}
    for proxy in found:
        ports_of.setdefault(proxy.remote_port, []).append(proxy)
    shared = [pair for pair in ports_of.values() if len(pair) > 1]
    if shared:
        shown = "; ".join(both(pair) for pair in shared[:5]) + (f"; and {len(shared) - 5} more port(s)"
                                                                if len(shared) > 5 else "")
        raise Conflict(f"remote ports {key}: nothing removed: a tcp and a udp proxy share remote port(s): {shown}; "
                       "delete them by name (anywherectl proxy del NAME), or by protocol (--protocol tcp|udp)")
    declared = [p for p in found if p.file is not None]
    if declared:
        shown = ", ".join(f"{p.name} ({p.file})" for p in declared[:5]) + (
            f" and {len(declared) - 5} more" if len(declared) > 5 else "")
        raise Conflict(f"remote ports {key}: nothing removed: declared in a file: {shown}; remove them there and "
                       "reload (anywherectl reload)")
    return found


def port_order(proxy: Any) -> tuple[int, str]:
    """Sort key: by remote port, a port's tcp proxy before its udp one."""
    return proxy.remote_port, proxy.protocol


def on_port(proxies: Iterable[Any], port: int, protocol: str | None = None) -> list[Any]:
    """The proxies on remote port `port` (of `protocol`, or of either): a tcp and a udp proxy may share
    a port number (the kernel keeps TCP and UDP ports apart), two of one protocol may not."""
    return sorted((p for p in proxies if p.remote_port == port and protocol in (None, p.protocol)), key=port_order)


def both(pair: list[Any]) -> str:
    """PORT: NAME (tcp) and NAME (udp)."""
    return f"{pair[0].remote_port}: " + " and ".join(f"{p.name} ({p.protocol})" for p in pair)


def by_port(proxies: Iterable[Any], key: str, protocol: str | None = None) -> Any:
    """The one proxy on remote port `key` (digits) of `protocol` (or of either), None if none; `Conflict`
    naming both when a tcp and a udp proxy share the port and no protocol says which: a port alone does
    not say which is meant, their names (or a protocol) do."""
    found = on_port(proxies, int(key), protocol)
    if len(found) > 1:
        raise Conflict(f"remote port {found[0].remote_port} is used by two proxies, "
                       + " and ".join(f"{p.name} ({p.protocol})" for p in found)
                       + ": say which by its name (anywherectl proxy del|enable|disable NAME), or with --protocol tcp|udp")
    return found[0] if found else None


def name_hint(same: Any, proxy: Any) -> str:
    """What to add to "a proxy named N already exists" when N is the other protocol's proxy on the same
    port (the default name AGENT:PORT is the same for both): give this one a name of its own."""
    if same.remote_port != proxy.remote_port or same.protocol == proxy.protocol:
        return ""
    return (f"; it is the {same.protocol} proxy on remote port {proxy.remote_port}: a {proxy.protocol} proxy may "
            'share that port number, under a name of its own (anywherectl proxy add --name NAME; "name" in the API)')


def label(proxies: list[Any], attr: str = "name") -> str:
    """One proxy's name (or other attribute) as it is; a range's as FIRST … LAST (N), for a log line."""
    items = [str(getattr(proxy, attr)) for proxy in proxies]
    return items[0] if len(items) == 1 else f"{items[0]} … {items[-1]} ({len(items)})"


def route(proxies: list[Any]) -> str:
    """Where one proxy, or a range's, leads, for a log line: port P → agent A → TARGET (whitelist)."""
    first = proxies[0]
    return (f"port {label(proxies, 'remote_port')} → agent {first.agent_id} → {label(proxies, 'target')}"
            + (f" (whitelist {','.join(first.whitelist)})" if first.whitelist else ""))


MAX_PROBLEMS_SHOWN = 5  # per section of a range: a range over busy ports names its first few, then a count


def capped(problems: list[str]) -> list[str]:
    """A refused declared set's problems, at most MAX_PROBLEMS_SHOWN for each "FILE [SECTION] KEY = VALUE"
    (the ports of one range), then how many more: a range of 1,000 busy ports is not 1,000 lines."""
    shown: list[str] = []
    more: dict[str, int] = {}
    for problem in problems:
        head = problem.split(": port ", 1)[0] if ": port " in problem else None
        if head is None:
            shown.append(problem)
            continue
        more[head] = more.get(head, 0) + 1
        if more[head] <= MAX_PROBLEMS_SHOWN:
            shown.append(problem)
    shown += [f"{head}: and {count - MAX_PROBLEMS_SHOWN} more ports" for head, count in more.items()
              if count > MAX_PROBLEMS_SHOWN]
    return shown
