"""PROXY protocol to the target (issue 19): `proxy_protocol = v1 | v2` on real processes.

Targets no one here wrote read the header: nginx (`listen ... proxy_protocol`, its access log
showing `$proxy_protocol_addr` and `$proxy_protocol_port`) for an IPv4 and an IPv6 client, v1 and
v2; HAProxy (`accept-proxy`) in front of an echo target.  A target that speaks first gets the
header before anything and its banner still reaches the client.  An agent that does not announce
``pp`` on its trunk (a hand-written old one), and the deprecated per-client data connections,
never get such a client: it is closed, and the log and the health check say why (with several
agents, the next one takes it).  The file key, the flag and the API
field, with export and their errors.  A test that needs nginx or haproxy skips, naming it, when it
is absent (`make system-deps` installs both).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest
from anywhere import proxyproto
from anywhere.wire import PROTO_VERSION
from conftest import Proc, TargetServer, echo, free_port, recv_all, wait_for, wait_log_line
from handpeer import client_ctx

CTL = "anywhere.ctl"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def need(binary: str) -> None:
    if not os.access(binary, os.X_OK):
        pytest.skip(f"{os.path.basename(binary)} is not installed ({binary}); make system-deps installs it")


def add(world, target: int, version: str | None, port: int | None = None, agent_id: str = "agent-1") -> int:
    port = port or free_port()
    body = {"name": "pp", "agent_id": agent_id, "local_ip": "127.0.0.1", "local_port": target, "remote_port": port}
    if version is not None:
        body["proxy_protocol"] = version
    world.api("POST", "/v1/proxies", body)
    return port


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# -- nginx --------------------------------------------------------------------------------------------
@pytest.fixture
def nginx(tmp_path):
    need(NGINX)
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port(socket.AF_INET)
    (prefix / "nginx.conf").write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format pp 'pp=$proxy_protocol_addr port=$proxy_protocol_port remote=$remote_addr';
    access_log {prefix}/access.log pp;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{ return 200 "hello from nginx\\n"; }}
    }}
}}
""")
    proc = Proc([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")],
                tmp_path / "nginx.out")
    try:
        wait_for(lambda: (prefix / "nginx.pid").exists() and listening(port), 10,
                 what=f"nginx to listen:\n{proc.log()}")
        proc.port = port
        proc.access = prefix / "access.log"
        yield proc
    finally:
        proc.stop()


def http_get(host: str, port: int) -> tuple[bytes, int]:
    """GET / through the tunnel; the answer and the client's own source port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.settimeout(10)
        c.connect((host, port))
        sport = c.getsockname()[1]
        c.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        return recv_all(c, 10), sport


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_logs_the_client_address_and_port_for_ipv4_and_ipv6_clients(world, nginx, version):
    world.start_server()
    world.start_agent()
    port = add(world, nginx.port, version)
    for host in ("127.0.0.1", "::1"):
        answer, sport = http_get(host, port)
        assert answer.startswith(b"HTTP/1.1 200") and b"hello from nginx" in answer, answer
        # the client's own address, never ::ffff:127.0.0.1; nginx itself saw the agent (127.0.0.1)
        line = f"pp={host} port={sport} remote=127.0.0.1"
        wait_for(lambda: nginx.access.exists() and line in nginx.access.read_text(), 10,
                 what=f"{line!r} in nginx's access log:\n{nginx.access.read_text() if nginx.access.exists() else ''}")
    assert "::ffff:" not in nginx.access.read_text()


# -- HAProxy --------------------------------------------------------------------------------------------
@pytest.fixture
def haproxy(tmp_path, echo_target):
    need(HAPROXY)
    port = free_port(socket.AF_INET)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
global
    log stdout format raw local0
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port} accept-proxy
    log-format "client=%ci:%cp"
    default_backend echo
backend echo
    server echo 127.0.0.1:{echo_target.port}
""")
    proc = Proc([HAPROXY, "-db", "-f", str(cfg)], tmp_path / "haproxy.log")
    try:
        wait_for(lambda: listening(port), 10, what=f"haproxy to listen:\n{proc.log()}")
        proc.port = port
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_haproxy_accept_proxy_takes_both_versions(world, haproxy, version):
    world.start_server()
    world.start_agent()
    port = add(world, haproxy.port, version)
    for host in ("127.0.0.1", "::1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect((host, port))
            sport = c.getsockname()[1]
            c.sendall(b"through haproxy")
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c, 10) == b"through haproxy"
        wait_log_line(haproxy, f"client={host}:{sport}", timeout=10)  # %ci: the header's source


# -- a target that speaks first ----------------------------------------------------------------------
class Banner:
    """A target that says its banner on accept, before reading anything (like SSH or SMTP), then
    reads until the client's line and answers it; it keeps every byte it received."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.server = TargetServer(self._handle)
        self.port = self.server.port

    def _handle(self, conn: socket.socket) -> None:
        conn.sendall(b"SSH-2.0-banner\r\n")
        got = bytearray()
        self.got.append(got)
        conn.settimeout(10)
        while not got.endswith(b"SSH-2.0-client\r\n"):
            data = conn.recv(65536)
            if not data:
                return
            got += data
        conn.sendall(b"bye\r\n")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_target_that_speaks_first_gets_the_header_before_anything(world, version):
    target = Banner()
    try:
        world.start_server()
        world.start_agent()
        port = add(world, target.port, version)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            sport = c.getsockname()[1]
            banner = b""
            while not banner.endswith(b"\r\n"):  # the client says nothing until it has the banner
                data = c.recv(100)
                assert data, "closed before the banner"
                banner += data
            assert banner == b"SSH-2.0-banner\r\n"
            c.sendall(b"SSH-2.0-client\r\n")
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c, 10) == b"bye\r\n"
        expected = proxyproto.header(proxyproto.origin(int(version[1]), ("127.0.0.1", sport), ("127.0.0.1", port)))
        wait_for(lambda: target.got and bytes(target.got[0]).endswith(b"SSH-2.0-client\r\n"), 5, what="the target's bytes")
        assert bytes(target.got[0]) == expected + b"SSH-2.0-client\r\n"
    finally:
        target.server.stop()


def test_the_header_goes_ahead_of_early_bytes_and_a_proxy_without_it_sends_none(world, echo_target):
    """The client's first bytes travel right behind OPEN (no round trip): still behind the header."""
    got: list[bytes] = []

    def keep(conn: socket.socket) -> None:
        data = recv_all(conn, 10)
        got.append(data)
        conn.sendall(data)
    target = TargetServer(keep)
    try:
        world.start_server()
        world.start_agent()
        with_pp, without = add(world, target.port, "v2"), free_port()
        world.api("POST", "/v1/proxies", {"name": "plain", "agent_id": "agent-1", "local_ip": "127.0.0.1",
                                          "local_port": target.port, "remote_port": without})
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(("::1", with_pp))
            sport = c.getsockname()[1]
            c.sendall(b"early" * 1000)
            c.shutdown(socket.SHUT_WR)
            data = recv_all(c, 10)
        header = proxyproto.header(proxyproto.origin(2, ("::1", sport), ("::1", with_pp)))
        assert data == header + b"early" * 1000  # what the target received, echoed
        assert echo(without, b"nothing in front") == b"nothing in front"
    finally:
        target.stop()


# -- who never gets such a client ------------------------------------------------------------------
def test_an_agent_that_does_not_announce_pp_never_gets_the_client(world, peers, echo_target):
    world.start_server("--trunk-idle-timeout", "0")
    ctx = client_ctx(world.creds.ca, world.creds.agent("agent-2"))
    admin = peers(world.port, ctx)  # an agent older than the PROXY protocol: no pp on its trunk
    admin.send("hello", proto=PROTO_VERSION, agent_id="agent-2", version="0.0.9")
    welcome = admin.recv()
    assert welcome["type"] == "welcome"
    trunk = peers(world.port, ctx)
    trunk.send("trunk", proto=PROTO_VERSION, agent_id="agent-2",
               **({"session": welcome["session"]} if "session" in welcome else {}))
    wait_for(lambda: any(a["agent_id"] == "agent-2" and a["trunks"] == 1
                         for a in world.api("GET", "/v1/agents")["agents"]), 5, what="the old agent's trunk")
    port = add(world, echo_target.port, "v1", agent_id="agent-2")
    start = len(world.server.log())
    assert echo(port, b"x") == b""  # closed, not connected without its header
    assert echo(port, b"x") == b""
    line = wait_log_line(world.server, "agent agent-2 (version 0.0.9) is too old for proxy_protocol", start=start)
    assert "proxy pp" in line
    wait_log_line(world.server, "proxy pp: client", "closed: agent agent-2 is too old for proxy_protocol", start=start)
    assert len([ln for ln in world.server.log()[start:].splitlines() if "(version 0.0.9) is too old" in ln]) == 1
    trunk.sock.settimeout(0.5)
    with pytest.raises((socket.timeout, TimeoutError)):  # no OPEN reached it, and it is still up
        trunk.sock.recv(100)
    proxy = next(p for p in world.api("GET", "/v1/proxies")["proxies"] if p["name"] == "pp")
    assert proxy["rejected"]["target_refused"] == 2
    with socket.socket(socket.AF_UNIX) as api:  # what a load balancer's health check hears
        api.settimeout(10)
        api.connect(world.sock)
        api.sendall(b"GET /v1/proxies/pp/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = recv_all(api, 10).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and json.loads(body) == {
        "proxy": "pp", "status": "unavailable", "reason": "no agent can serve: agent-2 too old for proxy_protocol"}


def test_with_several_agents_an_old_one_is_skipped_for_one_that_announces_pp(world, peers, echo_target):
    world.start_server("--trunk-idle-timeout", "0")
    world.start_agent("agent-1")
    ctx = client_ctx(world.creds.ca, world.creds.agent("agent-2"))
    admin = peers(world.port, ctx)
    admin.send("hello", proto=PROTO_VERSION, agent_id="agent-2", version="0.0.9")
    welcome = admin.recv()
    trunk = peers(world.port, ctx)
    trunk.send("trunk", proto=PROTO_VERSION, agent_id="agent-2",
               **({"session": welcome["session"]} if "session" in welcome else {}))
    wait_for(lambda: any(a["agent_id"] == "agent-2" and a["trunks"] == 1
                         for a in world.api("GET", "/v1/agents")["agents"]), 5, what="the old agent's trunk")
    port = free_port()
    world.api("POST", "/v1/proxies", {"name": "pp", "agent_ids": ["agent-2", "agent-1"], "balance": "failover",
                                      "local_ip": "127.0.0.1", "local_port": echo_target.port, "remote_port": port,
                                      "proxy_protocol": "v1"})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        sport = c.getsockname()[1]
        c.sendall(b"x")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c, 10) == f"PROXY TCP4 127.0.0.1 127.0.0.1 {sport} {port}\r\nx".encode()
    wait_log_line(world.server, "agent agent-2 is too old for proxy_protocol", "trying agent agent-1")


def test_the_deprecated_data_connections_refuse_a_proxy_protocol_client(world, echo_target):
    world.start_server("--pool-size", "0")
    world.start_agent()
    port = add(world, echo_target.port, "v2")
    start = len(world.server.log())
    assert echo(port, b"x") == b""
    wait_log_line(world.server, "proxy pp: client", "agent agent-1 has no trunk (pool_size = 0?): proxy_protocol "
                  "needs one (the per-client data connections carry no PROXY header)", start=start)
    plain = free_port()  # a proxy without it still works there
    world.api("POST", "/v1/proxies", {"name": "plain", "agent_id": "agent-1", "local_ip": "127.0.0.1",
                                      "local_port": echo_target.port, "remote_port": plain})
    assert echo(plain, b"still served") == b"still served"


# -- the key, the flag, the field ---------------------------------------------------------------------
def test_the_api_field_is_validated_shown_stored_and_exported(world, echo_target):
    world.start_server()
    ports = [free_port() for _ in range(4)]
    for name, value, port in (("one", "v1", ports[0]), ("two", "v2", ports[1]), ("off", "off", ports[2]),
                              ("null", None, ports[3])):
        world.api("POST", "/v1/proxies", {"name": name, "agent_id": "agent-1", "local_ip": "127.0.0.1",
                                          "local_port": echo_target.port, "remote_port": port,
                                          "proxy_protocol": value})
    listed = {p["name"]: p for p in world.api("GET", "/v1/proxies")["proxies"]}
    assert {n: p["proxy_protocol"] for n, p in listed.items()} == {"one": "v1", "two": "v2", "off": None, "null": None}
    for bad in ("v3", "V1", 1, True, ["v1"]):
        with pytest.raises(Exception) as err:
            world.api("POST", "/v1/proxies", {"agent_id": "agent-1", "local_ip": "127.0.0.1", "local_port": 80,
                                              "remote_port": free_port(), "proxy_protocol": bad})
        assert "400" in str(err.value) and f"proxy_protocol {bad!r} must be \"v1\", \"v2\", \"off\" or null (off)" \
            in str(err.value), str(err.value)
    with open(os.path.join(world.state_dir, "proxies.json"), encoding="utf-8") as f:
        stored = {p["name"]: p for p in json.load(f)["proxies"]}
    assert stored["one"]["proxy_protocol"] == "v1" and stored["two"]["proxy_protocol"] == "v2"
    assert "proxy_protocol" not in stored["off"] and "proxy_protocol" not in stored["null"]  # off: left out

    text = world.ctl("proxy", "export", "one", "two", "off", "--admin-socket", world.sock, prog=CTL).stdout
    assert "[one]\nagent = agent-1\n" in text and "proxy_protocol = v1\n" in text and "proxy_protocol = v2\n" in text
    assert text.count("proxy_protocol") == 2  # off is left out
    # a restart keeps them
    world.server.stop()
    world.start_server()
    listed = {p["name"]: p for p in world.api("GET", "/v1/proxies")["proxies"]}
    assert (listed["one"]["proxy_protocol"], listed["two"]["proxy_protocol"], listed["off"]["proxy_protocol"]) == \
        ("v1", "v2", None)


@pytest.mark.parametrize("prog", ["anywhere.ctl", "anywhere.server_cli"])
def test_the_flag_of_proxy_add(world, echo_target, prog):
    world.start_server()
    port = free_port()
    res = world.ctl("proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1", "--local-port",
                    str(echo_target.port), "--remote-port", str(port), "--proxy-protocol", "v2",
                    "--admin-socket", world.sock, prog=prog)
    assert f"proxy agent-1:{port} added" in res.stdout and "(PROXY protocol v2)" in res.stdout
    res = world.ctl("proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1", "--local-port", "80",
                    "--remote-port", str(free_port()), "--proxy-protocol", "v3", "--admin-socket", world.sock,
                    check=False, prog=prog)
    assert res.returncode == 2 and "--proxy-protocol: invalid choice: 'v3' (choose from 'v1', 'v2', 'off')" in res.stderr
    plain = free_port()
    world.ctl("proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1", "--local-port", "80",
              "--remote-port", str(plain), "--admin-socket", world.sock, prog=prog)
    listed = {p["remote_port"]: p for p in world.api("GET", "/v1/proxies")["proxies"]}
    assert listed[port]["proxy_protocol"] == "v2" and listed[plain]["proxy_protocol"] is None
    text = world.ctl("proxy", "list", "--admin-socket", world.sock, prog=prog).stdout
    assert f"proxy agent-1:{port}: PROXY protocol v2 to its target" in text and f"agent-1:{plain}: PROXY" not in text


def test_the_file_key_round_trips_and_a_reload_applies_a_change(world, echo_target):
    world.start_server()
    world.start_agent()
    os.makedirs(world.proxies_dir, exist_ok=True)
    path = os.path.join(world.proxies_dir, "web.conf")
    port = free_port()
    base = f"[web]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = {echo_target.port}\nremote_port = {port}\n"
    with open(path, "w") as f:
        f.write(base + "proxy_protocol = v1\n")
    res = world.ctl("reload", "--admin-socket", world.sock, check=False)
    assert res.returncode == 0, res.stderr
    web = next(p for p in world.api("GET", "/v1/proxies")["proxies"] if p["name"] == "web")
    assert web["proxy_protocol"] == "v1" and web["source"] == f"file:{path}"
    answer = echo(port, b"x")
    assert answer.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ") and answer.endswith(b"\r\nx")
    with open(path, "w") as f:
        f.write(base + "proxy_protocol = off\n")
    assert world.ctl("reload", "--admin-socket", world.sock, check=False).returncode == 0
    assert echo(port, b"x") == b"x"
    with open(path, "w") as f:
        f.write(base + "proxy_protocol = v9\n")
    res = world.ctl("reload", "--admin-socket", world.sock, check=False)
    assert res.returncode != 0 and f"{path} [web] proxy_protocol = v9: must be v1, v2 or off" in res.stderr + res.stdout
    assert echo(port, b"x") == b"x"  # nothing changed


def test_check_config_lists_the_key(tmp_path):
    directory = tmp_path / "proxies.d"
    directory.mkdir()
    (directory / "web.conf").write_text("[web]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 80\n"
                                        "remote_port = 18080\nproxy_protocol = v2\n\n[db]\nagent = agent-1\n"
                                        "local_ip = 127.0.0.1\nlocal_port = 5432\nremote_port = 15432\n"
                                        "proxy_protocol = off\n")
    res = subprocess.run([os.sys.executable, "-m", "anywhere.server_cli", "check-config", "--proxies-dir",
                          str(directory)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "[web]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 80\nremote_port = 18080\nproxy_protocol = v2\n" \
        in res.stdout
    assert res.stdout.count("proxy_protocol") == 1  # off is left out
