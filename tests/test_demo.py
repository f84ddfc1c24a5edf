"""`make demo` runs the QuickStart on loopback and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def test_demo_fetches_a_page_through_the_tunnel_and_exits_cleanly():
    before = set(_children(os.getpid()))
    res = subprocess.run([sys.executable, "-m", "anywhere.demo"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "HTTP 200" in res.stdout
    assert "Hello from inside the private network" in res.stdout
    assert "demo OK" in res.stdout
    assert set(_children(os.getpid())) == before  # nothing left running
