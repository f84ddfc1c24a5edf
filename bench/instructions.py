"""Instructions per request: what anywhered and the agent execute in user space, counted by
callgrind, for the working tree and for git revisions beside it, in one run.

    .venv/bin/python bench/instructions.py [--rev REV ...] [--round-trips N] [--conns N] [--rounds N]

Why: on this shared machine a timing swings by 2x from one minute to the next, so a change of a
few percent in the Python hot path drowns in `make bench`.  Instructions counted under valgrind
repeat within about 2% whatever else the machine does, so such a change shows in one run.

Each tree (the working tree, then each --rev, checked out into a temporary git worktree) runs
the Anywhere path exactly as `bench/run.py` starts it, with both daemons under
`valgrind --tool=callgrind`, in front of the harness's echo target.  After a warm-up the
counters are zeroed (callgrind_control), then two loads run, each followed by a dump:
  echo   N round trips of 1 KiB over 10 connections, 10 in flight (a c10 of small requests);
  conns  N short connections, 20 in flight (metric d's load generator: connect, 1 byte each
         way, close).
The table gives instructions per round trip and per connection, both daemons together, and the
ratio to the first tree.

What it does not show: the kernel's share (system calls, TCP on loopback: about half of a
daemon's CPU in `make profile`), cache misses, time spent waiting.  A change that trades
instructions for system calls looks better here than it is; confirm with `make bench`.
Not part of `make test`; needs valgrind (`make instructions` installs it).  Every process it
starts is ended by pid, and every worktree it adds is removed, before it exits.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from harness.metrics import LOADGEN  # noqa: E402
from harness.paths import Context, PATHS  # noqa: E402
from harness.procs import Procs  # noqa: E402
from harness.services import Echo, Ports  # noqa: E402

ECHO_SIZE = 1024
ECHO_CONNS = 10
LOAD_SECONDS = 600  # a bound on each load; under valgrind a default run takes about 15 s


def echo_load(port: int, total: int) -> int:
    """`total` echo round trips of ECHO_SIZE bytes over ECHO_CONNS connections, each keeping one in
    flight; returns how many completed (all of them, unless the bound ran out)."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(ECHO_CONNS)]
    sel = selectors.DefaultSelector()
    msg, owed, sent, done = b"x" * ECHO_SIZE, {}, 0, 0
    try:
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            if sent < total:
                s.sendall(msg)
                sent += 1
                owed[s] = ECHO_SIZE
        deadline = time.monotonic() + LOAD_SECONDS
        while done < total and time.monotonic() < deadline:
            for key, _ in sel.select(5):
                s = key.fileobj
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("the echo connection closed")
                owed[s] -= len(data)
                if owed[s] <= 0:
                    done += 1
                    if sent < total:
                        s.setblocking(True)
                        s.sendall(msg)
                        s.setblocking(False)
                        sent += 1
                        owed[s] += ECHO_SIZE
        return done
    finally:
        sel.close()
        for s in socks:
            s.close()


def conns_load(port: int, count: int) -> int:
    res = subprocess.run([sys.executable, LOADGEN, "conns", str(port), "--count", str(count), "--concurrency", "20",
                          "--timeout", "60", "--max-time", str(LOAD_SECONDS)],
                         capture_output=True, text=True, timeout=LOAD_SECONDS + 60)
    if res.returncode != 0:
        raise RuntimeError(f"loadgen exited {res.returncode}: {res.stderr[-500:]}")
    r = json.loads(res.stdout)
    if r["failed"]:
        raise RuntimeError(f"{r['failed']} connections failed: {r['errors']}")
    return r["ok"]


class Counter:
    """callgrind_control on one daemon: zero its counters, or dump them and read the total."""

    def __init__(self, pid: int, outdir: Path) -> None:
        self.pid, self.outdir = pid, outdir

    def _files(self) -> set[str]:
        return set(glob.glob(str(self.outdir / f"callgrind.out.{self.pid}*")))

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "-z", str(self.pid)], capture_output=True, timeout=120, check=True)

    def dump(self) -> int:
        before = self._files()
        subprocess.run(["callgrind_control", "-d", str(self.pid)], capture_output=True, timeout=120, check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for name in self._files() - before:
                text = Path(name).read_text(errors="replace")
                for line in text.splitlines():
                    if line.startswith("totals:"):
                        return int(line.split()[1])
            time.sleep(0.1)
        raise RuntimeError(f"callgrind wrote no dump for pid {self.pid}")


def measure(ctx: Context, echo_port: int, tree: Path, outdir: Path, round_trips: int, conns: int) -> dict:
    outdir.mkdir(parents=True, exist_ok=True)
    ctx.anywhere_env = dict(os.environ, PYTHONPATH=str(tree))
    ctx.anywhere_prefix = ["valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={outdir}/callgrind.out.%p"]
    ctx.anywhere_startup = 300.0
    path = PATHS["anywhere"](ctx)
    port = path.start(echo_port)
    try:
        counters = [Counter(pid, outdir) for pid in path.pids()]
        echo_load(port, 200)  # warm: trunks up, code paths taken once
        for c in counters:
            c.zero()
        n_echo = echo_load(port, round_trips)
        echo_ir = sum(c.dump() for c in counters)  # a dump zeroes the counters again
        n_conns = conns_load(port, conns)
        conns_ir = sum(c.dump() for c in counters)
    finally:
        path.stop()
    if n_echo < round_trips:
        raise RuntimeError(f"only {n_echo} of {round_trips} round trips within {LOAD_SECONDS} s")
    return {"echo": echo_ir / n_echo, "conns": conns_ir / n_conns}


def worktree(rev: str, where: Path) -> Path:
    res = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(where), rev],
                         capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise SystemExit(f"cannot check out {rev}: {res.stderr.strip()}")
    return where


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", action="append", default=[], help="a git revision to count beside the working tree (repeatable)")
    ap.add_argument("--round-trips", type=int, default=4000)
    ap.add_argument("--conns", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=1, help="runs per tree, alternating; the table shows medians")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            raise SystemExit(f"{tool} not found: apt-get install valgrind (make instructions does)")

    work = Path(tempfile.mkdtemp(prefix="anywhere-instr-"))
    (work / "logs").mkdir()
    procs = Procs(work / "logs")
    trees: list[tuple[str, Path]] = [("working tree", ROOT)]
    added: list[Path] = []
    results: dict[str, list[dict]] = {}
    try:
        for i, rev in enumerate(args.rev):
            added.append(worktree(rev, work / f"rev-{i}"))
            trees.append((rev, added[-1]))
        ports = Ports()
        echo = Echo(procs, ports).start()
        ctx = Context(procs, ports, work, dict(os.environ))
        ctx.anywhere_creds()
        runs = 0
        for rnd in range(args.rounds):
            for label, tree in (trees if rnd % 2 == 0 else trees[::-1]):
                runs += 1
                r = measure(ctx, echo, tree, work / f"callgrind-{runs}", args.round_trips, args.conns)
                results.setdefault(label, []).append(r)
                print(f"round {rnd + 1}: {label}: {r['echo']:,.0f} per round trip, {r['conns']:,.0f} per connection",
                      file=sys.stderr, flush=True)
    finally:
        procs.stop_all()
        for where in added:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], capture_output=True, timeout=60)
        subprocess.run(["rm", "-rf", str(work)], timeout=60)

    first = trees[0][0]
    base = {k: statistics.median(r[k] for r in results[first]) for k in ("echo", "conns")}
    print(f"user-space instructions, anywhered + agent (callgrind), median of {args.rounds} round(s)")
    print(f"{'tree':<24} {'per 1 KiB echo':>16} {'ratio':>7} {'per connection':>16} {'ratio':>7}")
    for label, _ in trees:
        med = {k: statistics.median(r[k] for r in results[label]) for k in ("echo", "conns")}
        print(f"{label:<24} {med['echo']:>16,.0f} {med['echo'] / base['echo']:>7.3f} "
              f"{med['conns']:>16,.0f} {med['conns'] / base['conns']:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
