"""The event loop: one thread, one epoll set, a heap of timers, signals via a wake-up fd.

Theory of operation
-------------------
Everything in an Anywhere process runs on one `Loop`.  A file object is registered once with
an interest mask (`READ`, `WRITE`: the `selectors` constants) and a callback ``callback(mask)``;
the owner changes the mask with `modify()` only when its wishes change (backpressure is
expressed this way) and removes it with `unregister()`, or with `discard()` when it closes the
socket right after: closing a descriptor takes it out of the epoll set, so that costs no system
call.

The loop drives `select.epoll` itself rather than through `selectors`: per event that spares a
`SelectorKey`, a method call and a tuple (0.8 -> 0.45 µs measured here), and per connection
registered, modified and removed 10.5 -> 3.7 µs, which shows at thousands of short connections
a second.  An event is looked up when it is dispatched, not when the batch is read, so a
callback never runs for a file object unregistered earlier in the same pass.

Timers are `(deadline, seq, Timer)` entries on a heap; a cancelled timer stays on the heap and
is skipped when it comes up, which keeps cancel O(1).

The clock is injectable: `Loop(clock=...)`, any callable returning seconds, `time.monotonic` by
default; `loop.time()` reads it and `loop.now` is its reading when the current pass's wait
ended (a cheap clock for bookkeeping).  A `ManualClock` stands still until `advance()` moves it:
waiting does not bring a timer nearer, so the loop then waits only for its descriptors (epoll
still waits on the real fds; with timeout 0 when a timer is due, never longer than `max_wait`),
and a test runs an hour of timers without sleeping.

Signals: `signal.set_wakeup_fd` writes the signal number into one end of a socketpair; the
other end is registered like any socket, so a signal wakes `select()` and its handler runs on
the loop, between callbacks, never in the middle of one.

Blocking calls that have no non-blocking form (getaddrinfo) run in a small thread pool;
their results are posted back with `call_soon_threadsafe`, which also writes to the wake-up
socket.  The only other thread is the server's state writer (`state.Store`), which writes
snapshots of the counters and touches nothing the loop uses.

The loop knows no protocol.  A callback that raises is logged and does not stop the loop.
It must not block: nothing on it may sleep, resolve or wait on a descriptor itself.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import itertools
import logging
import math
import select
import selectors
import signal
import socket
import time
from typing import Any, Callable

log = logging.getLogger("anywhere.loop")

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
_EPOLLIN, _EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
_TO_EPOLL = (0, _EPOLLIN, _EPOLLOUT, _EPOLLIN | _EPOLLOUT)  # indexed by READ | WRITE
MAX_EVENTS = 4096  # per wait; more ready descriptors are reported on the next pass


class Timer:
    """A pending call; `cancel()` is idempotent."""

    __slots__ = ("deadline", "fn", "args", "cancelled")

    def __init__(self, deadline: float, fn: Callable[..., Any], args: tuple) -> None:
        self.deadline = deadline
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.fn = _noop
        self.args = ()


def _noop(*_: Any) -> None:
    pass


class ManualClock:
    """A clock for tests: it reads `start` until `advance(seconds)` moves it forward."""

    def __init__(self, start: float = 1000.0) -> None:
        self.value = start

    def __call__(self) -> float:
        return self.value

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self.value += seconds


class Loop:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        # the clock itself, not a method around it: `loop.time()` is read per chunk on the relay's path
        self.time: Callable[[], float] = clock
        # waiting moves a real clock towards the next timer; a manual one only moves when told
        self._clock_waits = not isinstance(clock, ManualClock)
        self._epoll = select.epoll()
        # fd -> (callback, mask, file object): the callback is what a ready fd costs to find
        self._fds: dict[int, tuple[Callable[[int], None], int, Any]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._ready: collections.deque[tuple[Callable[..., Any], tuple]] = collections.deque()
        self._threadsafe: collections.deque[tuple[Callable[..., Any], tuple]] = collections.deque()
        self._at_end: collections.deque[tuple[Callable[..., Any], tuple]] = collections.deque()
        self._signal_handlers: dict[int, Callable[[int], None]] = {}
        self._old_signal_handlers: dict[int, Any] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.register(self._wake_r, READ, self._on_wakeup)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._running = False
        self._stopping = False
        self._closed = False
        self.now = self.time()  # when the current pass's wait ended: a cheap clock for bookkeeping

    # -- time and timers -------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When the earliest pending timer is due (on this loop's clock), or None."""
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(self.time() + max(0.0, delay), fn, args)
        heapq.heappush(self._timers, (timer.deadline, next(self._seq), timer))
        return timer

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._ready.append((fn, args))

    def call_at_end(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` at the end of this pass, after every event and callback of it (before the
        next wait): writers use it to gather what a whole pass produced into one write."""
        self._at_end.append((fn, args))

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        self._threadsafe.append((fn, args))
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the wake-up socket is already full: the loop will wake anyway

    def run_in_thread(self, fn: Callable[..., Any], callback: Callable[[Any, BaseException | None], None]) -> None:
        """Run blocking `fn()` in a worker thread; `callback(result, error)` runs on the loop."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="anywhere-resolve")

        def done(fut: concurrent.futures.Future) -> None:
            exc = fut.exception()
            self.call_soon_threadsafe(callback, None if exc else fut.result(), exc)

        self._executor.submit(fn).add_done_callback(done)

    # -- file objects ------------------------------------------------------------------------
    @staticmethod
    def _fileno(fileobj: Any) -> int:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd < 0:
            raise ValueError(f"invalid file descriptor {fd} ({fileobj!r} is closed?)")
        return fd

    def register(self, fileobj: Any, events: int, callback: Callable[[int], None]) -> None:
        """Watch `fileobj` (a socket or an fd) for `events`; KeyError if it is watched already."""
        fd = self._fileno(fileobj)
        if fd in self._fds:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        self._epoll.register(fd, _TO_EPOLL[events & 3])
        self._fds[fd] = (callback, events, fileobj)

    def modify(self, fileobj: Any, events: int, callback: Callable[[int], None]) -> None:
        """Change what a registered file object is watched for, and who is called; KeyError if it is not registered."""
        fd = self._lookup(fileobj)
        if fd is None:
            raise KeyError(f"{fileobj!r} is not registered")
        if self._fds[fd][1] != events:
            self._epoll.modify(fd, _TO_EPOLL[events & 3])
        self._fds[fd] = (callback, events, fileobj)

    def unregister(self, fileobj: Any) -> None:
        """Idempotent: unknown or closed file objects are ignored."""
        fd = self._lookup(fileobj)
        if fd is None:
            return
        del self._fds[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed behind our back: the kernel has dropped it already

    def discard(self, fileobj: Any) -> None:
        """Forget `fileobj`, which the caller closes right after (before the loop waits again):
        closing its only descriptor takes it out of the epoll set, so no system call is made here.
        Only for sockets this process opened and never duplicated; idempotent."""
        fd = self._lookup(fileobj)
        if fd is not None:
            del self._fds[fd]

    def close_socket(self, sock: Any, registered: bool | int) -> None:
        """Close `sock`, first forgetting it (`discard`) if it is `registered` (a true interest
        mask will do); for a socket this process opened and never duplicated.  Never raises."""
        if registered:
            self.discard(sock)
        try:
            sock.close()
        except OSError:
            pass

    def _drop_stale(self, fd: int) -> None:
        """An event for a descriptor nobody watches: one discarded but left open (a bug, which level
        triggering would turn into a busy loop) is taken out of the set.  A closed or reused number
        answers EBADF or ENOENT and nothing changes."""
        try:
            self._epoll.unregister(fd)
        except OSError:
            return
        log.warning("fd %d was discarded from the loop but not closed; no longer watched", fd)

    def _lookup(self, fileobj: Any) -> int | None:
        try:
            fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        except (OSError, ValueError):
            fd = -1
        if fd >= 0:
            return fd if fd in self._fds else None
        for fd, entry in self._fds.items():  # closed already (fileno() is -1): found by identity
            if entry[2] is fileobj:
                return fd
        return None

    # -- signals ---------------------------------------------------------------------------
    def add_signal_handler(self, signum: int, handler: Callable[[int], None]) -> None:
        if not self._signal_handlers:
            signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._signal_handlers[signum] = handler
        self._old_signal_handlers.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, _noop)  # the byte on the wake-up fd does the work

    def _on_wakeup(self, _mask: int) -> None:
        try:
            data = self._wake_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            data = b""
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                self._ready.append((handler, (signum,)))
        while self._threadsafe:
            self._ready.append(self._threadsafe.popleft())

    # -- running -----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        self._running = True
        self._stopping = False
        try:
            while not self._stopping:
                self.run_once()
        finally:
            self._running = False

    def run_once(self, max_wait: float | None = None) -> None:
        timeout = self._next_timeout()
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        fds = self._fds
        try:
            # epoll counts in milliseconds: round up, or a timer due in 0.4 ms spins the loop
            events = self._epoll.poll(-1 if timeout is None else math.ceil(timeout * 1e3) * 1e-3,
                                      min(max(len(fds), 1), MAX_EVENTS))
        except InterruptedError:
            events = []
        self.now = self.time()
        for fd, ev in events:
            entry = fds.get(fd)
            if entry is None:  # forgotten during this pass (its number may be reused already)
                self._drop_stale(fd)
                continue
            if ev == _EPOLLIN:
                mask = READ
            elif ev == _EPOLLOUT:
                mask = WRITE
            else:  # errors and hang-ups wake every interest, as selectors reports them
                mask = ((WRITE if ev & ~_EPOLLIN else 0) | (READ if ev & ~_EPOLLOUT else 0)) & entry[1]
            try:
                entry[0](mask)
            except Exception:
                log.exception("unhandled error in callback %r", entry[0])
        now = self.time()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                fn, args = timer.fn, timer.args
                timer.cancel()
                self._call(fn, args)
        # callbacks scheduled during this pass run now; new ones wait for the next pass
        for _ in range(len(self._ready)):
            fn, args = self._ready.popleft()
            self._call(fn, args)
        at_end = self._at_end
        while at_end:
            fn, args = at_end.popleft()
            self._call(fn, args)

    def _next_timeout(self) -> float | None:
        if self._ready or self._threadsafe or self._at_end:
            return 0.0
        deadline = self.next_deadline()
        if deadline is None:
            return None
        left = deadline - self.time()
        if left <= 0.0:
            return 0.0
        return left if self._clock_waits else None

    @staticmethod
    def _call(fn: Callable[..., Any], args: tuple) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("unhandled error in callback %r", fn)

    def close(self) -> None:
        """Restore signal handlers, release the epoll set and the wake-up pair; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._signal_handlers:
            for signum, old in self._old_signal_handlers.items():
                try:
                    signal.signal(signum, old)
                except (ValueError, TypeError):
                    pass
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._epoll.close()
        self._fds.clear()
        self._wake_r.close()
        self._wake_w.close()
