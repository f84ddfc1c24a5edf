"""Metric h: does interactive traffic wait behind bulk?  (issue 13, part 2)

Two hosts in network namespaces joined by a veth pair shaped with tbf (40 Mbit/s each way, burst
16 kB, latency 20 ms: `netns.ShapedLink`).  The server host runs the tunnel's server side
(anywhered, sshd) and every client; the agent host runs the agent side (the agent, `ssh -R`) and
the targets: an echo server and a one-off iperf3 server, on all its addresses.  Each path
forwards both targets through one tunnel (Anywhere: two proxies of one agent; ssh -R: two -R
forwards of one ssh connection; direct: the agent host's address across the link).

A cell is (path, direction, N bulk streams), on a freshly started path:
- the interactive probe (`loadgen.py interactive`, on the server host): 64 bytes every 50 ms
  through its own forward to the echo server, each round trip recorded;
- at the same time `iperf3 -P N` through the other forward: ``down`` = `-R`, bulk flows from the
  agent host to the client (target -> client, the direction of a download); ``up`` = client ->
  target.  iperf3 runs `warmup` seconds (`-O`, not counted) then `seconds` measured; the probe
  measures from warmup + 0.5 s for seconds - 1 s, inside iperf3's measured period;
- ``idle``: the probe alone.
While a load cell runs, `ss -tin` is read three times in each namespace (at a quarter, half and
three quarters of the measured period): the sockets' queues (Send-Q, notsent, Recv-Q) are kept in
the raw results and the middle reading summed per side (`queues`), with the packets each tbf
dropped during the cell.

Each round runs every cell on every path (path order rotated per round); figures are medians over
rounds, "x direct" the median of per-round ratios.  The goal (Anywhere's rows under load): echo
p99 <= 1.5 x direct's p99 + 10 ms, and bulk >= 0.95 x direct's throughput.  Every process is
started through `Procs` and ended by pid; the namespaces are deleted on the way out.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path as FsPath

from .netns import ShapedLink
from .paths import PATHS, Context, Path
from .procs import Procs
from .services import Echo, Ports, iperf3_server

LOADGEN = str(FsPath(__file__).resolve().parent / "loadgen.py")
H_PATHS = ["direct", "ssh", "ssh-aes", "anywhere"]  # socat is not a reverse tunnel
H_DEFAULT_PATHS = ["direct", "ssh-aes", "anywhere"]
P99_FACTOR, P99_SLACK, THROUGHPUT_SHARE = 1.5, 10.0, 0.95


@dataclass
class HSettings:
    seconds: float = 12.0  # measured per cell
    warmup: float = 3.0  # bulk runs this long before the measurement
    streams: tuple[int, ...] = (1, 4, 16)
    rate: float = 20.0  # interactive messages per second
    size: int = 64  # bytes per message
    link_rate: str = "40mbit"
    congestion: str | None = None  # TCP congestion control in the namespaces; None: the host's default

    @classmethod
    def quick(cls) -> "HSettings":
        return cls(seconds=6.0, warmup=2.0)

    def cells(self) -> list[tuple[str, int]]:
        return [("idle", 0), *((d, n) for d in ("down", "up") for n in self.streams)]


def cell_name(direction: str, n: int) -> str:
    return "idle" if direction == "idle" else f"{direction} {n}"


@dataclass
class HContext:
    ctx: Context
    link: ShapedLink
    echo_port: int
    st: HSettings

    @property
    def procs(self) -> Procs:
        return self.ctx.procs


# -- ss -----------------------------------------------------------------------------------------------
_SOCK = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)")


def parse_ss(text: str) -> list[dict]:
    """`ss -tin` -> one dict a TCP socket: local, peer, recvq, sendq, notsent (bytes), rtt_ms."""
    out: list[dict] = []
    for line in text.splitlines():
        m = _SOCK.match(line)
        if m and m.group(1) != "State":
            out.append({"local": m.group(4), "peer": m.group(5),
                        "recvq": int(m.group(2)), "sendq": int(m.group(3)), "notsent": 0, "rtt_ms": None})
        elif out and line[:1] in ("\t", " "):
            n = re.search(r"\bnotsent:(\d+)", line)
            if n:
                out[-1]["notsent"] = int(n.group(1))
            rtt = re.search(r"\brtt:([\d.]+)/", line)
            if rtt:
                out[-1]["rtt_ms"] = float(rtt.group(1))
    return out


def queues(snapshot: dict[str, list[dict]], link: ShapedLink, echo_port: int, probe_port: int) -> dict:
    """Per side: bytes in the sockets that cross the link (Send-Q, notsent of it, Recv-Q: on a
    tunnel, its trunks or its ssh connection) and in the local ones; and where the interactive
    stream's bytes wait outside the link: ``echo_unread_agent``, the Recv-Q of the tunnel's socket
    to the echo target (echoes the agent side has not read yet), ``echo_unread_server``, the
    Recv-Q of the tunnel's socket from the probe (requests the server side has not read yet), and
    ``echo_unsent_server``, its Send-Q (echoes not yet taken by the probe)."""
    out: dict = {"echo_unread_agent": 0, "echo_unread_server": 0, "echo_unsent_server": 0}
    for side, socks in snapshot.items():
        for s in socks:
            where = "link" if s["local"].rsplit(":", 1)[0] in link.addr.values() else "local"
            acc = out.setdefault(f"{side}:{where}", {"n": 0, "sendq": 0, "notsent": 0, "recvq": 0})
            acc["n"] += 1
            for k in ("sendq", "notsent", "recvq"):
                acc[k] += s[k]
            if side == "agent" and s["peer"].endswith(f":{echo_port}"):
                out["echo_unread_agent"] += s["recvq"]
            if side == "server" and s["local"].endswith(f":{probe_port}"):
                out["echo_unread_server"] += s["recvq"]
                out["echo_unsent_server"] += s["sendq"]
    return out


def read_ss(link: ShapedLink) -> tuple[dict[str, str], dict[str, list[dict]]]:
    texts = {side: link.ss(side) for side in ("server", "agent")}
    return texts, {side: parse_ss(t) for side, t in texts.items()}


# -- one cell -----------------------------------------------------------------------------------------
def _wait_json(proc, timeout: float, what: str) -> dict:
    try:
        out, _ = proc.popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} did not finish within {timeout:.0f} s") from None
    try:
        return json.loads(out)
    except ValueError:
        raise RuntimeError(f"{what} exited {proc.popen.returncode}: {out[-500:]!r}\n{proc.log_tail()}") from None


def run_cell(h: HContext, path: Path, direction: str, n: int) -> dict:
    """One measurement on a fresh `path`: {p50, p99, max, lost, mbps, retransmits, queues, ...}."""
    st, procs, link = h.st, h.procs, h.link
    bulk = direction != "idle"
    started = []
    drops = {side: link.drops(side) for side in ("server", "agent")}
    try:
        if bulk:
            iperf_srv, iperf_port = iperf3_server(procs, h.ctx.ports, bind=None, prefix=link.cmd("agent", []))
            started.append(iperf_srv)
            echo_port, bulk_port = path.start_forwards([h.echo_port, iperf_port])
        else:
            (echo_port,) = path.start_forwards([h.echo_port])
        host = path.client_host
        t0 = time.monotonic()
        if bulk:
            iperf = procs.start("iperf3-client", link.cmd("server", [
                "iperf3", "-c", host, "-p", str(bulk_port), "-t", f"{st.seconds:g}", "-O", f"{st.warmup:g}",
                "-P", str(n), "-J", *(["-R"] if direction == "down" else [])]), stdout=subprocess.PIPE)
            started.append(iperf)
            skip, measured = st.warmup + 0.5, st.seconds - 1.0
        else:
            skip, measured = 0.5, st.seconds
        probe = procs.start("probe", link.cmd("server", [
            sys.executable, LOADGEN, "interactive", str(echo_port), "--host", host, "--rate", f"{st.rate:g}",
            "--size", str(st.size), "--skip", f"{skip:g}", "--seconds", f"{measured:g}", "--drain", "20"]),
            stdout=subprocess.PIPE)
        started.append(probe)
        samples = []
        for frac in (0.25, 0.5, 0.75) if bulk else ():
            delay = t0 + skip + measured * frac - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            samples.append(read_ss(link))
        r = _wait_json(probe, skip + measured + 40, "the interactive probe")
        res = {"p50": r["rtt_p50_ms"], "p99": r["rtt_p99_ms"], "max": r["rtt_max_ms"], "mean": r["rtt_mean_ms"],
               "lost": r["lost"], "probe_error": r["error"], "rtts_ms": r["rtts_ms"]}
        if bulk:
            d = _wait_json(iperf, st.warmup + st.seconds + 60, "iperf3")
            if d.get("error"):
                raise RuntimeError(f"iperf3: {d['error']}")
            res["mbps"] = d["end"]["sum_received"]["bits_per_second"] / 1e6
            res["retransmits"] = d["end"].get("sum_sent", {}).get("retransmits")
        if samples:
            res["queues"] = queues(samples[1][1], link, h.echo_port, echo_port)
            res["ss"] = [parsed for _, parsed in samples]  # every reading, parsed
            res["ss_text"] = samples[1][0]  # the middle one as ss printed it
        after = {side: link.drops(side) for side in drops}  # packets the full bottleneck dropped in this cell
        res["tbf_drops"] = {side: None if None in (drops[side], after[side]) else after[side] - drops[side] for side in drops}
        return res
    finally:
        for proc in reversed(started):
            procs.stop(proc, timeout=2)
        path.stop()


# -- the run ------------------------------------------------------------------------------------------
def run(procs: Procs, workdir: FsPath, anywhere_env: dict, paths: list[str], rounds: int, st: HSettings,
        anywhere_defaults: bool, progress) -> dict:
    """Every cell on every path, `rounds` times, in fresh namespaces; returns the raw values."""
    workdir.mkdir(exist_ok=True)
    values: list[dict] = []  # per round: {(cell, path): result}
    errors: list[dict] = []
    with ShapedLink(rate=st.link_rate, congestion=st.congestion) as link:
        ctx = Context(procs, Ports(), workdir, anywhere_env, link=link)
        ctx.anywhere_defaults = anywhere_defaults
        meta = {"link": link.describe(), "congestion": link.congestion(), "settings": vars(st) | {"streams": list(st.streams)}}
        try:
            echo = Echo(procs, ctx.ports, bind="0.0.0.0", prefix=link.cmd("agent", []))
            h = HContext(ctx, link, echo.start(), st)
            if "anywhere" in paths:
                ctx.anywhere_creds()
                meta["anywhere_limits"] = ctx.anywhere_config()[1]
            for name in paths:
                if name.startswith("ssh"):
                    meta.setdefault("ssh", {})[name] = ctx.ssh_probe(PATHS[name].cipher)
            progress(f"metric h: {link.describe()}; TCP congestion control {meta['congestion']}")
            for rnd in range(rounds):
                k = rnd % len(paths)
                order = paths[k:] + paths[:k]
                progress(f"\n== metric h, round {rnd + 1}/{rounds}: order {', '.join(order)}; "
                         f"load avg {' '.join(open('/proc/loadavg').read().split()[:3])}")
                got: dict = {}
                for direction, n in st.cells():
                    for name in order:
                        if not echo.proc.alive():
                            raise RuntimeError(f"the echo target died:\n{echo.proc.log_tail()}")
                        t0 = time.monotonic()
                        try:
                            res = run_cell(h, PATHS[name](ctx), direction, n)
                        except Exception as exc:  # one failed cell does not end the run
                            errors.append({"round": rnd + 1, "cell": cell_name(direction, n), "path": name,
                                           "error": f"{type(exc).__name__}: {exc}"})
                            progress(f"  h {cell_name(direction, n):8} {name:9} FAILED: {str(exc)[:800]}")
                            continue
                        got[(cell_name(direction, n), name)] = res
                        q = sum(v for k, v in res.get("queues", {}).items() if k.startswith("echo_"))
                        progress(f"  h {cell_name(direction, n):8} {name:9} echo p50 {res['p50'] or 0:8.1f} ms  "
                                 f"p99 {res['p99'] or 0:8.1f} ms  lost {res['lost']}"
                                 + (f" ({res['probe_error']})" if res["probe_error"] else "")
                                 + (f"  bulk {res['mbps']:5.1f} Mbit/s" if "mbps" in res else "")
                                 + (f"  (echo bytes waiting outside the link: {q})" if q and name != "direct" else "")
                                 + f"  ({time.monotonic() - t0:.1f} s)")
                values.append(got)
        finally:
            procs.stop_all()  # everything in the namespaces ends before they are deleted
    return {"meta": meta, "rounds": values, "errors": errors}


# -- the table ----------------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(result: dict, paths: list[str], st: HSettings) -> list[dict]:
    """One record a (cell, path): medians over rounds, the ratios and, on Anywhere's rows, the goal."""
    rounds = result["rounds"]
    recs = []
    for direction, n in st.cells():
        cell = cell_name(direction, n)
        direct_p99 = _median([r.get((cell, "direct"), {}).get("p99") for r in rounds])
        limit = P99_FACTOR * direct_p99 + P99_SLACK if direct_p99 is not None else None
        for name in paths:
            got = [r[(cell, name)] for r in rounds if (cell, name) in r]
            if not got:
                continue
            rec = {"cell": cell, "direction": direction, "streams": n, "path": name, "rounds": len(got),
                   "p50": _median([g["p50"] for g in got]), "p99": _median([g["p99"] for g in got]),
                   "max": max((g["max"] for g in got if g["max"] is not None), default=None),
                   "lost": sum(g["lost"] for g in got), "mbps": _median([g.get("mbps") for g in got]),
                   "p99_limit": limit}
            ratios = [r[(cell, name)]["mbps"] / r[(cell, "direct")]["mbps"] for r in rounds
                      if (cell, name) in r and (cell, "direct") in r and r[(cell, "direct")].get("mbps")
                      and r[(cell, name)].get("mbps") is not None]
            rec["x_direct"] = _median(ratios)
            rec["p99_vs_limit"] = rec["p99"] / limit if (limit and rec["p99"] is not None) else None
            rec["result"] = None
            if name == "anywhere" and direction != "idle":
                if rec["p99_vs_limit"] is None or rec["x_direct"] is None:
                    rec["result"] = "n/a"
                else:
                    ok = rec["p99_vs_limit"] <= 1.0 and rec["x_direct"] >= THROUGHPUT_SHARE and rec["lost"] == 0
                    rec["result"] = "PASS" if ok else "FAIL"
            recs.append(rec)
    return recs


def table(recs: list[dict], labels: dict[str, str], st: HSettings, rounds: int) -> str:
    def f(v, fmt):
        return "-" if v is None else fmt.format(v)

    header = ["cell", "path", "echo p50", "echo p99", "lost", "bulk Mbit/s", "x direct", "p99 limit", "p99/limit",
              "result"]
    lines, prev = [], None
    for r in recs:
        if prev is not None and r["cell"] != prev:
            lines.append([])
        cell = "" if r["cell"] == prev else (r["cell"] + (" stream" if r["streams"] == 1 else " streams" if r["streams"] else ""))
        prev = r["cell"]
        direct = r["path"] == "direct"
        lines.append([cell, labels.get(r["path"], r["path"]), f(r["p50"], "{:.1f}"), f(r["p99"], "{:.1f}"),
                      str(r["lost"]), f(r["mbps"], "{:.1f}"), "-" if direct else f(r["x_direct"], "{:.2f}"),
                      "-" if direct else f(r["p99_limit"], "{:.1f}"), "-" if direct else f(r["p99_vs_limit"], "{:.2f}"),
                      r["result"] or ""])
    widths = [max(len(header[i]), *(len(l[i]) for l in lines if l)) for i in range(len(header))]
    left = (0, 1, 9)
    fmt = lambda cells: "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [f"h. interactive echo ({st.size} B, {st.rate:g}/s) while iperf3 -P N crosses a {st.link_rate} tbf link "
           f"(down: agent host -> clients, up: clients -> agent host); ms and Mbit/s, medians of {rounds} round(s)",
           fmt(header), "  ".join("-" * w for w in widths)]
    out += [fmt(l) if l else "" for l in lines]
    verdicts = [r["result"] for r in recs if r["result"] in ("PASS", "FAIL")]
    out.append("")
    out.append(f"goal (Anywhere, every load row): echo p99 <= {P99_FACTOR:g} x direct p99 + {P99_SLACK:g} ms (p99 limit), "
               f"bulk >= {THROUGHPUT_SHARE:.2f} x direct, no echo lost: {verdicts.count('PASS')} PASS, "
               f"{verdicts.count('FAIL')} FAIL of {len(verdicts)}")
    return "\n".join(out)


def queue_notes(result: dict, paths: list[str]) -> str:
    """Where the bytes waited, per tunnel and load cell (the last round's middle `ss` reading)."""
    if not result["rounds"]:
        return ""
    last = result["rounds"][-1]
    out = ["where bytes waited at mid-cell (last round; `ss -tin`; KB = 1000 bytes): send-q of the tunnel's "
           "sockets on the link, per side (of it not yet sent); interactive bytes not yet read by the tunnel from "
           "the probe (server side) and from the echo target (agent side), 64 B a message:"]
    for (cell, name), res in last.items():
        if name == "direct" or cell == "idle":
            continue
        q = res["queues"]
        parts = [f"{key.split(':')[0]} send-q {acc['sendq'] / 1e3:.0f} (notsent {acc['notsent'] / 1e3:.0f})"
                 for key, acc in sorted(q.items()) if isinstance(acc, dict) and key.endswith(":link") and acc["sendq"] >= 1000]
        parts.append(f"echo unread: server {q['echo_unread_server']} B, agent {q['echo_unread_agent']} B")
        out.append(f"  {cell:8} {name:9} " + "; ".join(parts))
    return "\n".join(out)
