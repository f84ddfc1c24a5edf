"""Aggregation and the printed table.

For every (metric, path): the median over rounds, the ratio to direct (computed per round, then
the median of those ratios), and the spread, (max - min) / median in percent.  Anywhere's rows
carry the target and PASS/FAIL (medians; "ahead of ssh" compares medians of the same metric).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

from .metrics import UDP_RATES


@dataclass
class Row:
    key: str
    label: str
    unit: str
    fmt: str = "{:.2f}"
    ratio: bool = True  # show the ratio to direct


ROWS = [
    Row("a.gbps", "a. 1 stream", "Gbit/s"),
    Row("b.gbps", "b. 8 streams", "Gbit/s"),
    *[r for size, name in (("1k", "1KiB"), ("1m", "1MiB")) for c in (10, 100) for r in (
        Row(f"c.{size}.c{c}.rps", f"c. {name} c{c}", "req/s", "{:.0f}"),
        Row(f"c.{size}.c{c}.p50", f"c. {name} c{c} p50", "ms", "{:.3f}"),
        Row(f"c.{size}.c{c}.p99", f"c. {name} c{c} p99", "ms", "{:.3f}"))],
    Row("d.rate", "d. new conns", "conn/s", "{:.0f}"),
    Row("d.failed", "d. failed conns", "count", "{:.0f}", ratio=False),
    Row("e.rps", "e. 1KiB c1000", "req/s", "{:.0f}"),
    Row("e.p99", "e. 1KiB c1000 p99", "ms", "{:.2f}"),
    Row("e.rss_mb", "e. peak RSS", "MB", "{:.1f}", ratio=False),
    Row("f.open", "f. conns held", "count", "{:.0f}", ratio=False),
    Row("f.kib_per_conn", "f. memory/conn", "KiB", "{:.2f}", ratio=False),
    Row("f.rtt_p50", "f. echo p50", "ms", "{:.3f}"),
    Row("f.rtt_p99", "f. echo p99", "ms", "{:.3f}"),
    Row("g.cpu_s_per_gb", "g. CPU per GB", "s/GB", "{:.3f}", ratio=False),
    *[r for rate in UDP_RATES for r in (
        Row(f"i.{rate}.mbps", f"i. UDP {rate} received", "Mbit/s"),
        Row(f"i.{rate}.loss", f"i. UDP {rate} loss", "%", "{:.2f}", ratio=False),
        Row(f"i.{rate}.jitter", f"i. UDP {rate} jitter", "ms", "{:.3f}", ratio=False))],
]

SSH_PATHS = ("ssh", "ssh-aes")


@dataclass
class Stat:
    values: list[float]
    median: float | None
    ratio: float | None
    spread: float | None
    worst: float | None  # max over rounds (for counts of failures)


def aggregate(rounds: list[dict], paths: list[str]) -> dict[tuple[str, str], Stat]:
    out: dict[tuple[str, str], Stat] = {}
    keys = {k for r in rounds for p in r.values() for k in p if not k.startswith("_")}
    for key in keys:
        for path in paths:
            vals, ratios = [], []
            for r in rounds:
                v = r.get(path, {}).get(key)
                if v is None:
                    continue
                vals.append(float(v))
                d = r.get("direct", {}).get(key)
                if d:
                    ratios.append(float(v) / float(d))
            if not vals:
                continue
            med = statistics.median(vals)
            spread = (max(vals) - min(vals)) / med * 100 if med else (0.0 if max(vals) == min(vals) else None)
            out[(key, path)] = Stat(vals, med, statistics.median(ratios) if ratios else None, spread, max(vals))
    return out


# -- targets ------------------------------------------------------------------------------------------
def _med(stats, key, path):
    s = stats.get((key, path))
    return s.median if s else None


def _best_ssh(stats, key):
    vals = [v for v in (_med(stats, key, p) for p in SSH_PATHS) if v is not None]
    return max(vals) if vals else None


def targets(stats: dict, f_count: int) -> dict[str, tuple[str, Callable[[], tuple[bool | None, str]]]]:
    """metric key -> (target text, check() -> (pass or None if not measurable, note))."""
    def st(key):
        return stats.get((key, "anywhere"))

    def ratio_at_least(key, x, extra=None):
        def check():
            s = st(key)
            if s is None or s.ratio is None:
                return None, "no direct to compare"
            ok, notes = s.ratio >= x, []
            if extra:
                ok2, note = extra(s)
                notes.append(note)
                if ok2 is not None:
                    ok = ok and ok2
            return ok, "; ".join(n for n in notes if n)
        return check

    def ahead_of(key, ref_paths, label):
        def extra(s):
            refs = [v for v in (_med(stats, key, p) for p in ref_paths) if v is not None]
            if not refs:
                return None, f"{label} not run"
            return s.median > max(refs), f"{s.median / max(refs):.2f}x {label}"
        return extra

    def times_ssh(key):
        def extra(s):
            ref = _best_ssh(stats, key)
            return (None, f"{s.median / ref:.1f}x best ssh -R") if ref else (None, "")
        return extra

    def at_most(key, limit, use_worst=False):
        def check():
            s = st(key)
            if s is None:
                return None, "not measured"
            v = s.worst if use_worst else s.median
            return v <= limit, f"max over rounds {v:.0f}" if use_worst else ""
        return check

    def cpu_vs_ssh():
        s = st("g.cpu_s_per_gb")
        ref = _med(stats, "g.cpu_s_per_gb", "ssh-aes")
        if s is None:
            return None, "not measured"
        if ref is None:
            return None, "ssh-aes not run"
        return s.median <= ref, f"{s.median / ref:.2f}x ssh-aes"

    def held_all():
        s = st("f.open")
        if s is None:
            return None, "not measured"
        return min(s.values) >= f_count, f"of {f_count}"

    return {
        "a.gbps": (">=0.40x, > ssh-aes", ratio_at_least("a.gbps", 0.40, ahead_of("a.gbps", ["ssh-aes"], "ssh-aes"))),
        "b.gbps": (">=0.30x", ratio_at_least("b.gbps", 0.30)),
        "c.1k.c10.rps": (">=0.30x", ratio_at_least("c.1k.c10.rps", 0.30, times_ssh("c.1k.c10.rps"))),
        "c.1k.c100.rps": (">=0.30x", ratio_at_least("c.1k.c100.rps", 0.30, times_ssh("c.1k.c100.rps"))),
        "c.1k.c10.p99": ("<=2 ms", at_most("c.1k.c10.p99", 2.0)),
        "c.1m.c10.rps": (">=0.35x", ratio_at_least("c.1m.c10.rps", 0.35)),
        "c.1m.c100.rps": (">=0.35x", ratio_at_least("c.1m.c100.rps", 0.35)),
        "d.rate": (">=0.30x, > ssh -R", ratio_at_least("d.rate", 0.30, ahead_of("d.rate", SSH_PATHS, "best ssh"))),
        "d.failed": ("0 in every round", at_most("d.failed", 0, use_worst=True)),
        "e.rps": (">=0.45x", ratio_at_least("e.rps", 0.45)),
        "e.p99": ("<=100 ms", at_most("e.p99", 100.0)),
        "e.rss_mb": ("<=80 MB", at_most("e.rss_mb", 80.0)),
        "f.open": (f"all {f_count}", held_all),
        "f.kib_per_conn": ("<=16 KiB", at_most("f.kib_per_conn", 16.0)),
        "f.rtt_p99": ("<=50 ms", at_most("f.rtt_p99", 50.0)),
        "g.cpu_s_per_gb": ("<= ssh-aes", cpu_vs_ssh),
    }


# -- the table ----------------------------------------------------------------------------------------
def table(stats: dict, paths: list[str], labels: dict[str, str], f_count: int, rounds: list[dict],
          n_rounds: int) -> tuple[str, list[dict]]:
    tg = targets(stats, f_count)
    header = ["metric", "path", "median", "unit", "x direct", "spread", "target", "result", "notes"]
    lines: list[list[str]] = []
    records: list[dict] = []
    passed = failed = 0
    for row in ROWS:
        group = []
        for path in paths:
            s = stats.get((row.key, path))
            if s is None:
                continue
            ratio = f"{s.ratio:.2f}" if (row.ratio and s.ratio is not None) else "-"
            spread = f"{s.spread:.0f}%" if s.spread is not None and len(s.values) > 1 else "-"
            target, result, note = "", "", ""
            if path == "anywhere" and row.key in tg:
                target, check = tg[row.key]
                ok, note = check()
                result = "n/a" if ok is None else ("PASS" if ok else "FAIL")
                passed += ok is True
                failed += ok is False
            errs = _errors_note(row.key, path, rounds)
            if row.key == "f.kib_per_conn":
                pss = stats.get(("f.pss_kib_per_conn", path))
                if pss is not None and pss.median and s.median > 1.5 * pss.median:
                    errs = f"PSS {pss.median:.1f} KiB/conn (RSS counts shared pages per process)"
            if row.key == "e.rss_mb" and path == "socat":
                errs = "a process per connection; RSS counts shared pages in each"
            elif row.key == "e.rss_mb":
                idle = stats.get(("e.idle_rss_mb", path))
                errs = f"idle before wrk {idle.median:.1f} MB" if idle else ""
            if len(s.values) < n_rounds:
                errs = "; ".join(n for n in (errs, f"{len(s.values)} of {n_rounds} rounds") if n)
            note = "; ".join(n for n in (note, errs) if n)
            group.append([row.label, labels.get(path, path), row.fmt.format(s.median), row.unit, ratio, spread,
                          target, result, note])
            records.append({"metric": row.key, "path": path, "median": s.median, "unit": row.unit,
                            "ratio_to_direct": s.ratio if row.ratio else None, "spread_pct": s.spread,
                            "values": s.values, "target": target or None, "result": result or None, "notes": note})
        if group:
            lines.extend(group)
            lines.append([])
    widths = [max(len(header[i]), *(len(l[i]) for l in lines if l)) for i in range(len(header))] if lines else []
    out = []
    if widths:
        fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 3, 6, 7, 8) else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        out.append(fmt(header))
        out.append("  ".join("-" * w for w in widths))
        for l in lines[:-1]:
            out.append(fmt(l) if l else "")
    out.append("")
    out.append(f"Anywhere targets: {passed} PASS, {failed} FAIL"
               + (f" (of {passed + failed} measured)" if passed + failed else ""))
    return "\n".join(out), records


def _errors_note(key: str, path: str, rounds: list[dict]) -> str:
    """wrk errors (socket errors + non-2xx) for request-rate rows, the worst round."""
    if key.endswith(".rps"):
        ekey = key[:-4] + ".errors"
        errs = [r.get(path, {}).get(ekey) for r in rounds]
        worst = max((e for e in errs if e is not None), default=0)
        return f"wrk errors {worst:.0f}" if worst else ""
    if key == "d.rate":
        failed = [r.get(path, {}).get("d.failed") for r in rounds]
        worst = max((e for e in failed if e is not None), default=0)
        return f"{worst:.0f} failed" if worst else ""
    return ""
