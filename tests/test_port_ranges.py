"""Port ranges (issue 19): `remote_port = A-B` declares one proxy per port, named NAME:PORT, in a
proxies.d file, with `proxy add`, and in the API body; all bound or none.

Real anywhered and agent processes on loopback; the targets are real sockets on a block of
consecutive ports, each answering with its own port number, so that a client of every remote port
can tell which target it reached.  Every refused range is checked to have changed nothing: the
same proxies listed, none of the range's ports listening.  The file format's messages are checked
on real files without a server (read_dir).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading

import pytest

from anywhere.errors import ConfigError, CtlError
from anywhere.server.declared import read_dir
from conftest import ask, refused, wait_for

CTL = "anywhere.ctl"
SERVER = "anywhere.server_cli"
ATTEMPTS = 50  # random bases tried for a block of free ports


def _bindable(port: int) -> bool:
    """Free on the dual-stack wildcard (as anywhered binds) and on 127.0.0.1 (as the targets bind)."""
    try:
        with socket.socket(socket.AF_INET6) as s6:
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s6.bind(("::", port))
        with socket.socket(socket.AF_INET) as s4:
            s4.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


_taken: set[int] = set()  # blocks handed out in this run: never twice


def free_block(count: int) -> list[int]:
    """`count` consecutive ports free now, below the ephemeral range (so a client's own port will
    not take one): a random base, every port checked, a bounded number of tries."""
    for _ in range(ATTEMPTS):
        base = random.randrange(20000, 32000 - count)
        ports = list(range(base, base + count))
        if not _taken.intersection(ports) and all(_bindable(p) for p in ports):
            _taken.update(ports)
            return ports
    raise AssertionError(f"no {count} consecutive free ports found in {ATTEMPTS} tries")


class PortTargets:
    """A listener on each of `ports` (127.0.0.1): every connection gets b"PORT:" + what it sends."""

    def __init__(self, ports: list[int]) -> None:
        self.socks = []
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(16)
            self.socks.append(sock)
            threading.Thread(target=self._accept, args=(sock, port), daemon=True).start()

    @staticmethod
    def _accept(sock: socket.socket, port: int) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=PortTargets._serve, args=(conn, port), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket, port: int) -> None:
        with conn:
            conn.settimeout(10)
            try:
                data = conn.recv(65536)
                if data:
                    conn.sendall(f"{port}:".encode() + data)
            except OSError:
                pass

    def stop(self) -> None:
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@pytest.fixture
def targets():
    """Ten targets on consecutive ports, each answering with its port."""
    ports = free_block(10)
    made = PortTargets(ports)
    yield ports
    made.stop()


def write(world, file: str, text: str) -> str:
    os.makedirs(world.proxies_dir, exist_ok=True)
    path = os.path.join(world.proxies_dir, file)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def section(name: str, remote: str, local: str, agent: str = "agent-1") -> str:
    return f"[{name}]\nagent = {agent}\nlocal_ip = 127.0.0.1\nremote_port = {remote}\nlocal_port = {local}\n"


def span(ports: list[int]) -> str:
    return f"{ports[0]}-{ports[-1]}"


def listed(world) -> dict[str, dict]:
    return {p["name"]: p for p in world.api("GET", "/v1/proxies")["proxies"]}


def ctl(world, *args: str, prog: str = CTL, check: bool = True):
    return world.ctl(*args, "--admin-socket", world.sock, prog=prog, check=check)


def stored(world) -> list[str]:
    """The proxies in the state directory (none before the first save)."""
    if not os.path.exists(os.path.join(world.state_dir, "proxies.json")):
        return []
    with open(os.path.join(world.state_dir, "proxies.json"), encoding="utf-8") as f:
        return [p["name"] for p in json.load(f)["proxies"]]


@pytest.fixture
def up(world, targets):
    """anywhered with an empty proxies_dir, and agent-1."""
    world.proxies_dir = str(world.tmp / "proxies.d")
    os.makedirs(world.proxies_dir)
    world.start_server()
    world.start_agent("agent-1")
    world.targets = targets
    return world


# -- in files --------------------------------------------------------------------------------------
def test_a_declared_range_reaches_each_own_target_port_or_one_port_for_all(up):
    world, local = up, up.targets
    remote, shared = free_block(10), free_block(10)
    path = write(world, "web.conf", section("web", span(remote), span(local)) +
                 section("one", span(shared), str(local[3])))
    res = ctl(world, "reload", check=False)
    assert res.returncode == 0, res.stderr
    for r, l in zip(remote, local):
        assert ask(r) == f"{l}:hello".encode(), r
    for r in shared:
        assert ask(r) == f"{local[3]}:hello".encode(), r
    got = listed(world)
    assert set(got) == {f"web:{p}" for p in remote} | {f"one:{p}" for p in shared}
    assert {p["source"] for p in got.values()} == {f"file:{path}"}
    assert got[f"web:{remote[4]}"]["local_port"] == local[4] and got[f"web:{remote[4]}"]["remote_port"] == remote[4]
    assert stored(world) == []  # the file is their home
    # a shorter range: the ports no longer declared are closed, the others unchanged
    write(world, "web.conf", section("web", span(remote[:5]), span(local[:5])))
    res = ctl(world, "reload")
    assert "removed" in res.stdout and "5 unchanged" in res.stdout, res.stdout
    assert set(listed(world)) == {f"web:{p}" for p in remote[:5]}
    assert ask(remote[4]) == f"{local[4]}:hello".encode() and refused(remote[5]) and refused(shared[0])


def test_a_declared_range_is_all_or_none(up):
    world, local = up, up.targets
    first, remote = free_block(3), free_block(10)
    write(world, "a.conf", section("a", span(first), str(local[0])))
    assert ctl(world, "reload", check=False).returncode == 0
    before = listed(world)
    held = socket.socket(socket.AF_INET6)
    held.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    held.bind(("::", remote[6]))
    held.listen(1)
    try:
        path = write(world, "web.conf", section("web", span(remote), span(local)))
        res = ctl(world, "reload", check=False)
        assert res.returncode == 1 and "422" in res.stderr, res.stderr
        assert (f"{path} [web] remote_port = {span(remote)}: port {remote[6]}: cannot listen on [::]:{remote[6]}: "
                "Address already in use") in res.stderr, res.stderr
        assert set(listed(world)) == set(before)
        assert all(refused(p) for p in remote if p != remote[6])
        # a range over another section's ports names each port, the first few of them
        write(world, "web.conf", section("web", f"{first[1]}-{first[1] + 9}", span(local)))
        res = ctl(world, "reload", check=False)
        assert res.returncode == 1
        assert (f"{path} [web] remote_port = {first[1]}-{first[1] + 9}: port {first[2]}: already used by proxy "
                f"a:{first[2]} in {world.proxies_dir}/a.conf") in res.stderr, res.stderr
        assert set(listed(world)) == set(before)
    finally:
        held.close()
    write(world, "web.conf", section("web", span(remote), span(local)))
    assert ctl(world, "reload", check=False).returncode == 0
    assert all(ask(r) == f"{l}:hello".encode() for r, l in zip(remote, local))
    # the API deletes no declared proxy, of a range either
    with pytest.raises(CtlError) as err:
        world.api("DELETE", f"/v1/proxies/{span(remote)}")
    assert (f"409 remote ports {span(remote)}: nothing removed: declared in a file: web:{remote[0]} ({path}), "
            f"web:{remote[1]} ({path})") in str(err.value), str(err.value)
    assert len(listed(world)) == 13


@pytest.mark.parametrize("remote,local,expected", [
    ("30009-30000", "80", "remote_port = 30009-30000: the range ends before it starts (30000 < 30009)"),
    ("30000-30009", "40000-40004", "local_port = 40000-40004: a range of 5 ports, and remote_port = 30000-30009 is "
                                   "10: give a range of the same length, or a single local port for all"),
    ("30000", "40000-40004", "local_port = 40000-40004: a range of local ports needs remote_port to be a range of "
                             "the same length"),
    ("20000-21000", "80", "remote_port = 20000-21000: a range of 1001 ports; at most 1000"),
    ("3000x-30009", "80", "remote_port = 3000x-30009: must be 1..65535, or a range START-END of at most 1000 ports "
                          "(e.g. 30000-30009)"),
    ("30000-", "80", "remote_port = 30000-: must be 1..65535, or a range START-END"),
    ("65530-65540", "80", "remote_port = 65530-65540: 65540 is not a port 1..65535"),
])
def test_a_bad_range_in_a_file_is_named_with_file_section_key_and_value(tmp_path, remote, local, expected):
    (tmp_path / "web.conf").write_text(section("web", remote, local))
    with pytest.raises(ConfigError) as err:
        read_dir(str(tmp_path))
    assert err.value.problems[0].startswith(f"{tmp_path / 'web.conf'} [web] {expected}"), err.value.problems
    assert len(err.value.problems) == 1


def test_a_range_of_at_most_1000_ports_and_a_name_with_room_for_the_port(tmp_path):
    (tmp_path / "web.conf").write_text(section("web", "20000-20999", "80") + section("x" * 60, "22000-22001", "80"))
    with pytest.raises(ConfigError) as err:
        read_dir(str(tmp_path))
    assert err.value.problems == [f"{tmp_path / 'web.conf'} [{'x' * 60}]: name '{'x' * 60}' is too long for a range: "
                                  f"each proxy is named NAME:PORT, at most 64 characters ({'x' * 60}:22001 is 66)"]
    (tmp_path / "web.conf").write_text(section("web", "20000-20999", "80"))
    got = read_dir(str(tmp_path))
    assert len(got) == 1000 and got[999].spec["name"] == "web:20999" and got[999].spec["local_port"] == 80


def test_check_config_lists_a_declared_range_one_proxy_per_port(tmp_path):
    (tmp_path / "web.conf").write_text(section("web", "30000-30002", "40000-40002"))
    res = subprocess.run([sys.executable, "-m", SERVER, "check-config", "--proxies-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"# {tmp_path}: OK; 3 proxies declared" in res.stdout
    for i in range(3):
        assert (f"[web:3000{i}]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 4000{i}\n"
                f"remote_port = 3000{i}\n") in res.stdout


# -- with proxy add, and the API -------------------------------------------------------------------
def test_proxy_add_with_a_range_named_or_not_delete_one_and_restart(up):
    world, local = up, up.targets
    named, unnamed = free_block(10), free_block(10)
    res = ctl(world, "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1", "--remote-port", span(named),
              "--local-port", span(local), "--name", "web")
    assert res.stdout.strip() == (f"10 proxies added, web:{named[0]} … web:{named[-1]}: ports {span(named)} → agent "
                                  f"agent-1 → 127.0.0.1:{span(local)}"), res.stdout
    res = ctl(world, "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1", "--remote-port",
              span(unnamed), "--local-port", str(local[9]), prog=SERVER)  # anywhered proxy add, the same verbs
    assert f"agent-1:{unnamed[0]} … agent-1:{unnamed[-1]}" in res.stdout, res.stdout
    for r, l in zip(named, local):
        assert ask(r) == f"{l}:hello".encode(), r
    for r in unnamed:
        assert ask(r) == f"{local[9]}:hello".encode(), r
    got = listed(world)
    names = {f"web:{p}" for p in named} | {f"agent-1:{p}" for p in unnamed}
    assert set(got) == names and {p["source"] for p in got.values()} == {"api"}
    assert set(stored(world)) == names  # each one stored, as a single proxy is
    # export: one section each, which a proxies.d file takes back as it is
    text = ctl(world, "proxy", "export").stdout
    assert f"[web:{named[3]}]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = {local[3]}\nremote_port = {named[3]}\n" \
        in text
    # delete one: the others stay
    res = ctl(world, "proxy", "del", f"web:{named[3]}")
    assert f"proxy web:{named[3]} deleted" in res.stdout
    assert refused(named[3]) and ask(named[4]) == f"{local[4]}:hello".encode()
    assert len(listed(world)) == 19 and f"web:{named[3]}" not in stored(world)
    # a restart keeps what was made through the API
    world.server.stop()
    world.start_server()
    wait_for(lambda: any(a["agent_id"] == "agent-1" for a in world.api("GET", "/v1/agents")["agents"]), 20,
             what="agent-1 back")
    assert set(listed(world)) == names - {f"web:{named[3]}"}
    assert all(p["state"] == "listening" for p in listed(world).values())
    assert ask(named[9]) == f"{local[9]}:hello".encode() and ask(unnamed[0]) == f"{local[9]}:hello".encode()
    assert refused(named[3])
    # delete a range: every proxy on those remote ports, at once (the gap of the one deleted is fine)
    res = ctl(world, "proxy", "del", "--remote-port", span(unnamed))
    assert res.stdout.strip() == (f"10 proxies deleted (agent-1:{unnamed[0]} … agent-1:{unnamed[-1]}); 0 connection(s) "
                                  "closed"), res.stdout
    res = ctl(world, "proxy", "del", span(named))
    assert res.stdout.startswith(f"9 proxies deleted (web:{named[0]} … web:{named[-1]})"), res.stdout
    assert listed(world) == {} and stored(world) == []
    assert all(refused(p) for p in named + unnamed)
    res = ctl(world, "proxy", "del", span(named), check=False)
    assert res.returncode == 1 and f"404 no proxy named {span(named)} (and no proxy on remote ports {span(named)})" \
        in res.stderr, res.stderr


def test_an_api_range_is_one_atomic_operation(up):
    world, local = up, up.targets
    remote = free_block(10)
    body = {"agent_id": "agent-1", "local_ip": "127.0.0.1", "remote_port": span(remote), "local_port": span(local),
            "name": "web"}
    world.api("POST", "/v1/proxies", {"name": "taken", "agent_id": "agent-1", "local_ip": "127.0.0.1",
                                      "local_port": local[0], "remote_port": remote[7]})
    before = listed(world)
    with pytest.raises(CtlError) as err:
        world.api("POST", "/v1/proxies", body)
    assert (f"409 none of the 10 proxies of the range added: remote port {remote[7]} is already used by proxy taken"
            in str(err.value)), str(err.value)
    assert listed(world).keys() == before.keys()
    assert all(refused(p) for p in remote if p != remote[7])
    world.api("DELETE", "/v1/proxies/taken")
    # a port held by another socket: nothing bound, the port named
    held = socket.socket(socket.AF_INET6)
    held.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    held.bind(("::", remote[2]))
    held.listen(1)
    try:
        res = ctl(world, "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1", "--remote-port",
                  span(remote), "--local-port", span(local), check=False)
        assert res.returncode == 1
        assert (f"409 none of the 10 proxies of the range added: cannot listen on remote port {remote[2]}: cannot "
                f"listen on [::]:{remote[2]}: Address already in use") in res.stderr, res.stderr
        assert listed(world) == {} and stored(world) == []
        assert all(refused(p) for p in remote if p != remote[2])
    finally:
        held.close()
    # the agent port in a range
    with pytest.raises(CtlError) as err:
        world.api("POST", "/v1/proxies", dict(body, remote_port=f"{world.port - 1}-{world.port + 1}", local_port=80))
    assert f"remote port {world.port} is the agent port" in str(err.value)
    assert listed(world) == {}
    # and then all of it
    data = world.api("POST", "/v1/proxies", body)
    assert [p["name"] for p in data["proxies"]] == [f"web:{p}" for p in remote]
    assert all(ask(r) == f"{l}:hello".encode() for r, l in zip(remote, local))
    # a second time: every name and port taken; nothing changes
    with pytest.raises(CtlError) as err:
        world.api("POST", "/v1/proxies", body)
    assert f"409 none of the 10 proxies of the range added: a proxy named web:{remote[0]} already exists" \
        in str(err.value)
    assert len(listed(world)) == 10


@pytest.mark.parametrize("remote,local,expected", [
    ("30009-30000", 80, "400 remote_port '30009-30000': the range ends before it starts (30000 < 30009)"),
    ("30000-30009", "40000-40004", "400 local_port '40000-40004': a range of 5 ports, and remote_port = "
                                   "30000-30009 is 10: give a range of the same length, or a single local port for all"),
    (30000, "40000-40004", "400 local_port '40000-40004': a range of local ports needs remote_port to be a range"),
    ("20000-21000", 80, "400 remote_port '20000-21000': a range of 1001 ports; at most 1000"),
    ("3000x-30009", 80, "400 remote_port '3000x-30009': must be 1..65535, or a range START-END"),
])
def test_a_bad_range_in_the_api_is_a_400_naming_it(world, remote, local, expected):
    world.start_server()
    with pytest.raises(CtlError) as err:
        world.api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1", "remote_port": remote,
                                          "local_port": local})
    assert expected in str(err.value), str(err.value)
    assert world.api("GET", "/v1/proxies")["proxies"] == []


@pytest.mark.parametrize("flags,code,expected", [
    (("--remote-port", "30009-30000", "--local-port", "80"), 2,
     "argument --remote-port: '30009-30000': the range ends before it starts (30000 < 30009)"),
    (("--remote-port", "20000-21000", "--local-port", "80"), 2,
     "argument --remote-port: '20000-21000': a range of 1001 ports; at most 1000"),
    (("--remote-port", "1-2-3", "--local-port", "80"), 2, "argument --remote-port: '1-2-3': must be 1..65535, or a range"),
    (("--remote-port", "30000-30009", "--local-port", "40000-40004"), 1,
     "--local-port 40000-40004: a range of local ports needs --remote-port to be a range of the same length"),
])
def test_a_bad_range_on_the_command_line_is_a_clear_error(world, flags, code, expected):
    res = world.ctl("proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1", *flags, "--admin-socket",
                    str(world.tmp / "none.sock"), check=False, prog=CTL)
    assert res.returncode == code and expected in res.stderr, res.stderr


def test_a_range_of_the_largest_size_is_served_and_its_problems_are_named_in_a_few_lines(up):
    world, local = up, up.targets
    remote = free_block(1000)
    data = world.api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1",
                                             "remote_port": span(remote), "local_port": local[0]})
    assert len(data["proxies"]) == 1000 and len(stored(world)) == 1000
    for r in (remote[0], remote[500], remote[-1]):
        assert ask(r) == f"{local[0]}:hello".encode(), r
    # the same range declared in a file: refused, the first five ports named, then a count
    path = write(world, "web.conf", section("web", span(remote), str(local[1])))
    res = ctl(world, "reload", check=False)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if path in line]
    assert lines[0].endswith(f"{path} [web] remote_port = {span(remote)}: port {remote[0]}: already used by proxy "
                             f"agent-1:{remote[0]}, made through the API"), lines
    assert len(lines) == 6 and lines[-1].endswith(f"{path} [web] remote_port = {span(remote)}: and 995 more ports"), \
        lines
    os.unlink(path)
    res = ctl(world, "proxy", "del", span(remote))
    assert res.stdout.startswith(f"1000 proxies deleted (agent-1:{remote[0]} … agent-1:{remote[-1]})"), res.stdout
    assert listed(world) == {} and refused(remote[0]) and refused(remote[-1])
