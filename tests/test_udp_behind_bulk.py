"""A UDP flow behind bulk downloads on a shaped link (issue 19's UDP on the links of issue 13).

Two hosts in network namespaces (tests/nshost.py), the link between them shaped with tbf to
40 Mbit/s each way.  Through one agent: 8 downloads (target -> client, 6 MiB each, every byte
checked: tests/bulkpeer.py) through one proxy fill the agent's trunk, while a client sends a
64-byte numbered datagram 20 times a second through a UDP proxy to a UDP echo on the agent host.

What must hold: every datagram comes back.  Inside the tunnel nothing is lost, and a light flow
(well under LIGHT_RATE, trunk.py "Scheduling") takes the urgent lane like an interactive stream,
so it is not dropped at the agent's edge for the trunk being full of someone else's bulk.  (It
was: 111 of 160 came back, the rest dropped while the downloads filled the trunk.)  The round trip
is printed, not asserted: that is the benchmark's business.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

import nshost
from bulkpeer import BulkDown
from conftest import wait_for

pytestmark = pytest.mark.netns

BULKPEER = str(Path(__file__).resolve().parent / "bulkpeer.py")
BULK_PORT, UDP_PORT = 7001, 7002  # the targets, on the agent host's loopback
BULK_PROXY, UDP_PROXY = 8081, 8082
DOWNLOADS, SIZE = 8, 6 * 1024 * 1024
COUNT, RATE = 160, 20  # datagrams, a second: 8 s of them while the downloads run
UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""


@pytest.fixture
def hosts(tmp_path):
    with nshost.two_hosts(tmp_path, f"awd{os.getpid() % 100000}", "10.236.1", heartbeat=2.0,
                          server_args=("--trunk-idle-timeout", "0")) as h:
        h.shape("40mbit")
        for args, name in (([BULKPEER, str(BULK_PORT)], "bulk-target"), (["-c", UDP_ECHO, str(UDP_PORT)], "udp-echo")):
            h.start(h.ns_agt, [sys.executable, "-u", *args], name).wait_log("listening")
        wait_for(lambda: any(a["agent_id"] == "agent-1" for a in h.api("GET", "/v1/agents")["agents"]), 15,
                 what=f"the agent to connect:\n{h.agent.log()}")
        for remote, local, protocol in ((BULK_PROXY, BULK_PORT, "tcp"), (UDP_PROXY, UDP_PORT, "udp")):
            h.api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": local,
                                          "remote_port": remote, "protocol": protocol})
        yield h


def test_a_light_udp_flow_loses_nothing_behind_downloads_that_fill_the_trunk(hosts):
    client = nshost.in_netns(hosts.ns_srv, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sent_at: dict[int, float] = {}
    rtts: dict[int, float] = {}
    try:
        client.settimeout(5)
        client.sendto(b"open", ("127.0.0.1", UDP_PROXY))
        assert client.recv(100) == b"open"  # the flow is up before the bulk starts
        connect = hosts.connect()
        downloads = [BulkDown(connect("127.0.0.1", BULK_PROXY, 10), seed=i, n=SIZE).start() for i in range(DOWNLOADS)]
        time.sleep(1.0)  # the downloads fill the trunk

        def receive() -> None:
            client.settimeout(0.5)
            deadline = time.monotonic() + COUNT / RATE + 5
            while len(rtts) < COUNT and time.monotonic() < deadline:
                try:
                    data = client.recv(100)
                except socket.timeout:
                    continue
                seq = int(data[:8])
                rtts[seq] = time.monotonic() - sent_at[seq]
        receiver = threading.Thread(target=receive)
        receiver.start()
        for seq in range(COUNT):
            sent_at[seq] = time.monotonic()
            client.sendto(b"%08d" % seq + b"u" * 56, ("127.0.0.1", UDP_PROXY))
            time.sleep(1 / RATE)
        busy = sum(1 for d in downloads if not d.done)  # still downloading when the last datagram went
        receiver.join(15)
        for d in downloads:
            d.join(40)
    finally:
        client.close()
    assert [d.error for d in downloads if d.error] == [] and [d.progress for d in downloads] == [SIZE] * DOWNLOADS
    assert busy > 0, "the downloads were over before the datagrams: nothing was behind bulk"
    lost = sorted(set(range(COUNT)) - set(rtts))
    times = sorted(rtts.values())
    print(f"\n{len(rtts)} of {COUNT} datagrams back behind {DOWNLOADS} downloads on a 40 Mbit/s link; round trip "
          f"p50 {times[len(times) // 2] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms" if times else "")
    assert not lost, f"{len(lost)} of {COUNT} datagrams never came back (first: {lost[:10]})"
