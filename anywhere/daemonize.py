"""`--daemon --pidfile PATH` for hosts without systemd (never used under systemd).

The pid file is locked with fcntl.flock in the parent, before detaching, so a second start
is refused in the operator's terminal ("already running as pid N") rather than in a log; the
lock's fd is kept across the detach, the daemon writes its pid, and the file is removed on exit.
The command returns only once the daemon has written its pid (it reports through a pipe), so a
script may read the pid file as soon as `anywhered start --daemon` has exited.  Detaching uses python-daemon's DaemonContext with umask 0o027, every file descriptor
already open (listeners bound before detaching, so bind errors also reach the terminal) kept,
and no signal handlers of its own: the loop installs ours.

It owns the pid file and its lock.  It must not be used under systemd (Type=notify supervises
the process there), nor touch the loop: it runs before the loop exists.
"""

from __future__ import annotations

import fcntl
import os

from .errors import AlreadyRunning  # another process holds the pid file (daemonize.AlreadyRunning, as before)


class PidFile:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.fd: int | None = None

    def acquire(self, write: bool = True) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(f"already running as pid {other} (pid file {self.path} is locked)") from None
        self.fd = fd
        os.ftruncate(fd, 0)
        if write:
            self.write()

    def write(self) -> None:
        assert self.fd is not None  # acquire() first (our own call order)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def open_fds() -> list[int]:
    return [int(n) for n in os.listdir("/proc/self/fd") if int(n) > 2]


def detach(pidfile: PidFile, log_file: str | None) -> None:
    """Become a daemon: the calling process exits (0 once the daemon has written its pid), the
    daemon returns from here."""
    import daemon  # python-daemon; imported here so the normal path does not need it

    stream = open(log_file, "a", buffering=1) if log_file else None  # noqa: SIM115 (lives as long as the daemon)
    read_end, write_end = os.pipe()
    first = os.fork()
    if first > 0:  # the command the operator ran: wait for the daemon's word, then leave
        os.close(write_end)
        word = b""
        while True:
            chunk = os.read(read_end, 64)
            if not chunk:
                break
            word += chunk
        os.waitpid(first, 0)
        os._exit(0 if word == b"ok" else 1)
    os.close(read_end)
    keep = open_fds()
    ctx = daemon.DaemonContext(files_preserve=keep, umask=0o027, working_directory="/", signal_map={},
                               stdout=stream, stderr=stream, detach_process=True)
    ctx.open()
    pidfile.write()
    os.write(write_end, b"ok")
    os.close(write_end)
