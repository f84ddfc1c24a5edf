"""A tcp and a udp proxy on one remote port number (DNS: 53/udp and 53/tcp; iperf3 -u: its TCP control
connection and its UDP data on one port), against a running anywhered with a real agent, a TCP echo
and a UDP echo target on loopback: through the API, in proxies.d files, one of each; a port range
of each on the same ports; a port alone no longer naming one proxy is refused, naming both; two of
one protocol on a port are still refused; a restart restores both from the state file."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess

import pytest

from conftest import echo, refused, wait_for

CTL = "anywhere.ctl"


def _bindable(port: int) -> bool:
    """Free for TCP and for UDP on the dual-stack wildcard, as anywhered binds a proxy's port."""
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET6, kind) as s:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(("::", port))
    except OSError:
        return False
    return True


def free_ports(count: int = 1) -> list[int]:
    """`count` consecutive port numbers free for both protocols, below the ephemeral range."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        ports = list(range(base, base + count))
        if all(_bindable(p) for p in ports):
            return ports
    raise AssertionError(f"no {count} consecutive ports free for TCP and UDP")


def udp_ask(port: int, data: bytes) -> bytes | None:
    """One datagram to 127.0.0.1:PORT, the first answer (None: none within a few tries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        for _ in range(3):
            s.sendto(data, ("127.0.0.1", port))
            try:
                return s.recvfrom(65535)[0]
            except TimeoutError:
                continue
    return None


def ctl(world, *args: str) -> subprocess.CompletedProcess:
    return world.ctl(*args, "--admin-socket", world.sock, check=False, prog=CTL)


def listed(world) -> dict[str, dict]:
    return {p["name"]: p for p in world.api("GET", "/v1/proxies")["proxies"]}


def body(port, local_port: int, protocol: str = "tcp", **fields) -> dict:
    return {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": local_port, "remote_port": port,
            "protocol": protocol, **fields}


def section(name: str, local_port: int, port: int, protocol: str = "tcp") -> str:
    """A proxies.d section for agent-1 (the protocol key only for udp, as a file would say it)."""
    return (f"[{name}]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = {local_port}\nremote_port = {port}\n"
            + ("protocol = udp\n" if protocol == "udp" else ""))


def refused_with(world, method: str, path: str, payload=None) -> str:
    try:
        world.api(method, path, payload)
    except Exception as exc:  # CtlError: "STATUS message"
        return str(exc)
    raise AssertionError(f"{method} {path} was not refused")


def both_answer(port: int, tag: bytes) -> None:
    """TCP to PORT reaches the TCP echo, UDP to PORT the UDP echo."""
    assert echo(port, b"tcp " + tag) == b"tcp " + tag
    assert udp_ask(port, b"udp " + tag) == b"udp " + tag


@pytest.fixture
def up(world):
    world.proxies_dir = str(world.tmp / "proxies.d")
    os.makedirs(world.proxies_dir)
    world.start_server()
    world.start_agent("agent-1")
    return world


def test_a_tcp_and_a_udp_proxy_on_one_port_through_the_api(up, echo_target, udp_echo):
    world = up
    [port] = free_ports()
    world.api("POST", "/v1/proxies", body(port, udp_echo.port, "udp"))  # named agent-1:PORT
    # the second of the pair without a name: the default name is taken; the error says what to do
    res = ctl(world, "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1", "--local-port",
              str(echo_target.port), "--remote-port", str(port))
    assert res.returncode == 1 and f"a proxy named agent-1:{port} already exists" in res.stderr, res.stderr
    assert f"the udp proxy on remote port {port}" in res.stderr and "--name" in res.stderr, res.stderr
    res = ctl(world, "proxy", "add", "--name", "dns-tcp", "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
              "--local-port", str(echo_target.port), "--remote-port", str(port))
    assert res.returncode == 0, res.stderr
    both_answer(port, b"one")
    got = listed(world)
    assert {(p["name"], p["protocol"], p["remote_port"]) for p in got.values()} == \
        {(f"agent-1:{port}", "udp", port), ("dns-tcp", "tcp", port)}
    # two of one protocol on a port: refused as before, whichever protocol
    assert f"409 remote port {port} is already used by proxy dns-tcp" in \
        refused_with(world, "POST", "/v1/proxies", body(port, echo_target.port, name="other"))
    assert f"409 remote port {port} is already used by proxy agent-1:{port}" in \
        refused_with(world, "POST", "/v1/proxies", body(port, udp_echo.port, "udp", name="other"))
    # a port alone names two proxies: every verb that takes one refuses, naming both
    both = f"remote port {port} is used by two proxies, dns-tcp (tcp) and agent-1:{port} (udp): say which by its name"
    for args in (("proxy", "del", str(port)), ("proxy", "del", "--remote-port", str(port)),
                 ("proxy", "disable", str(port)), ("proxy", "enable", str(port)), ("proxy", "export", str(port))):
        res = ctl(world, *args)
        assert res.returncode == 1 and both in res.stderr, (args, res.stderr)
    assert "409 " + both in refused_with(world, "GET", f"/v1/proxies/{port}/health")
    assert "409 " + both in refused_with(world, "DELETE", f"/v1/connections?proxy={port}")
    assert set(listed(world)) == {"dns-tcp", f"agent-1:{port}"}
    both_answer(port, b"still")
    # a restart restores both from the state file
    with open(os.path.join(world.state_dir, "proxies.json"), encoding="utf-8") as f:
        assert [(p["name"], p.get("protocol", "tcp")) for p in json.load(f)["proxies"]] == \
            [("dns-tcp", "tcp"), (f"agent-1:{port}", "udp")]
    world.server.stop()
    server = world.start_server()
    wait_for(lambda: world.api("GET", "/v1/agents")["agents"], 20, what="agent-1 back")
    assert {name: p["state"] for name, p in listed(world).items()} == \
        {"dns-tcp": "listening", f"agent-1:{port}": "listening"}
    assert "not served" not in server.log()
    both_answer(port, b"after a restart")
    # by name: one goes, the other stays; then the port names one proxy again
    res = ctl(world, "proxy", "del", "dns-tcp")
    assert res.returncode == 0 and "proxy dns-tcp deleted" in res.stdout, res.stderr
    assert refused(port) and udp_ask(port, b"udp alone") == b"udp alone"
    res = ctl(world, "proxy", "disable", str(port))
    assert res.returncode == 0, res.stderr
    assert listed(world)[f"agent-1:{port}"]["state"] == "disabled"


def test_a_tcp_and_a_udp_proxy_on_one_port_in_files_and_mixed(up, echo_target, udp_echo):
    world = up
    port, mixed = free_ports()[0], free_ports()[0]
    with open(os.path.join(world.proxies_dir, "dns.conf"), "w", encoding="utf-8") as f:
        f.write(section("dns-udp", udp_echo.port, port, "udp") + "\n" +
                section("dns-tcp", echo_target.port, port) + "\n" +
                section("mixed-tcp", echo_target.port, mixed))
    res = ctl(world, "reload")
    assert res.returncode == 0, res.stderr
    both_answer(port, b"files")
    # one from a file, the other through the API
    world.api("POST", "/v1/proxies", body(mixed, udp_echo.port, "udp", name="mixed-udp"))
    both_answer(mixed, b"mixed")
    assert {(n, p["protocol"], p["source"][:4]) for n, p in listed(world).items() if p["remote_port"] == mixed} == \
        {("mixed-tcp", "tcp", "file"), ("mixed-udp", "udp", "api")}
    # a file still may not declare a port twice for one protocol, nor take an API proxy's (port, protocol)
    extra = os.path.join(world.proxies_dir, "zz.conf")
    with open(extra, "w", encoding="utf-8") as f:
        f.write(section("again", udp_echo.port, port, "udp") + "\n" +
                section("mixed-again", udp_echo.port, mixed, "udp"))
    res = ctl(world, "reload")
    assert res.returncode == 1, res.stdout
    assert f"{extra} [again] remote_port = {port}: already used by proxy dns-udp in " in res.stderr, res.stderr
    os.unlink(extra)
    with open(extra, "w", encoding="utf-8") as f:
        f.write(section("mixed-again", udp_echo.port, mixed, "udp"))
    res = ctl(world, "reload")
    assert res.returncode == 1
    assert f"{extra} [mixed-again] remote_port = {mixed}: already used by proxy mixed-udp, made through the API" \
        in res.stderr, res.stderr
    os.unlink(extra)
    # a file proxy and the API: a port naming both is refused with the file's proxy among them
    res = ctl(world, "proxy", "del", str(mixed))
    assert res.returncode == 1 and "mixed-tcp (tcp) and mixed-udp (udp)" in res.stderr, res.stderr
    # a reload that swaps the protocols of the pair on one port hands each listener to its new owner
    with open(os.path.join(world.proxies_dir, "dns.conf"), "w", encoding="utf-8") as f:
        f.write(section("dns-udp", echo_target.port, port) + "\n" +
                section("dns-tcp", udp_echo.port, port, "udp"))
    res = ctl(world, "reload")
    assert res.returncode == 0, res.stderr
    both_answer(port, b"swapped")
    assert {n: p["protocol"] for n, p in listed(world).items() if p["remote_port"] == port} == \
        {"dns-udp": "tcp", "dns-tcp": "udp"}


def test_a_tcp_range_and_a_udp_range_on_the_same_ports(up, echo_target, udp_echo):
    world = up
    ports = free_ports(3)
    span = f"{ports[0]}-{ports[-1]}"
    world.api("POST", "/v1/proxies", body(span, echo_target.port, name="t"))
    world.api("POST", "/v1/proxies", body(span, udp_echo.port, "udp", name="u"))
    for port in ports:
        both_answer(port, str(port).encode())
    # the same range of one protocol again: refused as before, naming every port
    assert "409 none of the 3 proxies of the range added: remote port" in \
        refused_with(world, "POST", "/v1/proxies", body(span, udp_echo.port, "udp", name="v"))
    # a range of ports where a tcp and a udp proxy share one: nothing removed, both named
    res = ctl(world, "proxy", "del", span)
    assert res.returncode == 1, res.stdout
    assert (f"remote ports {span}: nothing removed: a tcp and a udp proxy share remote port(s): "
            f"{ports[0]}: t:{ports[0]} (tcp) and u:{ports[0]} (udp); ") in res.stderr, res.stderr
    assert len(listed(world)) == 6
    # one by name; then a range over the ports left to one protocol deletes them
    for port in ports:
        assert ctl(world, "proxy", "del", f"u:{port}").returncode == 0
    res = ctl(world, "proxy", "del", span)
    assert res.returncode == 0 and res.stdout.startswith("3 proxies deleted"), res.stderr
    assert listed(world) == {}


def test_a_udp_proxy_may_use_the_agent_ports_number(up, udp_echo, echo_target):
    """The agent port is TCP: its number is free for a UDP proxy, still not for a TCP one."""
    world = up
    assert "409 remote port" in refused_with(world, "POST", "/v1/proxies", body(world.port, echo_target.port))
    world.api("POST", "/v1/proxies", body(world.port, udp_echo.port, "udp"))
    assert udp_ask(world.port, b"next to the agent port") == b"next to the agent port"
    assert world.api("GET", "/v1/agents")["agents"]  # the agent, on the TCP port of that number, still there


# -- --protocol tcp|udp (?protocol=): a port, or a range, that a tcp and a udp proxy share names one ----------
def test_a_range_deleted_by_protocol_where_a_tcp_and_a_udp_range_share_the_ports(up, echo_target, udp_echo):
    world = up
    ports = free_ports(10)
    span = f"{ports[0]}-{ports[-1]}"
    world.api("POST", "/v1/proxies", body(span, echo_target.port, name="t"))
    world.api("POST", "/v1/proxies", body(span, udp_echo.port, "udp", name="u"))
    res = ctl(world, "proxy", "del", span)  # without --protocol: refused as before, saying what to do
    assert res.returncode == 1 and "delete them by name (anywherectl proxy del NAME), or by protocol " \
        "(--protocol tcp|udp)" in res.stderr, res.stderr
    res = ctl(world, "proxy", "del", span, "--protocol", "udp")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"10 proxies deleted (u:{ports[0]} … u:{ports[-1]})"), res.stdout
    assert {(p["name"], p["protocol"]) for p in listed(world).values()} == {(f"t:{p}", "tcp") for p in ports}
    for port in ports:  # the tcp range still carries traffic; nothing answers udp
        assert echo(port, b"tcp %d" % port) == b"tcp %d" % port
    assert udp_ask(ports[0], b"gone") is None
    res = ctl(world, "proxy", "del", "--remote-port", span, "--protocol", "udp")  # none left of that protocol
    assert res.returncode == 1 and f"no proxy named {span} (and no udp proxy on remote ports {span})" in res.stderr
    res = ctl(world, "proxy", "del", span)  # one protocol left on the ports: as before
    assert res.returncode == 0 and res.stdout.startswith("10 proxies deleted"), res.stderr
    assert listed(world) == {}


def test_a_shared_port_by_protocol_in_the_cli_and_the_api(up, echo_target, udp_echo):
    world = up
    [port] = free_ports()
    world.api("POST", "/v1/proxies", body(port, udp_echo.port, "udp"))  # agent-1:PORT
    world.api("POST", "/v1/proxies", body(port, echo_target.port, name="dns-tcp"))
    res = ctl(world, "proxy", "disable", str(port))
    assert res.returncode == 1 and ": say which by its name (anywherectl proxy del|enable|disable NAME), or with " \
        "--protocol tcp|udp" in res.stderr, res.stderr
    res = ctl(world, "proxy", "disable", str(port), "--protocol", "udp")
    assert res.returncode == 0 and f"proxy agent-1:{port} disabled" in res.stdout, res.stderr
    assert {n: p["state"] for n, p in listed(world).items()} == {f"agent-1:{port}": "disabled", "dns-tcp": "listening"}
    assert world.api("POST", f"/v1/proxies/{port}/enable?protocol=udp")["proxy"]["name"] == f"agent-1:{port}"
    assert world.api("GET", f"/v1/proxies/{port}/health?protocol=tcp")["proxy"] == "dns-tcp"
    # a bad value: argparse refuses it in the CLI, the API with a 400 naming it
    res = ctl(world, "proxy", "del", str(port), "--protocol", "sctp")
    assert res.returncode == 2 and "argument --protocol: invalid choice: 'sctp'" in res.stderr, res.stderr
    for method, path in (("DELETE", f"/v1/proxies/{port}?protocol=sctp"),
                         ("POST", f"/v1/proxies/{port}/disable?protocol=sctp"),
                         ("GET", f"/v1/proxies/{port}/health?protocol=sctp")):
        assert "400 protocol 'sctp' must be tcp or udp" in refused_with(world, method, path), path
    # a name with the other protocol: refused, saying so; nothing removed
    assert "409 proxy dns-tcp is a tcp proxy, not udp" in \
        refused_with(world, "DELETE", "/v1/proxies/dns-tcp?protocol=udp")
    res = ctl(world, "proxy", "del", "dns-tcp", "--protocol", "udp")
    assert res.returncode == 1 and "proxy dns-tcp is a tcp proxy, not udp" in res.stderr, res.stderr
    assert len(listed(world)) == 2
    both_answer(port, b"both still")
    # the shared port by protocol: the tcp one goes, the udp one stays and answers
    res = ctl(world, "proxy", "del", str(port), "--protocol", "tcp")
    assert res.returncode == 0 and "proxy dns-tcp deleted" in res.stdout, res.stderr
    assert refused(port) and udp_ask(port, b"udp alone") == b"udp alone"
    assert world.api("DELETE", f"/v1/proxies/{port}?protocol=udp")["deleted"] == f"agent-1:{port}"
    assert listed(world) == {}
