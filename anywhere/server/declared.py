"""Proxies declared in files (issue 16, proxies.d): reading and checking a directory of them.

Every `*.conf` file of the directory is INI in the format of proxyfile.py (one section per proxy,
named by the section), read with configobj and checked with validate like anywhered.conf.

`read_dir` returns the declared proxies as API-shaped specs (the keys `proxy.validate_proxy`
takes), each with the file it came from, or raises ConfigError listing every problem of every
file at once, each naming file, section, key and value (a malformed file, an unknown key, a bad
value, a name declared twice across files, a remote port declared twice for one protocol: a tcp
and a udp proxy may share one).  A section whose remote_port is a range START-END declares
one proxy per port (ranges.py `expand`: SECTION:PORT), each a Declared with its section and
range, so that every problem with one of them names the section and the range as written, and
the port.  It reads files only: checking the set
against the running proxies, binding, and applying it as a diff are the ProxyTable's and the
server's (proxies.py `ProxyTable.prepare` / `commit`, core.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .. import config as configuration
from ..errors import ConfigError, Invalid
from ..proxyfile import PROXY_SPEC, agents_problem, to_api
from .proxy import NAME_RE, validate_proxy
from .ranges import capped, expand, pairing_problem, port_value

@dataclass
class Declared:
    """One proxy of a proxies.d file: the spec `validate_proxy` takes, and where it was declared."""

    spec: dict[str, Any]
    file: str
    section: str = ""  # the section that declared it ("": the proxy's name)
    remote_range: str | None = None  # declared by a range: its remote_port, "30000-30009"

    @property
    def source(self) -> str:
        return f"file:{self.file}"

    def where(self, key: str = "") -> str:
        """FILE [SECTION], with KEY = VALUE; for one of a range, remote_port = START-END: port PORT."""
        head = f"{self.file} [{self.section or self.spec['name']}]"
        if key == "remote_port" and self.remote_range:
            return f"{head} remote_port = {self.remote_range}: port {self.spec['remote_port']}"
        return head + (f" {key} = {self.spec[key]}" if key else "")

    def as_declared(self) -> tuple[Any, ...]:
        """What ProxyTable.prepare takes: (spec, file), with section and range for one of a range."""
        return (self.spec, self.file) + ((self.section, self.remote_range) if self.remote_range else ())


def read_dir(directory: str) -> list[Declared]:
    """The proxies declared in `directory`'s *.conf files, in file then section order; none if the
    directory does not exist.  Raises ConfigError with every problem found, all files read."""
    try:  # not glob: it would take an unreadable directory for an empty one, and drop every proxy
        names = sorted(n for n in os.listdir(directory) if n.endswith(".conf") and not n.startswith("."))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise ConfigError([f"{directory}: not a directory"]) from None
    except OSError as exc:
        raise ConfigError([f"{directory}: cannot read: {exc.strerror}"]) from None
    problems: list[str] = []
    declared: list[Declared] = []
    for path in (os.path.join(directory, name) for name in names):
        try:
            sections = configuration.read(path, PROXY_SPEC)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        for name, values in sections.items():
            if not NAME_RE.fullmatch(name) or (name.isascii() and name.isdigit()):
                problems.append(f"{path} [{name}]: the section names the proxy: 1-64 letters, digits, '.', '_', ':' "
                                f"or '-', not all digits")
                continue
            wrong = agents_problem(values)
            if wrong:
                problems.append(f"{path} [{name}] {wrong}")
                continue
            wrong = pairing_problem(port_value(values["remote_port"]), port_value(values["local_port"]))
            if wrong:
                problems.append(f"{path} [{name}] {wrong[0]} = {values[wrong[0]]}: {wrong[1]}")
                continue
            try:
                specs = expand(to_api(name, values))
                for spec in specs:
                    validate_proxy(spec)  # the API's own checks: what a file declares, the API would accept
            except Invalid as exc:
                problems.append(f"{path} [{name}]: {exc.message}")
                continue
            ranged = values["remote_port"] if isinstance(values["remote_port"], str) else None
            declared.extend(Declared(spec, path, name, ranged) for spec in specs)
    problems.extend(capped(_clashes(declared)))
    if problems:
        raise ConfigError(problems)
    return declared


def _clashes(declared: list[Declared]) -> list[str]:
    """A name, or a remote port of one protocol, declared twice, across files or within one."""
    problems = []
    names: dict[str, Declared] = {}
    ports: dict[tuple[int, str], Declared] = {}  # a tcp and a udp proxy may share a port number
    for item in declared:
        name, port = item.spec["name"], (item.spec["remote_port"], item.spec.get("protocol", "tcp"))
        first = names.setdefault(name, item)
        if first is not item:
            where = item.where("remote_port") if item.remote_range else item.where()
            problems.append(f"{where}: proxy {name} is declared in {first.file} too")
        first = ports.setdefault(port, item)
        if first is not item:
            problems.append(f"{item.where('remote_port')}: already used by proxy {first.spec['name']} in {first.file}")
    return problems
