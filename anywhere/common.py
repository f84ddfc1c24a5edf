"""Small things every entry point shares: version, logging set-up, default credential paths.

It owns the version and build commit, logging set-up, the default admin socket and credential
paths, the agent id rule, the quoting of peer text for logs and answers (`printable`),
`human_bytes`, the command-line port type and the two errors the entry points report
(`CtlError`, `CredentialsError`).  It must not import any module of the package but wire.py
(whose limits the port type takes), nor hold state beyond the cached build commit: every module
may import it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import subprocess
import sys

from .wire import MAX_PORT, MIN_PORT
from .errors import CredentialError, CtlError  # noqa: F401  (common.CtlError, as before)

__version__ = "0.1.0"

DEFAULT_ADMIN_SOCKET = "/run/anywhere/anywhered.sock"

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMAT_JOURNAL = "%(levelname)s %(name)s: %(message)s"


@functools.lru_cache(maxsize=None)
def build_commit() -> str:
    """The commit this code was built from: baked in by the package builds (anywhere/_build.py),
    else read from git when running from a checkout, else "unknown"."""
    try:
        from ._build import commit
    except ImportError:
        commit = None
    return commit or git_commit(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) or "unknown"


def version_line(prog: str) -> str:
    """What `--version` prints, e.g. 'anywhered 0.1.0 ("main-0123456789ab")'."""
    return f'{prog} {__version__} ("{build_commit()}")'


def git_commit(root: str) -> str | None:
    """'BRANCH-SHA12' (BRANCH is 'HEAD' when detached; '-dirty' added when tracked files differ from
    the commit) of the git checkout at `root`, or None if `root` is not one or git cannot tell."""
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD", "--abbrev-ref", "HEAD"],
                              capture_output=True, text=True, timeout=10, env=env)
        if head.returncode != 0 or len(head.stdout.split()) != 2:
            return None
        sha, branch = head.stdout.split()
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = "-dirty" if status.returncode == 0 and status.stdout.strip() else ""
    return f"{branch}-{sha[:12]}{dirty}"


def setup_logging(level: str = "info", log_file: str | None = None) -> None:
    """Log to stderr (the journal under systemd) or append to `log_file`; raises OSError if it cannot be opened."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (use debug, info, warning or error)")
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    # under systemd, stderr goes to the journal, which stamps each line itself
    journal = not log_file and bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(logging.Formatter(LOG_FORMAT_JOURNAL if journal else LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(numeric)


def install_root() -> str | None:
    """The directory above bin/ when running from the PyInstaller bundle, else None."""
    if getattr(sys, "frozen", False):
        return os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
    return None


SYSTEM_CREDENTIALS = "/etc/anywhere/credential"


def default_credential(name: str) -> str:
    """credential/NAME as in the original layout: in the current directory, else beside bin/
    (the unpacked tarball), else /etc/anywhere/credential/NAME (the packages)."""
    relative = os.path.join("credential", name)
    if os.path.exists(relative):
        return relative
    root = install_root()
    if root and os.path.exists(os.path.join(root, relative)):
        return os.path.join(root, relative)
    system = os.path.join(SYSTEM_CREDENTIALS, name)
    if os.path.exists(system):
        return system
    return relative


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: what can forge a line
# or hide text in a log, a terminal or an audit record.
_UNPRINTABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
PEER_TEXT_MAX = 200


def printable(text: object, limit: int = PEER_TEXT_MAX) -> str:
    """`text` (anything a peer controls) made safe for one log line, an audit record or an API answer:
    control characters escaped as \\xNN / \\uNNNN and backslashes doubled, then cut to `limit`
    characters with a note of how much was left out.  Never raises."""
    text = text if isinstance(text, str) else str(text)
    cut = ""
    if len(text) > limit:
        cut = f"...({len(text) - limit} more characters)"
        text = text[:limit]
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    if _UNPRINTABLE_RE.search(text):
        text = _UNPRINTABLE_RE.sub(_escape_char, text)
    return text + cut


def human_bytes(n: int) -> str:
    """A byte count for people, in powers of 1000: "999 B", "1.5 KB", "2.0 GB" (TB at most)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def has_control(text: str) -> bool:
    """Whether `text` holds a character `printable` would escape (a control character)."""
    return _UNPRINTABLE_RE.search(text) is not None


def _escape_char(match: "re.Match[str]") -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def valid_agent_id(agent_id: str) -> bool:
    return bool(AGENT_ID_RE.fullmatch(agent_id))


# CtlError (errors.py): a command talking to the daemon failed; one line on stderr, exit status 1.
# CredentialsError: a credentials command failed (credentials.py); errors.CredentialError under its old name.
CredentialsError = CredentialError


MAX_PORT_RANGE = 1000  # ports in one range (proxies.d remote_port = A-B, proxy add --remote-port A-B, the API)
PORT_RANGE_EXPECTED = (f"must be {MIN_PORT}..{MAX_PORT}, or a range START-END of at most "
                       f"{MAX_PORT_RANGE} ports (e.g. 30000-30009)")


def parse_port_range(text: str) -> int | tuple[int, int]:
    """A port ("8080": 8080) or a range ("30000-30009": (30000, 30009), START <= END, at most
    MAX_PORT_RANGE ports).  ValueError says what is wrong, for an operator."""
    start, sep, end = text.strip().partition("-")
    start, end = start.strip(), end.strip()
    if not all(t.isascii() and t.isdigit() for t in ((start, end) if sep else (start,))):
        raise ValueError(PORT_RANGE_EXPECTED)
    low, high = int(start), int(end or start)
    for port in (low, high):
        if not MIN_PORT <= port <= MAX_PORT:
            raise ValueError(f"{port} is not a port {MIN_PORT}..{MAX_PORT}" if sep else
                             PORT_RANGE_EXPECTED)
    if not sep:
        return low
    if high < low:
        raise ValueError(f"the range ends before it starts ({high} < {low})")
    if high - low + 1 > MAX_PORT_RANGE:
        raise ValueError(f"a range of {high - low + 1} ports; at most {MAX_PORT_RANGE}")
    return low, high


def range_text(value: int | tuple[int, int]) -> int | str:
    """How a port or a range is written: 8080, or "30000-30009"."""
    return value if isinstance(value, int) else f"{value[0]}-{value[1]}"


def port_range_arg(text: str) -> int | str:
    """argparse type for a port or a range START-END (--remote-port, --local-port of proxy add)."""
    try:
        return range_text(parse_port_range(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def port_arg(text: str) -> int:
    """argparse type for a TCP port."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not MIN_PORT <= value <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"{value} is not a port number {MIN_PORT}..{MAX_PORT}")
    return value
