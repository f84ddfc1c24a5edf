"""UDP proxies (issue 19): real clients (dig and a DNS client over UDP sockets) through the tunnel
to dnsmasq, a UDP echo target for large datagrams and many flows, idle flows ending on both sides,
the whitelist per datagram, max_flows, and the keys, flags and API fields with bad values."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from anywhere.common import CtlError as ApiError
from conftest import free_udp_port, log_lines, wait_for

DNSMASQ = shutil.which("dnsmasq") or next((p for p in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq") if os.path.exists(p)), None)
DIG = shutil.which("dig")
SERVER = "anywhere.server_cli"


@pytest.fixture
def dnsmasq(tmp_path):
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed (make system-deps installs dnsmasq-base)")
    port = free_udp_port()
    pid_file = tmp_path / "dnsmasq.pid"
    proc = subprocess.Popen([DNSMASQ, "--no-daemon", f"--port={port}", "--listen-address=127.0.0.1",
                             "--bind-interfaces", "--no-resolv", "--no-hosts", "--address=/example.test/192.0.2.1",
                             f"--pid-file={pid_file}", "--conf-file=/dev/null", "--cache-size=0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _dns_ask(port, 1) is not None or proc.poll() is not None, 10, what="dnsmasq to answer")
        if proc.poll() is not None:
            pytest.skip(f"dnsmasq could not start: {proc.stderr.read().decode(errors='replace')[-500:]}")
        yield port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def dns_query(qid: int, name: str = "example.test") -> bytes:
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)


def dns_answer_ip(reply: bytes) -> str | None:
    """The first A record of a reply (enough for dnsmasq's answer to one question)."""
    if len(reply) < 12 or struct.unpack("!H", reply[6:8])[0] < 1:
        return None
    return socket.inet_ntoa(reply[-4:])


def _dns_ask(port: int, qid: int, sock: socket.socket | None = None, timeout: float = 1.0) -> bytes | None:
    own = sock is None
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        sock.sendto(dns_query(qid), ("127.0.0.1", port))
        while True:
            reply, _ = sock.recvfrom(4096)
            if reply[:2] == struct.pack("!H", qid):
                return reply
    except OSError:
        return None
    finally:
        if own:
            sock.close()


def udp_proxy(world, local_port: int, **fields) -> int:
    remote = free_udp_port()
    body = {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": local_port, "remote_port": remote,
            "protocol": "udp", **fields}
    world.api("POST", "/v1/proxies", body)
    return remote


def udp_conns(world) -> list[dict]:
    return [c for c in world.api("GET", "/v1/connections")["connections"] if c.get("protocol") == "udp"]


def test_a_thousand_dig_queries_through_the_tunnel_all_answered(world, dnsmasq, tmp_path):
    """dig asks 1,000 times (batch mode: each query from a socket of its own, so a flow each) and
    gets 1,000 answers, none asked again (+tries=1: the tunnel loses nothing on loopback); then 10
    clients of our own ask 20 times each on one socket each: 10 flows, counted both ways."""
    if DIG is None:
        pytest.skip("dig is not installed (make system-deps installs bind9-dnsutils)")
    world.start_server()
    world.start_agent()
    remote = udp_proxy(world, dnsmasq)
    queries = tmp_path / "queries"
    queries.write_text("example.test\n" * 1000)
    res = subprocess.run([DIG, "@127.0.0.1", "-p", str(remote), "-f", str(queries), "+short", "+tries=1",
                          "+time=5"], capture_output=True, text=True, timeout=120)
    answers = res.stdout.split()
    assert answers.count("192.0.2.1") == 1000, f"{answers.count('192.0.2.1')} of 1000 answered: {res.stdout[-500:]}"
    dig_flows = len(udp_conns(world))
    assert dig_flows >= 1

    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(10)]
    answered, deadline = 0, time.monotonic() + 60
    try:
        for i in range(200):
            if time.monotonic() > deadline:
                break
            reply = _dns_ask(remote, i + 1, socks[i % 10], timeout=2.0)
            if reply is not None and dns_answer_ip(reply) == "192.0.2.1":
                answered += 1
        ports = {s.getsockname()[1] for s in socks}
    finally:
        for s in socks:
            s.close()
    assert answered == 200
    ours = [f for f in udp_conns(world) if int(f["source"].rsplit(":", 1)[1]) in ports]
    assert len(ours) == 10 and all(f["bytes_in"] > 0 and f["bytes_out"] > 0 for f in ours), ours
    listed = world.ctl("conn", "list", "--admin-socket", world.sock).stdout
    assert "udp" in listed


def test_a_large_datagram_arrives_whole_and_many_flows_end_when_idle(world, udp_echo):
    world.start_server()
    agent = world.start_agent()
    remote = udp_proxy(world, udp_echo.port, udp_idle_timeout=2)
    big = bytes(range(256)) * 31 + b"end" + b"\x07" * (8000 - 256 * 31 - 3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(big, ("127.0.0.1", remote))
        reply, _ = s.recvfrom(65535)
        assert reply == big
    # 200 flows from different source ports at once
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]
    try:
        for i, s in enumerate(socks):
            s.sendto(b"flow %d" % i, ("127.0.0.1", remote))
        for i, s in enumerate(socks):
            s.settimeout(10)
            assert s.recvfrom(100)[0] == b"flow %d" % i
        assert len(udp_conns(world)) == 201
    finally:
        for s in socks:
            s.close()
    assert len(udp_echo.sources) == 201  # one socket of the agent per flow
    # idle for udp_idle_timeout = 2: gone from conn list, and the agent's sockets closed too
    wait_for(lambda: not udp_conns(world), 10, what="idle flows to end")
    wait_for(lambda: len(log_lines(agent, "udp flow", "ended")) >= 201, 10, what="the agent to end its flows")
    proxy = next(p for p in world.api("GET", "/v1/proxies")["proxies"] if p["remote_port"] == remote)
    assert proxy["protocol"] == "udp" and proxy["flows"] == 0 and proxy["connections_total"] == 201
    assert proxy["bytes_in"] >= 8000 and proxy["bytes_out"] >= 8000


def test_whitelist_and_max_flows(world, udp_echo):
    world.start_server()
    world.start_agent()
    walled = udp_proxy(world, udp_echo.port, whitelist=["192.0.2.0/24"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        s.sendto(b"hello", ("127.0.0.1", walled))
        with pytest.raises(socket.timeout):
            s.recvfrom(100)
    assert not udp_conns(world) and not udp_echo.sources
    proxy = next(p for p in world.api("GET", "/v1/proxies")["proxies"] if p["remote_port"] == walled)
    assert proxy["rejected"]["whitelist"] >= 1
    capped = udp_proxy(world, udp_echo.port, max_flows=3)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
    try:
        for s in socks[:3]:
            s.settimeout(5)
            s.sendto(b"in", ("127.0.0.1", capped))
            assert s.recvfrom(10)[0] == b"in"
        for s in socks[3:]:
            s.settimeout(1)
            s.sendto(b"out", ("127.0.0.1", capped))
            with pytest.raises(socket.timeout):
                s.recvfrom(10)
    finally:
        for s in socks:
            s.close()
    proxy = next(p for p in world.api("GET", "/v1/proxies")["proxies"] if p["remote_port"] == capped)
    assert proxy["rejected"]["limit"] == 2 and proxy["flows"] == 3
    assert "max_flows = 3 UDP flows" in world.server.log()


@pytest.mark.parametrize("field, value, message", [
    ("protocol", "sctp", "protocol 'sctp' must be one of tcp, udp"),
    ("udp_idle_timeout", 0, "udp_idle_timeout 0 must be a number of seconds greater than 0 (at most 86400)"),
    ("udp_idle_timeout", "5", "udp_idle_timeout '5' must be a number of seconds greater than 0 (at most 86400)"),
    ("max_flows", 0, "max_flows 0 must be a whole number 1..65536"),
    ("max_flows", 1.5, "max_flows 1.5 must be a whole number 1..65536"),
])
def test_bad_values_through_the_api(world, field, value, message):
    world.start_server()
    body = {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": 53, "remote_port": free_udp_port(),
            "protocol": "udp", field: value}
    with pytest.raises(ApiError) as err:
        world.api("POST", "/v1/proxies", body)
    assert message in str(err.value)


def test_bad_values_in_files_and_flags(tmp_path):
    directory = tmp_path / "proxies.d"
    directory.mkdir()
    (directory / "dns.conf").write_text("[dns]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 53\n"
                                        "remote_port = 5353\nprotocol = sctp\nudp_idle_timeout = 0\nmax_flows = lots\n")
    res = subprocess.run([sys.executable, "-m", SERVER, "check-config", "--proxies-dir", str(directory)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"{directory}/dns.conf [dns] protocol = sctp: must be one of tcp, udp" in res.stderr
    assert f"{directory}/dns.conf [dns] udp_idle_timeout = 0: must be a number of seconds greater than 0 (at most 86400)" \
        in res.stderr
    assert f"{directory}/dns.conf [dns] max_flows = lots: must be a whole number 1..65536" in res.stderr
    (directory / "dns.conf").write_text("[dns]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 53\n"
                                        "remote_port = 5353\nprotocol = udp\nudp_idle_timeout = 30\n")
    res = subprocess.run([sys.executable, "-m", SERVER, "check-config", "--proxies-dir", str(directory)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "protocol = udp\nudp_idle_timeout = 30\n" in res.stdout
    for prog in ("anywhere.ctl", SERVER):
        for flag, value, message in (("--protocol", "sctp", "argument --protocol: invalid choice: 'sctp'"),
                                     ("--udp-idle-timeout", "0", "argument --udp-idle-timeout: '0': must be a number "
                                      "of seconds greater than 0 (at most 86400)"),
                                     ("--max-flows", "70000", "argument --max-flows: '70000': must be a whole number "
                                      "1..65536")):
            res = subprocess.run([sys.executable, "-m", prog, "proxy", "add", "--agent-id", "a", "--local-ip", "127.0.0.1",
                                  "--local-port", "53", "--remote-port", "5353", flag, value, "--admin-socket",
                                  str(tmp_path / "none.sock")], capture_output=True, text=True, timeout=60)
            assert res.returncode == 2 and message in res.stderr, res.stderr


def test_an_agent_that_did_not_announce_udp_is_sent_no_flow(world, creds):
    from hostile import HostileAgent
    from anywhere import mux
    server = world.start_server()
    old = HostileAgent(world.port, creds.ca, creds.agent("agent-2"), "agent-2")  # an older agent: no udp=1
    try:
        assert old.connect()["type"] == "welcome"
        old.keep_alive()
        trunk = old.trunk(ping=1, window=1)
        wait_for(lambda: any(a["agent_id"] == "agent-2" and a["trunks"] == 1
                             for a in world.api("GET", "/v1/agents")["agents"]), 5, what="its trunk to register")
        remote = free_udp_port()
        world.api("POST", "/v1/proxies", {"agent_id": "agent-2", "local_ip": "127.0.0.1", "local_port": 53,
                                          "remote_port": remote, "protocol": "udp"})
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", ("127.0.0.1", remote))
            line = wait_for(lambda: log_lines(server, "does not carry UDP"), 5, what="the refusal in the log")[0]
        assert "agent agent-2 does not carry UDP (an older version: upgrade it)" in line
        assert not any(kind == mux.OPEN for kind, _, _ in trunk.frames)
        trunk._read(time.monotonic() + 0.5)
        assert not any(kind == mux.OPEN for kind, _, _ in trunk.frames)
        assert not udp_conns(world)
    finally:
        old.close()


def test_per_client_data_connections_carry_no_udp(world, udp_echo):
    conf = world.tmp / "anywhered.conf"
    conf.write_text("[server]\npool_size = 0\n")
    server = world.start_server("--config", str(conf))
    world.start_agent()
    remote = udp_proxy(world, udp_echo.port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        s.sendto(b"hello", ("127.0.0.1", remote))
        line = wait_for(lambda: log_lines(server, "UDP flows need trunks"), 5, what="the refusal in the log")[0]
        with pytest.raises(socket.timeout):
            s.recvfrom(100)
    assert "pool_size = 0" in line and not udp_echo.sources


def test_a_udp_proxy_from_a_file_and_a_reload_that_makes_it_tcp(world, udp_echo, echo_target):
    from pathlib import Path
    world.proxies_dir = str(world.tmp / "proxies.d")
    Path(world.proxies_dir).mkdir()
    remote = free_udp_port()
    conf = Path(world.proxies_dir) / "dns.conf"
    conf.write_text(f"[dns]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = {udp_echo.port}\n"
                    f"remote_port = {remote}\nprotocol = udp\nudp_idle_timeout = 30\n")
    world.start_server()
    world.start_agent()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"from a file", ("127.0.0.1", remote))
        assert s.recvfrom(100)[0] == b"from a file"
    [proxy] = world.api("GET", "/v1/proxies")["proxies"]
    assert proxy["protocol"] == "udp" and proxy["udp_idle_timeout"] == 30 and proxy["source"].startswith("file:")
    # the same port, now tcp: the UDP socket closes, a TCP listener takes the port number
    conf.write_text(f"[dns]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = {echo_target.port}\n"
                    f"remote_port = {remote}\n")
    world.api("POST", "/v1/reload")
    from conftest import echo
    assert echo(remote, b"now tcp") == b"now tcp"
    [proxy] = world.api("GET", "/v1/proxies")["proxies"]
    assert proxy["protocol"] == "tcp"


def test_a_burst_that_comes_while_the_server_is_busy_waits_in_its_socket(world, udp_echo):
    """The proxy's UDP socket holds what arrives while the loop is elsewhere (here: the server
    stopped for a moment): 500 datagrams of 1,400 bytes (700 KB, within the flow's window) sent
    meanwhile all reach the target and come back.  With Linux's default receive buffer (208 KiB)
    about 90 survived; net.UDP_RCVBUF asks for 4 MiB on the proxy's socket and the agent's."""
    world.start_server()
    world.start_agent()
    remote = udp_proxy(world, udp_echo.port)
    count, size = 500, 1400
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.settimeout(5)
        s.sendto(b"open", ("127.0.0.1", remote))
        assert s.recv(100) == b"open"  # the flow is up
        world.server.signal(signal.SIGSTOP)
        try:
            for i in range(count):
                s.sendto(i.to_bytes(4, "big") * (size // 4), ("127.0.0.1", remote))
        finally:
            world.server.signal(signal.SIGCONT)
        got: set[int] = set()
        s.settimeout(3)
        try:
            while len(got) < count:
                got.add(int.from_bytes(s.recv(65535)[:4], "big"))
        except socket.timeout:
            pass
    assert len(got) == count, f"{len(got)} of {count} datagrams came back"


def test_an_ipv6_client_is_a_flow_of_its_own_and_the_whitelist_sees_its_address(world, udp_echo):
    """The proxy's UDP socket is dual-stack: a client on ::1 and one on 127.0.0.1 are two flows,
    listed with their own addresses (the IPv4 one unmapped); a whitelist of 127.0.0.0/8 refuses
    ::1 and still serves 127.0.0.1."""
    world.start_server()
    world.start_agent()
    remote = udp_proxy(world, udp_echo.port)
    for family, host in ((socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(b"hello " + host.encode(), (host, remote))
            assert s.recv(100) == b"hello " + host.encode()
    sources = sorted(f["source"] for f in udp_conns(world))
    assert len(sources) == 2 and sources[0].startswith("127.0.0.1:") and sources[1].startswith("[::1]:"), sources
    walled = udp_proxy(world, udp_echo.port, whitelist=["127.0.0.0/8"], name="walled")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        s.sendto(b"let me in", ("::1", walled))
        with pytest.raises(socket.timeout):
            s.recv(100)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(b"v4", ("127.0.0.1", walled))
        assert s.recv(100) == b"v4"
    assert "refused: not in the proxy's whitelist" in world.server.log()
