"""A small, fast echo server for the benchmark (metrics d and f): one epoll loop, level-triggered.

Usage: python echo_server.py PORT [HOST]   (listens on HOST:PORT, default 127.0.0.1; SIGTERM ends it)

It raises its own RLIMIT_NOFILE to the hard limit so it can hold every connection of metric f.
Each connection: whatever arrives is sent back; when the peer closes, the connection is closed.
A connection whose echo cannot be written at once stops being read until it has drained.
"""

from __future__ import annotations

import errno
import resource
import select
import socket
import sys


def main() -> int:
    port = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(4096)
    ls.setblocking(False)
    lfd = ls.fileno()
    ep = select.epoll()
    ep.register(lfd, select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    pending: dict[int, bytes] = {}
    IN, OUT = select.EPOLLIN, select.EPOLLOUT

    def close(fd: int) -> None:
        sock = conns.pop(fd, None)
        pending.pop(fd, None)
        if sock is not None:
            try:
                ep.unregister(fd)
            except OSError:
                pass
            sock.close()

    while True:
        try:
            events = ep.poll(1.0)
        except InterruptedError:
            continue
        for fd, ev in events:
            if fd == lfd:
                while True:
                    try:
                        c, _ = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE):
                            print(f"echo: accept: {exc}", file=sys.stderr, flush=True)
                        break
                    c.setblocking(False)
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[c.fileno()] = c
                    ep.register(c.fileno(), IN)
                continue
            sock = conns.get(fd)
            if sock is None:
                continue
            if fd in pending:
                if ev & (OUT | select.EPOLLERR | select.EPOLLHUP):
                    data = pending[fd]
                    try:
                        n = sock.send(data)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        close(fd)
                        continue
                    if n < len(data):
                        pending[fd] = data[n:]
                    else:
                        del pending[fd]
                        ep.modify(fd, IN)
                continue
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                close(fd)
                continue
            if not data:
                close(fd)
                continue
            try:
                n = sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                close(fd)
                continue
            if n < len(data):
                pending[fd] = data[n:]
                ep.modify(fd, OUT)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
