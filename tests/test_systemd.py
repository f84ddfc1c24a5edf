"""Under a real systemd: the units from systemd/, unchanged, in a systemd-nspawn guest booting Debian 12.

The project is installed into the guest as a package would install it (code under
/usr/lib/anywhere, /usr/bin wrappers, units in /usr/lib/systemd/system, the sysusers.d file run
with systemd-sysusers, credentials 0640 root:anywhere under /etc/anywhere/credential).  The only
test-specific change is a drop-in with WatchdogSec=3 for both services, so a hung loop is caught
in seconds.  Everything happens on the guest's own loopback (--private-network).

In order, the tests check:
 * `systemctl start anywhered` / `anywhere-agent@agent-1` return only after READY=1 (the admin
   socket and the agent port exist the moment start returns), as user anywhere, with STATUS= text;
 * a request tunneled server → agent → target works; a member of group anywhere may use
   anywherectl, another user may not;
 * `systemctl reload anywhered` applies a change; with a broken file it exits non-zero and the
   daemon keeps running on the old configuration; the same for a file in proxies.d;
 * a loop stopped with SIGSTOP misses its watchdog pings, is killed and restarted, and comes back
   with its proxies;
 * `systemctl stop anywhered` drains: a request in flight completes, new ones are refused, the
   unit ends inactive (not failed) with exit status 0; stopping anywhere-agents.target stops the
   agent instances (PartOf).

Needs root and systemd-nspawn (installed with apt-get if missing); otherwise skipped with the
reason.  The first run builds the guest's root file system (about 1-2 minutes, cached under
~/.cache/anywhere-test, see tests/systemd_guest.py); later runs take about 30 seconds.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

import systemd_guest
from systemd_guest import Guest, Unavailable

pytestmark = pytest.mark.slow

SERVER = "anywhered"
AGENT = "anywhere-agent@agent-1"
WATCHDOG_SEC = 3
SOCKET = "/run/anywhere/anywhered.sock"
OPERATOR = "operator1"  # a member of group anywhere, not root

SERVER_CONF = """\
[server]
port = 1111
whitelist = {whitelist}
drain_timeout = 15
log_level = {log_level}
"""
GOOD = SERVER_CONF.format(whitelist="127.0.0.1, ::1", log_level="info")
AGENT_CONF = """\
[agent]
server = 127.0.0.1
allow = 127.0.0.1
"""
EXITS = "/run/anywhere-test-exits"
# test only: a hung loop must be caught in seconds; record how each run ended (an inactive unit is
# garbage-collected, so `systemctl show` cannot tell afterwards)
DROP_IN = f"""\
[Service]
WatchdogSec={WATCHDOG_SEC}
ExecStopPost=+/bin/sh -c 'echo "%n $$SERVICE_RESULT $$EXIT_CODE $$EXIT_STATUS" >> {EXITS}'
"""
# The intranet target: "/" answers at once, "/slow" sends half, waits 3 s, sends the rest.
TARGET = r'''
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            body = b"slow start\n" + b"x" * 100000 + b"\nslow end\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:50000])
            self.wfile.flush()
            time.sleep(3)
            self.wfile.write(body[50000:])
        else:
            body = b"hello from the target\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
'''
SLOW_LEN = len(b"slow start\n") + 100000 + len(b"\nslow end\n")


class System:
    """The booted guest with the project installed and configured; helpers speak systemctl."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, user: str | None = None):
        argv = list(cmd) if user is None else ["runuser", "-u", user, "--", *cmd]
        res = self.guest.run(argv, check=False, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"`{' '.join(argv)}` exited {res.returncode}:\n{res.stdout}{res.stderr}\n"
                                 f"{self.journal()}")
        return res

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str = SERVER, lines: int = 40) -> str:
        res = self.guest.run(["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines), "-u", unit],
                             check=False, timeout=30)
        return f"--- journal of {unit} ---\n{res.stdout.rstrip()}"

    def messages(self, unit: str = SERVER) -> str:
        return self.guest.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit], check=False, timeout=30).stdout

    def last_exit(self, unit: str) -> str:
        """'SERVICE_RESULT EXIT_CODE EXIT_STATUS' of the unit's last run (from the drop-in's ExecStopPost)."""
        lines = self.run("cat", EXITS, check=False).stdout.splitlines()
        ends = [line.split(" ", 1)[1] for line in lines if line.startswith(unit + " ")]
        return ends[-1] if ends else ""

    def write_server_conf(self, text: str) -> None:
        self.guest.write("/etc/anywhere/anywhered.conf", text, mode="0640", owner="root:anywhere")

    def curl(self, path: str = "/", port: int = 8080, timeout: float = 10) -> subprocess.CompletedProcess:
        return self.guest.run(["curl", "-sS", "--max-time", str(timeout), f"http://127.0.0.1:{port}{path}"],
                              check=False, timeout=timeout + 30)

    def ctl_json(self, *args: str, user: str | None = None) -> dict:
        return json.loads(self.run("anywherectl", *args, "--json", user=user).stdout)

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.journal()}\n"
                                     f"{self.journal(AGENT)}")
            time.sleep(interval)

    def agent_connected(self) -> bool:
        res = self.run("anywherectl", "agent", "list", "--json", check=False)
        return res.returncode == 0 and any(a["agent_id"] == "agent-1" for a in json.loads(res.stdout)["agents"])

    def tunnel_works(self) -> bool:
        res = self.curl("/", timeout=5)
        return res.returncode == 0 and res.stdout == "hello from the target\n"

    def ensure_up(self) -> None:
        """Server and agent running, agent connected, the proxy in place (for tests run alone)."""
        for unit in (SERVER, AGENT):
            if self.show(unit, "ActiveState")["ActiveState"] != "active":
                self.run("systemctl", "start", unit)
        self.wait(self.agent_connected, 30, "agent-1 to connect")
        if not any(p["remote_port"] == 8080 for p in self.ctl_json("proxy", "list")["proxies"]):
            self.run("anywherectl", "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
                     "--local-port", "8000", "--remote-port", "8080")
        self.wait(self.tunnel_works, 30, "the tunnel to work")


@pytest.fixture(scope="module")
def system():
    try:
        systemd_guest.ensure_host_tools()
        tree = systemd_guest.base_tree()
    except Unavailable as exc:
        pytest.skip(f"systemd tests need a systemd-nspawn guest: {exc}")
    started = time.monotonic()
    guest = Guest(tree)
    try:
        try:
            guest.boot()
        except Unavailable as exc:
            pytest.skip(f"systemd tests need a systemd-nspawn guest: {exc}")
        install(guest)
        systemd_guest.log(f"guest ready with the project installed in {time.monotonic() - started:.1f} s")
        yield System(guest)
    finally:
        guest.close()


def install(guest: Guest) -> None:
    """Install and configure as a package and an operator would; the units are the repo's, unchanged.

    Test-specific: the drop-in (WatchdogSec=3, exit recorder), the target service, the operator user.
    """
    stage = guest.workdir / "stage"
    systemd_guest.stage_project(stage)
    etc = stage / "etc/anywhere"
    systemd_guest.credentials_tree(etc, ["agent-1"])
    (etc / "agents").mkdir(parents=True)
    (etc / "anywhered.conf").write_text(GOOD)
    (etc / "agents/agent-1.conf").write_text(AGENT_CONF)
    for unit in ("anywhered.service", "anywhere-agent@.service"):
        dropin = stage / f"etc/systemd/system/{unit}.d"
        dropin.mkdir(parents=True)
        (dropin / "50-test.conf").write_text(DROP_IN)
    target = stage / "usr/local/lib/anywhere-test/target.py"
    target.parent.mkdir(parents=True)
    target.write_text(TARGET)
    guest.install(stage)
    guest.sh(f"""
        systemd-sysusers /usr/lib/sysusers.d/anywhere.conf
        python3 -m compileall -q /usr/lib/anywhere
        chown -R root:anywhere /etc/anywhere
        chmod 0755 /etc/anywhere /etc/anywhere/agents
        chmod 0750 /etc/anywhere/credential
        chmod 0644 /etc/anywhere/credential/*.crt
        chmod 0640 /etc/anywhere/credential/*.key /etc/anywhere/anywhered.conf /etc/anywhere/agents/*.conf
        useradd --no-create-home --groups anywhere {OPERATOR}
        systemctl daemon-reload
        systemd-run --quiet --unit=anywhere-test-target --service-type=exec python3 /usr/local/lib/anywhere-test/target.py 8000
    """)


def test_start_returns_after_ready(system: System):
    # the admin socket and the agent port exist the moment `systemctl start` returns: READY=1 gated it
    res = system.run("/bin/sh", "-ec", f"systemctl start {SERVER}; test -S {SOCKET} && echo socket-ok; "
                                       "ss -Hltn 'sport = :1111'", timeout=90)
    assert "socket-ok" in res.stdout and ":1111" in res.stdout, res.stdout + system.journal()
    props = system.show(SERVER, "Type", "NotifyAccess", "ActiveState", "SubState", "MainPID", "StatusText",
                        "WatchdogUSec", "NRestarts")
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main", props
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), f"{props}\n{system.journal()}"
    assert props["WatchdogUSec"] == f"{WATCHDOG_SEC}s", props
    assert "agent(s)" in props["StatusText"] and "prox" in props["StatusText"], props
    pid = props["MainPID"]
    uid = system.run("id", "-u", "anywhere").stdout.strip()
    status = system.run("cat", f"/proc/{pid}/status").stdout
    assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status, status  # runs as User=anywhere
    mode = system.run("stat", "-c", "%a %U:%G", "/run/anywhere", SOCKET).stdout.split("\n")
    assert mode[0] == "750 anywhere:anywhere" and mode[1].startswith("660 anywhere:anywhere"), mode

    system.run("systemctl", "start", AGENT, timeout=90)
    props = system.show(AGENT, "Type", "ActiveState", "SubState", "StatusText", "WatchdogUSec")
    assert (props["Type"], props["ActiveState"], props["SubState"]) == ("notify", "active", "running"), \
        f"{props}\n{system.journal(AGENT)}"
    assert props["StatusText"] and props["WatchdogUSec"] == f"{WATCHDOG_SEC}s", props
    system.wait(system.agent_connected, 30, "agent-1 to connect")
    system.wait(lambda: "1 agent(s)" in system.show(SERVER, "StatusText")["StatusText"], 10,
                "STATUS= to count the agent")


def test_tunneled_request_and_operator_access(system: System):
    system.ensure_up()  # adds the proxy 8080 → agent-1 → 127.0.0.1:8000 as root with anywherectl
    res = system.curl("/")
    assert res.returncode == 0 and res.stdout == "hello from the target\n", res
    # a member of group anywhere may drive the daemon; anyone else is told why not
    agents = system.ctl_json("agent", "list", user=OPERATOR)["agents"]
    assert [a["agent_id"] for a in agents] == ["agent-1"], agents
    denied = system.run("anywherectl", "agent", "list", user="nobody", check=False)
    assert denied.returncode == 1 and "permission denied" in denied.stderr, denied
    # a public port below 1024 works through AmbientCapabilities=CAP_NET_BIND_SERVICE (User=anywhere)
    system.run("anywherectl", "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
               "--local-port", "8000", "--remote-port", "80")
    res = system.curl("/", port=80)
    assert res.returncode == 0 and res.stdout == "hello from the target\n", f"{res}\n{system.journal()}"
    system.run("anywherectl", "proxy", "del", "--remote-port", "80")
    assert system.run("test", "-s", "/var/lib/anywhere/proxies.json", check=False).returncode == 0


def test_reload(system: System):
    system.ensure_up()
    pid = system.show(SERVER, "MainPID")["MainPID"]
    # a change: a whitelist without 127.0.0.1 shuts the local client out, without a restart
    system.write_server_conf(SERVER_CONF.format(whitelist="192.0.2.1", log_level="info"))
    system.run("systemctl", "reload", SERVER)
    assert system.show(SERVER, "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}
    assert not system.tunnel_works(), "the reloaded whitelist should refuse 127.0.0.1"
    assert "changed: whitelist" in system.messages()
    system.write_server_conf(GOOD)
    system.run("systemctl", "reload", SERVER)
    assert system.tunnel_works(), system.journal()

    # a broken file: the reload fails visibly, the daemon keeps running on what it had
    system.write_server_conf(GOOD.replace("port = 1111", "port = 70000"))
    try:
        res = system.run("systemctl", "reload", SERVER, check=False)
        assert res.returncode != 0, f"reload of a broken config exited 0:\n{res.stdout}{res.stderr}"
        props = system.show(SERVER, "MainPID", "ActiveState", "SubState")
        assert props == {"MainPID": pid, "ActiveState": "active", "SubState": "running"}, props
        assert "reload refused" in system.messages() and "70000" in system.messages(), system.journal()
        assert system.tunnel_works(), system.journal()
    finally:
        system.write_server_conf(GOOD)
    system.run("systemctl", "reload", SERVER)

    # the agent reloads too (ExecReload sends SIGHUP), keeping its process and its connection
    agent_pid = system.show(AGENT, "MainPID")["MainPID"]
    system.guest.write("/etc/anywhere/agents/agent-1.conf", AGENT_CONF + "dial_timeout = 7\n", mode="0640",
                       owner="root:anywhere")
    try:
        res = system.run("systemctl", "reload", AGENT, check=False)
        assert res.returncode == 0, f"{res.stdout}{res.stderr}\n{system.journal(AGENT)}"
        system.wait(lambda: "configuration reloaded; changed: dial_timeout" in system.messages(AGENT), 10,
                    "the agent to reload")
        assert system.show(AGENT, "MainPID", "ActiveState") == {"MainPID": agent_pid, "ActiveState": "active"}
        assert system.tunnel_works(), system.journal(AGENT)
    finally:
        system.guest.write("/etc/anywhere/agents/agent-1.conf", AGENT_CONF, mode="0640", owner="root:anywhere")


def test_proxies_dir_reload(system: System):
    """A file dropped into /etc/anywhere/proxies.d serves after `systemctl reload`; a bad one makes the
    reload fail, naming file, section, key and value, and the running set keeps serving."""
    system.ensure_up()
    pid = system.show(SERVER, "MainPID")["MainPID"]
    web = "[web]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 8000\nremote_port = 8081\n"
    system.run("mkdir", "-p", "/etc/anywhere/proxies.d")
    system.guest.write("/etc/anywhere/proxies.d/web.conf", web, mode="0640", owner="root:anywhere")
    try:
        system.run("systemctl", "reload", SERVER)
        res = system.curl("/", port=8081)
        assert res.returncode == 0 and res.stdout == "hello from the target\n", f"{res}\n{system.journal()}"
        web_proxy = next(p for p in system.ctl_json("proxy", "list")["proxies"] if p["name"] == "web")
        assert web_proxy["source"] == "file:/etc/anywhere/proxies.d/web.conf", web_proxy

        system.guest.write("/etc/anywhere/proxies.d/bad.conf", web.replace("[web]", "[bad]").replace("8081", "70000"),
                           mode="0640", owner="root:anywhere")
        res = system.run("systemctl", "reload", SERVER, check=False)
        assert res.returncode != 0, f"reload with a bad proxies file exited 0:\n{res.stdout}{res.stderr}"
        assert system.show(SERVER, "MainPID", "ActiveState") == {"MainPID": pid, "ActiveState": "active"}
        assert "/etc/anywhere/proxies.d/bad.conf [bad] remote_port = 70000: must be 1..65535" in system.messages()
        res = system.curl("/", port=8081)
        assert res.returncode == 0 and res.stdout == "hello from the target\n", f"{res}\n{system.journal()}"
        assert system.tunnel_works()
    finally:
        system.run("rm", "-f", "/etc/anywhere/proxies.d/bad.conf", "/etc/anywhere/proxies.d/web.conf")
    system.run("systemctl", "reload", SERVER)
    assert system.curl("/", port=8081, timeout=3).returncode != 0  # removed with its file
    assert system.tunnel_works()


def test_watchdog_restarts_a_hung_loop(system: System):
    system.ensure_up()
    before = system.show(SERVER, "MainPID", "NRestarts")
    time.sleep(WATCHDOG_SEC + 1)  # a healthy loop pings in time: nothing happens
    assert system.show(SERVER, "MainPID", "NRestarts") == before, system.journal()
    started = time.monotonic()
    system.run("/bin/sh", "-c", f"kill -STOP {before['MainPID']}")  # the loop freezes, the process lives

    def restarted() -> bool:
        now = system.show(SERVER, "MainPID", "NRestarts", "ActiveState")
        return (int(now["NRestarts"]) > int(before["NRestarts"]) and now["MainPID"] not in ("0", before["MainPID"])
                and now["ActiveState"] == "active")
    system.wait(restarted, 40, "the watchdog to restart anywhered")
    elapsed = time.monotonic() - started
    assert "Watchdog timeout" in system.messages(), system.journal()
    assert system.last_exit(f"{SERVER}.service") == "watchdog killed ABRT", system.journal()
    systemd_guest.log(f"hung anywhered restarted by the watchdog after {elapsed:.1f} s")
    # it comes back with its proxy (state dir), the agent reconnects, the tunnel works again
    system.wait(system.agent_connected, 40, "agent-1 to reconnect")
    system.wait(system.tunnel_works, 20, "the tunnel to work again")


def test_stop_drains(system: System):
    system.ensure_up()
    slow = system.guest.popen(["curl", "-sS", "--max-time", "30", "-w", "\n%{http_code}",
                               "http://127.0.0.1:8080/slow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        system.wait(lambda: system.ctl_json("conn", "list")["connections"], 10, "the slow request to be tunneled")
        stop = system.guest.popen(["systemctl", "stop", SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            system.wait(lambda: system.show(SERVER, "ActiveState")["ActiveState"] == "deactivating", 10,
                        "anywhered to be stopping")
            refused = system.curl("/", timeout=5)
            assert refused.returncode != 0, f"a new connection was served while draining: {refused}"
            out, err = slow.communicate(timeout=40)
            stop_out, stop_err = stop.communicate(timeout=60)
        finally:
            if stop.poll() is None:
                stop.kill()
                stop.wait()
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    body, _, code = out.rpartition("\n")
    assert slow.returncode == 0 and code == "200" and len(body) == SLOW_LEN and body.endswith("\nslow end\n"), \
        f"curl {slow.returncode} {code} {len(body)} bytes, {err}\n{system.journal()}"
    assert stop.returncode == 0, stop_out + stop_err
    assert system.show(SERVER, "ActiveState")["ActiveState"] == "inactive"
    assert system.last_exit(f"{SERVER}.service") == "success exited 0", system.journal()
    log = system.messages()
    assert "draining: 1 connection(s) live" in log and "anywhered stopped" in log, system.journal()
    assert "Traceback" not in log, system.journal(lines=200)

    # the agent's own watchdog pings kept it alive all along (it reconnected, it was never restarted)
    assert system.show(AGENT, "NRestarts", "ActiveState") == {"NRestarts": "0", "ActiveState": "active"}, \
        system.journal(AGENT)

    # the agents target reaches every instance (PartOf), enabled as an operator would.  (The stop
    # job of the target itself finishes first: stop order is the reverse of start order.)
    system.run("systemctl", "enable", AGENT)
    system.run("systemctl", "start", "anywhere-agents.target")
    assert system.show(AGENT, "ActiveState")["ActiveState"] == "active"
    system.run("systemctl", "stop", "anywhere-agents.target")
    system.wait(lambda: system.show(AGENT, "ActiveState")["ActiveState"] == "inactive", 30,
                "the agent to stop with anywhere-agents.target")
    assert system.last_exit(f"{AGENT}.service") == "success exited 0", system.journal(AGENT)
    assert "Traceback" not in system.messages(AGENT), system.journal(AGENT, 200)
