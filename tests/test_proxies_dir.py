"""Proxies declared in proxies_dir (issue 16), against a running anywhered with a real agent and
real clients on loopback: applied at start and on reload as a diff, all or nothing; their source
shown; the API refusing to change them; export then import; check-config.

Every reload here goes through `anywherectl reload` (the same path as `systemctl reload`'s
SIGHUP, which one test takes too), and every refused one is checked to have changed nothing: the
same proxies listed, the same ports serving.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from conftest import TargetServer, ask, echo, free_port, recv_all, refused, wait_for, wait_log_line

CTL = "anywhere.ctl"
SERVER = "anywhere.server_cli"
FIELDS = ("name", "agent_id", "local_ip", "local_port", "remote_port", "whitelist", "enabled", "idle_timeout")


def tagged(tag: bytes):
    """A target handler that answers every read with `tag` + what it read."""
    def handler(conn: socket.socket) -> None:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(tag + data)
    return handler


@pytest.fixture
def targets():
    """Two targets on loopback: A answers "A:" + data, B answers "B:" + data."""
    a, b = TargetServer(tagged(b"A:")), TargetServer(tagged(b"B:"))
    yield {"A": a.port, "B": b.port}
    a.stop()
    b.stop()


def section(name: str, local_port: int, remote_port: int, agent: str = "agent-1", **extra: str) -> str:
    lines = [f"[{name}]", f"agent = {agent}", "local_ip = 127.0.0.1", f"local_port = {local_port}",
             f"remote_port = {remote_port}"] + [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def write(world, file: str, *sections: str) -> str:
    os.makedirs(world.proxies_dir, exist_ok=True)
    path = os.path.join(world.proxies_dir, file)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(sections))
    return path


def reload(world) -> subprocess.CompletedProcess:
    return world.ctl("reload", "--admin-socket", world.sock, check=False, prog=CTL)


def listed(world) -> dict[str, dict]:
    return {p["name"]: p for p in world.api("GET", "/v1/proxies")["proxies"]}


def shape(world) -> dict[str, tuple]:
    """What a refused reload must leave as it was: every proxy's fields, state and source."""
    return {n: tuple(p[k] for k in FIELDS + ("state", "source")) for n, p in listed(world).items()}


class Live:
    """A client connection held open across a reload; `round` checks that bytes still flow."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sent = 0

    def round(self, tag: bytes) -> bool:
        data = os.urandom(1000).hex().encode()
        try:
            self.sock.sendall(data)
            got = b""
            while len(got) < len(tag) + len(data):
                chunk = self.sock.recv(65536)
                if not chunk:
                    return False
                got += chunk
        except OSError:
            return False
        self.sent += len(data)
        return got == tag + data

    def closed(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def up(world, targets):
    """anywhered with an empty proxies_dir, and agent-1."""
    os.makedirs(world.tmp / "proxies.d")
    world.proxies_dir = str(world.tmp / "proxies.d")
    world.start_server()
    world.start_agent("agent-1")
    world.targets = targets
    return world


def test_declared_proxies_are_served_from_the_start_with_their_source_and_never_stored(world, targets):
    web_port, api_port = free_port(), free_port()
    world.proxies_dir = str(world.tmp / "proxies.d")
    web = write(world, "web.conf", section("web", targets["A"], web_port, whitelist="127.0.0.1/32, ::1/128"))
    world.start_server()
    world.start_agent("agent-1")
    world.add_proxy(targets["B"], remote_port=api_port)
    assert ask(web_port) == b"A:hello" and ask(api_port) == b"B:hello"
    got = listed(world)
    assert got["web"]["source"] == f"file:{web}" and got[f"agent-1:{api_port}"]["source"] == "api"
    assert got["web"]["whitelist"] == ["127.0.0.1/32", "::1/128"]
    table = world.ctl("proxy", "list", "--admin-socket", world.sock, prog=CTL).stdout
    header, *body = table.splitlines()
    assert header.split()[-1] == "SOURCE"
    assert sorted(row.split()[-1] for row in body) == ["api", f"file:{web}"]
    # the state directory keeps the API's proxy only: without its file, web is gone after a restart
    with open(os.path.join(world.state_dir, "proxies.json"), encoding="utf-8") as f:
        assert [p["name"] for p in json.load(f)["proxies"]] == [f"agent-1:{api_port}"]
    world.server.stop()
    os.unlink(web)
    world.start_server()
    assert list(listed(world)) == [f"agent-1:{api_port}"]
    assert refused(web_port)


def test_a_reload_applies_the_diff_and_keeps_live_connections(up):
    world, t = up, up.targets
    keep, retarget, fence, move, gone, new, moved = (free_port() for _ in range(7))
    write(world, "keep.conf", section("keep", t["A"], keep))
    write(world, "change.conf", section("retarget", t["A"], retarget), section("fence", t["A"], fence),
          section("move", t["A"], move))
    gone_file = write(world, "gone.conf", section("gone", t["A"], gone))
    res = reload(world)
    assert res.returncode == 0, res.stderr
    assert "proxies declared in files: added retarget, fence, move, gone, keep; 0 unchanged" in res.stdout, res.stdout
    assert set(listed(world)) == {"keep", "retarget", "fence", "move", "gone"}
    live = {name: Live(port) for name, port in
            (("keep", keep), ("retarget", retarget), ("fence", fence), ("move", move), ("gone", gone))}
    for conn in live.values():
        assert conn.round(b"A:")
    before = listed(world)

    write(world, "change.conf", section("retarget", t["B"], retarget),
          section("fence", t["A"], fence, whitelist="10.9.9.9", idle_timeout="600"),
          section("move", t["A"], moved))
    os.unlink(gone_file)
    new_file = write(world, "new.conf", section("new", t["B"], new))
    res = reload(world)
    assert res.returncode == 0, res.stderr
    line = next(l for l in res.stdout.splitlines() if l.startswith("proxies declared in files"))
    assert line == ("proxies declared in files: added new; removed gone; changed retarget, fence, move; 1 unchanged; "
                    "1 connection(s) closed"), line

    after = listed(world)
    assert set(after) == {"keep", "retarget", "fence", "move", "new"}
    # unchanged: its counters and its live connection kept
    assert after["keep"]["connections_total"] == before["keep"]["connections_total"] == 1
    assert after["keep"]["connections"] == 1
    # live connections through the unchanged and the changed proxies keep flowing, to the target
    # they were opened to; the removed proxy's is closed
    for name in ("keep", "retarget", "fence", "move"):
        assert live[name].round(b"A:"), name
    assert live["gone"].closed()
    # new clients see the new set
    assert ask(keep) == b"A:hello"
    assert ask(retarget) == b"B:hello"  # a new target, for new clients
    assert ask(fence) == b""  # the new whitelist, in place
    assert after["fence"]["idle_timeout"] == 600 and after["fence"]["whitelist"] == ["10.9.9.9/32"]
    assert refused(move) and ask(moved) == b"A:hello"  # the new port bound, the old one closed
    assert refused(gone)
    assert ask(new) == b"B:hello" and after["new"]["source"] == f"file:{new_file}"
    for name in ("keep", "retarget", "fence", "move"):  # and still, after all that traffic
        assert live[name].round(b"A:"), name
        live[name].close()
    live["gone"].close()

    # enabled = false closes the port and keeps the live connection; true again serves
    conn = Live(keep)
    write(world, "keep.conf", section("keep", t["A"], keep, enabled="false"))
    assert reload(world).returncode == 0
    assert listed(world)["keep"]["state"] == "disabled" and refused(keep) and conn.round(b"A:")
    write(world, "keep.conf", section("keep", t["A"], keep))
    assert reload(world).returncode == 0
    assert ask(keep) == b"A:hello" and conn.round(b"A:")
    conn.close()


def test_two_proxies_may_swap_their_ports_and_a_renamed_proxy_keeps_its_port(up):
    world, t = up, up.targets
    p1, p2 = free_port(), free_port()
    write(world, "pair.conf", section("one", t["A"], p1), section("two", t["B"], p2))
    assert reload(world).returncode == 0
    write(world, "pair.conf", section("one", t["A"], p2), section("three", t["B"], p1))
    res = reload(world)
    assert res.returncode == 0, res.stderr
    assert ask(p2) == b"A:hello" and ask(p1) == b"B:hello"
    assert set(listed(world)) == {"one", "three"}


ERRORS = {
    "a value out of range": (
        lambda w, t, busy: [write(w, "bad.conf", section("bad", t["A"], 70000))],
        "{dir}/bad.conf [bad] remote_port = 70000: must be 1..65535"),
    "an unknown key": (
        lambda w, t, busy: [write(w, "bad.conf", section("bad", t["A"], free_port(), colour="blue"))],
        "{dir}/bad.conf [bad] colour: unknown key"),
    "a malformed file": (
        lambda w, t, busy: [write(w, "bad.conf", "[bad]\nagent agent-1\n")],
        "{dir}/bad.conf line 2: "),
    "a name declared twice": (
        lambda w, t, busy: [write(w, "zz.conf", section("web", t["A"], free_port()))],
        "{dir}/zz.conf [web]: proxy web is declared in {dir}/web.conf too"),
    "a port declared twice": (
        lambda w, t, busy: [write(w, "zz.conf", section("other", t["A"], w.web_port))],
        "{dir}/zz.conf [other] remote_port = {web}: already used by proxy web in {dir}/web.conf"),
    "the name of a proxy made through the API": (
        lambda w, t, busy: [write(w, "zz.conf", section("made", t["A"], free_port()))],
        "{dir}/zz.conf [made]: a proxy named made was made through the API; delete it there "
        "(anywherectl proxy del made) or give this section another name"),
    "the port of a proxy made through the API": (
        lambda w, t, busy: [write(w, "zz.conf", section("other", t["A"], w.api_port))],
        "{dir}/zz.conf [other] remote_port = {api}: already used by proxy made, made through the API"),
    "the agent port": (
        lambda w, t, busy: [write(w, "zz.conf", section("other", t["A"], w.port))],
        "{dir}/zz.conf [other] remote_port = {agent}: is the agent port"),
    "a port held by another process": (
        lambda w, t, busy: [write(w, "zz.conf", section("other", t["A"], busy))],
        "{dir}/zz.conf [other] remote_port = {busy}: cannot listen on [::]:{busy}: Address already in use"),
    "a moved proxy's new port held by another process": (
        lambda w, t, busy: [write(w, "web.conf", section("web", t["A"], busy))],
        "{dir}/web.conf [web] remote_port = {busy}: cannot listen on [::]:{busy}: Address already in use"),
}


def test_every_refused_reload_names_file_section_key_and_value_and_changes_nothing(up):
    world, t = up, up.targets
    world.web_port, world.api_port = free_port(), free_port()
    web = write(world, "web.conf", section("web", t["A"], world.web_port))
    world.api("POST", "/v1/proxies", {"name": "made", "agent_id": "agent-1", "local_ip": "127.0.0.1",
                                      "local_port": t["B"], "remote_port": world.api_port})
    assert reload(world).returncode == 0
    held = socket.socket(socket.AF_INET6)
    held.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    held.bind(("::", 0))
    held.listen(1)
    busy = held.getsockname()[1]
    conn = Live(world.web_port)
    assert conn.round(b"A:")
    running = shape(world)
    values = {"dir": world.proxies_dir, "web": world.web_port, "api": world.api_port, "agent": world.port,
              "busy": busy}
    try:
        for what, (make, expected) in ERRORS.items():
            start = len(world.server.log())
            make(world, t, busy)
            res = reload(world)
            message = expected.format(**values)
            assert res.returncode == 1, what
            assert "422" in res.stderr and message in res.stderr, f"{what}: {res.stderr}"
            wait_log_line(world.server, "reload refused", start=start)
            assert message in world.server.log()[start:], what
            assert shape(world) == running, what
            assert ask(world.web_port) == b"A:hello" and ask(world.api_port) == b"B:hello", what
            assert conn.round(b"A:"), what
            for name in os.listdir(world.proxies_dir):
                if name != "web.conf":
                    os.unlink(os.path.join(world.proxies_dir, name))
            write(world, "web.conf", section("web", t["A"], world.web_port))
        # several problems in several files: every one named, at once
        write(world, "a.conf", section("a", 0, free_port()))
        write(world, "b.conf", section("b", t["A"], free_port(), enabled="maybe"))
        res = reload(world)
        assert res.returncode == 1
        assert f"{world.proxies_dir}/a.conf [a] local_port = 0: must be 1..65535" in res.stderr
        assert f"{world.proxies_dir}/b.conf [b] enabled = maybe: must be true or false" in res.stderr
        assert shape(world) == running
        # a SIGHUP (systemctl reload) is refused the same way, in the log
        start = len(world.server.log())
        world.server.signal(signal.SIGHUP)
        line = wait_log_line(world.server, "reload refused", start=start)
        assert "nothing changed" in line or "stays in force" in line
        assert f"{world.proxies_dir}/a.conf [a] local_port = 0" in world.server.log()[start:]
        assert shape(world) == running and conn.round(b"A:")
        os.unlink(os.path.join(world.proxies_dir, "a.conf"))
        os.unlink(os.path.join(world.proxies_dir, "b.conf"))
        assert reload(world).returncode == 0 and conn.round(b"A:")
        assert web in shape(world)["web"][-1]
    finally:
        held.close()
        conn.close()


def test_a_bad_file_or_a_clash_with_a_stored_proxy_stops_the_start(world, targets):
    world.proxies_dir = str(world.tmp / "proxies.d")
    write(world, "bad.conf", section("bad", targets["A"], free_port(), idle_timeout="-1"))
    proc = world.start_server(wait=False)
    assert proc.popen.wait(20) == 2
    assert f"{world.proxies_dir}/bad.conf [bad] idle_timeout = -1: must be a number of seconds" in proc.log()
    os.unlink(os.path.join(world.proxies_dir, "bad.conf"))
    port = free_port()
    world.start_server()
    world.api("POST", "/v1/proxies", {"name": "made", "agent_id": "agent-1", "local_ip": "127.0.0.1",
                                      "local_port": targets["A"], "remote_port": port})
    world.server.stop()
    write(world, "made.conf", section("made", targets["A"], port))
    proc = world.start_server(wait=False)
    assert proc.popen.wait(20) == 1
    assert "cannot start" in proc.log()
    assert f"{world.proxies_dir}/made.conf [made]: a proxy named made was made through the API" in proc.log()


def test_the_api_refuses_to_change_a_declared_proxy_naming_its_file(up):
    world, t = up, up.targets
    port = free_port()
    web = write(world, "web.conf", section("web", t["A"], port))
    assert reload(world).returncode == 0
    conn = Live(port)
    assert conn.round(b"A:")
    for method, path, verb in (("DELETE", "/v1/proxies/web", "remove"),
                               ("POST", "/v1/proxies/web/disable", "set enabled = false"),
                               ("POST", "/v1/proxies/web/enable", "set enabled = true"),
                               ("DELETE", f"/v1/proxies/{port}", "remove")):
        with pytest.raises(Exception) as err:
            world.api(method, path)
        assert f"409 proxy web is declared in {web}: {verb} it there and reload" in str(err.value), str(err.value)
    res = world.ctl("proxy", "del", "web", "--admin-socket", world.sock, check=False, prog=CTL)
    assert res.returncode == 1 and f"declared in {web}" in res.stderr
    with pytest.raises(Exception) as err:
        world.api("POST", "/v1/proxies", {"name": "web", "agent_id": "agent-1", "local_ip": "127.0.0.1",
                                          "local_port": t["B"], "remote_port": free_port()})
    assert f"409 a proxy named web already exists (declared in {web})" in str(err.value)
    with pytest.raises(Exception) as err:
        world.api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": t["B"],
                                          "remote_port": port})
    assert f"409 remote port {port} is already used by proxy web (declared in {web})" in str(err.value)
    # still there, still serving, the live connection untouched; killing its connections is allowed
    assert listed(world)["web"]["state"] == "listening" and ask(port) == b"A:hello" and conn.round(b"A:")
    world.ctl("conn", "kill", "--proxy", "web", "--admin-socket", world.sock, prog=CTL)
    assert conn.closed()
    conn.close()


def test_export_then_import_gives_the_same_proxies_and_the_same_behaviour(up):
    world, t = up, up.targets
    ports = [free_port() for _ in range(3)]
    world.api("POST", "/v1/proxies", {"name": "fenced", "agent_id": "agent-1", "local_ip": "127.0.0.1",
                                      "local_port": t["A"], "remote_port": ports[0],
                                      "whitelist": ["127.0.0.1/32", "::1"], "idle_timeout": 30})
    world.api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": t["B"],
                                      "remote_port": ports[1]})
    world.api("POST", "/v1/proxies", {"name": "off", "agent_id": "agent-1", "local_ip": "localhost",
                                      "local_port": t["B"], "remote_port": ports[2]})
    world.api("POST", "/v1/proxies/off/disable")
    declared_port = free_port()
    write(world, "web.conf", section("web", t["A"], declared_port))
    assert reload(world).returncode == 0
    before = {n: {k: p[k] for k in FIELDS} for n, p in listed(world).items() if p["source"] == "api"}
    assert len(before) == 3

    text = world.ctl("proxy", "export", "--admin-socket", world.sock, prog=CTL).stdout
    assert "[web]" not in text  # declared already: not exported
    one = world.ctl("proxy", "export", "fenced", "--admin-socket", world.sock, prog=CTL).stdout
    assert "[fenced]" in one and "[off]" not in one
    res = world.ctl("proxy", "export", "web", "--admin-socket", world.sock, check=False, prog=CTL)
    assert res.returncode == 1 and "already declared in a file: web" in res.stderr
    res = world.ctl("proxy", "export", "nosuch", "--admin-socket", world.sock, check=False, prog=CTL)
    assert res.returncode == 1 and "no proxy named nosuch" in res.stderr

    for name in before:
        world.ctl("proxy", "del", name, "--admin-socket", world.sock, prog=CTL)
    assert set(listed(world)) == {"web"}
    path = write(world, "exported.conf", text)
    res = reload(world)
    assert res.returncode == 0, res.stderr
    after = {n: {k: p[k] for k in FIELDS} for n, p in listed(world).items() if n != "web"}
    assert after == before
    assert all(p["source"] == f"file:{path}" for n, p in listed(world).items() if n != "web")
    assert ask(ports[0]) == b"A:hello" and ask(ports[1]) == b"B:hello" and refused(ports[2])
    # and the state directory no longer holds them
    with open(os.path.join(world.state_dir, "proxies.json"), encoding="utf-8") as f:
        assert json.load(f)["proxies"] == []


def test_check_config_validates_and_prints_the_declared_proxies(tmp_path, targets):
    directory = tmp_path / "proxies.d"
    directory.mkdir()
    (directory / "web.conf").write_text(section("web", 8080, 18080, whitelist="203.0.113.0/24") +
                                        section("db", 5432, 15432, enabled="false"))
    (directory / "example.conf").write_text("# declares nothing\n#[web]\n#agent = agent-1\n")
    config = tmp_path / "anywhered.conf"
    config.write_text(f"[server]\nproxies_dir = {directory}\n")
    res = subprocess.run([os.sys.executable, "-m", SERVER, "check-config", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"proxies_dir = {directory}" in res.stdout
    assert f"# {directory}: OK; 2 proxies declared" in res.stdout
    assert (f"# {directory}/web.conf\n[web]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 8080\n"
            "remote_port = 18080\nwhitelist = 203.0.113.0/24\n") in res.stdout
    assert "[db]" in res.stdout and "enabled = false" in res.stdout
    (directory / "bad.conf").write_text(section("bad", 80, 70000))
    res = subprocess.run([os.sys.executable, "-m", SERVER, "check-config", "--proxies-dir", str(directory)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"{directory}/bad.conf [bad] remote_port = 70000: must be 1..65535" in res.stderr
