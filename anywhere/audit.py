"""The audit log: one JSON line per finished client connection and per admin action.

`audit_log` in the configuration: empty (off), ``journal`` (the lines go to the daemon's log,
i.e. the journal under systemd, through the logger ``anywhere.audit``), or a file path (appended,
one line per write, opened with O_APPEND so concurrent rotation by copytruncate is safe; a
reload reopens it, for rotation by rename).  Records never contain secrets: the bearer token
is never logged, only who used it.

It owns the audit file (or the ``anywhere.audit`` logger).  It must not write secrets, nor peer
text unescaped (callers pass `common.printable` text; json.dumps escapes the rest), nor raise
into the daemon when the file cannot be written.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from typing import Any

log = logging.getLogger("anywhere.audit")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    def __init__(self, target: str = "") -> None:
        self.target = ""
        self.fd: int | None = None
        self.open(target)

    def open(self, target: str) -> None:
        """Switch to `target` ("" off, "journal", or a path).  Raises OSError if the file cannot be opened."""
        fd = None
        if target not in ("", "journal"):
            directory = os.path.dirname(os.path.abspath(target))
            os.makedirs(directory, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.close()
        self.target, self.fd = target, fd

    def write(self, kind: str, **fields: Any) -> None:
        if not self.target:
            return
        line = json.dumps({"time": _now(), "event": kind, **fields}, separators=(",", ":"), ensure_ascii=False)
        if self.fd is None:
            log.info("%s", line)
            return
        try:
            os.write(self.fd, (line + "\n").encode("utf-8"))
        except OSError as exc:
            logging.getLogger("anywhere.server").error("audit log %s: write failed: %s", self.target, exc.strerror)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
