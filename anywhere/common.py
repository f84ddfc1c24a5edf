"""Small things every entry point shares: version, logging set-up, default credential paths."""

from __future__ import annotations

import logging
import os
import sys

__version__ = "0.1.0"

DEFAULT_AGENT_PORT = 1111
DEFAULT_API_PORT = 1112
DEFAULT_GRPC_PORT = 1113
DEFAULT_ADMIN_SOCKET = "/run/anywhere/anywhered.sock"
DEFAULT_STATE_DIR = "/var/lib/anywhere"

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "info", log_file: str | None = None) -> None:
    """Log to stderr (the journal under systemd) or append to `log_file`; raises OSError if it cannot be opened."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r} (use debug, info, warning or error)")
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
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
