"""Run-time state that must survive a restart or a crash: the proxies, in STATE_DIR/proxies.json.

Theory of operation
-------------------
*One file, replaced whole.*  A write goes to a temporary file in the same directory, is fsynced,
renamed over the old file, and the directory is fsynced.  A reader therefore sees the old file
or the new one, never half of one; a write that fails leaves the old file as it was.

*Two kinds of write* (`Store`).  An admin change (a proxy added, deleted, enabled, disabled) is
written by `Store.save` on the caller's thread — the event loop — and is durable when it
returns: the API answers only then.  Admin changes are rare; the loop waits for their fsyncs.
The counters, saved every `stats_save_interval` seconds, go through `Store.save_later`: it
numbers a snapshot of plain data (dicts and lists made for it, never touched again by the
loop), leaves it in a slot of one and returns at once; a writer thread does the JSON and the
fsyncs.  Besides the loop's resolver pool it is the only thread, and it is outside the data
path: it touches nothing but its snapshot, the file, and the log.  (Measured on this ext4
disk: a save takes about 1 ms when the disk is idle, up to 170 ms while another process
flushes 2 GB; on the loop that would stall every tunnel, every 30 s.)

*Never two writers, never an older file over a newer one.*  A lock is held for the whole of a
write, by whichever thread writes.  Snapshots are numbered in the order they are taken; a
snapshot older than the one last written is dropped, not written, so an admin change saved
while a counter save is still writing is never overwritten by that (or a queued) older
snapshot.  A newer counter snapshot replaces one still waiting in the slot.  `Store.close`
writes what is waiting and stops the thread (shutdown flushes the last counters).

*A proxy is never lost by accident.*  The names of the stored proxies are remembered from the
file as loaded and from every save; a save that would leave one of them out without the
caller saying it was deleted is refused (`StateError`) and logged as an error.  Entries the
server cannot use (corrupt, or conflicting) are handed back to it as they are, so that it can
carry them over, untouched, in every later save.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .errors import StateError  # state.StateError, as before

STATE_FILE = "proxies.json"
FORMAT = 1

log = logging.getLogger("anywhere.state")


def path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_FILE)


def load_all(state_dir: str) -> tuple[list[Any], dict]:
    """The stored proxy entries, as they are in the file (every one, valid or not: the caller
    keeps what it cannot use), and the counters (([], {}) if there is no state yet).  Raises StateError."""
    file = path(state_dir)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return [], {}
    except (OSError, ValueError) as exc:
        raise StateError(f"{file}: cannot read the stored proxies: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("proxies"), list):
        raise StateError(f"{file}: not an Anywhere state file of format {FORMAT}")
    stats = data.get("stats")
    return list(data["proxies"]), stats if isinstance(stats, dict) else {}


def encode(proxies: list[Any], stats: dict | None = None) -> bytes:
    data: dict = {"format": FORMAT, "proxies": proxies}
    if stats is not None:
        data["stats"] = stats
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_file(state_dir: str, body: bytes) -> None:
    """Replace STATE_DIR/proxies.json with `body` atomically and durably.  Raises OSError (the old file stays)."""
    os.makedirs(state_dir, mode=0o750, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".proxies.", suffix=".tmp", dir=state_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path(state_dir))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(state_dir: str, proxies: list[Any], stats: dict | None = None) -> None:
    """Replace the stored proxies (and counters) atomically.  Raises OSError on failure (the old file stays)."""
    write_file(state_dir, encode(proxies, stats))


def entry_name(entry: Any) -> str | None:
    """The name an entry of the file carries, if it carries one."""
    name = entry.get("name") if isinstance(entry, dict) else None
    return name if isinstance(name, str) and name else None


@dataclass
class _Snapshot:
    number: int
    proxies: list[Any]
    stats: dict | None


class Store:
    """The state file of one state directory: loads it, writes admin changes now and counters in
    the background, one writer at a time, newest snapshot last (see the module's docstring).

    `write(state_dir, body)` does the writing (default `write_file`); a test may give a slower one.
    """

    def __init__(self, state_dir: str, write: Callable[[str, bytes], None] = write_file) -> None:
        self.state_dir = state_dir
        self._write = write
        self._lock = threading.Lock()  # held for a whole write: one writer at a time
        self._cond = threading.Condition()  # guards _slot and _closing
        self._slot: _Snapshot | None = None  # the counter snapshot waiting for the writer thread
        self._closing = False
        self._thread: threading.Thread | None = None
        self._taken = 0  # snapshots are numbered when taken (on the loop's thread)
        self._written = 0  # the number of the snapshot in the file; older ones are dropped
        self.kept: set[str] = set()  # names that must be in every save unless said deleted
        self.background_failed = False  # the last background write failed: the next periodic save retries

    @property
    def file(self) -> str:
        return path(self.state_dir)

    def load(self) -> tuple[list[Any], dict]:
        """The stored proxy entries and counters (`load_all`); their names are kept from now on."""
        entries, stats = load_all(self.state_dir)
        self.kept = {name for name in map(entry_name, entries) if name}
        return entries, stats

    def save(self, proxies: list[Any], stats: dict | None = None, deleted: Iterable[str] = ()) -> None:
        """Write now, on this thread; durable when it returns.  `deleted`: names left out on purpose.

        Raises StateError (a proxy would be lost: nothing written) or OSError (the old file stays).
        """
        deleted = set(deleted)
        snap = self._take(proxies, stats, deleted)  # newer than one in the slot: that one is written first or never
        if not self._lock.acquire(blocking=False):
            log.info("saving %s: waiting for the counter save still writing it", self.file)
            self._lock.acquire()
        try:
            self._write_locked(snap)
        finally:
            self._lock.release()
        self.kept = (self.kept - deleted) | {name for name in map(entry_name, proxies) if name}

    def save_later(self, proxies: list[Any], stats: dict | None = None) -> None:
        """Hand a snapshot to the writer thread and return at once.  `proxies` and `stats` must be
        the caller's own copies, not changed afterwards.  Raises StateError if a proxy would be lost."""
        snap = self._take(proxies, stats, set())
        with self._cond:
            if self._closing:
                raise StateError(f"{self.file}: the state is closed")
            self._slot = snap  # a snapshot still waiting is older: replaced, the newest wins
            if self._thread is None:  # started at the first use: after a --daemon fork, never before
                self._thread = threading.Thread(target=self._run, name="anywhere-state", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        """Write the snapshot still waiting, if any, and stop the writer thread.  Idempotent."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    # -- inside ----------------------------------------------------------------------------------------
    def _take(self, proxies: list[Any], stats: dict | None, deleted: set[str]) -> _Snapshot:
        names = {name for name in map(entry_name, proxies) if name}
        lost = sorted(self.kept - names - deleted)
        if lost:
            log.error("refusing to write %s: it would lose proxies nobody deleted: %s; the file stays as it is",
                      self.file, ", ".join(lost))
            raise StateError(f"{self.file}: not written: it would lose proxies nobody deleted: {', '.join(lost)}")
        self._taken += 1
        return _Snapshot(self._taken, proxies, stats)

    def _write_locked(self, snap: _Snapshot) -> bool:
        """Write `snap` unless a newer one is in the file already; the caller holds the lock."""
        if snap.number <= self._written:
            return False
        self._write(self.state_dir, encode(snap.proxies, snap.stats))
        self._written = snap.number
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._slot is None and not self._closing:
                    self._cond.wait()
                snap, self._slot = self._slot, None
            if snap is None:
                return  # closing, nothing waiting
            try:
                with self._lock:
                    self._write_locked(snap)
            except Exception as exc:  # the thread must outlive a full disk: the next save retries
                self.background_failed = True
                log.error("cannot save the counters in %s: %s", self.file,
                          getattr(exc, "strerror", None) or exc)
            else:
                self.background_failed = False
