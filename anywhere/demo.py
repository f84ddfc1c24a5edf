"""`make demo`: the QuickStart on one machine, on loopback, then a clean exit.

Makes credentials in a temporary directory, starts an HTTP target, anywhered and an agent,
adds a proxy with `anywhered proxy add`, fetches a page through the tunnel, shows what the
daemon reports, and stops everything it started (by pid), whatever happens.  It must not touch
anything outside its temporary directory, nor send a byte beyond loopback.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from . import credentials
from .client import Client
from .common import CtlError

PAGE = b"<html><body><h1>Hello from inside the private network</h1></body></html>\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: object) -> None:
        pass


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _run(cmd: list[str]) -> str:
    shown = " ".join(["anywhered" if c == "anywhere.server_cli" else c for c in cmd[2:]])
    print(f"    $ {shown}", flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    out = (res.stdout + res.stderr).strip()
    if out:
        print("      " + out.replace("\n", "\n      "), flush=True)
    if res.returncode != 0:
        raise RuntimeError(f"command failed with status {res.returncode}")
    return out


def _wait(predicate, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a process exited early with status {p.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


def main() -> int:
    py = sys.executable
    procs: list[subprocess.Popen] = []
    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=target.serve_forever, daemon=True).start()
    ok = False
    with tempfile.TemporaryDirectory(prefix="anywhere-demo-") as tmp:
        try:
            cred = os.path.join(tmp, "credential")
            _step(f"credentials in {cred}")
            credentials.init(cred, "localhost", ["127.0.0.1"])
            credentials.issue("agent-1", cred, basename="client")
            agent_port, remote_port = _free_port(), _free_port()
            sock = os.path.join(tmp, "anywhered.sock")
            target_port = target.server_address[1]
            _step(f"HTTP target on 127.0.0.1:{target_port} (the service inside the private network)")

            _step(f"anywhered on 127.0.0.1:{agent_port}, whitelist 127.0.0.1")
            server_log = open(os.path.join(tmp, "anywhered.log"), "w")
            procs.append(subprocess.Popen(
                [py, "-m", "anywhere.server_cli", "start", "-p", str(agent_port), "--wl", "127.0.0.1",
                 "--bind", "127.0.0.1", "--proxy-bind", "127.0.0.1", "--ca", f"{cred}/ca.crt",
                 "--cert", f"{cred}/server.crt", "--key", f"{cred}/server.key", "--admin-socket", sock,
                 "--state-dir", os.path.join(tmp, "state")],
                stdout=server_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            _wait(lambda: os.path.exists(sock), 15, "anywhered's admin socket", procs)

            _step("agent agent-1 (inside the private network) connects to the server")
            agent_log = open(os.path.join(tmp, "agent.log"), "w")
            procs.append(subprocess.Popen(
                [py, "-m", "anywhere.agent_cli", "-i", "agent-1", "-s", "127.0.0.1", "-p", str(agent_port),
                 "--ca", f"{cred}/ca.crt", "--cert", f"{cred}/client.crt", "--key", f"{cred}/client.key"],
                stdout=agent_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            client = Client(sock)
            _wait(lambda: bool(client.call("GET", "/v1/agents")["agents"]), 15, "the agent to connect", procs)

            _step("add a proxy with the original's command line")
            _run([py, "-m", "anywhere.server_cli", "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
                  "--local-port", str(target_port), "--remote-port", str(remote_port), "--admin-socket", sock])

            url = f"http://127.0.0.1:{remote_port}/"
            _step(f"GET {url} through the tunnel")
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read()
            print(f"    HTTP {resp.status}, {len(body)} bytes: {body.decode().strip()}")
            if body != PAGE:
                raise RuntimeError("the page through the tunnel differs from the target's")

            _step("what the daemon reports")
            _run([py, "-m", "anywhere.server_cli", "agent", "list", "--admin-socket", sock])
            _run([py, "-m", "anywhere.server_cli", "proxy", "list", "--admin-socket", sock])
            ok = True
        except (RuntimeError, OSError, CtlError, credentials.CredentialsError) as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            for name in ("anywhered.log", "agent.log"):
                path = os.path.join(tmp, name)
                if os.path.exists(path):
                    print(f"--- {name}\n{open(path).read()}", file=sys.stderr)
        finally:
            _stop(procs)
            target.shutdown()
            target.server_close()
    _step("stopped anywhered, the agent and the target; " + ("demo OK" if ok else "demo FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
