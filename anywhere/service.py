"""What anywhered and the agent share as long-running services: the pid file and detaching
around start-up, and the run of the loop with signals, systemd notifications and a clean end.

It owns the process's lifetime around the loop: pid file, detach, signals, READY/STOPPING.  It
must not know what the daemon serves: the server and the agent pass in what to start and stop.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
from typing import Callable

from .daemonize import AlreadyRunning, PidFile, detach
from .loop import Loop
from .notify import Notifier

log = logging.getLogger("anywhere.service")

STATUS_INTERVAL = 2.0
NOFILE_CEILING = 1 << 20  # raise_nofile goes no higher, whatever the hard limit


def raise_nofile() -> int:
    """Raise this process's soft limit of open files to its hard limit, as daemons that use epoll
    may (the soft limit's usual 1024 only protects select() users); returns the limit now in
    force.  Under systemd both are the unit's LimitNOFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = NOFILE_CEILING if hard == resource.RLIM_INFINITY else min(hard, NOFILE_CEILING)
        if wanted > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (ValueError, OSError) as exc:
                log.debug("cannot raise the open files limit from %d to %d: %s", soft, wanted, exc)
    return soft


def with_pidfile(args: argparse.Namespace, prog: str, prepare: Callable[[], Callable[[], int] | int]) -> int:
    """Lock --pidfile (refusing a second instance in the terminal), run `prepare()` — which binds
    what it needs and returns the function that serves, or an exit status — then detach if
    --daemon, serve, and remove the pid file at the end."""
    if args.daemon and not args.pidfile:
        print(f"{prog}: --daemon needs --pidfile PATH", file=sys.stderr)
        return 2
    pidfile = PidFile(args.pidfile) if args.pidfile else None
    if pidfile:
        try:
            pidfile.acquire(write=not args.daemon)  # a daemon writes its own pid once detached
        except (AlreadyRunning, OSError) as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
    try:
        serve = prepare()
        if isinstance(serve, int):
            return serve
        if args.daemon:
            assert pidfile is not None  # checked above
            detach(pidfile, os.path.abspath(args.log_file) if args.log_file else None)
        return serve()
    finally:
        if pidfile:
            pidfile.release()


def run_loop(loop: Loop, notifier: Notifier, name: str, status: Callable[[], str], on_stop: Callable[[int], None],
             on_hup: Callable[[int], None], close: Callable[[], None]) -> int:
    """Serve until the loop stops: SIGTERM/SIGINT → on_stop, SIGHUP → on_hup; READY=1, watchdog and
    STATUS= for systemd; then `close()` and release the loop.  Returns exit status 0."""
    loop.add_signal_handler(signal.SIGTERM, on_stop)
    loop.add_signal_handler(signal.SIGINT, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)

    def report_status() -> None:
        notifier.status(status())
        loop.call_later(STATUS_INTERVAL, report_status)

    notifier.ready(status())
    notifier.start_watchdog(loop)
    report_status()
    try:
        loop.run()
    finally:
        close()
        notifier.close()
        loop.close()
    log.info("%s stopped", name)
    return 0
