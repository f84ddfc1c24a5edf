"""systemd notifications (sd_notify) on top of `sdnotify`, and the watchdog driven by the loop.

`sdnotify.SystemdNotifier` finds and connects NOTIFY_SOCKET (``@name`` for abstract sockets) and
does nothing when there is none.  It encodes as latin-1 and silently drops anything else, and
knows no watchdog, so `Notifier` sends through its connected socket itself, UTF-8 encoded and
non-blocking (a full queue drops a message rather than stall the loop).

Watchdog: when WATCHDOG_USEC is set (and WATCHDOG_PID is unset or ours), `start_watchdog()`
schedules WATCHDOG=1 on the loop every half interval, after the given health check passes.  The
ping comes from the loop itself, never from a thread, so a wedged loop stops the pings and
systemd restarts the service.

It owns the notification socket and the watchdog's timer.  It must not ping from a thread nor
block: a full queue drops the message.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable

import sdnotify

from .loop import Loop, Timer

log = logging.getLogger("anywhere.notify")


def monotonic_usec() -> int:
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)


def watchdog_interval() -> float | None:
    """Seconds between pings systemd expects, or None when the watchdog is off for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and (pid.isascii() and pid.isdigit()) and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


class Notifier:
    def __init__(self) -> None:
        self._sd = sdnotify.SystemdNotifier()
        self.sock: socket.socket | None = self._sd.socket if os.environ.get("NOTIFY_SOCKET") else None
        if self.sock is not None:
            self.sock.setblocking(False)
        self._timer: Timer | None = None
        self.last_status = ""

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> bool:
        if self.sock is None:
            return False
        data = "\n".join(fields).encode("utf-8")
        try:
            self.sock.send(data)
            return True
        except OSError as exc:
            log.debug("sd_notify %r not sent: %s", fields, exc)
            return False

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *(["STATUS=" + status] if status else []))

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self, status: str | None = None) -> None:
        self.send("STOPPING=1", *(["STATUS=" + status] if status else []))

    def status(self, text: str) -> None:
        if text != self.last_status:
            self.last_status = text
            self.send("STATUS=" + text.replace("\n", " "))

    def start_watchdog(self, loop: Loop, healthy: Callable[[], bool] = lambda: True) -> float | None:
        interval = watchdog_interval()
        if interval is None or self.sock is None:
            return None

        def ping() -> None:
            if healthy():
                self.send("WATCHDOG=1")
            else:
                log.error("health check failed: not pinging the watchdog")
            self._timer = loop.call_later(interval / 2, ping)

        ping()
        return interval

    def close(self) -> None:
        if self._timer:
            self._timer.cancel()
            self._timer = None
        if self._sd.socket is not None:
            self._sd.socket.close()
            self._sd.socket = None
            self.sock = None
