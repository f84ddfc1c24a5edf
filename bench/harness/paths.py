"""The paths under test: each forwards a local port on 127.0.0.1 to a target port.

A `Path` is started fresh for every measurement (`start(target_port)` returns the port clients
use; `start_forwards([port, ...])` forwards several targets through one tunnel, one port each) and
stopped right after (`stop()`); `pids()` lists its processes, with their children, for the CPU
and memory accounting; clients connect to `client_host` (127.0.0.1).  A path that carries UDP
(`udp = True`: direct and anywhere) also has `start_udp(target_port)`: one port number that
reaches the target's TCP port over TCP and its UDP port over UDP (iperf3 -u uses both, on one
number); `cannot_run(letter)` says why a path cannot run a metric (the UDP one on a TCP-only
path), and the runner skips it with that reason.

On two hosts (metric h: `Context(..., link=ShapedLink)`), the tunnel's server side (anywhered,
sshd; the clients) runs in the server host's namespace and its agent side (the agent, `ssh -R`,
the targets, on 127.0.0.1 there) in the agent host's; the agent side reaches the server at the
server host's address, across the shaped link.  Direct's clients go across the link to the
agent host's address.

- direct: the target's own port; no process of its own.
- socat: `socat -b262144 TCP-LISTEN:P,bind=127.0.0.1,fork,reuseaddr,backlog=1024 TCP:127.0.0.1:T`
  (a fork per connection, one relay copy, no encryption; bind and backlog added so it is
  loopback-only and does not drop SYNs with socat's default backlog of 5).
- ssh / ssh-aes: a throwaway sshd (own host key, authorized_keys and config in the temp dir,
  127.0.0.1 only, `-D -e`) and `ssh -N -R 127.0.0.1:P:127.0.0.1:T` (one -R per target, one
  connection); OpenSSH's default cipher, or `-c aes128-gcm@openssh.com`.  The sshd master, its
  per-connection children and the ssh client are the tunnel's processes.
- anywhere: `anywhered start` and `anywhere -i agent-1 -s 127.0.0.1`, the venv's console scripts
  (importing the snapshot of anywhere/ the runner copied at start, via PYTHONPATH),
  mutual TLS with credentials made for this run, `--wl 127.0.0.1`, `--log-level warning`, admin
  socket and state dir in the temp dir, then `anywhered proxy add`.  anywhered + agent are the
  tunnel's processes.  anywhered's admission limits are raised in a config file (every client
  here is 127.0.0.1 on one proxy); `--anywhere-defaults` runs it without that file.  Several
  targets: one proxy each, on the same agent.  UDP (metric i): a TCP proxy and a UDP proxy
  (`--protocol udp`) on one remote port, to the target's port.

Every process gets RLIMIT_NOFILE raised to its hard limit (`Procs.start`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path as FsPath

from .netns import ShapedLink
from .procs import Proc, Procs, wait_until
from .services import Ports, udp_bound, wait_listen

VENV_BIN = FsPath(sys.executable).parent
SSHD = "/usr/sbin/sshd"


class Path:
    name = "?"
    label = "?"

    settle = 0.5  # seconds between start-up and the measurement (e.g. Anywhere's warm pool fills)
    client_host = "127.0.0.1"  # where the clients connect
    udp = False  # carries UDP datagrams (metric i); see start_udp
    udp_note = "carries TCP only"  # why not, when udp is False
    UDP_METRICS = "i"

    @classmethod
    def cannot_run(cls, letter: str) -> str | None:
        """Why this path cannot run metric `letter`, or None."""
        if letter in cls.UDP_METRICS and not cls.udp:
            return f"{cls.label} {cls.udp_note}"
        return None

    def __init__(self, ctx: "Context") -> None:
        self.ctx = ctx
        self.procs: list[Proc] = []

    def start(self, target_port: int) -> int:
        return self.start_forwards([target_port])[0]

    def start_forwards(self, target_ports: list[int]) -> list[int]:
        """Forward each target port through one tunnel; the ports clients use, in the same order."""
        ports = self._start(target_ports)
        if self.procs:
            time.sleep(self.settle)
        return ports

    def _start(self, target_ports: list[int]) -> list[int]:
        raise NotImplementedError

    def start_udp(self, target_port: int) -> int:
        """The port that reaches the target's TCP port over TCP and its UDP port over UDP (same number)."""
        port = self._start_udp(target_port)
        if self.procs:
            time.sleep(self.settle)
        return port

    def _start_udp(self, target_port: int) -> int:
        raise RuntimeError(f"{self.label} {self.udp_note}")

    def pids(self) -> list[int]:
        return self.ctx.procs.tree(self.procs) if self.procs else []

    def stop(self) -> None:
        if self.procs:
            self.ctx.procs.tree(self.procs)  # remember children for the sweep
        for proc in list(self.procs):  # each path lists its clients before their servers
            self.ctx.procs.stop(proc)
        self.procs = []


class Context:
    """What the paths share for a run: the process registry, ports, temp dir, credentials."""

    def __init__(self, procs: Procs, ports: Ports, workdir: FsPath, anywhere_env: dict | None = None,
                 link: ShapedLink | None = None) -> None:
        self.procs = procs
        self.ports = ports
        self.workdir = workdir
        self.anywhere_env = anywhere_env  # PYTHONPATH pointing at the run's snapshot of anywhere/
        self.link = link  # two hosts (metric h), or None: everything on this host's loopback
        self.server_addr = link.addr["server"] if link else "127.0.0.1"  # where the agent side reaches the server
        self.target_host = link.addr["agent"] if link else "127.0.0.1"  # the targets, seen from the clients' host
        # bench/instructions.py runs the daemons under valgrind: a command in front of the venv's
        # python, and the patience that takes to start
        self.anywhere_prefix: list[str] = []
        self.anywhere_startup = 15.0
        self.n = 0
        self._ssh_ready = False
        self._anywhere_ready = False

    def cmd(self, side: str, args: list[str]) -> list[str]:
        """`args` run on the "server" host (anywhered, sshd, the clients) or the "agent" host."""
        return self.link.cmd(side, args) if self.link else args

    def tmp(self, name: str) -> FsPath:
        self.n += 1
        d = self.workdir / f"{name}-{self.n}"
        d.mkdir(mode=0o700)
        return d

    # -- ssh keys --------------------------------------------------------------------------------
    def ssh_setup(self) -> FsPath:
        d = self.workdir / "ssh"
        if not self._ssh_ready:
            d.mkdir(mode=0o700, exist_ok=True)
            for name in ("host_ed25519", "client_ed25519"):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"bench-{name}",
                                "-f", str(d / name)], check=True, timeout=30)
            (d / "authorized_keys").write_bytes((d / "client_ed25519.pub").read_bytes())
            os.chmod(d / "authorized_keys", 0o600)
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
            self._ssh_ready = True
        return d

    def sshd_config(self, port: int, tmp: FsPath) -> FsPath:
        d = self.ssh_setup()
        conf = tmp / "sshd_config"
        conf.write_text(f"""Port {port}
ListenAddress {self.server_addr}
HostKey {d}/host_ed25519
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
UseDNS no
MaxStartups 100:30:200
LogLevel ERROR
""")
        return conf

    def ssh_client_args(self, sshd_port: int, cipher: str | None) -> list[str]:
        d = self.ssh_setup()
        args = ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR",
                "-i", str(d / "client_ed25519"), "-p", str(sshd_port)]
        if cipher:
            args += ["-c", cipher]
        return args

    def start_sshd(self, tmp: FsPath) -> tuple[Proc, int]:
        port = self.ports.get()
        conf = self.sshd_config(port, tmp)
        proc = self.procs.start("sshd", self.cmd("server", [SSHD, "-D", "-e", "-f", str(conf)]))
        wait_listen(proc, port, "sshd")
        return proc, port

    def ssh_probe(self, cipher: str | None) -> dict:
        """Which cipher, MAC and key exchange a connection negotiates (from `ssh -v`)."""
        tmp = self.tmp("ssh-probe")
        sshd, port = self.start_sshd(tmp)
        try:
            args = self.ssh_client_args(port, cipher)
            args[args.index("LogLevel=ERROR")] = "LogLevel=VERBOSE"
            res = subprocess.run(self.cmd("agent", [*args, "-v", f"root@{self.server_addr}", "true"]),
                                 capture_output=True, text=True, timeout=30)
        finally:
            self.procs.stop(sshd)
        out = res.stderr
        m = re.search(r"kex: client->server cipher: (\S+) MAC: (\S+)", out)
        k = re.search(r"kex: algorithm: (\S+)", out)
        if res.returncode != 0 or not m:
            raise RuntimeError(f"ssh probe failed (exit {res.returncode}):\n{out[-2000:]}")
        return {"cipher": m.group(1), "mac": m.group(2), "kex": k.group(1) if k else "?"}

    # -- Anywhere ---------------------------------------------------------------------------------
    # The benchmark's clients all come from 127.0.0.1 to one proxy, so anywhered's admission
    # limits (per-source rate, per-proxy connections, pending per agent, ...) would measure the
    # limiter, not the relay: they are raised in a config file (`--anywhere-defaults` keeps them).
    LIMITS = {"rate_limit": "0", "max_connections": "100000", "max_connections_per_proxy": "100000",
              "max_pending_per_agent": "20000", "max_unauthenticated": "20000"}
    anywhere_defaults = False

    def anywhere_config(self) -> tuple[str | None, dict]:
        """A config file with the limits this anywhered knows raised (each key checked with check-config)."""
        if self.anywhere_defaults:
            return None, {}
        if hasattr(self, "_anywhere_config"):
            return self._anywhere_config
        path = self.workdir / "anywhered.conf"

        def accepted(keys: dict) -> bool:
            path.write_text("[server]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
            res = subprocess.run([str(VENV_BIN / "anywhered"), "check-config", "--config", str(path)],
                                 capture_output=True, text=True, timeout=30, env=self.anywhere_env, cwd=self.workdir)
            return res.returncode == 0
        applied = dict(self.LIMITS)
        if not accepted(applied):
            applied = {k: v for k, v in self.LIMITS.items() if accepted({k: v})}
            accepted(applied)
        self._anywhere_config = (str(path) if applied else None, applied)
        return self._anywhere_config

    # -- Anywhere credentials --------------------------------------------------------------------
    def anywhere_creds(self) -> FsPath:
        d = self.workdir / "credential"
        if not self._anywhere_ready:
            from anywhere import credentials  # the venv's package
            credentials.init(str(d), "localhost", sorted({"127.0.0.1", "::1", self.server_addr}))
            credentials.issue("agent-1", str(d))
            self._anywhere_ready = True
        return d


class Direct(Path):
    name = "direct"
    label = "direct"
    udp = True

    @property
    def client_host(self) -> str:
        return self.ctx.target_host

    def _start(self, target_ports: list[int]) -> list[int]:
        return list(target_ports)

    def _start_udp(self, target_port: int) -> int:
        return target_port


class Socat(Path):
    name = "socat"
    label = "socat -b256K"

    def _start(self, target_ports: list[int]) -> list[int]:
        if self.ctx.link:
            raise RuntimeError("socat is not a reverse tunnel: it runs on one host only")
        ports = []
        for target_port in target_ports:
            port = self.ctx.ports.get()
            proc = self.ctx.procs.start("socat", [
                "socat", "-b262144", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
                f"TCP:127.0.0.1:{target_port}"])
            self.procs.append(proc)
            wait_listen(proc, port, "socat")
            ports.append(port)
        return ports


class Ssh(Path):
    name = "ssh"
    label = "ssh -R (default)"
    cipher: str | None = None

    def _start(self, target_ports: list[int]) -> list[int]:
        tmp = self.ctx.tmp(self.name)
        sshd, sshd_port = self.ctx.start_sshd(tmp)
        ports = [self.ctx.ports.get() for _ in target_ports]
        forwards = [a for port, target in zip(ports, target_ports) for a in ("-R", f"127.0.0.1:{port}:127.0.0.1:{target}")]
        client = self.ctx.procs.start("ssh", self.ctx.cmd("agent", [
            *self.ctx.ssh_client_args(sshd_port, self.cipher), "-N", *forwards, f"root@{self.ctx.server_addr}"]))
        self.procs = [client, sshd]  # stop order: the client first, so sshd's session child ends
        try:
            for port in ports:  # listened on by sshd's session child, on the server's host
                wait_listen(client, port, "ssh -R forward", where=sshd)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- sshd log ---\n{sshd.log_tail()}") from None
        return ports


class SshAes(Ssh):
    name = "ssh-aes"
    label = "ssh -R aes128-gcm"
    cipher = "aes128-gcm@openssh.com"


class Anywhere(Path):
    name = "anywhere"
    label = "Anywhere (mTLS)"
    server_args: list[str] = []  # extra flags of anywhered start

    udp = True

    def _start(self, target_ports: list[int]) -> list[int]:
        self._launch()
        ports = [self.ctx.ports.get() for _ in target_ports]
        for port, target_port in zip(ports, target_ports):  # one proxy per target, all on agent-1
            self._proxy_add(port, target_port, "tcp")
        return ports

    def _start_udp(self, target_port: int) -> int:
        self._launch()
        port = self.ctx.ports.get()
        self._proxy_add(port, target_port, "tcp")  # iperf3's control connection
        self._proxy_add(port, target_port, "udp")  # its datagrams, to the same port number
        return port

    def _launch(self) -> None:
        """anywhered and agent-1, the agent online."""
        creds = self.ctx.anywhere_creds()
        tmp = self.ctx.tmp("anywhere")
        agent_port = self.ctx.ports.get()
        sock = str(tmp / "anywhered.sock")
        config, _ = self.ctx.anywhere_config()
        prefix = [*self.ctx.anywhere_prefix, str(VENV_BIN / "python")] if self.ctx.anywhere_prefix else []
        patience = self.ctx.anywhere_startup
        server_addr = self.ctx.server_addr
        server = self.ctx.procs.start("anywhered", self.ctx.cmd("server", [
            *prefix, str(VENV_BIN / "anywhered"), "start", *(["--config", config] if config else []), "-p", str(agent_port), "--bind", server_addr,
            "--proxy-bind", "127.0.0.1", "--ca", str(creds / "ca.crt"), "--cert", str(creds / "server.crt"),
            "--key", str(creds / "server.key"), "--wl", "127.0.0.1", "--admin-socket", sock,
            "--state-dir", str(tmp / "state"), "--log-level", "warning", "--drain-timeout", "2", *self.server_args]),
            cwd=str(tmp), env=self.ctx.anywhere_env)
        self.procs = [server]
        wait_listen(server, agent_port, "anywhered", timeout=patience)
        wait_until(lambda: os.path.exists(sock), patience, "the admin socket", alive=server.alive)
        agent = self.ctx.procs.start("anywhere-agent", self.ctx.cmd("agent", [
            *prefix, str(VENV_BIN / "anywhere"), "-i", "agent-1", "-s", server_addr, "-p", str(agent_port),
            "--ca", str(creds / "ca.crt"), "--cert", str(creds / "agent-1.crt"), "--key", str(creds / "agent-1.key"),
            "--log-level", "warning"]), cwd=str(tmp), env=self.ctx.anywhere_env)
        self.procs = [agent, server]  # stop order: the agent first

        from anywhere.ctl import Client, CtlError
        client = Client(sock)

        def agent_online() -> bool:
            try:
                return any(a.get("agent_id") == "agent-1" for a in client.call("GET", "/v1/agents")["agents"])
            except CtlError:
                return False
        try:
            wait_until(agent_online, patience, "the agent to connect", interval=0.05, alive=agent.alive)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- agent log ---\n{agent.log_tail()}\n--- server log ---\n{server.log_tail()}") from None
        self._sock, self._tmp, self._server = sock, tmp, server

    def _proxy_add(self, port: int, target_port: int, protocol: str) -> None:
        """A proxy on agent-1 from remote `port` to 127.0.0.1:`target_port`; returns once it listens."""
        res = subprocess.run([str(VENV_BIN / "anywhered"), "proxy", "add", "--admin-socket", self._sock,
                              "--agent-id", "agent-1", "--local-ip", "127.0.0.1", "--local-port", str(target_port),
                              "--remote-port", str(port),
                              # a name of its own: the default, AGENT:PORT, is the TCP proxy's on the same port
                              *(["--protocol", protocol, "--name", f"agent-1:{port}-{protocol}"] if protocol != "tcp" else [])],
                             capture_output=True, text=True, timeout=30, cwd=str(self._tmp), env=self.ctx.anywhere_env)
        if res.returncode != 0:
            raise RuntimeError(f"anywhered proxy add ({protocol}, remote port {port}) failed: "
                               f"{(res.stderr + res.stdout).strip()}")
        if protocol == "udp":
            wait_until(lambda: udp_bound(port, self._server.pid), self.ctx.anywhere_startup,
                       f"the Anywhere UDP proxy to bind port {port}", alive=self._server.alive)
        else:
            wait_listen(self._server, port, "the Anywhere proxy port", timeout=self.ctx.anywhere_startup)


class AnywhereConn(Anywhere):
    """Anywhere without trunks: every client gets a data connection of its own (asked for on the
    admin connection, reused once both directions ended): the path trunks replaced, kept to
    measure whether it still earns its place (not among the default paths)."""

    name = "anywhere-conn"
    label = "Anywhere, a data connection per client (pool_size 0)"
    udp = False
    udp_note = "carries TCP only (UDP flows need trunks)"
    server_args = ["--pool-size", "0"]


PATHS = {cls.name: cls for cls in (Direct, Socat, Ssh, SshAes, Anywhere, AnywhereConn)}

