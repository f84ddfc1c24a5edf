"""Where Anywhere's CPU goes under one load: py-spy on anywhered and the agent, one table each.

    .venv/bin/python bench/cpuprofile.py [--load bulk|c10|c100|conns] [--seconds N] [--native] [--top N]

Starts the targets and the Anywhere path exactly as `bench/run.py` does (the harness in
bench/harness), runs one load through it while `py-spy record` samples both processes, and prints
for each process its CPU seconds (from /proc) and the functions with the most samples: "self"
(the function itself was running) and "total" (it was on the stack).  `--native` adds C frames
(OpenSSL, the interpreter), which shows how much of a Python line is the call it makes.
Loads: bulk = one iperf3 stream; c10 / c100 = wrk on the 1 KiB file; conns = short connections
(metric d's load generator).  Not part of `make test`; needs py-spy (pip) and what `make bench`
installs.  Every process it starts is ended by pid before it exits.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness.metrics import LOADGEN  # noqa: E402
from harness.paths import PATHS, Context  # noqa: E402
from harness.procs import CLK_TCK, Procs, cpu_ticks, raise_nofile  # noqa: E402
from harness.services import Echo, Nginx, Ports, iperf3_server  # noqa: E402

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def load_command(load: str, port: int, seconds: int) -> list[str]:
    if load == "bulk":
        return ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds)]
    if load in ("c1", "c10", "c100"):
        return ["wrk", "-t1", f"-c{load[1:]}", f"-d{seconds}s", f"http://127.0.0.1:{port}/1k"]
    if load == "conns":
        return [sys.executable, LOADGEN, "conns", str(port), "--count", str(2000 * seconds), "--max-time", str(seconds),
                "--concurrency", "50", "--timeout", "10"]
    raise ValueError(load)


def summarise(raw: Path, top: int) -> list[str]:
    """py-spy's raw format: one line per distinct stack, 'frame;frame;... count'."""
    self_n: collections.Counter[str] = collections.Counter()
    total_n: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [f.split(" (")[0] + (" (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                                      if " (" in f else "") for f in stack.split(";")]
        self_n[frames[-1]] += n
        for f in set(frames):
            total_n[f] += n
    if not samples:
        return ["  (no samples)"]
    out = [f"  {samples} samples", f"  {'self %':>7}  {'total %':>7}  function"]
    for name, n in self_n.most_common(top):
        out.append(f"  {100 * n / samples:7.1f}  {100 * total_n[name] / samples:7.1f}  {name}")
    out.append("  by total (on the stack):")
    for name, n in total_n.most_common(top):
        out.append(f"  {100 * self_n[name] / samples:7.1f}  {100 * n / samples:7.1f}  {name}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/cpuprofile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", choices=("bulk", "c1", "c10", "c100", "conns"), default="bulk")
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--native", action="store_true", help="sample C frames too")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--rate", type=int, default=250, help="samples per second")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, py-spy's raw output)")
    args = p.parse_args()
    if not os.access(PY_SPY, os.X_OK):
        print("py-spy is missing: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="anywhere-profile-"))
    (workdir / "logs").mkdir()
    procs = Procs(workdir / "logs")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    try:
        ports = Ports()
        ctx = Context(procs, ports, workdir, env)
        ctx.anywhere_creds()
        if args.load == "bulk":
            _, target = iperf3_server(procs, ports)
        elif args.load == "conns":
            target = Echo(procs, ports).start()
        else:
            target = Nginx(procs, ports, workdir).start()
        path = PATHS["anywhere"](ctx)
        port = path.start(target)
        agent, server = path.procs
        spies = []
        for proc in (server, agent):
            out = workdir / f"{proc.name}.raw"
            cmd = [PY_SPY, "record", "--pid", str(proc.pid), "--format", "raw", "--output", str(out),
                   "--rate", str(args.rate), "--duration", str(args.seconds + 1), "--nonblocking"]
            if args.native:
                cmd.append("--native")
            spies.append((proc, out, procs.start(f"py-spy-{proc.name}", cmd)))
        time.sleep(0.5)
        before = {proc.name: cpu_ticks([proc.pid]) for proc in (server, agent)}
        t0 = time.monotonic()
        load = procs.start("load", load_command(args.load, port, args.seconds), stdout=subprocess.PIPE)
        stdout, _ = load.popen.communicate(timeout=args.seconds + 120)
        elapsed = time.monotonic() - t0
        after = {proc.name: cpu_ticks([proc.pid]) for proc in (server, agent)}
        for _, _, spy in spies:
            spy.popen.wait(args.seconds + 60)
        tail = stdout.decode(errors="replace").strip().splitlines()
        print(f"load {args.load}, {elapsed:.1f} s: " + " | ".join(l.strip() for l in tail[-3:]))
        for proc, out, _ in spies:
            cpu = (after[proc.name] - before[proc.name]) / CLK_TCK
            print(f"\n{proc.name}: {cpu:.2f} CPU s ({100 * cpu / elapsed:.0f}% of one core)")
            print("\n".join(summarise(out, args.top)) if out.exists() else "  (py-spy wrote nothing)")
    finally:
        procs.stop_all()
        if args.keep:
            print(f"temp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
