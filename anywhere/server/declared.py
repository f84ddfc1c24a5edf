"""Proxies declared in files (issue 16, proxies.d): reading and checking a directory of them.

Every `*.conf` file of the directory is INI in the format of proxyfile.py (one section per proxy,
named by the section), read with configobj and checked with validate like anywhered.conf.

`read_dir` returns the declared proxies as API-shaped specs (the keys `proxies.validate_proxy`
takes), each with the file it came from, or raises ConfigError listing every problem of every
file at once, each naming file, section, key and value (a malformed file, an unknown key, a bad
value, a name or remote port declared twice across files).  It reads files only: checking the set
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
from .proxies import NAME_RE, validate_proxy

@dataclass
class Declared:
    """One proxy of a proxies.d file: the spec `validate_proxy` takes, and where it was declared."""

    spec: dict[str, Any]
    file: str

    @property
    def source(self) -> str:
        return f"file:{self.file}"


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
            spec = to_api(name, values)
            try:
                validate_proxy(spec)  # the API's own checks: what a file declares, the API would accept
            except Invalid as exc:
                problems.append(f"{path} [{name}]: {exc.message}")
                continue
            declared.append(Declared(spec, path))
    problems.extend(_clashes(declared))
    if problems:
        raise ConfigError(problems)
    return declared


def _clashes(declared: list[Declared]) -> list[str]:
    """A name or a remote port declared twice, across files or within one."""
    problems = []
    names: dict[str, Declared] = {}
    ports: dict[int, Declared] = {}
    for item in declared:
        name, port = item.spec["name"], item.spec["remote_port"]
        first = names.setdefault(name, item)
        if first is not item:
            problems.append(f"{item.file} [{name}]: proxy {name} is declared in {first.file} too")
        first = ports.setdefault(port, item)
        if first is not item:
            problems.append(f"{item.file} [{name}] remote_port = {port}: already used by proxy "
                            f"{first.spec['name']} in {first.file}")
    return problems
