"""Child processes and /proc accounting for the benchmark.

Every process the harness starts goes through `Procs.start()`; `Procs.stop_all()` (called from
the runner's ``finally``) ends them by pid, and also any descendant the harness has seen under
them (sshd and socat fork per connection; sshd's children call setsid(), so they are not in the
parent's process group).  A pid is only signalled if its start time still matches the one
recorded when it was seen, so a recycled pid is never hit.

Accounting reads /proc directly:

- CPU: utime+stime+cutime+cstime (clock ticks) summed over a process tree.  Adding the c* fields
  keeps the time of children that exited and were reaped during the measurement (a socat fork
  that ended, an sshd session child) in the total, without double counting: a reaped process is
  no longer in the tree.
- memory: VmRSS (resident set, KiB) summed over the tree.  For trees that fork per connection
  (socat) this counts the shared pages (libc, the binary) once per process.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE of the calling process to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- /proc -------------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3, the state, is index 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The start time of a live (not zombie) process, or None."""
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22: starttime


def ppid_map() -> dict[int, int]:
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields:
                out[int(name)] = int(fields[1])
    return out


def descendants(roots: list[int], parents: dict[int, int] | None = None) -> list[int]:
    """The live processes among `roots` and all their descendants."""
    parents = ppid_map() if parents is None else parents
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [r for r in roots if r in parents]
    seen = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime (fields 14-17)
    return total


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def pss_kib(pids: list[int]) -> int:
    """Proportional set size summed (shared pages split between the processes sharing them)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def listening(port: int, pid: int | None = None) -> bool:
    """Whether something listens on `port` (any address), read from /proc/net/tcp{,6}, no connection
    made; with `pid`, in that process's network namespace (/proc/PID/net/...)."""
    want = f":{port:04X}"
    base = f"/proc/{pid}/net" if pid else "/proc/net"
    for table in (f"{base}/tcp", f"{base}/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and parts[1].endswith(want):
                        return True
        except OSError:
            pass
    return False


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02, alive=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if alive is not None and not alive():
            raise RuntimeError(f"{what}: the process exited first")
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


# -- processes ---------------------------------------------------------------------------------------
class Proc:
    def __init__(self, name: str, popen: subprocess.Popen, log_path: Path | None) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self.start_time = start_time(popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-n:]


class Procs:
    """Registry of everything the harness started; `stop()` / `stop_all()` end them by pid."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []
        self._seen: dict[int, dict[int, int]] = {}  # root pid -> {descendant pid: start time}
        self._lock = threading.Lock()
        self._n = 0

    def start(self, name: str, args: list[str], *, stdin=subprocess.DEVNULL, stdout=None, env=None,
              cwd=None, log: bool = True) -> Proc:
        self._n += 1
        log_path = self.log_dir / f"{self._n:03d}-{name}.log" if log else None
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            popen = subprocess.Popen(args, stdin=stdin, stdout=stdout if stdout is not None else out,
                                     stderr=out, env=env, cwd=cwd, preexec_fn=raise_nofile,
                                     start_new_session=True)
        finally:
            if log_path:
                out.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def tree(self, procs: list[Proc]) -> list[int]:
        """Live pids of `procs` and their descendants (remembered for the sweep when a root stops)."""
        parents = ppid_map()
        out: list[int] = []
        for proc in procs:
            if not proc.alive():
                continue
            pids = descendants([proc.pid], parents)
            out.extend(pids)
            with self._lock:
                seen = self._seen.setdefault(proc.pid, {})
                for pid in pids:
                    if pid != proc.pid and pid not in seen:
                        st = start_time(pid)
                        if st is not None:
                            seen[pid] = st
        return out

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        if proc.alive():
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)
        self._sweep(proc.pid)

    def _sweep(self, root: int) -> None:
        """SIGKILL remembered descendants of `root` that outlived it (same pid *and* start time)."""
        with self._lock:
            seen = self._seen.pop(root, {})
        # a child may still be reaping its own connection: give it a moment after its parent's exit
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(start_time(p) == s for p, s in seen.items()):
            time.sleep(0.02)
        for pid, st in seen.items():
            if start_time(pid) == st:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(start_time(p) == s for p, s in seen.items()):
            time.sleep(0.02)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc, timeout=3.0)
            except Exception:  # keep ending the others
                pass
        for root in list(self._seen):
            self._sweep(root)


class RssSampler:
    """Samples the summed VmRSS of a process tree in a thread; `peak_kib` after `stop()`.

    The tree is re-read from /proc every 0.5 s; RSS every `interval` s (50 ms), or every 0.5 s
    when the tree has more than 64 processes (socat forking per connection), to keep the
    sampler's own CPU out of the measurement.
    """

    def __init__(self, pids_fn, interval: float = 0.05) -> None:
        self.pids_fn = pids_fn
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids: list[int] = []
        refreshed = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - refreshed >= 0.5:
                pids = self.pids_fn()
                refreshed = now
            self.peak_kib = max(self.peak_kib, rss_kib(pids))
            self.samples += 1
            self._stop.wait(self.interval if len(pids) <= 64 else 0.5)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
