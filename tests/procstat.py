"""Readings of a live process from /proc, for leak checks: open file descriptors and resident memory.

Only reads; never signals or changes the process.
"""

from __future__ import annotations

import collections
import os


def fd_count(pid: int) -> int:
    """Open file descriptors of `pid` (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> dict[str, int]:
    """The open descriptors by kind (socket, pipe, anon_inode:[eventpoll], a path...), for messages."""
    kinds: collections.Counter[str] = collections.Counter()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:  # closed between listdir and readlink
            continue
        kind = target.split(":", 1)[0] if target.startswith(("socket:", "pipe:")) else target
        kinds[kind] += 1
    return dict(kinds)


def rss_kb(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def snapshot(pid: int) -> dict:
    return {"fds": fd_count(pid), "rss_kb": rss_kb(pid), "kinds": fd_kinds(pid)}
