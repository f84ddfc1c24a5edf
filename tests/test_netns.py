"""Multi-host, in network namespaces: server, agent, target and two clients on separate hosts.

Topology (every address exists only inside namespaces this module creates; nothing leaves them):

    cl1 10.231.1.11 fd00:231:1::11 ─┐
    cl2 10.231.1.12 fd00:231:1::12 ─┤ "public" bridge in srv:   srv 10.231.1.1  fd00:231:1::1
    agt 10.231.1.2  fd00:231:1::2  ─┘   (anywhered, agent port 1111, proxy ports 80xx)
    agt 10.231.4.1 ── point-to-point "private" link ── tgt 10.231.4.2 (echo server :7000)

srv even has a route to the private network via agt, so packets to the target really leave
srv, but no namespace forwards (ip_forward stays 0 in a fresh namespace): only agt reaches tgt.
The module first proves that, then tunnels through it and judges the whitelist on cl1 and cl2,
whose real source addresses differ.

Needs root and working `ip netns`; otherwise every test is skipped with the reason.  Every
process is ended by pid and every namespace deleted in teardown, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from anywhere import credentials
from anywhere.ctl import Client
from anywhere.net import hostport
from conftest import Proc, wait_for

pytestmark = pytest.mark.netns

PY = sys.executable
REPO = str(Path(__file__).resolve().parent.parent)

TAG = f"aw{os.getpid()}"  # at most 9 characters: veth names below stay within 15
NS = {role: f"{TAG}-{role}" for role in ("srv", "agt", "tgt", "cl1", "cl2")}
BRIDGE = "br0"  # lives inside srv, so its name cannot collide

SRV_IP, AGT_IP, CL1_IP, CL2_IP = "10.231.1.1", "10.231.1.2", "10.231.1.11", "10.231.1.12"
SRV_IP6, AGT_IP6, CL1_IP6, CL2_IP6 = "fd00:231:1::1", "fd00:231:1::2", "fd00:231:1::11", "fd00:231:1::12"
AGT_PRIV_IP, TGT_IP = "10.231.4.1", "10.231.4.2"
AGENT_PORT, TGT_PORT = 1111, 7000

# -- scripts run inside the namespaces ----------------------------------------------------------------
ECHO_SCRIPT = r"""
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(64)
print("listening", flush=True)
def serve(c):
    try:
        while True:
            d = c.recv(1 << 16)
            if not d:
                c.shutdown(socket.SHUT_WR)
                return
            c.sendall(d)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, a = srv.accept()
    print("accepted", a[0], a[1], flush=True)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# Connects, sends N random bytes (then EOF), reads until EOF; prints one JSON line.
CLIENT_SCRIPT = r"""
import hashlib, json, os, socket, sys, threading, time
host, port, n, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
res = {}
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(wait)
t0 = time.monotonic()
try:
    s.connect((host, port))
except OSError as e:
    print(json.dumps({"connect_error": repr(e)}))
    sys.exit(0)
res["local"] = list(s.getsockname()[:2])
payload = os.urandom(n)
res["sent_sha"] = hashlib.sha256(payload).hexdigest()
h = hashlib.sha256()
got = [0]
state = {"eof": False, "recv_error": None}
def reader():
    try:
        while True:
            d = s.recv(1 << 20)
            if not d:
                state["eof"] = True
                return
            h.update(d)
            got[0] += len(d)
    except TimeoutError:
        state["recv_error"] = "timeout"
    except OSError as e:
        state["recv_error"] = type(e).__name__
t = threading.Thread(target=reader, daemon=True)
t.start()
try:
    view = memoryview(payload)
    for i in range(0, n, 1 << 16):
        s.sendall(view[i:i + (1 << 16)])
    s.shutdown(socket.SHUT_WR)
except OSError as e:
    res["send_error"] = type(e).__name__
t.join(wait + 5)
res.update(state, recv_len=got[0], recv_sha=h.hexdigest(), elapsed=time.monotonic() - t0)
print(json.dumps(res))
"""

# Connects, gets an echo of b"hello", prints a JSON line, holds the connection until stdin closes.
HOLD_SCRIPT = r"""
import json, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=10)
s.sendall(b"hello")
buf = b""
while len(buf) < 5:
    d = s.recv(5 - len(buf))
    if not d:
        break
    buf += d
print(json.dumps({"local": list(s.getsockname()[:2]), "echo": buf.decode("latin-1")}), flush=True)
sys.stdin.read()
s.shutdown(socket.SHUT_WR)
rest = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    rest += d
print(json.dumps({"rest": len(rest)}), flush=True)
"""

# A direct TCP connect with a short deadline: {"ok": bool, "error": ...}
DIAL_SCRIPT = r"""
import json, socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print(json.dumps({"ok": True}))
except OSError as e:
    print(json.dumps({"ok": False, "error": repr(e)}))
"""


# -- helpers --------------------------------------------------------------------------------------------
def run(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def ns_exec(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def ns_python(role: str, script: str, *args: str, timeout: float = 40) -> dict:
    """Run a Python script in a namespace; returns the JSON of its last output line."""
    res = run(*ns_exec(NS[role]), PY, "-c", script, *args, check=False, timeout=timeout)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        raise AssertionError(f"script in {role} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return json.loads(lines[-1])


def existing_netns() -> set[str]:
    res = run("ip", "netns", "list", check=False)
    return {line.split()[0] for line in res.stdout.splitlines() if line.strip()}


@dataclass
class Net:
    tmp: Path
    cred_dir: Path
    sock: str
    procs: list[Proc] = field(default_factory=list)
    server: Proc | None = None
    target: Proc | None = None

    def api(self, method: str, path: str, body=None):
        return Client(self.sock).call(method, path, body)

    def start(self, role: str, args: list[str], name: str) -> Proc:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = Proc([*ns_exec(NS[role]), *args], self.tmp / f"{name}.log", env=env)
        self.procs.append(proc)
        return proc

    def start_agent(self, agent_id: str, *extra: str) -> Proc:
        d = self.cred_dir
        proc = self.start("agt", [PY, "-m", "anywhere.agent_cli", "-s", SRV_IP, "-p", str(AGENT_PORT),
                                  "--ca", str(d / "ca.crt"), "--cert", str(d / f"{agent_id}.crt"),
                                  "--key", str(d / f"{agent_id}.key"), "--log-level", "debug", *extra],
                          f"agent-{agent_id}")

        def connected() -> bool:
            if self.agent(agent_id):
                return True
            if not proc.alive():
                raise AssertionError(f"agent {agent_id} exited {proc.popen.returncode}:\n{proc.log()}")
            return False
        wait_for(connected, 15, what=f"agent {agent_id} to connect")
        return proc

    def agent(self, agent_id: str) -> dict | None:
        return next((a for a in self.api("GET", "/v1/agents")["agents"] if a["agent_id"] == agent_id), None)

    def add_proxy(self, remote_port: int, agent_id: str = "agent-1", whitelist: list[str] | None = None) -> None:
        body = {"agent_id": agent_id, "local_ip": TGT_IP, "local_port": TGT_PORT, "remote_port": remote_port}
        if whitelist is not None:
            body["whitelist"] = whitelist
        self.api("POST", "/v1/proxies", body)

    def target_accepts(self) -> list[str]:
        return re.findall(r"^accepted (\S+) \d+$", self.target.log(), re.M)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=5)
            except Exception:  # never let one process keep the others (or the namespaces) alive
                proc.kill()


def delete_namespaces(names) -> list[str]:
    errors = []
    present = existing_netns()
    for name in names:
        if name in present:
            res = run("ip", "netns", "del", name, check=False)
            if res.returncode != 0:
                errors.append(f"ip netns del {name}: {res.stderr.strip()}")
    return errors


def build_topology() -> None:
    for ns in NS.values():
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        # fresh namespaces do not forward; say so explicitly, it is what the test relies on
        run(*ns_exec(ns), "sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0", check=False)
    srv = NS["srv"]
    run("ip", "-n", srv, "link", "add", BRIDGE, "type", "bridge")
    run("ip", "-n", srv, "addr", "add", f"{SRV_IP}/24", "dev", BRIDGE)
    run("ip", "-n", srv, "addr", "add", f"{SRV_IP6}/64", "dev", BRIDGE, "nodad")
    run("ip", "-n", srv, "link", "set", BRIDGE, "up")
    for role, ip, ip6 in (("agt", AGT_IP, AGT_IP6), ("cl1", CL1_IP, CL1_IP6), ("cl2", CL2_IP, CL2_IP6)):
        inner, outer = f"{TAG}{role[0]}{role[-1]}", f"{TAG}s{role[-1]}"  # e.g. aw1234at / aw1234st
        run("ip", "link", "add", inner, "netns", NS[role], "type", "veth", "peer", "name", outer, "netns", srv)
        run("ip", "-n", srv, "link", "set", outer, "master", BRIDGE)
        run("ip", "-n", srv, "link", "set", outer, "up")
        run("ip", "-n", NS[role], "addr", "add", f"{ip}/24", "dev", inner)
        run("ip", "-n", NS[role], "addr", "add", f"{ip6}/64", "dev", inner, "nodad")
        run("ip", "-n", NS[role], "link", "set", inner, "up")
    a, t = f"{TAG}ap", f"{TAG}tp"
    run("ip", "link", "add", a, "netns", NS["agt"], "type", "veth", "peer", "name", t, "netns", NS["tgt"])
    run("ip", "-n", NS["agt"], "addr", "add", f"{AGT_PRIV_IP}/24", "dev", a)
    run("ip", "-n", NS["tgt"], "addr", "add", f"{TGT_IP}/24", "dev", t)
    run("ip", "-n", NS["agt"], "link", "set", a, "up")
    run("ip", "-n", NS["tgt"], "link", "set", t, "up")
    # Routes toward the private network, so a direct attempt really sends packets (and is dropped
    # for want of forwarding) instead of failing locally with "network unreachable".
    run("ip", "-n", srv, "route", "add", "10.231.4.0/24", "via", AGT_IP)
    for role in ("cl1", "cl2"):
        run("ip", "-n", NS[role], "route", "add", "10.231.4.0/24", "via", SRV_IP)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip(f"network-namespace tests need root (running as uid {os.geteuid()})")
    if shutil.which("ip") is None:
        pytest.skip("network-namespace tests need the `ip` command (iproute2), which is not installed")
    leftovers = delete_namespaces(NS.values())  # from an earlier crashed run with this same pid
    if leftovers:
        pytest.skip("cannot remove namespaces left over from an earlier run: " + "; ".join(leftovers))
    probe = run("ip", "netns", "add", NS["srv"], check=False)
    if probe.returncode != 0:
        pytest.skip(f"`ip netns add` failed, network namespaces unavailable here: {probe.stderr.strip()}")
    run("ip", "netns", "del", NS["srv"], check=False)

    tmp = tmp_path_factory.mktemp("netns")
    cred_dir = tmp / "credential"
    credentials.init(str(cred_dir), "server.test", [SRV_IP, SRV_IP6])
    credentials.issue("agent-1", str(cred_dir))
    credentials.issue("agent-2", str(cred_dir))
    n = Net(tmp, cred_dir, str(tmp / "anywhered.sock"))
    try:
        build_topology()
        n.target = n.start("tgt", [PY, "-u", "-c", ECHO_SCRIPT, TGT_IP, str(TGT_PORT)], "target")
        n.target.wait_log("listening")
        n.server = n.start("srv", [PY, "-m", "anywhere.server_cli", "start", "-p", str(AGENT_PORT),
                                   "--ca", str(cred_dir / "ca.crt"), "--cert", str(cred_dir / "server.crt"),
                                   "--key", str(cred_dir / "server.key"), "--admin-socket", n.sock,
                                   "--state-dir", str(tmp / "state"), "--log-level", "debug", "--wl", CL1_IP],
                           "server")
        n.server.wait_log("listening for agents")
        n.start_agent("agent-1")
        yield n
    finally:
        n.stop_all()
        errors = delete_namespaces(NS.values())
        assert not errors, errors


def client(role: str, host: str, port: int, nbytes: int, wait: float = 10) -> dict:
    return ns_python(role, CLIENT_SCRIPT, host, str(port), str(nbytes), str(wait), timeout=wait + 30)


def assert_echoed(res: dict, nbytes: int) -> None:
    assert "connect_error" not in res, res
    assert res.get("send_error") is None and res["recv_error"] is None, res
    assert res["eof"] and res["recv_len"] == nbytes, res
    assert res["recv_sha"] == res["sent_sha"], res


def assert_refused(net: Net, res: dict, role: str, src_ip: str, which: str) -> None:
    """Closed at once without a byte, and the server's log names this very client and the whitelist."""
    assert "connect_error" not in res, res  # the kernel accepts; anywhered then closes
    assert res["recv_len"] == 0, res
    assert res["eof"] or res["recv_error"] in ("ConnectionResetError", "BrokenPipeError"), res
    assert res["recv_error"] != "timeout" and res["elapsed"] < 5, res
    ip, port = res["local"]
    assert ip == src_ip, f"{role} connected from {ip}, expected {src_ip}"
    peer = hostport(ip, port)
    wait_for(lambda: f"client {peer} refused: not in the {which} whitelist" in net.server.log(), 5,
             what=f"the server to log the refusal of {peer} ({role}):\n{net.server.log()[-3000:]}")


# -- tests ----------------------------------------------------------------------------------------------
def test_target_reachable_only_from_the_agents_host(net):
    """Before any tunnel: srv, cl1 and cl2 cannot reach the target directly; agt can."""
    assert ns_python("agt", DIAL_SCRIPT, TGT_IP, str(TGT_PORT), "3") == {"ok": True}
    for role in ("srv", "cl1", "cl2"):
        res = ns_python(role, DIAL_SCRIPT, TGT_IP, str(TGT_PORT), "1.5")
        assert res["ok"] is False, f"{role} reached the target directly: the topology is wrong"
    # the agent really dialled the server's public address from its own host
    assert net.agent("agent-1")["address"].startswith(f"{AGT_IP}:")


def test_client_reaches_private_target_through_tunnel(net):
    """8 MB of random data from cl1 through srv → agt → tgt and back, byte for byte."""
    net.add_proxy(8001)
    before = len(net.target_accepts())
    nbytes = 8 * 1024 * 1024
    res = client("cl1", SRV_IP, 8001, nbytes, wait=30)
    assert_echoed(res, nbytes)
    assert res["local"][0] == CL1_IP
    # the target saw the agent's private address: the connection came out of the agent's host
    accepts = net.target_accepts()
    assert accepts[before:] == [AGT_PRIV_IP], accepts
    wait_for(lambda: net.api("GET", "/v1/connections")["connections"] == [], 5, what="connection list to empty")


def test_global_whitelist_refuses_second_client(net):
    """--wl names cl1 only: cl2, same network, different source address, is closed without data."""
    if not any(p["remote_port"] == 8001 for p in net.api("GET", "/v1/proxies")["proxies"]):
        net.add_proxy(8001)
    before = len(net.target_accepts())
    res = client("cl2", SRV_IP, 8001, 1000, wait=5)
    assert_refused(net, res, "cl2", CL2_IP, "global")
    # over IPv6 too: cl2's v6 address is not in --wl either
    res6 = client("cl2", SRV_IP6, 8001, 0, wait=5)
    assert_refused(net, res6, "cl2", CL2_IP6, "global")
    # and cl1 over IPv6 is another address, also not listed
    res1 = client("cl1", SRV_IP6, 8001, 0, wait=5)
    assert_refused(net, res1, "cl1", CL1_IP6, "global")
    # cl1 over IPv4 still passes right after
    assert_echoed(client("cl1", SRV_IP, 8001, 100_000), 100_000)
    # the refused clients never made the agent dial the target
    assert net.target_accepts()[before:] == [AGT_PRIV_IP]


def test_proxy_whitelist_overrides_global(net):
    """A proxy with its own whitelist [cl2] lets cl2 in and refuses cl1, whom --wl would allow."""
    net.add_proxy(8002, whitelist=[CL2_IP])
    res2 = client("cl2", SRV_IP, 8002, 1_000_000, wait=20)
    assert_echoed(res2, 1_000_000)
    assert res2["local"][0] == CL2_IP
    res1 = client("cl1", SRV_IP, 8002, 1000, wait=5)
    assert_refused(net, res1, "cl1", CL1_IP, "proxy's")


def test_proxy_whitelist_ipv6_cidr(net):
    """A v6 CIDR in a proxy's whitelist: cl2 over IPv6 passes, cl2 over IPv4 and cl1 over IPv6 are refused."""
    net.add_proxy(8003, whitelist=[f"{CL2_IP6}/128"])
    res = client("cl2", SRV_IP6, 8003, 500_000, wait=20)
    assert_echoed(res, 500_000)
    assert res["local"][0] == CL2_IP6
    assert_refused(net, client("cl2", SRV_IP, 8003, 0, wait=5), "cl2", CL2_IP, "proxy's")
    assert_refused(net, client("cl1", SRV_IP6, 8003, 0, wait=5), "cl1", CL1_IP6, "proxy's")


def test_connection_list_shows_real_source(net):
    """While cl1 holds a tunnelled connection, GET /v1/connections and `anywhered conn list` show CL1_IP."""
    if not any(p["remote_port"] == 8001 for p in net.api("GET", "/v1/proxies")["proxies"]):
        net.add_proxy(8001)
    env = dict(os.environ, PYTHONPATH=REPO)
    holder = subprocess.Popen([*ns_exec(NS["cl1"]), PY, "-u", "-c", HOLD_SCRIPT, SRV_IP, "8001"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 15)
        assert ready, "the holding client in cl1 printed nothing within 15 s"
        first = json.loads(holder.stdout.readline() or b"{}")
        assert first.get("echo") == "hello", (first, holder.poll())
        ip, port = first["local"]
        assert ip == CL1_IP
        conns = net.api("GET", "/v1/connections")["connections"]
        mine = [c for c in conns if c["remote_port"] == 8001]
        assert len(mine) == 1, conns
        assert mine[0]["source"] == f"{CL1_IP}:{port}", mine
        assert mine[0]["agent_id"] == "agent-1" and mine[0]["target"] == f"{TGT_IP}:{TGT_PORT}", mine
        out = run(PY, "-m", "anywhere.server_cli", "conn", "list", "--admin-socket", net.sock, timeout=30).stdout
        assert f"{CL1_IP}:{port}" in out, out
        rest, err = holder.communicate(timeout=15)  # closes its stdin: the client sends EOF, reads to EOF
        assert holder.returncode == 0, err
        assert json.loads(rest.decode().strip().splitlines()[-1]) == {"rest": 0}
        wait_for(lambda: not [c for c in net.api("GET", "/v1/connections")["connections"] if c["remote_port"] == 8001],
                 5, what="the connection to leave the list")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(5)


def test_agent_dialling_by_address_with_server_name(net):
    """A second agent dials SRV_IP but checks the certificate for --server-name server.test."""
    net.start_agent("agent-2", "--server-name", "server.test")
    assert net.agent("agent-2")["address"].startswith(f"{AGT_IP}:")
    net.add_proxy(8004, agent_id="agent-2")
    assert_echoed(client("cl1", SRV_IP, 8004, 200_000), 200_000)
