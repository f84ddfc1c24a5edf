"""Sixteen bulk streams and an interactive one share a shaped link (issue 13, part 2): correctness only.

Two hosts in network namespaces (tests/nshost.py), the link between them shaped with tbf to
40 Mbit/s each way.  Through one agent: 16 bulk streams through one proxy (8 downloads, target ->
client, and 8 uploads, client -> target, each of a fixed size of deterministic data checked byte
by byte at the receiving end: tests/bulkpeer.py) and, through another proxy, an interactive
stream sending a 64-byte numbered message 20 times a second to an echo target, while the bulk
runs.

What must hold, whatever the scheduling: every echo comes back, whole and in order; every bulk
stream delivers all its bytes, none lost, duplicated, reordered or changed; and none is starved:
by the time a direction's streams have moved three quarters of their bytes together, each of them
has moved at least a quarter of its own (a fair share is three quarters; a scheduler that serves
streams one after another has not started the last ones; a busy stream that read on a light
allowance it never spent, while its earlier DATA waited in the bulk lane, left others at 0.00-0.27
of theirs in 5 of 7 runs).  How long the echoes take is the
benchmark's business (`bench/run.py --metrics h`), not asserted here; the figures are printed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

import nshost
from bulkpeer import BulkDown, BulkUp, Interactive
from conftest import wait_for
from nshost import TGT_PORT

pytestmark = pytest.mark.netns

BULKPEER = str(Path(__file__).resolve().parent / "bulkpeer.py")
BULK_PORT = 7001  # the bulk target, on the agent host's loopback
ECHO_PROXY, BULK_PROXY = 8080, 8081
STREAMS = 16  # half down, half up
SIZE = 6 * 1024 * 1024  # bytes per bulk stream: 48 MiB each way, about 11 s at 40 Mbit/s
MIN_SHARE = 0.25  # of its bytes, by the time its direction has moved 3/4 of its bytes
RUN_LIMIT = 25.0  # seconds for all the bulk to arrive
DRAIN = 10.0  # seconds, after the bulk, for the last echoes


@pytest.fixture
def hosts(tmp_path):
    with nshost.two_hosts(tmp_path, f"awq{os.getpid() % 100000}", "10.235.1", heartbeat=2.0,
                          server_args=("--trunk-idle-timeout", "0")) as h:
        h.shape("40mbit")
        target = h.start(h.ns_agt, [sys.executable, "-u", BULKPEER, str(BULK_PORT)], "bulk-target")
        target.wait_log("listening")
        wait_for(lambda: any(a["agent_id"] == "agent-1" for a in h.api("GET", "/v1/agents")["agents"]), 15,
                 what=f"the agent to connect:\n{h.agent.log()}")
        for remote, local in ((ECHO_PROXY, TGT_PORT), (BULK_PROXY, BULK_PORT)):
            h.api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": local,
                                          "remote_port": remote})
        wait_for(lambda: [a["trunks"] for a in h.api("GET", "/v1/agents")["agents"]] == [2], 10, what="both trunks")
        yield h


def moved_when(streams, fraction: float) -> float:
    """The time at which the streams together had first moved `fraction` of all their bytes."""
    events = sorted((t, i, p) for i, s in enumerate(streams) for t, p in s.trace)
    now: dict[int, int] = {}
    total = sum(s.n for s in streams)
    for t, i, p in events:
        now[i] = p
        if sum(now.values()) >= fraction * total:
            return t
    raise AssertionError(f"the streams never moved {fraction} of their bytes together")


def test_sixteen_bulk_streams_and_an_interactive_one_share_a_shaped_link(hosts):
    connect = hosts.connect()
    inter = Interactive(connect("127.0.0.1", ECHO_PROXY, 10), rate=20, size=64, seconds=RUN_LIMIT).start()
    bulk = []
    time.sleep(0.5)  # the interactive stream is open and echoing before the bulk starts
    t0 = time.monotonic()
    try:
        for i in range(STREAMS):
            cls = BulkDown if i % 2 == 0 else BulkUp
            bulk.append(cls(connect("127.0.0.1", BULK_PROXY, 10), seed=i, n=SIZE).start())
        deadline = t0 + RUN_LIMIT
        while time.monotonic() < deadline and not all(s.done for s in bulk):
            time.sleep(0.1)
        took = time.monotonic() - t0
    finally:
        for s in bulk:
            s.join(max(0.0, t0 + RUN_LIMIT - time.monotonic()) + 1)
        inter.finish(timeout=DRAIN)

    # nothing lost, duplicated, reordered or changed; everything arrived
    assert all(s.done for s in bulk), [f"{s.name}: {s.progress} of {s.n}" for s in bulk if not s.done]
    assert [s.error for s in bulk if s.error] == []
    assert [s.progress for s in bulk] == [SIZE] * STREAMS
    assert inter.error is None, inter.error
    assert inter.sent > 0 and inter.echoed == inter.sent, (inter.sent, inter.echoed)

    # nobody starved: when a direction had moved three quarters of its bytes (fair share: three
    # quarters of each stream's; streams served one after another: nothing yet for the last ones),
    # every stream of it had moved at least MIN_SHARE of its own
    least = {}
    for direction, group in (("down", bulk[0::2]), ("up", bulk[1::2])):
        when = moved_when(group, 0.75)
        share, name = least[direction] = min((s.at(when) / s.n, s.name) for s in group)
        assert share >= MIN_SHARE, f"{name} had moved {share:.2f} of its bytes when its direction had moved 0.75"
    first = max(next(t for t, p in s.trace if p) - t0 for s in bulk)
    print(f"\n{STREAMS} bulk streams x {SIZE >> 20} MiB (8 down, 8 up) across a 40 Mbit/s tbf link in {took:.1f} s, every "
          f"byte checked; {inter.echoed} of {inter.sent} interactive echoes back, in order; at three quarters of each "
          f"direction the least advanced stream had moved {least['down'][0]:.2f} (down) and {least['up'][0]:.2f} (up) "
          f"of its bytes (fair: 0.75); the last stream to move began {first:.1f} s after the first")
