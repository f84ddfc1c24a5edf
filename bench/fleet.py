"""A fleet on one server (issue 18): anywhered's memory, idle CPU, admin API latency and restart with N idle agents.

    .venv/bin/python bench/fleet.py [--sizes 60,1000,5000] [--quick] [--workers K] [--max-rss-gib G] [--json PATH]

(`make bench-fleet` makes the venv and runs this; options through FLEET_ARGS.)

Theory of operation: one fresh anywhered in a temporary directory of its own (admin socket,
state directory, an absent proxies_dir, a config file raising max_agents (past the largest N) and the handshake
limits), bound to 127.0.0.1 only, and K worker processes (harness/fleet_agents.py), each
running many of the project's own agent sessions (`anywhere.agent.Agent`, one `AgentConfig` and
one certificate each) over one Loop.  The certificates are made once with anywhere.credentials
and kept in ~/.cache/anywhere-bench-fleet (a CA, the server's, fleet-00001 ... for the agents).

For each N of --sizes, in increasing order, on the same server: agents are added up to N (at
--ramp-rate a second) until every one is welcomed with its trunks; then anywhered's idle CPU over
--idle-seconds (utime+stime of /proc/PID/stat), its RSS (VmRSS) and open descriptors, the
latency of GET /v1/agents, GET /v1/status (anywherectl's requests, through anywhere.client on the
admin socket; median of --repeat) and GET /metrics, and one whole `anywherectl agent list`
command; a proxy is added on the last agent to an echo target on 127.0.0.1 and one request is
sent through it; then anywhered gets SIGTERM and is started again on the same port, state
directory and config: the time from SIGTERM until every agent is welcomed again (with its
trunks), how many agents backed off to their longest delay meanwhile (each session's failures,
read every 0.2 s by the workers) and how often the server refused a handshake for its limits
(its log), then the same proxy, restored from the state directory, gets one more request.

Every wait has a deadline (per phase: --ramp-timeout, --restart-timeout); a phase that runs out
is reported (what it reached, and why) and the larger sizes are skipped.  So is a size at which
anywhered plus the workers would pass --max-rss-gib (checked while agents are added), or at which
anywhered exits.  Every process is ended by pid in the ``finally`` below, also on Ctrl-C or
SIGTERM, and the temporary directory removed.  All agents connect from 127.0.0.1, so the limits
per source address are raised to match the global one (printed with the table): what is measured
is the server, not its defence against one address.  Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness.procs import CLK_TCK, raise_nofile, rss_kib  # noqa: E402

from anywhere import credentials  # noqa: E402
from anywhere.client import Client  # noqa: E402

PY = sys.executable
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anywhere-bench-fleet"
WORKER = HERE / "harness" / "fleet_agents.py"
POOL_SIZE = 2  # anywhered's default pool_size: trunks per agent

# the issue's goals
GOAL_PER_AGENT_KIB = 64
GOAL_TOTAL_MIB_AT_5000 = 400
GOAL_IDLE_CPU = 10.0
GOAL_API_S = 1.0
GOAL_METRICS_S = 2.0
GOAL_BACK_S = 60.0


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class PhaseTimeout(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/fleet.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="60,1000,5000", help="agent counts, comma-separated (default 60,1000,5000)")
    p.add_argument("--quick", action="store_true", help="sizes 60,1000")
    p.add_argument("--workers", type=int, default=0, help="agent processes (default: one per 1,250 agents, at least 2)")
    p.add_argument("--ramp-rate", type=float, default=100.0, help="agents started a second, in all (default 100)")
    p.add_argument("--ramp-timeout", type=float, default=0.0,
                   help="seconds for N agents to connect (default 60 + N/20)")
    p.add_argument("--restart-timeout", type=float, default=120.0,
                   help="seconds for every agent to be back after the restart (default 120; the goal is 60)")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="idle CPU window (default 10)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds of quiet before the idle window (default 3)")
    p.add_argument("--repeat", type=int, default=5, help="admin requests timed per kind (default 5; median shown)")
    p.add_argument("--max-rss-gib", type=float, default=6.0,
                   help="stop adding agents when anywhered and the workers together pass this (default 6)")
    p.add_argument("--max-unauthenticated", type=int, default=2000,
                   help="the server's max_unauthenticated (default 2000; per source: half of it, 1,000, "
                   "which is what one address may have under the default of 1,000... see the output)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    args.size_list = [60, 1000] if args.quick else sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    return args


# -- credentials ---------------------------------------------------------------------------------------
def agent_id(i: int) -> str:
    return f"fleet-{i:05d}"


def _issue_range(directory: str, ids: list[str]) -> int:
    made = 0
    for aid in ids:
        crt, key = os.path.join(directory, aid + ".crt"), os.path.join(directory, aid + ".key")
        if not (os.path.exists(crt) and os.path.exists(key)):
            credentials.issue(aid, directory, force=True)
            made += 1
    return made


def ensure_credentials(count: int) -> Path:
    """The CA, the server's and `count` agents' certificates in CACHE, made once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if not all((CACHE / name).exists() for name in ("ca.crt", "ca.key", "server.crt", "server.key")):
        progress(f"making a CA and the server's certificate in {CACHE}")
        credentials.init(str(CACHE), "localhost", ["127.0.0.1"], force=True)
    ids = [agent_id(i) for i in range(1, count + 1)]
    missing = [a for a in ids if not ((CACHE / f"{a}.crt").exists() and (CACHE / f"{a}.key").exists())]
    if missing:
        progress(f"issuing {len(missing)} agent certificates into {CACHE} (once; kept for later runs)")
        t0 = time.monotonic()
        chunks = [missing[i:i + 100] for i in range(0, len(missing), 100)]
        with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            made = sum(pool.map(_issue_range, [str(CACHE)] * len(chunks), chunks))
        progress(f"  {made} issued in {time.monotonic() - t0:.1f} s")
    return CACHE


# -- processes ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process (all its threads), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


class Server:
    """anywhered in `tmp`, restartable on the same port, state directory and config."""

    def __init__(self, tmp: Path, creds: Path, max_agents: int, max_unauth: int) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.sock = str(tmp / "anywhered.sock")
        self.config = tmp / "anywhered.conf"
        self.config.write_text(
            "# bench/fleet.py: every agent connects from 127.0.0.1, so the limit per source address is\n"
            "# raised to the global one's half (the most the server allows one address)\n"
            "[server]\n"
            "bind = 127.0.0.1\n"
            "proxy_bind = 127.0.0.1\n"
            f"max_agents = {max_agents}\n"
            f"max_unauthenticated = {max_unauth}\n"
            f"max_unauthenticated_per_source = {max_unauth}\n")
        self.args = [PY, "-m", "anywhere.server_cli", "start", "--config", str(self.config), "-p", str(self.port),
                     "--ca", str(creds / "ca.crt"), "--cert", str(creds / "server.crt"),
                     "--key", str(creds / "server.key"), "--admin-socket", self.sock,
                     "--state-dir", str(tmp / "state"), "--proxies-dir", str(tmp / "proxies.d-absent"),
                     "--log-level", "info"]
        self.popen: subprocess.Popen | None = None
        self.starts = 0
        self.client = Client(self.sock)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def log_path(self, n: int | None = None) -> Path:
        return self.tmp / f"anywhered-{self.starts if n is None else n}.log"

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        with open(self.log_path(), "ab") as log:
            self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"anywhered exited {self.popen.returncode} at start:\n{self.log_tail()}")
            try:
                self.client.call("GET", "/v1/status")
                return
            except Exception:
                time.sleep(0.05)
        raise PhaseTimeout(f"anywhered did not answer on {self.sock} within {timeout:.0f} s")

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM, then SIGKILL after `timeout`; returns the seconds it took to exit."""
        if not self.alive():
            return 0.0
        t0 = time.monotonic()
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path().read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def limit_refusals(self, n: int) -> int:
        """Handshakes refused for max_unauthenticated(_per_source), from start `n`'s log (throttled
        lines carry a count of those left out; the last window's count is not logged yet)."""
        try:
            text = self.log_path(n).read_text(errors="replace")
        except OSError:
            return 0
        total = 0
        for line in text.splitlines():
            if "limit on agent port" in line:
                more = re.search(r"\((\d+) more like it", line)
                total += 1 + (int(more.group(1)) if more else 0)
        return total

    def api_seconds(self, path: str) -> float:
        t0 = time.perf_counter()
        self.client.call("GET", path)
        return time.perf_counter() - t0

    def metrics_seconds(self) -> float:
        """GET /metrics on the admin socket (text, not JSON: a plain HTTP/1.1 request)."""
        t0 = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(self.sock)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: anywhered\r\nConnection: close\r\n\r\n")
            chunks = []
            while True:
                data = s.recv(262144)
                if not data:
                    break
                chunks.append(data)
        body = b"".join(chunks)
        if not body.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"/metrics answered {body[:80]!r}")
        return time.perf_counter() - t0

    def ctl_seconds(self, *args: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([PY, "-m", "anywhere.ctl", *args, "--admin-socket", self.sock], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=60, check=True)
        return time.perf_counter() - t0


class Worker:
    """One harness/fleet_agents.py process, spoken to one JSON line at a time."""

    def __init__(self, n: int, tmp: Path, creds: Path, port: int) -> None:
        self.popen = subprocess.Popen([PY, str(WORKER), str(creds), str(port), str(tmp / f"agents-{n}.log")],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp / f"agents-{n}.err", "ab"))
        self.ids: list[str] = []
        hello = self.read(20)
        self.pid = hello["pid"]

    def read(self, timeout: float = 30.0) -> dict:
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        if not ready:
            raise PhaseTimeout(f"agent worker {self.popen.pid} did not answer within {timeout:.0f} s")
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"agent worker {self.popen.pid} exited ({self.popen.poll()})")
        return json.loads(line)

    def call(self, cmd: str, timeout: float = 30.0, **kw) -> dict:
        assert self.popen.stdin is not None
        self.popen.stdin.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
        self.popen.stdin.flush()
        return self.read(timeout)

    def end(self) -> None:
        if self.popen.poll() is None:
            try:
                self.call("quit", timeout=5)
                self.popen.wait(5)
            except Exception:
                pass
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


class Fleet:
    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.count = 0
        self.base_rss_kib = sum(w.call("report")["rss_kib"] for w in workers)  # before any agent
        self.base_total_kib = self.base_rss_kib  # plus anywhered's alone (set by main)

    def add(self, upto: int, rate: float) -> None:
        per = rate / len(self.workers)
        for i in range(self.count + 1, upto + 1):
            self.workers[(i - 1) % len(self.workers)].ids.append(agent_id(i))
        for w in self.workers:
            new = [a for a in w.ids if int(a.split("-")[1]) > self.count]
            if new:
                w.call("add", ids=new, rate=per)
        self.count = upto

    def report(self) -> dict:
        reps = [w.call("report") for w in self.workers]
        keys = ("started", "pending", "welcomed", "trunks", "trunks_wanted", "at_max_backoff", "failed_once", "rss_kib", "fds")
        out = {k: sum(r[k] for r in reps) for k in keys}
        out["worst_failures"] = max(r["worst_failures"] for r in reps)
        out["max_backoff_threshold"] = reps[0]["max_backoff_threshold"]
        out["start_errors"] = [e for r in reps for e in r["start_errors"]]
        out["states"] = {}
        for r in reps:
            for k, v in r["states"].items():
                out["states"][k] = out["states"].get(k, 0) + v
        return out

    def call_all(self, cmd: str) -> None:
        for w in self.workers:
            w.call(cmd)

    @property
    def last(self) -> str:
        return agent_id(self.count)


def wait_all_back(server: Server, fleet: Fleet, want: int, timeout: float, cap_kib: int | None, t0: float,
                  what: str, trunks: bool = False) -> tuple[float | None, dict, str]:
    """Poll until `want` agents (and every one started) are welcomed, with all their trunks if
    `trunks`; returns (seconds since t0 or None, last report, why it stopped short)."""
    deadline = time.monotonic() + timeout
    last_note = 0.0
    rep: dict = {}
    while True:
        rep = fleet.report()
        now = time.monotonic()
        if rep["welcomed"] >= want and rep["pending"] == 0 and rep["welcomed"] == rep["started"] and \
                (not trunks or rep["trunks"] >= rep["trunks_wanted"]):
            return now - t0, rep, ""
        if not server.alive():
            return None, rep, f"anywhered exited ({server.popen.returncode}): {server.log_tail(300)!r}"
        total = rss_kib([server.pid]) + rep["rss_kib"]
        # what the connections not open yet will add, at what each open one costs now (both sides)
        conns = rep["welcomed"] + rep["trunks"]
        per_conn = max(0, total - fleet.base_total_kib) / conns if conns else 0
        projected = total + per_conn * (rep["trunks_wanted"] - rep["trunks"] + (1 + POOL_SIZE) *
                                        (rep["started"] - rep["welcomed"]))
        if cap_kib and projected > cap_kib:
            closed = sum(w.call("close_unwelcomed")["closed"] for w in fleet.workers)
            progress(f"  memory cap: anywhered + agent processes at {total / 1048576:.1f} GiB, "
                     f"{projected / 1048576:.1f} GiB with the connections still opening; {closed} agents not up "
                     f"yet closed, waiting for the trunks of the {rep['welcomed']} that are")
            fleet.count = rep["welcomed"]
            _, rep, _ = wait_all_back(server, fleet, 0, min(60.0, max(10.0, deadline - now)), None, t0,
                                      "trunks after the memory cap", trunks=True)
            return None, rep, (f"memory cap: anywhered + agent processes at {total / 1048576:.1f} GiB "
                               f"({projected / 1048576:.1f} GiB projected) > --max-rss-gib {cap_kib / 1048576:.0f}")
        if now > deadline:
            return None, rep, f"{what} timeout ({timeout:.0f} s)"
        if now - last_note > 5:
            last_note = now
            progress(f"  {what}: {rep['welcomed']}/{want} welcomed, trunks {rep['trunks']}/{rep['trunks_wanted']}, "
                     f"states {rep['states']}, anywhered {rss_kib([server.pid]) / 1024:.0f} MiB, "
                     f"agents {rep['rss_kib'] / 1024:.0f} MiB")
        time.sleep(0.25)


def wait_trunks(fleet: Fleet, t0: float, timeout: float, stall: float = 20.0) -> tuple[float | None, dict]:
    """After the sessions are up: until every welcomed agent has its trunks, or `stall` seconds
    without one more, or `timeout`; returns (seconds since t0 or None, last report)."""
    deadline = time.monotonic() + timeout
    best, best_at = -1, time.monotonic()
    while True:
        rep = fleet.report()
        now = time.monotonic()
        if rep["trunks"] >= rep["trunks_wanted"]:
            return now - t0, rep
        if rep["trunks"] > best:
            best, best_at = rep["trunks"], now
        if now > deadline or now - best_at > stall:
            progress(f"  trunks: {rep['trunks']} of {rep['trunks_wanted']} open, none more for "
                     f"{now - best_at:.0f} s; going on")
            return None, rep
        time.sleep(0.5)


# -- an echo target -------------------------------------------------------------------------------------
class Echo:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def echo_through(port: int, timeout: float = 10.0) -> tuple[bool, float, str]:
    payload = os.urandom(1024)
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while data := c.recv(65536):
                got += data
    except OSError as exc:
        return False, time.perf_counter() - t0, str(exc)
    ok = got == payload
    return ok, time.perf_counter() - t0, "" if ok else f"got {len(got)} of {len(payload)} bytes back"


# -- one size ---------------------------------------------------------------------------------------------
def measure(args, server: Server, fleet: Fleet, n: int, echo: Echo, base_kib: int, cap_kib: int) -> dict:
    res: dict = {"n": n}
    progress(f"N = {n}: adding agents {fleet.count + 1}..{n} at {args.ramp_rate:.0f}/s")
    t0 = time.monotonic()
    fleet.add(n, args.ramp_rate)
    ramp_timeout = args.ramp_timeout or 60 + n / 20
    took, rep, why = wait_all_back(server, fleet, n, ramp_timeout, cap_kib, t0, "connecting")
    res["reached"] = rep["welcomed"]
    res["connect_s"] = took
    res["stopped"] = why
    if why:
        progress(f"  stopped short at {rep['welcomed']} of {n}: {why}")
        if not server.alive():
            return res
    else:
        progress(f"  {n} agents welcomed in {took:.1f} s")
    reached = rep["welcomed"]
    res["trunks_s"], rep = wait_trunks(fleet, t0, ramp_timeout)
    res["trunks"] = (rep["trunks"], rep["trunks_wanted"])

    time.sleep(args.settle)
    c0, t0 = cpu_ticks(server.pid), time.monotonic()
    time.sleep(args.idle_seconds)
    c1, t1 = cpu_ticks(server.pid), time.monotonic()
    res["idle_cpu"] = 100.0 * (c1 - c0) / CLK_TCK / (t1 - t0) if c0 is not None and c1 is not None else None
    res["rss_mib"] = rss_kib([server.pid]) / 1024
    res["per_agent_kib"] = (rss_kib([server.pid]) - base_kib) / reached if reached else None
    res["server_fds"] = fd_count(server.pid)
    rep = fleet.report()
    res["agents_rss_kib_per_agent"] = (rep["rss_kib"] - fleet.base_rss_kib) / reached if reached else None
    res["agents_fds"] = rep["fds"]
    progress(f"  idle CPU {res['idle_cpu']:.1f}%, anywhered {res['rss_mib']:.0f} MiB "
             f"({res['per_agent_kib'] or 0:.0f} KiB/agent), {res['server_fds']} fds")

    def timed(fn, *a) -> tuple[float, float]:
        xs = [fn(*a) for _ in range(args.repeat)]
        return statistics.median(xs), max(xs)
    res["agents_api_s"] = timed(server.api_seconds, "/v1/agents")
    res["status_api_s"] = timed(server.api_seconds, "/v1/status")
    res["metrics_s"] = timed(server.metrics_seconds)
    res["ctl_agent_list_s"] = server.ctl_seconds("agent", "list")
    res["ctl_status_s"] = server.ctl_seconds("status")
    listed = len(server.client.call("GET", "/v1/agents")["agents"])
    res["listed"] = listed
    progress(f"  /v1/agents {res['agents_api_s'][0] * 1000:.0f} ms ({listed} listed), /v1/status "
             f"{res['status_api_s'][0] * 1000:.0f} ms, /metrics {res['metrics_s'][0] * 1000:.0f} ms")

    # a proxy on the last agent (kept in the state directory over the restart)
    last = fleet.last if not why else None
    if last is None:  # short of N: the last agent that did connect
        connected = {a["agent_id"] for a in server.client.call("GET", "/v1/agents")["agents"]}
        last = max(connected, default=None)
    res["proxy_agent"] = last
    remote = free_port()
    if last:
        server.client.call("POST", "/v1/proxies", {"agent_id": last, "local_ip": "127.0.0.1", "local_port": echo.port,
                                                   "remote_port": remote, "name": f"fleet-{n}"})
        res["proxy_before"] = echo_through(remote)
        progress(f"  proxy :{remote} -> {last} -> echo: {res['proxy_before']}")

    # restart
    fleet.call_all("reset")
    progress(f"  restart: SIGTERM to anywhered {server.pid}")
    t0 = time.monotonic()
    res["stop_s"] = server.stop()
    server.start()
    res["start_s"] = time.monotonic() - t0 - res["stop_s"]
    took, rep, why2 = wait_all_back(server, fleet, reached, args.restart_timeout, None, t0, "reconnecting")
    res["back_s"] = took
    res["back_stopped"] = why2
    res["back_reached"] = rep["welcomed"]
    res["back_trunks_s"], rep = wait_trunks(fleet, t0, args.restart_timeout) if took is not None else (None, rep)
    res["back_trunks"] = (rep["trunks"], rep["trunks_wanted"])
    time.sleep(1)
    rep = fleet.report()
    res["at_max_backoff"] = rep["at_max_backoff"]
    res["max_backoff_threshold"] = rep["max_backoff_threshold"]
    res["worst_failures"] = rep["worst_failures"]
    res["failed_once"] = rep["failed_once"]
    res["limit_refusals"] = server.limit_refusals(server.starts)
    res["rss_after_restart_mib"] = rss_kib([server.pid]) / 1024 if server.alive() else None
    if took is not None:
        progress(f"  all {reached} back {took:.1f} s after SIGTERM (stop {res['stop_s']:.1f} s); "
                 f"{rep['at_max_backoff']} at max backoff, worst {rep['worst_failures']} failures in a row, "
                 f"{res['limit_refusals']} handshakes refused for limits")
    else:
        progress(f"  restart: {rep['welcomed']} of {reached} back: {why2}")
    if last and server.alive():
        deadline = time.monotonic() + 10
        ok = (False, 0.0, "not tried")
        while time.monotonic() < deadline:  # the last agent may be among the last ones back
            ok = echo_through(remote)
            if ok[0]:
                break
            time.sleep(0.25)
        res["proxy_after"] = ok
        progress(f"  proxy after the restart: {ok}")
        try:
            server.client.call("DELETE", f"/v1/proxies/fleet-{n}")
        except Exception as exc:
            progress(f"  deleting proxy fleet-{n}: {exc}")
    return res


# -- the table --------------------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def table(args, base_mib: float, results: list[dict], elapsed: float, max_unauth: int) -> str:
    cols = [f"N={r['n']}" for r in results]
    rows: list[tuple[str, list[str], str, str]] = []

    def row(label, fmt, goal="", check=None):
        cells, oks = [], []
        for r in results:
            try:
                v = fmt(r)
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                v = "-"
            cells.append(v)
            if check is not None:
                try:
                    oks.append(check(r))
                except (KeyError, TypeError, ValueError):
                    oks.append(None)
        vals = [o for o in oks if o is not None]
        res = "" if not vals else ("PASS" if all(vals) else "FAIL")
        rows.append((label, cells, goal, res))

    row("agents connected", lambda r: f"{r['reached']}" + ("" if not r["stopped"] else " (short)"))
    row("  time to connect", lambda r: f"{r['connect_s']:.1f} s" if r["connect_s"] is not None else "-")
    row("  trunks open", lambda r: f"{r['trunks'][0]}/{r['trunks'][1]}" + (f" {r['trunks_s']:.0f} s" if r["trunks_s"] else ""))
    row("anywhered RSS", lambda r: f"{r['rss_mib']:.0f} MiB", f"<= {GOAL_TOTAL_MIB_AT_5000} MiB at 5000",
        lambda r: (r["rss_mib"] <= GOAL_TOTAL_MIB_AT_5000) if r["n"] >= 5000 and not r["stopped"] else
        (False if r["n"] >= 5000 else None))
    row("  growth per agent", lambda r: f"{r['per_agent_kib']:.0f} KiB", f"<= {GOAL_PER_AGENT_KIB} KiB",
        lambda r: r["per_agent_kib"] <= GOAL_PER_AGENT_KIB)
    row("  open fds", lambda r: f"{r['server_fds']}")
    row("agent processes, growth per agent", lambda r: f"{r['agents_rss_kib_per_agent']:.0f} KiB")
    row("idle CPU of anywhered", lambda r: f"{r['idle_cpu']:.1f}%", f"<= {GOAL_IDLE_CPU:.0f}% of a core",
        lambda r: r["idle_cpu"] <= GOAL_IDLE_CPU)
    row("GET /v1/agents (agent list)", lambda r: f"{r['agents_api_s'][0] * 1000:.0f} ms", f"<= {GOAL_API_S:.0f} s",
        lambda r: r["agents_api_s"][1] <= GOAL_API_S)
    row("GET /v1/status", lambda r: f"{r['status_api_s'][0] * 1000:.0f} ms", f"<= {GOAL_API_S:.0f} s",
        lambda r: r["status_api_s"][1] <= GOAL_API_S)
    row("GET /metrics", lambda r: f"{r['metrics_s'][0] * 1000:.0f} ms", f"<= {GOAL_METRICS_S:.0f} s",
        lambda r: r["metrics_s"][1] <= GOAL_METRICS_S)
    row("anywherectl agent list (whole cmd)", lambda r: f"{r['ctl_agent_list_s'] * 1000:.0f} ms")
    row("anywherectl status (whole cmd)", lambda r: f"{r['ctl_status_s'] * 1000:.0f} ms")
    row("restart: all sessions back", lambda r: f"{r['back_s']:.1f} s" if r["back_s"] is not None
        else f"{r['back_reached']} back", f"<= {GOAL_BACK_S:.0f} s",
        lambda r: r["back_s"] is not None and r["back_s"] <= GOAL_BACK_S)
    row("  trunks back", lambda r: f"{r['back_trunks'][0]}/{r['back_trunks'][1]}" +
        (f" {r['back_trunks_s']:.0f} s" if r["back_trunks_s"] else ""))
    row("  of which stopping", lambda r: f"{r['stop_s']:.1f} s")
    row("  agents at max backoff", lambda r: f"{r['at_max_backoff']}", "0",
        lambda r: r["at_max_backoff"] == 0)
    row("  worst failures in a row", lambda r: f"{r['worst_failures']}")
    row("  agents that failed at least once", lambda r: f"{r['failed_once']}")
    row("  handshakes refused (limits)", lambda r: f"{r['limit_refusals']}")
    row("  anywhered RSS after restart", lambda r: f"{r['rss_after_restart_mib']:.0f} MiB")
    row("proxy on the last agent", lambda r: ("ok" if r["proxy_before"][0] else "FAILED") + " / "
        + ("ok" if r["proxy_after"][0] else "FAILED"), "ok / ok after restart",
        lambda r: r["proxy_before"][0] and r["proxy_after"][0])

    w0 = max(len(r[0]) for r in rows) + 2
    wc = max([12] + [len(c) + 2 for r in rows for c in r[1]])
    wg = max(len(r[2]) for r in rows) + 2
    lines = [f"anywhered alone (before agents): {base_mib:.1f} MiB RSS",
             f"{'metric':<{w0}}" + "".join(f"{c:<{wc}}" for c in cols) + f"{'goal':<{wg}}result"]
    for label, cells, goal, res in rows:
        lines.append(f"{label:<{w0}}" + "".join(f"{c:<{wc}}" for c in cells) + f"{goal:<{wg}}{res}".rstrip())
    notes = []
    for r in results:
        if r.get("stopped"):
            notes.append(f"N={r['n']}: stopped at {r['reached']} agents: {r['stopped']}")
        if r.get("back_stopped"):
            notes.append(f"N={r['n']}: restart: {r['back_reached']} back: {r['back_stopped']}")
    notes.append(f"server config: max_agents at its default (10000) or above the largest N; every agent connects from 127.0.0.1, so "
                 f"max_unauthenticated = {max_unauth} and max_unauthenticated_per_source = {max_unauth} (a single "
                 f"address gets at most half of max_unauthenticated: {max_unauth // 2}); heartbeats, pool_size "
                 f"and timeouts at their defaults. API latencies: median of {args.repeat} (PASS/FAIL on the "
                 f"slowest); the whole anywherectl command includes starting Python. Idle CPU over "
                 f"{args.idle_seconds:.0f} s, after {args.settle:.0f} s of quiet. Growth per agent: "
                 f"(RSS - RSS alone) / agents connected.")
    notes.append(f"run took {elapsed / 60:.1f} min; the workers (agents) share the machine's "
                 f"{os.cpu_count()} cores with anywhered")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


# -- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    nofile = raise_nofile()  # inherited by anywhered and the workers
    top = max(args.size_list)
    n_workers = args.workers or max(2, -(-top // 1250))
    need = top * (1 + POOL_SIZE) * 1.1 + 200
    if nofile < need:
        progress(f"warning: RLIMIT_NOFILE is {nofile}; anywhered needs about {need:.0f} for {top} agents "
                 f"({1 + POOL_SIZE} connections each)")
    progress(f"RLIMIT_NOFILE {nofile}; sizes {args.size_list}; {n_workers} agent processes")
    creds = ensure_credentials(top)
    tmp = Path(tempfile.mkdtemp(prefix="anywhere-fleet-"))
    server: Server | None = None
    workers: list[Worker] = []
    echo: Echo | None = None
    results: list[dict] = []

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    try:
        echo = Echo()
        server = Server(tmp, creds, max_agents=max(10000, top + 100), max_unauth=args.max_unauthenticated)
        server.start()
        time.sleep(2)
        base_kib = rss_kib([server.pid])
        progress(f"anywhered {server.pid} on 127.0.0.1:{server.port}, alone: {base_kib / 1024:.1f} MiB")
        workers = [Worker(i, tmp, creds, server.port) for i in range(n_workers)]
        fleet = Fleet(workers)
        fleet.base_total_kib += base_kib
        cap_kib = int(args.max_rss_gib * 1048576)
        for n in args.size_list:
            res = measure(args, server, fleet, n, echo, base_kib, cap_kib)
            results.append(res)
            if res.get("stopped") or res.get("back_stopped") or not server.alive():
                skipped = [s for s in args.size_list if s > n]
                if skipped:
                    progress(f"skipping {skipped}: N = {n} stopped short")
                break
    except KeyboardInterrupt as exc:
        progress(f"interrupted ({exc or 'Ctrl-C'}); cleaning up")
    except Exception as exc:
        progress(f"failed: {type(exc).__name__}: {exc}")
        if server is not None:
            progress(f"anywhered's log ends:\n{server.log_tail()}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for w in workers:
            w.end()
        if server is not None:
            server.stop(10)
        if echo is not None:
            echo.close()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    if not results:
        print("no size completed; nothing to report")
        return 1
    print(table(args, base_kib / 1024, results, elapsed, args.max_unauthenticated))
    if args.json:
        Path(args.json).write_text(json.dumps({"base_kib": base_kib, "results": results, "elapsed_s": elapsed},
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
