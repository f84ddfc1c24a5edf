"""`make demo` runs the QuickStart on loopback and leaves no process behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def _procs_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_demo_fetches_a_page_through_the_tunnel_and_exits_cleanly():
    res = subprocess.run([sys.executable, "-m", "anywhere.demo"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "HTTP 200" in res.stdout
    assert "Hello from inside the private network" in res.stdout
    assert "demo OK" in res.stdout
    tmp = re.search(r"credentials in (\S+)/credential", res.stdout).group(1)
    assert not os.path.exists(tmp)  # its temporary directory is gone
    assert _procs_mentioning(tmp) == []  # and no server or agent is left running
