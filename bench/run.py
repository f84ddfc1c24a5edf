"""Anywhere's benchmark: every path, every metric, on loopback (h: across a shaped link); tables of medians.

    .venv/bin/python bench/run.py [--rounds N] [--quick] [--metrics a,b,...] [--paths ...] [--json PATH]
    .venv/bin/python bench/run.py --metrics h [--quick] [--paths direct,anywhere]   (metric h alone)

(`make bench` installs the Debian packages it needs, makes the venv, and runs this.)

Paths: direct (client to target), socat (one relay copy, 256 KiB buffer), ssh -R with OpenSSH's
default cipher and with aes128-gcm, Anywhere (anywhered + agent, mutual TLS).  Metrics: a. one
iperf3 stream; b. 8 streams; c. wrk -t1 through nginx, c10/c100 on 1 KiB and 1 MiB; d. new
connections/s (2,000 short echo connections, 50 in flight); e. wrk -c1000 on 1 KiB with the
tunnel's peak RSS; f. 5,000 idle tunneled connections: memory per connection, echo RTT on a
sample; g. CPU seconds of the tunnel's processes per GB (during a's stream); h. interactive traffic
behind bulk: the round trip of a 64-byte echo sent 20 times a second while iperf3 -P 1/4/16 moves
bulk through another forward of the same tunnel, down and up, across a veth pair shaped to 40 Mbit/s
each way with tbf, between two network namespaces (root; its own topology and its own table, see
harness/interactive.py; paths direct, ssh -R aes128-gcm and Anywhere unless --paths names others);
i. UDP: iperf3 -u -l 1400 at a fixed rate, -b 100M and -b 500M (10 s each; 3 s with --quick), one
flow: the Mbit/s the iperf3 server received, the datagrams lost (%) and the jitter (ms), as the
server counts them (iperf3 -J, end.sum_received); only on the paths that carry UDP (direct, and
Anywhere: a TCP proxy for iperf3's control connection and a UDP proxy on the same remote port, to
the iperf3 server's port); the others are skipped with the reason printed.

Theory of operation: the targets (nginx, an echo server; iperf3 one-off servers per run) start
once.  Each round runs every test on every path back to back, the path order rotated by one per
round; each (test, path) starts the path fresh and stops it right after, so no test inherits
another's connections or memory.  Every process is started through `Procs` and ended by pid in
the ``finally`` below.  Medians over rounds; the ratio to direct is computed within each round.
Metric h runs after the loopback metrics, in rounds of its own, with its own processes and
namespaces, all gone when it ends.  Progress goes to stderr, the report to stdout, the raw
results to --json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import interactive, netns, report  # noqa: E402
from harness.metrics import TESTS, UDP_LEN, UDP_RATES, Settings, Targets  # noqa: E402
from harness.paths import PATHS, SSHD, Context  # noqa: E402
from harness.procs import Procs, raise_nofile  # noqa: E402
from harness.services import Echo, Nginx, Ports  # noqa: E402

ALL_METRICS = "abcdefghi"
LOOPBACK_METRICS = "abcdefgi"
ALL_PATHS = ["direct", "socat", "ssh", "ssh-aes", "anywhere"]
EXTRA_PATHS = ["anywhere-conn"]  # only when named: Anywhere with pool_size 0 (harness/paths.py)
TOOLS = {"iperf3": "iperf3", "wrk": "wrk", "nginx": "nginx-light", "socat": "socat", "ssh": "openssh-client",
         "ssh-keygen": "openssh-client"}


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, help="rounds (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="short durations, fewer connections, 1 round")
    p.add_argument("--metrics", default=",".join(ALL_METRICS), help="comma-separated subset of a,b,c,d,e,f,g,h,i")
    p.add_argument("--paths", help=f"comma-separated subset of {','.join(ALL_PATHS + EXTRA_PATHS)} (default: all "
                   f"but {','.join(EXTRA_PATHS)}; metric h: "
                   f"{','.join(interactive.H_DEFAULT_PATHS)}, and of the named ones those it can run: "
                   f"{','.join(interactive.H_PATHS)})")
    p.add_argument("--h-seconds", type=float, help="metric h: seconds measured per cell (default 12; 6 with --quick), "
                   "after a warm-up of 3 s (2 s)")
    p.add_argument("--h-congestion", help="metric h: TCP congestion control in its namespaces, one the host allows "
                   "them (net.ipv4.tcp_allowed_congestion_control; default: the host's, which a new namespace inherits)")
    p.add_argument("--json", default=str(HERE / "results" / "latest.json"), help="raw results (default bench/results/latest.json)")
    p.add_argument("--anywhere-defaults", action="store_true",
                   help="run anywhered with its default admission limits (per-source rate, per-proxy connections, ...)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) after the run")
    args = p.parse_args(argv)
    args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    named = [x.strip() for x in args.paths.split(",") if x.strip()] if args.paths else None
    bad = [m for m in args.metrics if m not in ALL_METRICS] + [x for x in named or [] if x not in PATHS]
    if bad:
        p.error(f"unknown metric or path: {', '.join(bad)}")
    args.paths = [x for x in ALL_PATHS + EXTRA_PATHS if x in (named or ALL_PATHS)]  # canonical order, direct first
    args.h_paths = [x for x in interactive.H_PATHS if x in (named or interactive.H_DEFAULT_PATHS)]
    if "h" in args.metrics and not args.h_paths:
        p.error(f"metric h runs on {', '.join(interactive.H_PATHS)}: none of them is in --paths")
    if args.h_seconds is not None and args.h_seconds < 2:
        p.error("--h-seconds must be at least 2")
    if args.h_congestion:
        try:
            allowed = open("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read().split()
        except OSError:
            allowed = []
        if args.h_congestion not in allowed:
            p.error(f"--h-congestion {args.h_congestion}: a network namespace may only use what the host allows "
                    f"(net.ipv4.tcp_allowed_congestion_control: {' '.join(allowed) or '?'})")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def _first_line(args: list[str]) -> str:
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    lines = [l for l in (res.stdout + res.stderr).splitlines() if l.strip()]
    return lines[0].strip() if lines else "?"


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
                break
    except OSError:
        pass
    import resource
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": cpu, "memory": mem,
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1], "loadavg_start": open("/proc/loadavg").read().split()[:3]}


def tool_versions() -> dict:
    import anywhere
    socat = _first_line(["sh", "-c", "socat -V | grep -m1 'socat version'"])
    return {
        "iperf3": _first_line(["iperf3", "--version"]),
        "wrk": _first_line(["wrk", "-v"]).split(" Copyright")[0],
        "nginx": _first_line(["nginx", "-v"]),
        "socat": socat,
        "openssh": _first_line(["ssh", "-V"]),
        "python": platform.python_version(),
        "openssl (python ssl)": ssl.OPENSSL_VERSION,
        "anywhere": getattr(anywhere, "__version__", "?"),
    }


def snapshot_code(workdir: Path) -> tuple[Path, dict]:
    """Copy anywhere/ into the temp dir: every Anywhere process of the run imports this copy
    (PYTHONPATH), so edits to the tree during a run cannot mix code versions."""
    src = workdir / "src"
    shutil.copytree(HERE.parent / "anywhere", src / "anywhere", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH", "")) if p)
    sys.path.insert(0, str(src))  # the runner's own imports (credentials, the admin client) too
    return src, env


def code_state(src: Path | None = None) -> dict:
    """Which Anywhere code ran: the commit, whether anywhere/ differs from it, a hash of its files."""
    import hashlib
    repo = HERE.parent
    h = hashlib.sha256()
    for f in sorted(((src or repo) / "anywhere").glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "anywhere_dirty": bool(git("status", "--porcelain", "--", "anywhere")),
            "anywhere_sha256": h.hexdigest()[:12]}


def check_tools(args: argparse.Namespace) -> list[str]:
    loopback = any(m in LOOPBACK_METRICS for m in args.metrics)
    ssh = (loopback and any(p.startswith("ssh") for p in args.paths)) or \
        ("h" in args.metrics and any(p.startswith("ssh") for p in args.h_paths))
    tools = dict(TOOLS) if loopback else {"iperf3": "iperf3", "ssh": "openssh-client", "ssh-keygen": "openssh-client"}
    missing = [pkg for tool, pkg in tools.items() if shutil.which(tool) is None
               and not (tool in ("ssh", "ssh-keygen") and not ssh)]
    if ssh and not os.access(SSHD, os.X_OK):
        missing.append("openssh-server")
    return sorted(set(missing))


def select_tests(metrics: list[str]):
    tests = [(tid, letter, fn) for tid, letter, fn in TESTS if letter in metrics]
    if "a" in metrics:  # a measures g during its stream
        tests = [t for t in tests if t[0] != "g"]
    return tests


def header_text(meta: dict, loopback: bool) -> str:
    m, t, s = meta["machine"], meta["tools"], meta["settings"]
    lines = [
        "Anywhere benchmark — " + meta["started"],
        f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, kernel {m['kernel']}, "
        f"open files {m['nofile']}, load avg at start {' '.join(m['loadavg_start'])}",
        "tools:   " + "; ".join(f"{k} {v}" if not v.lower().startswith(k.split()[0]) else v for k, v in t.items()),
    ]
    for name, probe in meta.get("ssh", {}).items():
        lines.append(f"{name:8} negotiates cipher {probe.get('cipher')} (MAC {probe.get('mac')}, kex {probe.get('kex')})")
    c = meta["code"]
    lines.append(f"code:    anywhere/ as of commit {c['commit']}" + (" + uncommitted changes" if c["anywhere_dirty"] else "")
                 + f", copied at start and run from the copy (anywhere/*.py sha256 {c['anywhere_sha256']})")
    if "anywhere" in meta["paths"]:
        limits = meta.get("anywhere_limits")
        lines.append("anywhere: pool and relay defaults; admission limits "
                     + (("raised (one source, one proxy): " + ", ".join(f"{k}={v}" for k, v in limits.items()))
                        if limits else "at their defaults"))
    if loopback:
        lines.append(f"nginx:   worker_processes {Nginx.WORKERS}, access_log off, sendfile on, keepalive_requests 1000000")
        lines.append(f"runs:    {meta['rounds']} round(s), path order rotated per round; iperf3 -t {s['iperf_seconds']}; "
                     f"wrk -t1 -d{s['wrk_seconds']}s --timeout 10s; d {s['d_count']} conns / {s['d_concurrency']} in flight; "
                     f"f {s['f_count']} conns, RTT sample {s['f_sample']}; every path fresh per measurement")
        if "i" in meta["metrics"]:
            lines.append(f"udp (i): iperf3 -u -l {UDP_LEN} -b {' and -b '.join(UDP_RATES)}, -t {s['udp_seconds']}, one flow; "
                         "Mbit/s, loss and jitter as the iperf3 server counted them")
        lines.append("columns: median over rounds; x direct = median of per-round ratios to direct; "
                     "spread = (max-min)/median; targets and PASS/FAIL on Anywhere's rows")
    return "\n".join(lines)


def h_header(h: dict, rounds: int) -> str:
    m, st = h["meta"], h["meta"]["settings"]
    lines = [f"metric h: {m['link']}; TCP congestion control {m['congestion']}",
             f"  cells: idle, then iperf3 -P {'/'.join(map(str, st['streams']))} down (-R: agent host -> clients) and up, "
             f"each on a fresh path: {st['warmup']:g} s warm-up (iperf3 -O) + {st['seconds']:g} s measured; "
             f"{rounds} round(s), path order rotated per round"]
    for name, probe in m.get("ssh", {}).items():
        lines.append(f"  {name} negotiates cipher {probe.get('cipher')} (MAC {probe.get('mac')})")
    limits = m.get("anywhere_limits")
    if limits is not None:
        lines.append("  anywhere: two proxies on one agent; admission limits " + ("raised" if limits else "at their defaults"))
    return "\n".join(lines)


def h_labels(h: dict, paths: list[str]) -> dict[str, str]:
    labels = {name: PATHS[name].label for name in paths}
    if "ssh" in h["meta"].get("ssh", {}):
        labels["ssh"] = f"ssh -R ({h['meta']['ssh']['ssh']['cipher'].split('@')[0]})"
    return labels


def run_h(args: argparse.Namespace, workdir: Path, anywhere_env: dict) -> dict:
    """Metric h, in processes and namespaces of its own (all ended and deleted when it returns)."""
    st = interactive.HSettings.quick() if args.quick else interactive.HSettings()
    if args.h_seconds is not None:
        st.seconds = args.h_seconds
    st.congestion = args.h_congestion
    procs = Procs(workdir / "h-logs")
    (workdir / "h-logs").mkdir()
    t0 = time.monotonic()
    try:
        h = interactive.run(procs, workdir / "h", anywhere_env, args.h_paths, args.rounds, st,
                            args.anywhere_defaults, progress)
    finally:
        procs.stop_all()
    h["seconds"] = time.monotonic() - t0
    recs = interactive.summarize(h, args.h_paths, st)
    labels = h_labels(h, args.h_paths)
    cells = sum(len(r) for r in h["rounds"])
    h["summary"] = recs
    h["table"] = "\n".join(x for x in (
        h_header(h, args.rounds), "", interactive.table(recs, labels, st, args.rounds), "",
        interactive.queue_notes(h, args.h_paths),
        f"h table took {h['seconds'] / 60:.1f} min ({cells} cells)") if x is not None)
    if h["errors"]:
        h["table"] += f"\n{len(h['errors'])} h cell(s) failed:\n" + "\n".join(
            f"  round {e['round']} {e['cell']} {e['path']}: {e['error'].splitlines()[0][:200]}" for e in h["errors"])
    h["rounds"] = [{f"{cell}|{path}": res for (cell, path), res in r.items()} for r in h["rounds"]]  # JSON keys
    return h


def run(args: argparse.Namespace) -> int:
    raise_nofile()
    missing = check_tools(args)
    if missing:
        progress(f"missing: {' '.join(missing)}; `make bench` installs them (apt-get install -y {' '.join(missing)})")
        return 2
    tests = select_tests(args.metrics)
    h_skip = netns.unavailable() if "h" in args.metrics else None
    if h_skip and not tests:
        progress(f"metric h cannot run: {h_skip}")
        return 2
    if os.geteuid() != 0 and tests and any(p.startswith("ssh") or p == "socat" for p in args.paths):
        progress("note: not root; sshd and nginx expect root here (ssh paths need it)")
    settings = Settings.quick() if args.quick else Settings()
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="anywhere-bench-"))
    (workdir / "logs").mkdir()
    procs = Procs(workdir / "logs")
    src, anywhere_env = snapshot_code(workdir)
    meta: dict = {"started": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "machine": machine_info(), "tools": tool_versions(), "rounds": args.rounds,
                  "settings": vars(settings), "paths": args.paths if tests else [], "metrics": args.metrics,
                  "quick": args.quick, "nginx_worker_processes": Nginx.WORKERS, "code": code_state(src)}
    rounds: list[dict] = []
    raw: list[dict] = []
    errors: list[dict] = []
    loads: list[list[str]] = []
    labels: dict[str, str] = {}
    h: dict | None = None
    h_failed = h_note = ""  # h_note: why there is no h table (h_failed: and the run failed)
    ok = False
    try:
        if tests:
            labels = run_loopback(args, tests, settings, procs, workdir, anywhere_env, meta, rounds, raw, errors, loads)
        if "h" in args.metrics:
            if h_skip:
                progress(f"metric h skipped: {h_skip}")
                errors.append({"test": "h", "error": f"skipped: {h_skip}"})
                h_note = f"metric h skipped: {h_skip}"
            else:
                try:
                    h = run_h(args, workdir, anywhere_env)
                except Exception as exc:  # the loopback results still get reported
                    errors.append({"test": "h", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
                    progress(f"metric h FAILED: {exc}")
                    h_failed = h_note = f"metric h FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                else:
                    errors.extend({"test": "h", **e} for e in h["errors"])
        ok = True
    except KeyboardInterrupt:
        progress("interrupted; stopping every process")
    finally:
        procs.stop_all()
    elapsed = time.monotonic() - t_start
    meta["seconds"] = elapsed
    meta["code_tree_at_end"] = code_state()  # the tree may have moved on; the run used the copy
    meta["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    if not rounds and h is None:
        progress(f"{h_failed or 'no complete round'}; logs kept in {workdir}")
        return 1
    meta["loadavg_rounds"] = loads
    out = [header_text(meta, bool(tests)), ""]
    text, records = "", []
    if rounds:
        stats = report.aggregate(rounds, args.paths)
        text, records = report.table(stats, args.paths, labels, settings.f_count, rounds, args.rounds)
        out += [text, ""]
    if h is not None:
        out += [h["table"], ""]
    elif h_note:
        out += [h_note, ""]
    out.append(f"run took {elapsed / 60:.1f} min; load avg (1 min) at each loopback round's start: "
               f"{', '.join(l[0] for l in loads) or '-'}; at the end: {meta['loadavg_end'][0]} ({meta['machine']['nproc']} CPUs)")
    for letter, why in meta.get("skipped", {}).items():
        out.append(f"metric {letter} not run on: " + "; ".join(f"{p} ({reason})" for p, reason in why.items()))
    loopback_errors = [e for e in errors if e.get("test") != "h"]
    if loopback_errors:
        out.append(f"{len(loopback_errors)} measurement(s) failed (details in the JSON):")
        out.extend(f"  round {e['round']} {e['test']} {e['path']}: {e['error'].splitlines()[0][:200]}" for e in loopback_errors)
    if errors:
        out.append(f"  (logs of the failed runs are in {workdir}/logs and {workdir}/h-logs)")
    print("\n" + "\n".join(out), flush=True)
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "labels": labels, "rounds": rounds, "measurements": raw,
                                     "errors": errors, "summary": records, "table": text, "h": h}, indent=1, default=str))
    print(f"raw results: {json_path}", flush=True)
    if args.keep_tmp or errors or not ok:
        print(f"temp dir with configs and logs kept: {workdir}", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok and not h_failed else 1


def run_loopback(args: argparse.Namespace, tests, settings: Settings, procs: Procs, workdir: Path, anywhere_env: dict,
                 meta: dict, rounds: list[dict], raw: list[dict], errors: list[dict], loads: list[list[str]]) -> dict[str, str]:
    """Metrics a-g on loopback: appends to rounds, raw, errors and loads; returns the paths' labels."""
    ports = Ports()
    ctx = Context(procs, ports, workdir, anywhere_env)
    progress(f"temp dir {workdir}; starting targets")
    nginx = Nginx(procs, ports, workdir)
    echo = Echo(procs, ports)
    targets = Targets(procs, ports, nginx.start(), echo.start())
    meta["ssh"] = {}
    if "ssh" in args.paths:
        meta["ssh"]["ssh -R"] = ctx.ssh_probe(None)
    if "ssh-aes" in args.paths:
        meta["ssh"]["ssh-aes"] = ctx.ssh_probe(PATHS["ssh-aes"].cipher)
    if "anywhere" in args.paths:
        ctx.anywhere_creds()
        ctx.anywhere_defaults = args.anywhere_defaults
        meta["anywhere_limits"] = ctx.anywhere_config()[1]
    labels = {name: PATHS[name].label for name in args.paths}
    skipped: dict[str, dict[str, str]] = meta.setdefault("skipped", {})  # metric letter -> {path: why not}
    for _tid, letter, _fn in tests:
        for name in args.paths:
            why = PATHS[name].cannot_run(letter)
            if why and name not in skipped.setdefault(letter, {}):
                skipped[letter][name] = why
                progress(f"metric {letter} skipped on {name}: {why}")
    for letter in [k for k, v in skipped.items() if not v]:
        del skipped[letter]
    if "ssh -R" in meta["ssh"]:
        labels["ssh"] = f"ssh -R ({meta['ssh']['ssh -R']['cipher'].split('@')[0]})"
    progress(header_text(meta, True))
    for rnd in range(args.rounds):
        k = rnd % len(args.paths)
        order = args.paths[k:] + args.paths[:k]
        load = open("/proc/loadavg").read().split()[:3]
        loads.append(load)
        progress(f"\n== round {rnd + 1}/{args.rounds}: order {', '.join(order)}; load avg {' '.join(load)}")
        values: dict[str, dict] = {p: {} for p in args.paths}
        for tid, letter, fn in tests:
            for name in order:
                if name in skipped.get(letter, {}):
                    continue
                for svc in (nginx.proc, echo.proc):
                    if svc is not None and not svc.alive():
                        raise RuntimeError(f"target {svc.name} died:\n{svc.log_tail()}")
                path = PATHS[name](ctx)
                t0 = time.monotonic()
                try:
                    res = fn(path, targets, settings)
                except Exception as exc:  # one failed measurement does not end the run
                    path.stop()
                    msg = f"{type(exc).__name__}: {exc}"
                    errors.append({"round": rnd + 1, "test": tid, "path": name, "error": msg,
                                   "traceback": traceback.format_exc()})
                    progress(f"  {tid:10} {name:9} FAILED ({time.monotonic() - t0:.1f} s): {msg[:800]}")
                    continue
                r = res.pop("_raw", None)
                if "g" not in args.metrics:
                    res = {k2: v for k2, v in res.items() if not k2.startswith("g.")}
                values[name].update(res)
                raw.append({"round": rnd + 1, "test": tid, "path": name, "seconds": time.monotonic() - t0,
                            "values": res, "raw": r})
                shown = ", ".join(f"{k2}={v:.4g}" for k2, v in res.items() if isinstance(v, (int, float)))
                progress(f"  {tid:10} {name:9} {shown}  ({time.monotonic() - t0:.1f} s)")
                time.sleep(0.3)
        rounds.append(values)
    return labels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
