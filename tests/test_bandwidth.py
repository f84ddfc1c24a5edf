"""Bandwidth limits per proxy (issue 19): `bandwidth = 20mbit`, `--bandwidth`, the API's field.

Unit: the token bucket (shaper.py) on a clock of the test's own, the gates on a real loop, and
the value's check with the exact messages (file, section, key, value).  Integration: a real
anywhered and agent on loopback with iperf3 (a client no one here wrote) as the measure: a proxy
limited to 20 Mbit/s measures within 10% of it each way (normal and -R), a second proxy of the
same agent without a limit measures far above it at the same time, and nothing is lost (every
byte sent is received).  Tests that need iperf3 skip, saying so, where it is absent (`make
system-deps` installs it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from anywhere import config, proxyfile
from anywhere.errors import ConfigError, Invalid
from anywhere.loop import Loop
from anywhere.server.proxies import validate_proxy
from anywhere.shaper import MIN_BURST, Gate, TokenBucket, burst_for

from conftest import TargetServer, free_port, wait_for

SERVER = "anywhere.server_cli"

IPERF3 = shutil.which("iperf3") or ("/usr/bin/iperf3" if os.path.exists("/usr/bin/iperf3") else None)
need_iperf3 = pytest.mark.skipif(IPERF3 is None, reason="iperf3 is not installed (make system-deps installs it)")
LIMIT = 20_000_000  # bits a second
SECONDS = 4


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the token bucket ---------------------------------------------------------------------------------------
def test_a_bucket_starts_full_accrues_at_its_rate_and_holds_at_most_its_burst():
    clock = Clock()
    bucket = TokenBucket(2_500_000, clock)  # 20 Mbit/s
    assert bucket.burst == burst_for(2_500_000) == 125_000  # 50 ms of the rate
    assert bucket.available() == 125_000
    bucket.spend(125_000)
    assert bucket.available() == 0
    clock.now += 0.01
    assert bucket.available() == pytest.approx(25_000, abs=1)
    clock.now += 10  # idle for long: no more than the burst
    assert bucket.available() == 125_000


def test_a_slow_bucket_still_holds_a_tls_records_worth():
    bucket = TokenBucket(1000, Clock())  # 8 kbit/s
    assert bucket.burst == MIN_BURST == 16 * 1024


def test_spending_past_zero_is_owed_before_anything_passes_again():
    clock = Clock()
    bucket = TokenBucket(1_000_000, clock)
    bucket.spend(bucket.burst + 30_000)
    assert bucket.available() == 0
    assert bucket.delay(10_000) == pytest.approx(0.04)  # 30,000 owed, then 10,000
    clock.now += 0.029
    assert bucket.available() == 0  # still 1,000 owed
    clock.now += 0.002
    assert bucket.available() == pytest.approx(1000, abs=1)


def test_a_new_rate_applies_at_once_and_caps_what_is_saved():
    clock = Clock()
    bucket = TokenBucket(10_000_000, clock)
    bucket.set_rate(100_000)
    assert bucket.burst == MIN_BURST and bucket.available() == MIN_BURST
    bucket.spend(MIN_BURST)
    clock.now += 0.1
    assert bucket.available() == pytest.approx(10_000, abs=1)
    with pytest.raises(ValueError):
        bucket.set_rate(0)


def test_a_gate_keeps_one_timer_and_resumes_its_streams_in_turn():
    loop = Loop()
    try:
        gate = Gate(loop, 1_000_000, "test")
        gate.spend(gate.bucket.burst)
        order: list[str] = []

        def waiter(name: str):
            def resume() -> None:
                order.append(name)
                gate.spend(4000)  # each takes a wake's worth: the next one waits for more
            return resume
        a, b, c = waiter("a"), waiter("b"), waiter("c")
        for w in (a, b, c, a):
            gate.wait(w)
        assert list(gate.waiting) == [a, b, c] and gate.timer is not None
        timer = gate.timer
        gate.wait(b)
        assert gate.timer is timer  # one timer, however many wait
        gate.leave(c)  # a stream that closes leaves
        wait_for(lambda: (loop.run_once(0.01), len(order) >= 2)[1], 5, interval=0)
        assert order[:2] == ["a", "b"]
        assert not gate.waiting or gate.timer is not None
        released = gate.release()
        assert gate.timer is None and gate.waiting == {} and set(released) <= {a, b}
    finally:
        loop.close()


def test_a_gate_grants_a_wakes_worth_or_all_that_is_wanted_never_a_trickle():
    loop = Loop()
    try:
        gate = Gate(loop, 2_500_000, "test")  # 20 Mbit/s: wake 12,500 bytes, burst 125,000
        clock = Clock()
        gate.bucket.clock, gate.bucket.stamp = clock, clock()
        assert gate.grant() == gate.bucket.burst == 125_000
        gate.spend(125_000)
        clock.now += 0.001  # 2,500 tokens: fewer than a wake's worth
        assert gate.available() == 2500 and gate.grant() == 0 and gate.grant(want=3000) == 0
        assert gate.grant(want=100) == 2500  # a small remainder goes at once
        clock.now += 0.004
        assert gate.grant() == gate.wake == 12_500
    finally:
        loop.close()


# -- the value: file, flag and API -----------------------------------------------------------------------
@pytest.mark.parametrize("text, bits", [("10mbit", 10_000_000), ("1.5gbit", 1_500_000_000), ("500kbit", 500_000),
                                        ("20 Mbit", 20_000_000), ("100gbit", 100 * 10**9), ("8kbit", 8000),
                                        ("0", 0), ("off", 0), ("", 0)])
def test_rates_accepted(text, bits):
    assert config.check_bandwidth(text) == bits


@pytest.mark.parametrize("text", ["10", "10mbps", "10MB", "-1mbit", "0.5kbit", "200gbit", "1e3kbit", "mbit",
                                  "1.0000000001gbit", "ten mbit"])
def test_rates_refused(text):
    with pytest.raises(config.ValidateError, match="must be a rate with a unit kbit, mbit or gbit"):
        config.check_bandwidth(text)


def test_a_bad_value_in_a_file_names_file_section_key_and_value(tmp_path):
    path = tmp_path / "web.conf"
    path.write_text("[web]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 80\nremote_port = 8080\n"
                    "bandwidth = 10mbps\n\n[db]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 5432\n"
                    "remote_port = 5432\nbandwidth = -2mbit\n")
    with pytest.raises(ConfigError) as err:
        config.read(str(path), proxyfile.PROXY_SPEC)
    expected = ("must be a rate with a unit kbit, mbit or gbit (powers of 1000, e.g. 10mbit, 1.5gbit), "
                "8kbit..100gbit, or 0/off: unlimited")
    assert f"{path} [web] bandwidth = 10mbps: {expected}" in err.value.problems
    assert f"{path} [db] bandwidth = -2mbit: {expected}" in err.value.problems


def test_a_file_renders_and_reads_back_the_same_limit(tmp_path):
    path = tmp_path / "x.conf"
    path.write_text("[web]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 80\nremote_port = 8080\n"
                    "bandwidth = 1.5gbit\n\n[free]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 81\n"
                    "remote_port = 8081\n")
    sections = config.read(str(path), proxyfile.PROXY_SPEC)
    api = [proxyfile.to_api(name, values) for name, values in sections.items()]
    assert [p["bandwidth"] for p in api] == [1_500_000_000, 0]
    text = proxyfile.render(api)
    assert "bandwidth = 1500mbit" in text and text.count("bandwidth") == 1
    path.write_text(text)
    assert [proxyfile.to_api(n, v)["bandwidth"] for n, v in config.read(str(path), proxyfile.PROXY_SPEC).items()] == \
        [1_500_000_000, 0]


def test_the_api_takes_bits_or_a_rate_and_stores_the_field_only_when_set():
    base = {"agent_id": "a", "local_ip": "127.0.0.1", "local_port": 80, "remote_port": 8080}
    assert validate_proxy(dict(base, bandwidth=20_000_000)).to_dict()["bandwidth"] == 20_000_000
    assert validate_proxy(dict(base, bandwidth="20mbit")).bandwidth == 20_000_000
    assert "bandwidth" not in validate_proxy(base).to_dict()  # the form older versions read
    assert "bandwidth" not in validate_proxy(dict(base, bandwidth=0)).to_dict()
    for bad in (-1, 7999, 10**12, "10mbps", True, 1.5, [1]):
        with pytest.raises(Invalid, match=r"^bandwidth .* must be bits a second 8000\.\.100000000000"):
            validate_proxy(dict(base, bandwidth=bad))


# -- iperf3 through the tunnel ---------------------------------------------------------------------------
def iperf3_server(port: int) -> subprocess.Popen:
    return subprocess.Popen([IPERF3, "-s", "-B", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def iperf3(port: int, reverse: bool = False, seconds: int = SECONDS, parallel: int = 1) -> dict:
    args = [IPERF3, "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J", "-P", str(parallel)] + \
        (["-R"] if reverse else [])
    res = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    assert res.returncode == 0, f"iperf3 {' '.join(args[1:])} failed: {res.stdout[-2000:]} {res.stderr[-2000:]}"
    end = json.loads(res.stdout)["end"]
    return {"sent": end["sum_sent"]["bytes"], "received": end["sum_received"]["bytes"],
            "bps": end["sum_received"]["bits_per_second"]}


@pytest.fixture
def iperf_targets():
    ports = [free_port(), free_port()]
    servers = [iperf3_server(p) for p in ports]
    yield ports
    for proc in servers:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def measure_both(limited: int, free: int, reverse: bool, parallel: int) -> tuple[dict, dict]:
    """iperf3 through both proxies at the same time."""
    out: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda k=k, p=p: out.__setitem__(k, iperf3(p, reverse, parallel=parallel)))
               for k, p in (("limited", limited), ("free", free))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 90)
    assert set(out) == {"limited", "free"}, "an iperf3 run did not finish"
    return out["limited"], out["free"]


@need_iperf3
@pytest.mark.parametrize("reverse, parallel", [(False, 1), (True, 1), (False, 4), (True, 4)],
                         ids=["client-to-target", "target-to-client", "4-connections", "4-connections-reverse"])
def test_a_limited_proxy_measures_its_limit_and_another_of_the_same_agent_is_unaffected(world, iperf_targets, reverse,
                                                                                          parallel):
    """Four connections at once share the limit: it is the proxy's, not each connection's."""
    world.start_server()
    world.start_agent("agent-1")
    limited_port, free_port_ = free_port(), free_port()
    os.makedirs(world.proxies_dir, exist_ok=True)
    with open(os.path.join(world.proxies_dir, "limited.conf"), "w") as f:
        f.write(f"[limited]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = {iperf_targets[0]}\n"
                f"remote_port = {limited_port}\nbandwidth = 20mbit\n")
    world.ctl("reload", "--admin-socket", world.sock)
    world.ctl("proxy", "add", "--admin-socket", world.sock, "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
              "--local-port", str(iperf_targets[1]), "--remote-port", str(free_port_), "--name", "free")
    proxies = {p["name"]: p for p in world.api("GET", "/v1/proxies")["proxies"]}
    assert proxies["limited"]["bandwidth"] == LIMIT and proxies["free"]["bandwidth"] == 0

    limited, free = measure_both(limited_port, free_port_, reverse, parallel)
    print(f"\n-P {parallel} {'-R ' if reverse else ''}limited: {limited['bps'] / 1e6:.2f} Mbit/s, free: {free['bps'] / 1e6:.1f} "
          f"Mbit/s")
    assert LIMIT * 0.9 <= limited["bps"] <= LIMIT * 1.1, limited
    assert free["bps"] >= 5 * LIMIT, free  # far above the limit, at the same time


def test_nothing_is_lost_under_the_limit_either_way(world, echo_target):
    """iperf3's own counts cannot say it (its sender counts what its kernel took, and megabytes of
    socket buffers are still queued when the test ends): 3 MB echoed through a 20 Mbit/s proxy
    come back whole and in order, about 1.2 s each way, the two ways at once."""
    world.start_server()
    world.start_agent("agent-1")
    port = free_port()
    world.api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": echo_target.port,
                                      "remote_port": port, "bandwidth": "20mbit"})
    data = os.urandom(3_000_000)
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        sender = threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)))
        started = time.monotonic()
        sender.start()
        while chunk := c.recv(65536):
            got += chunk
        took = time.monotonic() - started
        sender.join(30)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest() and len(got) == len(data)
    assert took >= len(data) * 8 / LIMIT * 0.8, f"{took:.2f} s: not limited"


def test_a_limited_stream_moves_its_data_in_chunks_not_a_trickle(world):
    """Tokens accrue a few bytes a microsecond: a stream that read (or wrote) each few as they came
    moved its data in tens of bytes a record and, with the CPU gone into it, ran 15% below its
    rate.  2 MB each way through a 20 Mbit/s proxy reach the other side in reads of kilobytes."""
    size = 2_000_000
    reads: list[int] = []

    def sink_then_send(conn: socket.socket) -> None:
        got = 0
        while chunk := conn.recv(1 << 20):
            got += len(chunk)
            reads.append(len(chunk))
        conn.sendall(b"y" * got)
        conn.close()
    target = TargetServer(sink_then_send)
    try:
        world.start_server()
        world.start_agent("agent-1")
        port = free_port()
        world.api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": target.port,
                                          "remote_port": port, "bandwidth": "20mbit"})
        back: list[int] = []
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.sendall(b"x" * size)
            c.shutdown(socket.SHUT_WR)
            while chunk := c.recv(1 << 20):
                back.append(len(chunk))
    finally:
        target.stop()
    assert sum(reads) == size and sum(back) == size
    print(f"\nclient to target: {len(reads)} reads, target to client: {len(back)}")
    assert len(reads) <= size / 2000, f"client to target: {len(reads)} reads of {size // len(reads)} bytes on average"
    assert len(back) <= size / 2000, f"target to client: {len(back)} reads of {size // len(back)} bytes on average"


def echo_through(sock: socket.socket, size: int) -> float:
    """Send `size` random bytes on a live connection to the echo target, read them back (checked);
    the seconds it took."""
    data = os.urandom(size)
    got = bytearray()
    started = time.monotonic()
    sender = threading.Thread(target=sock.sendall, args=(data,))
    sender.start()
    while len(got) < size:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed"
        got += chunk
    sender.join(30)
    assert bytes(got) == data
    return time.monotonic() - started


def test_a_reload_applies_a_new_limit_to_the_live_connections_in_place(world, echo_target):
    world.start_server()
    world.start_agent("agent-1")
    port = free_port()
    path = os.path.join(world.proxies_dir, "web.conf")
    os.makedirs(world.proxies_dir, exist_ok=True)

    def declare(extra: str) -> None:
        with open(path, "w") as f:
            f.write(f"[web]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = {echo_target.port}\n"
                    f"remote_port = {port}\n{extra}")
        world.ctl("reload", "--admin-socket", world.sock)
    declare("")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        assert echo_through(c, 4_000_000) < 2.0  # unlimited (loopback: well under a second)
        declare("bandwidth = 8mbit\n")  # 1 MB/s each way, for this live connection too
        assert "proxy web changed" in world.server.log() and "bandwidth - → 8000000" in world.server.log()
        took = echo_through(c, 1_500_000)
        assert took >= 1.2, f"{took:.2f} s for 1.5 MB at 8 Mbit/s"
        declare("bandwidth = 80mbit\n")  # the same limit, at a new rate
        took = echo_through(c, 4_000_000)
        assert 0.3 <= took <= 1.5, f"{took:.2f} s for 4 MB at 80 Mbit/s"
        declare("")  # the limit goes: the connection is free again
        assert echo_through(c, 4_000_000) < 2.0
    listed = world.ctl("proxy", "list", "--admin-socket", world.sock).stdout
    assert "BANDWIDTH" in listed


def test_the_limit_is_stored_listed_and_exported_and_anywhered_takes_the_flag_too(world):
    world.start_server()
    world.ctl("proxy", "add", "--admin-socket", world.sock, "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
              "--local-port", "80", "--remote-port", str(free_port()), "--name", "web", "--bandwidth", "1.5gbit",
              prog=SERVER)
    added = world.ctl("proxy", "add", "--admin-socket", world.sock, "--agent-id", "agent-1", "--local-ip",
                      "127.0.0.1", "--local-port", "81", "--remote-port", str(free_port()), "--name", "free").stdout
    assert "bandwidth" not in added
    res = world.ctl("proxy", "add", "--admin-socket", world.sock, "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
                    "--local-port", "82", "--remote-port", str(free_port()), "--bandwidth", "10", check=False)
    assert res.returncode != 0 and "argument --bandwidth: 10: must be a rate with a unit kbit, mbit or gbit" in res.stderr
    world.server.stop()
    with open(os.path.join(world.state_dir, "proxies.json")) as f:
        stored = {p["name"]: p for p in json.load(f)["proxies"]}
    assert stored["web"]["bandwidth"] == 1_500_000_000 and "bandwidth" not in stored["free"]
    world.start_server()
    listed = {p["name"]: p for p in world.api("GET", "/v1/proxies")["proxies"]}
    assert listed["web"]["bandwidth"] == 1_500_000_000 and listed["free"]["bandwidth"] == 0
    table = world.ctl("proxy", "list", "--admin-socket", world.sock).stdout
    assert "BANDWIDTH" in table and "1500mbit" in table
    exported = world.ctl("proxy", "export", "--admin-socket", world.sock).stdout
    assert exported.count("bandwidth = ") == 1 and "bandwidth = 1500mbit" in exported
