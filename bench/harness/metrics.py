"""The measurements.  Each test runs on one freshly started path and returns {metric key: value}.

Keys (units): a.gbps, b.gbps (Gbit/s of iperf3's receiver); g.cpu_s_per_gb (CPU seconds of the
tunnel's processes per 10^9 bytes relayed, measured during the single-stream run of a);
c.<size>.c<n>.rps / .p50 / .p99 (wrk; ms); d.rate (connections/s), d.failed; e.rps, e.p99,
e.rss_mb (peak summed VmRSS of the tunnel's processes, MB = 10^6 bytes); f.open (connections
held), f.kib_per_conn, f.rtt_p50, f.rtt_p99 (ms); i.<rate>.mbps (Mbit/s the iperf3 server
received), i.<rate>.loss (% of the datagrams sent that the server never got), i.<rate>.jitter
(ms, iperf3's smoothed interarrival jitter, RFC 3550), one key set per rate of `UDP_RATES`.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path as FsPath

from .paths import Path
from .procs import CLK_TCK, Procs, RssSampler, cpu_ticks, pss_kib, rss_kib
from .services import Ports, iperf3_server

HERE = FsPath(__file__).resolve().parent
LOADGEN = str(HERE / "loadgen.py")


@dataclass
class Settings:
    iperf_seconds: int = 5
    wrk_seconds: int = 5
    d_count: int = 2000
    d_concurrency: int = 50
    f_count: int = 5000
    f_sample: int = 200
    f_open_timeout: float = 90.0
    udp_seconds: int = 10

    @classmethod
    def quick(cls) -> "Settings":
        return cls(iperf_seconds=2, wrk_seconds=2, d_count=500, f_count=1000, f_sample=100, f_open_timeout=30.0,
                   udp_seconds=3)


# metric i: iperf3 -u at these fixed rates (iperf3 -b), datagrams of UDP_LEN bytes of payload (-l)
UDP_RATES = ("100M", "500M")
UDP_LEN = 1400


@dataclass
class Targets:
    procs: Procs
    ports: Ports
    nginx_port: int
    echo_port: int


# -- a, b, g: iperf3 ---------------------------------------------------------------------------------
def iperf(path: Path, tg: Targets, st: Settings, streams: int) -> dict:
    server, target = iperf3_server(tg.procs, tg.ports)
    try:
        port = path.start(target)
        pids = path.pids()
        before = cpu_ticks(pids)
        args = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(st.iperf_seconds), "-J"]
        if streams > 1:
            args += ["-P", str(streams)]
        res = subprocess.run(args, capture_output=True, text=True, timeout=st.iperf_seconds + 60)
        after = cpu_ticks(path.pids() or pids)
    finally:
        path.stop()
        tg.procs.stop(server, timeout=2)
    try:
        data = json.loads(res.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 exited {res.returncode}: {res.stderr[-500:]}{res.stdout[-500:]}") from None
    if data.get("error"):
        raise RuntimeError(f"iperf3: {data['error']}")
    recv = data["end"]["sum_received"]
    nbytes = int(recv["bytes"])
    cpu_s = (after - before) / CLK_TCK
    out = {"gbps": recv["bits_per_second"] / 1e9, "bytes": nbytes, "cpu_s": cpu_s if pids else None,
           "cpu_s_per_gb": cpu_s / (nbytes / 1e9) if pids and nbytes else None,
           "retransmits": data["end"].get("sum_sent", {}).get("retransmits")}
    return out


def test_a(path: Path, tg: Targets, st: Settings) -> dict:
    r = iperf(path, tg, st, 1)
    return {"a.gbps": r["gbps"], "g.cpu_s_per_gb": r["cpu_s_per_gb"], "_raw": r}


def test_b(path: Path, tg: Targets, st: Settings) -> dict:
    r = iperf(path, tg, st, 8)
    return {"b.gbps": r["gbps"], "_raw": r}


def test_g(path: Path, tg: Targets, st: Settings) -> dict:
    r = iperf(path, tg, st, 1)
    return {"g.cpu_s_per_gb": r["cpu_s_per_gb"], "_raw": r}


# -- c, e: wrk through nginx -------------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unknown wrk time {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not rps:
        raise RuntimeError(f"no Requests/sec in wrk output:\n{out[-1500:]}")
    lat = {q: _ms(v) for q, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = sum(int(x) for x in errs.groups()) if errs else 0
    return {"rps": float(rps.group(1)), "p50": lat.get("50"), "p99": lat.get("99"),
            "errors": errors + (int(non2xx.group(1)) if non2xx else 0),
            "socket_errors": dict(zip(("connect", "read", "write", "timeout"), map(int, errs.groups()))) if errs else {},
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "requests": int(total.group(1)) if total else None}


def wrk(port: int, conns: int, file: str, seconds: int) -> dict:
    args = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "10s",
            f"http://127.0.0.1:{port}/{file}"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    if res.returncode != 0:
        raise RuntimeError(f"wrk exited {res.returncode}: {res.stderr[-500:]}")
    return parse_wrk(res.stdout)


def make_test_c(size: str, conns: int):
    key = f"c.{size}.c{conns}"

    def test_c(path: Path, tg: Targets, st: Settings) -> dict:
        try:
            port = path.start(tg.nginx_port)
            r = wrk(port, conns, size, st.wrk_seconds)
        finally:
            path.stop()
        return {f"{key}.rps": r["rps"], f"{key}.p50": r["p50"], f"{key}.p99": r["p99"], f"{key}.errors": r["errors"],
                "_raw": r}
    test_c.__name__ = f"test_{key}"
    return test_c


def test_e(path: Path, tg: Targets, st: Settings) -> dict:
    try:
        port = path.start(tg.nginx_port)
        pids = path.pids()
        idle_kib = rss_kib(pids)
        with RssSampler(path.pids) as sampler:
            r = wrk(port, 1000, "1k", st.wrk_seconds)
    finally:
        path.stop()
    peak = sampler.peak_kib if pids else None
    return {"e.rps": r["rps"], "e.p99": r["p99"], "e.errors": r["errors"],
            "e.rss_mb": peak * 1024 / 1e6 if peak else None, "e.idle_rss_mb": idle_kib * 1024 / 1e6 if pids else None,
            "_raw": {**r, "idle_rss_kib": idle_kib, "peak_rss_kib": peak, "rss_samples": sampler.samples}}


# -- d, f: the load generator ------------------------------------------------------------------------
def test_d(path: Path, tg: Targets, st: Settings) -> dict:
    try:
        port = path.start(tg.echo_port)
        res = subprocess.run([sys.executable, LOADGEN, "conns", str(port), "--count", str(st.d_count),
                              "--concurrency", str(st.d_concurrency), "--timeout", "10", "--max-time", "120"],
                             capture_output=True, text=True, timeout=200)
    finally:
        path.stop()
    if res.returncode != 0:
        raise RuntimeError(f"loadgen exited {res.returncode}: {res.stderr[-1000:]}")
    r = json.loads(res.stdout)
    return {"d.rate": r["rate"], "d.failed": r["failed"], "_raw": r}


class _Lines:
    """Reads JSON lines from a child's stdout with a deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.buf = b""

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"load generator silent for {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"load generator exited ({self.proc.poll()})")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def test_f(path: Path, tg: Targets, st: Settings) -> dict:
    gen = None
    try:
        port = path.start(tg.echo_port)
        time.sleep(0.5)
        pids = path.pids()
        before, pss_before = rss_kib(pids), pss_kib(pids)
        each_before = [rss_kib([pid]) for pid in pids]
        gen = tg.procs.start("loadgen-hold", [
            sys.executable, LOADGEN, "hold", str(port), "--count", str(st.f_count), "--sample", str(st.f_sample),
            "--concurrency", "100", "--timeout", "10", "--open-timeout", str(st.f_open_timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        lines = _Lines(gen.popen)
        opened = lines.read(st.f_open_timeout + 60)
        time.sleep(1.0)  # let the tunnel finish its bookkeeping before reading memory
        pids = path.pids()
        after, pss_after = rss_kib(pids), pss_kib(pids)
        each_after = [rss_kib([pid]) for pid in pids]
        n_procs = len(pids)
        gen.popen.stdin.write(b"\n")  # type: ignore[union-attr]
        gen.popen.stdin.flush()  # type: ignore[union-attr]
        rtt = lines.read(st.f_sample * 10 + 30)
        gen.popen.stdin.write(b"\n")  # type: ignore[union-attr]
        gen.popen.stdin.flush()  # type: ignore[union-attr]
        gen.popen.wait(30)
    finally:
        if gen is not None:
            tg.procs.stop(gen, timeout=5)
        path.stop()
    n = opened["opened"]
    per_conn = (after - before) / n if pids and n else None
    pss_per_conn = (pss_after - pss_before) / n if pids and n else None
    return {"f.open": n, "f.kib_per_conn": per_conn, "f.pss_kib_per_conn": pss_per_conn, "f.rtt_p50": rtt["rtt_p50_ms"], "f.rtt_p99": rtt["rtt_p99_ms"],
            "_raw": {"open": opened, "rtt": rtt, "rss_before_kib": before, "rss_after_kib": after,
                     "pss_before_kib": pss_before, "pss_after_kib": pss_after,
                     "tunnel_processes": n_procs, "rss_kib_each": list(zip(each_before, each_after))}}


# -- i: iperf3 -u ---------------------------------------------------------------------------------------
def parse_iperf_udp(out: str) -> dict:
    """The receiver's side of an `iperf3 -u -J` run: Mbit/s, loss %, jitter ms, datagrams."""
    try:
        data = json.loads(out)
    except ValueError:
        raise RuntimeError(f"iperf3 printed no JSON: {out[-500:]}") from None
    if data.get("error"):
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]
    recv = end.get("sum_received") or end["sum"]  # iperf3 before 3.13(?) has only sum: the server's counts
    return {"mbps": recv["bits_per_second"] / 1e6, "loss": float(recv["lost_percent"]), "jitter": float(recv["jitter_ms"]),
            "lost": recv.get("lost_packets"), "packets": recv.get("packets"),
            "sent_mbps": end.get("sum_sent", end["sum"])["bits_per_second"] / 1e6}


def make_test_i(rate: str):
    key = f"i.{rate}"

    def test_i(path: Path, tg: Targets, st: Settings) -> dict:
        server, target = iperf3_server(tg.procs, tg.ports)
        try:
            port = path.start_udp(target)
            res = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-u", "-b", rate, "-l", str(UDP_LEN),
                                  "-t", str(st.udp_seconds), "-J"],
                                 capture_output=True, text=True, timeout=st.udp_seconds + 60)
        finally:
            path.stop()
            tg.procs.stop(server, timeout=2)
        try:
            r = parse_iperf_udp(res.stdout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} (exit {res.returncode}; {res.stderr[-300:]})") from None
        return {f"{key}.mbps": r["mbps"], f"{key}.loss": r["loss"], f"{key}.jitter": r["jitter"], "_raw": r}
    test_i.__name__ = f"test_{key}"
    return test_i


# -- the list -----------------------------------------------------------------------------------------
# (test id, metric letter, function); the runner keeps only the tests of the requested metrics
TESTS = [
    ("a", "a", test_a),
    ("b", "b", test_b),
    ("c.1k.c10", "c", make_test_c("1k", 10)),
    ("c.1k.c100", "c", make_test_c("1k", 100)),
    ("c.1m.c10", "c", make_test_c("1m", 10)),
    ("c.1m.c100", "c", make_test_c("1m", 100)),
    ("d", "d", test_d),
    ("e", "e", test_e),
    ("f", "f", test_f),
    ("g", "g", test_g),  # only when a is not run (a measures g during its single stream)
    *[(f"i.{rate}", "i", make_test_i(rate)) for rate in UDP_RATES],  # paths that carry UDP only
]
