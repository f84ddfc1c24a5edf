"""INI configuration files, read with configobj and checked with validate against a role's configspec.

Theory of operation
-------------------
A config file is parsed → checked against its configspec (which fills the defaults) → turned
into the role's settings by the role (`server/settings.py`'s ServerConfig, `agent/settings.py`'s
AgentConfig: each is the one home of its keys' checks, defaults and help, and builds its spec
from them); command-line flags that were given override the file.  Every problem is collected
before anything is reported, and each one names the file, the section, the key, the bad value
and what is expected::

    anywhered.conf [server] port = 70000: must be 1..65535

Unknown sections and keys are errors too (a typo must not be silently ignored).  The checks
are our own validate functions (`port`, `seconds`, `addresses`, `networks`, …) so the messages
say what an operator needs, not what a type system would.  Nothing here opens a socket: a bad
file stops the process before it binds anything, and a reload that fails changes nothing.

This module owns the checks, the reading, and what flags derive from a key (`flag_type`: the
key's own check, so a flag cannot accept what the file refuses; `describe`: the key's range and
default for the flag's help).  Where the wire protocol bounds a value (heartbeat, pool size,
ports) the checks take the bound from wire.py.  It must not know any role's keys.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Callable

from configobj import ConfigObj, ConfigObjError, flatten_errors, get_extra_values
from validate import ValidateError, Validator

from . import proxyproto, wire
from .errors import ConfigError
from .common import MAX_PORT_RANGE, parse_port_range, range_text, valid_agent_id
from .net import HOSTNAME_RE, is_ip, parse_networks, split_hostport

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_SECONDS = 86400  # a timeout of more than a day is a typo


class _Bad(ValidateError):
    pass


# -- checks (validate functions): value in, converted value out, _Bad("what is expected") ------------
def _text(value: Any) -> str:
    if isinstance(value, list):
        raise _Bad("must be a single value, not a list")
    return str(value).strip()


def _list(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in items if str(v).strip()]


def check_port(value: Any, default: Any = None) -> int:
    text = _text(value)
    if not (text.isascii() and text.isdigit()) or not wire.MIN_PORT <= int(text) <= wire.MAX_PORT:
        raise _Bad(f"must be {wire.MIN_PORT}..{wire.MAX_PORT}")
    return int(text)


def check_port_range(value: Any, default: Any = None) -> int | str:
    """`port()`, or a range START-END: the port as an int, a range as its text "30000-30009"."""
    try:
        return range_text(parse_port_range(_text(value)))
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def check_count(value: Any, low: Any = 0, high: Any = 2**31) -> int:
    text = _text(value)
    low, high = int(low), int(high)
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise _Bad(f"must be a whole number {low}..{high}")
    return int(text)


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int | None:
    """Bytes from "268435456", "256M", "256MiB", "1g" (K, M, G, T: powers of 1024); None if not a size."""
    text = text.strip().upper().replace(" ", "")
    if text.endswith("IB"):
        text = text[:-2]
    elif text.endswith("B") and len(text) > 1 and not text[-2].isdigit():
        text = text[:-1]  # "KB", "MB": taken as KiB, MiB
    number, unit = (text[:-1], text[-1]) if text[-1:] in ("K", "M", "G", "T") else (text, "")
    if not (number.isascii() and number.isdigit()):
        return None
    return int(number) * _SIZE_UNITS[unit]


def check_size(value: Any, low: Any = "0", high: Any = "1T") -> int:
    text = _text(value)
    size = parse_size(text)
    if size is None or not (parse_size(str(low)) or 0) <= size <= (parse_size(str(high)) or 0):
        raise _Bad(f"must be a size in bytes, optionally with K, M or G (powers of 1024, e.g. 256M), {low}..{high}")
    return size


def check_seconds(value: Any, at_most: Any = MAX_SECONDS) -> float:
    text = _text(value)
    at_most = int(at_most)
    try:
        number = float(text)
    except ValueError:
        raise _Bad(f"must be a number of seconds greater than 0 (at most {at_most})") from None
    if not 0 < number <= at_most:  # also refuses NaN and infinities
        raise _Bad(f"must be a number of seconds greater than 0 (at most {at_most})")
    return number


def check_path(value: Any, default: Any = None) -> str:
    text = _text(value)
    if not text:
        raise _Bad("must be a path")
    return text


def check_name(value: Any, default: Any = None) -> str:
    text = _text(value)
    if not text or len(text) > 64 or not text.isprintable():
        raise _Bad("must be 1-64 printable characters")
    return text


def check_agent_id(value: Any, default: Any = None) -> str:
    text = _text(value)
    if not valid_agent_id(text):
        raise _Bad("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return text


MAX_AGENTS_PER_PROXY = 16
BALANCE_MODES = ("least-connections", "round-robin", "failover")


def check_agent_ids(value: Any, default: Any = None) -> list[str]:
    items = _list(value)
    if not 1 <= len(items) <= MAX_AGENTS_PER_PROXY:
        raise _Bad(f"must be 1 to {MAX_AGENTS_PER_PROXY} agent ids, comma-separated")
    for item in items:
        if not valid_agent_id(item):
            raise _Bad(f"{item!r} is not an agent id: 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                       "or digit")
    twice = sorted({i for i in items if items.count(i) > 1})
    if twice:
        raise _Bad(f"names {', '.join(twice)} twice")
    return items


def check_balance(value: Any, default: Any = None) -> str:
    text = _text(value)
    if text not in BALANCE_MODES:
        raise _Bad(f"must be one of {', '.join(BALANCE_MODES)}")
    return text


PROXY_PROTOCOLS = (*proxyproto.VERSIONS, proxyproto.OFF)  # a proxy's proxy_protocol; off is the default


def check_proxy_protocol(value: Any, default: Any = None) -> str:
    text = _text(value)
    if text not in PROXY_PROTOCOLS:
        raise _Bad("must be v1, v2 or off")
    return text


def check_host(value: Any, default: Any = None) -> str:
    text = _text(value)
    if not (is_ip(text) or HOSTNAME_RE.fullmatch(text)):
        raise _Bad("must be a host name or an IP address")
    return text


def check_servers(value: Any, default: Any = None) -> str:
    """One or more servers, comma-separated, each HOST or HOST:PORT (net.split_hostport).  Returns
    the text as given (a file's list joined by ", "); the port of an entry without one, and
    duplicates, are the role's business."""
    items = [part.strip() for item in _list(value) for part in item.split(",") if part.strip()]
    if not items:
        raise _Bad("must name a server: a host name or an IP address, optionally with :PORT")
    for item in items:
        try:
            split_hostport(item)
        except ValueError as exc:
            raise _Bad(f"{item!r}: {exc}" if len(items) > 1 else str(exc)) from None
    return value.strip() if isinstance(value, str) else ", ".join(items)


def check_addresses(value: Any, default: Any = None) -> list[str]:
    items = _list(value)
    for item in items:
        if item not in ("*", "::") and not is_ip(item) and not HOSTNAME_RE.fullmatch(item):
            raise _Bad(f"{item!r} is not an address: use IP addresses or host names, comma-separated")
    return ["" if i in ("*", "::") else i for i in items]


def check_networks(value: Any, default: Any = None) -> list[str]:
    items = _list(value)
    try:
        parse_networks(items)
    except ValueError as exc:
        raise _Bad(f"{exc.args[0]!r} is not an IP address or CIDR (e.g. 203.0.113.7, 198.51.100.0/24, 2001:db8::/32)") from None
    return items


def check_seconds_or_off(value: Any, at_most: Any = MAX_SECONDS) -> float:
    text = _text(value)
    if text in ("0", "off", ""):
        return 0.0
    return check_seconds(text, at_most)


_RATE_UNITS = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
MIN_BANDWIDTH, MAX_BANDWIDTH = 8 * 10**3, 100 * 10**9  # bits a second: 1 KB/s .. more than any link here


def check_bandwidth(value: Any, default: Any = None) -> int:
    """A proxy's bandwidth limit in bits a second: a number with kbit, mbit or gbit (powers of 1000:
    10mbit = 10,000,000 bit/s; 1.5gbit is allowed), 8kbit..100gbit; 0, off or nothing: unlimited (0).
    A bare number other than 0 is refused: bits or bytes, the reader could not tell."""
    text = _text(value).lower().replace(" ", "")
    if text in ("0", "off", ""):
        return 0
    bits = parse_bandwidth(text)
    if bits is None or not MIN_BANDWIDTH <= bits <= MAX_BANDWIDTH:
        raise _Bad("must be a rate with a unit kbit, mbit or gbit (powers of 1000, e.g. 10mbit, 1.5gbit), "
                   "8kbit..100gbit, or 0/off: unlimited")
    return bits


def parse_bandwidth(text: str) -> int | None:
    """Bits a second from "10mbit", "1.5gbit", "500kbit" (whole bits only); None if not such a rate."""
    text = text.strip().lower()
    unit = text[-4:]
    number = text[:-4]
    if unit not in _RATE_UNITS or not number or not re.fullmatch(r"[0-9]+(\.[0-9]+)?", number):
        return None
    whole, _, frac = number.partition(".")
    scale = _RATE_UNITS[unit]
    if len(frac) > 9 or (int(frac or "0") * scale) % 10 ** len(frac):
        return None  # a fraction of a bit
    return int(whole) * scale + int(frac or "0") * scale // 10 ** len(frac)


def format_bandwidth(bits: int) -> str:
    """The way a rate is written back: the largest unit that says it exactly (20mbit, 1500kbit, 1.5kbit)."""
    for unit in ("gbit", "mbit", "kbit"):
        if bits % _RATE_UNITS[unit] == 0:
            return f"{bits // _RATE_UNITS[unit]}{unit}"
    return f"{bits // 1000}.{bits % 1000:03d}".rstrip("0") + "kbit"  # whole bits: three decimals say it


def check_denylist(value: Any, default: Any = None) -> list[str]:
    items = _list(value)
    for item in items:
        if item.lower().startswith("serial:"):
            digits = item[7:].replace(":", "")
            try:
                int(digits, 16)
            except ValueError:
                raise _Bad(f"{item!r}: a serial is hexadecimal, e.g. serial:1F2E3D (colons allowed)") from None
        elif not valid_agent_id(item):
            raise _Bad(f"{item!r} is neither an agent id nor serial:HEX")
    return items


def check_allowlist(value: Any, default: Any = None) -> list[str]:
    from .allow import parse_allowlist
    items = _list(value)
    try:
        parse_allowlist(items)
    except ValueError as exc:
        raise _Bad(str(exc)) from None
    return items


def check_audit(value: Any, default: Any = None) -> str:
    text = _text(value)
    if text and text != "journal" and not text.startswith("/"):
        raise _Bad("must be empty (off), journal, or an absolute file path")
    return text


def check_endpoints(value: Any, default: Any = None) -> list[str]:
    items = _list(value)
    for item in items:
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535 or (host and not is_ip(host) and not HOSTNAME_RE.fullmatch(host)):
            raise _Bad(f"{item!r} is not HOST:PORT (e.g. 127.0.0.1:1112, [::1]:1112, :1112 for every address)")
    return items


def check_boolean(value: Any, default: Any = None) -> bool:
    text = _text(value).lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise _Bad("must be true or false")


def check_loglevel(value: Any, default: Any = None) -> str:
    text = _text(value).lower()
    if text not in LOG_LEVELS:
        raise _Bad(f"must be one of {', '.join(LOG_LEVELS)}")
    return text


CHECKS: dict[str, Callable[..., Any]] = {
    "port": check_port, "port_range": check_port_range, "count": check_count, "seconds": check_seconds, "path": check_path, "name": check_name,
    "agentid": check_agent_id, "agentids": check_agent_ids, "balance": check_balance, "host": check_host,
    "proxy_protocol": check_proxy_protocol,
    "servers": check_servers, "addresses": check_addresses,
    "networks": check_networks, "loglevel": check_loglevel, "audit": check_audit, "endpoints": check_endpoints,
    "boolean": check_boolean, "seconds_or_off": check_seconds_or_off, "denylist": check_denylist,
    "allowlist": check_allowlist, "size": check_size, "bandwidth": check_bandwidth,
}


# what each check accepts, in words, from the same arguments as the check (for --help)
RANGES: dict[str, Callable[..., str]] = {
    "port": lambda: f"{wire.MIN_PORT}..{wire.MAX_PORT}",
    "port_range": lambda: f"{wire.MIN_PORT}..{wire.MAX_PORT}, or START-END (at most {MAX_PORT_RANGE} ports)",
    "count": lambda low=0, high=2**31: f"{low}..{high}",
    "seconds": lambda at_most=MAX_SECONDS: f"more than 0, at most {at_most}",
    "seconds_or_off": lambda at_most=MAX_SECONDS: f"more than 0, at most {at_most}, or 0: off",
    "name": lambda: "1-64 printable characters",
    "size": lambda low="0", high="1T": f"{low}..{high}, in bytes or with K, M, G",
    "bandwidth": lambda: "a rate with kbit, mbit or gbit (powers of 1000, e.g. 10mbit), 8kbit..100gbit, or 0/off: unlimited",
}


# -- flags: the checks and ranges of the keys they override ----------------------------------------------
def _spec_check(spec: list[str], key: str) -> str:
    """The check of `key` in `spec`, e.g. 'count(0, 1024, default=2)'."""
    for line in spec:
        name, sep, check = line.partition("=")
        if sep and name.strip() == key:
            return check.strip()
    raise KeyError(f"{key} is not in the spec")


def _parse_check(check: str) -> tuple[str, list[str], dict[str, str]]:
    """'count(0, 1024, default=2)' -> ('count', ['0', '1024'], {'default': '2'}); our specs' simple syntax only."""
    name, _, rest = check.partition("(")
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for arg in (a.strip() for a in rest.rstrip(")").split(",")):
        if not arg:
            continue
        word, sep, value = arg.partition("=")
        if sep:
            kwargs[word.strip()] = value.strip().strip("\"'")
        else:
            args.append(arg.strip("\"'"))
    return name.strip(), args, kwargs


def describe(spec: list[str], key: str) -> str:
    """What `key` accepts and its default, for a flag's help: e.g. '0..1024; default 2'."""
    name, args, kwargs = _parse_check(_spec_check(spec, key))
    default = kwargs.pop("default", None)
    words = [RANGES[name](*args, **kwargs)] if name in RANGES else []
    if default not in (None, "None", "") and not default.startswith("list("):
        words.append(f"default {default}")
    return "; ".join(words)


def flag_type(spec: list[str], key: str) -> Callable[[str], Any]:
    """An argparse type for the flag that overrides `key`: the key's own check, with the same bounds.

    A bad value is an argparse error, which names the flag: "argument --pool-size: 1025: must be ...".
    """
    check = _spec_check(spec, key)
    validator = Validator(CHECKS)

    def convert(text: str) -> Any:
        try:
            return validator.check(check, text)
        except ValidateError as exc:
            raise argparse.ArgumentTypeError(f"{text}: {exc}") from None

    convert.__name__ = key
    return convert


# -- reading ---------------------------------------------------------------------------------------------
def read(path: str, spec: list[str], required: bool = True) -> dict[str, dict[str, Any]]:
    """Parse and check one file; {section: {key: value}} with defaults filled.  Raises ConfigError."""
    label = path
    if not os.path.exists(path):
        if required:
            raise ConfigError([f"{label}: no such file"])
        cfg = ConfigObj([], configspec=spec, encoding="utf-8")
    else:
        try:
            cfg = ConfigObj(path, configspec=spec, encoding="utf-8", file_error=True, raise_errors=False,
                            list_values=True, interpolation=False)
        except ConfigObjError as exc:
            errors = getattr(exc, "errors", None) or [exc]
            raise ConfigError([f"{label} line {getattr(e, 'line_number', '?')}: {_parse_message(e)}" for e in errors]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{label}: cannot read: {exc}"]) from None
    raw = {section: dict(cfg[section]) for section in cfg.sections if isinstance(cfg[section], dict)}
    problems: list[str] = []
    result = cfg.validate(Validator(CHECKS), preserve_errors=True, copy=False)
    if result is not True:
        for sections, key, error in flatten_errors(cfg, result):
            where = "".join(f"[{s}]" for s in sections)
            if key is None:
                problems.append(f"{label} {where}: missing section")
                continue
            if error is False:  # a key without a default, absent
                problems.append(f"{label} {where} {key}: is required")
                continue
            value = _lookup(raw, sections).get(key)
            shown = ", ".join(value) if isinstance(value, list) else value
            problems.append(f"{label} {where} {key} = {shown}: {error}")
    for sections, name in get_extra_values(cfg):
        where = "".join(f"[{s}]" for s in sections)
        kind = "section" if isinstance(_lookup(cfg, sections).get(name), dict) else "key"
        if kind == "section":
            problems.append(f"{label} [{name}]: unknown section")
        else:
            problems.append(f"{label} {where} {name}: unknown key" if where else f"{label} {name}: unknown key (outside any section)")
    if problems:
        raise ConfigError(problems)
    return {section: dict(cfg[section]) for section in cfg.sections}


def _lookup(tree: Any, sections: list[str]) -> dict:
    for s in sections:
        tree = tree.get(s, {}) if isinstance(tree, dict) else {}
    return tree if isinstance(tree, dict) else {}


def _parse_message(error: Exception) -> str:
    text = str(error)
    # configobj says e.g. 'Invalid line ("port 70") (matched as neither section nor keyword) at line 3.'
    return text.split(" at line ")[0] if " at line " in text else text


# -- building the role configs ---------------------------------------------------------------------------


def render(settings: dict[str, Any]) -> str:
    """Effective settings, INI style, for check-config."""
    lines = []
    for key in sorted(settings):
        value = settings[key]
        if isinstance(value, list):
            value = ", ".join(value) if value else "(none)"
        elif value is None:
            value = "(unset)"
        lines.append(f"{key} = {value}")
    return "\n".join(lines)


__all__ = ["ConfigError", "read", "render", "describe", "flag_type"]
