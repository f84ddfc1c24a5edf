"""Packaging: the PyInstaller tarball, the .deb and the .rpm, built by the Makefile targets into
temporary directories (never into the repository's dist/), plus the man pages, the bash
completion and `--version`.

* Fast (no build): man pages render without groff warnings and document every option; the
  completion offers every option and bash runs it; version_line() with a baked-in commit,
  from git, and "unknown"; the version is the same everywhere it is written down.
* tarball (slow): `make` (the default goal) builds it; a second build with CREDENTIALS=no
  gives byte for byte the first one's payload (reproducible, credentials excepted); the
  layout; the QuickStart from the unpacked tree on loopback with its own credential/;
  --help and --version of each binary.
* deb (slow): `make deb`; lintian clean; installed in a Debian 12 guest with a real systemd
  (tests/systemd_guest.py, --private-network): dpkg -i starts anywhered, an agent instance
  tunnels a request, a member of group anywhere uses anywherectl, an upgrade restarts the
  agents, dpkg --purge stops everything.
* rpm (slow): `make rpm`; rpmlint clean with packaging/rpm/anywhere.rpmlintrc; files and modes
  (rpm -qlvp); config flags; every scriptlet parses (sh -n).

Every process started here is ended by pid, also on failure; builds go to tmp_path.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from anywhere import agent_cli, common, ctl, server_cli
from conftest import Proc, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
VERSION = common.__version__
COMMANDS = ("anywhered", "anywhere", "anywherectl")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_TIMEOUT = 900


def make(target: str | None, dist: Path, work: Path, *variables: str) -> subprocess.CompletedProcess:
    """`make [target] DIST=dist WORKDIR=work ...` in the repository; fails the test with its output."""
    cmd = ["make", "-C", str(REPO), *([target] if target else []), f"DIST={dist}", f"WORKDIR={work}", *variables]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, env=env)
    if res.returncode != 0:
        if "missing Debian packages" in res.stderr and os.geteuid() != 0:
            pytest.skip(f"building needs Debian packages and root to install them: {res.stderr.strip()[-300:]}")
        pytest.fail(f"`{shlex.join(cmd)}` exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def install_tools(*kinds: str) -> None:
    """The Debian packages packaging/build.py lists for `kinds` (apt-get; skip without root)."""
    res = subprocess.run(["/usr/bin/python3", str(REPO / "packaging/build.py"), "deps", *kinds], capture_output=True,
                         text=True, timeout=900)
    if res.returncode != 0:
        if os.geteuid() != 0:
            pytest.skip(f"needs Debian packages for {kinds} and root to install them: {res.stderr.strip()[-300:]}")
        pytest.fail(res.stderr)


def baked_commit(work: Path) -> str:
    """The commit a build baked into its staged anywhere/_build.py."""
    for candidate in sorted(work.rglob("anywhere/_build.py")):
        if "pyinstaller" in str(candidate):
            continue
        namespace: dict = {}
        exec(candidate.read_text(), namespace)
        return namespace["commit"]
    raise AssertionError(f"no staged anywhere/_build.py under {work}")


def check_commit(commit: str) -> None:
    """A BRANCH-SHA12[-dirty] of a commit of this repository (or "unknown" outside a checkout)."""
    if not (REPO / ".git").exists():
        assert commit == "unknown"
        return
    match = re.fullmatch(r"(.+)-([0-9a-f]{12})(-dirty)?", commit)
    assert match, commit
    res = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", match.group(2) + "^{commit}"],
                         capture_output=True, timeout=30)
    assert res.returncode == 0, f"{commit}: not a commit of this repository"


def pyproject_dependencies() -> list[str]:
    """The distribution names of pyproject.toml's [project] dependencies."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"(?ms)^dependencies = \[(.*?)^\]", text)
    assert block, "no dependencies in pyproject.toml"
    return [re.split(r"[<>=!~; \[]", item, maxsplit=1)[0] for item in re.findall(r'"([^"]+)"', block.group(1))]


def debian_name(dist: str) -> str:
    """Debian's python3-* package of a PyPI distribution (python-daemon → python3-daemon)."""
    name = dist.lower().replace("_", "-")
    return "python3-" + (name[len("python-"):] if name.startswith("python-") else name)


def rpm_name(dist: str) -> str:
    """Fedora's python3-* package of a PyPI distribution (underscores kept: python3-prometheus_client)."""
    name = dist.lower()
    return "python3-" + (name[len("python-"):] if name.startswith("python-") else name)


# -- man pages, completion, version: no build ---------------------------------------------------------------
def parsers():
    return {"anywhered": server_cli.build_parser(), "anywhere": agent_cli.build_parser(), "anywherectl": ctl.build_parser()}


def long_options(parser) -> set[str]:
    """Every --option of a parser and its sub-commands (suppressed ones excepted)."""
    import argparse
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= long_options(sub)
        elif action.help != argparse.SUPPRESS:
            found |= {o for o in action.option_strings if o.startswith("--")}
    return found


def sub_commands(parser, depth: int = 0) -> set[str]:
    import argparse
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.add(name)
                found |= sub_commands(sub, depth + 1)
    return found


@pytest.fixture(scope="module")
def test_tools():
    install_tools("test")


@pytest.mark.parametrize("name", COMMANDS)
def test_man_page_renders_and_documents_every_option(name, test_tools):
    page = REPO / "man" / f"{name}.8"
    res = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80"))
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    # the source, with troff's escapes undone (the rendering hyphenates long options)
    text = re.sub(r"\\f[BIRP]|\\&", "", page.read_text()).replace("\\-", "-").replace("\\e", "\\")
    parser = parsers()[name]
    options = long_options(parser)
    if name == "anywhered":  # its admin verbs are anywherectl's, documented in anywherectl.8
        options -= long_options(parsers()["anywherectl"]) - {"--help", "--version"}
    undocumented = sorted(o for o in options if o not in text)
    assert not undocumented, f"{page.name} does not mention {undocumented}"
    missing = sorted(c for c in sub_commands(parser) if not re.search(rf"\b{re.escape(c)}\b", text))
    assert not missing, f"{page.name} does not mention the commands {missing}"
    assert f"Anywhere {VERSION}" in page.read_text(), f"{page.name}: .TH names another version"


def test_completion_offers_every_option():
    script = (REPO / "completion" / "anywhere").read_text()
    words = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", script))
    every = set().union(*(long_options(p) for p in parsers().values())) | {"--version"}
    assert not sorted(every - words), f"the completion lacks {sorted(every - words)}"
    assert not sorted(words - every), f"the completion offers options no command has: {sorted(words - every)}"
    for name, parser in parsers().items():
        for command in sub_commands(parser):
            assert re.search(rf"\b{re.escape(command)}\b", script), f"the completion lacks {name} {command}"


def complete(words: list[str]) -> list[str]:
    """What bash-completion + completion/anywhere offer for the command line `words` (cursor on the last word)."""
    script = f"""
        source /usr/share/bash-completion/bash_completion
        source {shlex.quote(str(REPO / 'completion' / 'anywhere'))}
        COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})
        COMP_CWORD={len(words) - 1}
        COMP_LINE={shlex.quote(' '.join(words))}
        COMP_POINT=${{#COMP_LINE}}
        func=$(complete -p {shlex.quote(words[0])} | sed -E 's/.*-F ([^ ]+).*/\\1/')
        "$func" {shlex.quote(words[0])} {shlex.quote(words[-1])} {shlex.quote(words[-2] if len(words) > 1 else '')}
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_completion_in_bash(test_tools):
    assert complete(["anywherectl", ""]) == ["proxy", "agent", "conn", "status", "reload", "credentials"]
    assert complete(["anywherectl", "proxy", ""]) == ["add", "list", "export", "del", "delete", "rm", "enable", "disable"]
    assert complete(["anywherectl", "conn", "kill", "--p"]) == ["--proxy"]
    assert set(complete(["anywherectl", "proxy", "add", "--"])) >= {"--agent-id", "--local-port", "--remote-port",
                                                                    "--admin-socket", "--json"}
    assert complete(["anywhered", "st"]) == ["start"]
    assert "--drain-timeout" in complete(["anywhered", "start", "--d"])
    assert complete(["anywhered", "start", "--log-level", "w"]) == ["warning"]
    assert "--server-ip" in complete(["anywhere", "--s"])
    assert complete(["anywhere", "check"]) == ["check-config"]
    assert complete(["anywherectl", "credentials", "init", "--server-n"]) == ["--server-name"]


def test_version_line_baked_git_and_unknown(tmp_path):
    line = common.version_line("anywhered")
    match = re.fullmatch(rf'anywhered {re.escape(VERSION)} \("(.+)"\)', line)
    assert match, line
    check_commit(match.group(1))
    # a copy outside any checkout, as installed from a package: the baked commit, else "unknown"
    shutil.copytree(REPO / "anywhere", tmp_path / "anywhere", ignore=shutil.ignore_patterns("__pycache__"))
    probe = [sys.executable, "-c", "from anywhere.common import version_line; print(version_line('anywhere agent'))"]
    res = subprocess.run(probe, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert res.stdout.strip() == f'anywhere agent {VERSION} ("unknown")', res.stdout + res.stderr
    (tmp_path / "anywhere" / "_build.py").write_text('commit = "master-0123456789ab"\n')
    res = subprocess.run(probe, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert res.stdout.strip() == f'anywhere agent {VERSION} ("master-0123456789ab")', res.stdout + res.stderr


def test_committed_build_module_names_no_commit():
    namespace: dict = {}
    exec((REPO / "anywhere" / "_build.py").read_text(), namespace)
    assert namespace["commit"] is None, "anywhere/_build.py is generated by the builds: never commit a real one"


def test_rpm_requires_pyproject_dependencies():
    spec = (REPO / "packaging/rpm/anywhere.spec").read_text()
    requires = set(re.findall(r"(?m)^Requires:\s+(\S+)\s*$", spec))
    missing = sorted(rpm_name(d) for d in pyproject_dependencies() if rpm_name(d) not in requires)
    assert not missing, f"packaging/rpm/anywhere.spec lacks Requires: {missing}"


def test_versions_agree():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(rf'(?m)^version = "{re.escape(VERSION)}"$', pyproject), "pyproject.toml and common.py disagree"
    changelog = (REPO / "packaging/debian/changelog").read_text()
    assert changelog.startswith(f"anywhere ({VERSION})"), "packaging/debian/changelog's top entry is another version"
    spec = (REPO / "packaging/rpm/anywhere.spec").read_text()
    assert f"%global anywhere_version {VERSION}" in spec and f"- {VERSION}-1" in spec, "packaging/rpm/anywhere.spec"


# -- the tarball ----------------------------------------------------------------------------------------------
def unpacked_members(archive: Path) -> dict[str, tuple]:
    """name → (type, mode, uid, gid, mtime, linkname, sha-ish content) of every member."""
    import hashlib
    members = {}
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read() if m.isfile() else b""
            members[m.name] = (m.type, m.mode, m.uid, m.gid, m.mtime, m.linkname, hashlib.sha256(data).hexdigest())
    return members


@pytest.fixture(scope="module")
def tarball(tmp_path_factory):
    """Two builds: `make` (the default goal) and `make tarball CREDENTIALS=no`, in separate work directories."""
    base = tmp_path_factory.mktemp("tarball")
    started = time.monotonic()
    make(None, base / "dist-a", base / "work-a")
    make("tarball", base / "dist-b", base / "work-b", "CREDENTIALS=no")
    print(f"two tarball builds in {time.monotonic() - started:.0f} s")
    for work in (base / "work-a" / "tarball", base / "work-b" / "tarball"):  # ~120 MB each; src/ is kept
        for scratch in ("pyinstaller-config", "pyinstaller-dist", "pyinstaller-work", "root"):
            shutil.rmtree(work / scratch, ignore_errors=True)
    return base


@pytest.mark.slow
def test_tarball_is_reproducible_except_credentials(tarball):
    a, b = tarball / "dist-a" / "anywhere.tar.gz", tarball / "dist-b" / "anywhere.tar.gz"
    members_a, members_b = unpacked_members(a), unpacked_members(b)
    credentials = {n for n in members_a if n == "credential" or n.startswith("credential/")}
    assert credentials == {"credential", "credential/ca.crt", "credential/server.crt", "credential/server.key",
                           "credential/client.crt", "credential/client.key"}, sorted(credentials)
    assert {n: v for n, v in members_a.items() if n not in credentials} == members_b
    # the archive without credentials is the other's payload, byte for byte, and the checksums say so
    import gzip
    import hashlib
    payload_b = hashlib.sha256(gzip.decompress(b.read_bytes())).hexdigest()
    sums = (tarball / "dist-a" / "anywhere.tar.gz.sha256").read_text()
    assert f"payload (everything but the per-build credential/): {payload_b}" in sums, sums
    assert sums.startswith(hashlib.sha256(a.read_bytes()).hexdigest() + "  anywhere.tar.gz\n"), sums
    assert baked_commit(tarball / "work-a") == baked_commit(tarball / "work-b")


@pytest.mark.slow
def test_tarball_layout(tarball):
    members = unpacked_members(tarball / "dist-a" / "anywhere.tar.gz")
    names = set(members)
    expected = {"bin/anywhered", "bin/anywhere", "bin/anywherectl", "bin/_internal", "etc/anywhered.conf",
                "etc/agents/agent.conf.example", "etc/proxies.d/example.conf", "etc/examples/haproxy.cfg",
                "systemd/anywhered.service",
                "systemd/anywhere-agent@.service",
                "systemd/anywhere-agents.target", "systemd/anywhere.sysusers", "share/man/man8/anywhered.8",
                "share/man/man8/anywhere.8", "share/man/man8/anywherectl.8",
                "share/bash-completion/completions/anywhere", "README.md"}
    assert expected <= names, sorted(expected - names)
    assert "credential/ca.key" not in names, "the CA's private key must never be shipped"
    assert not [n for n in names if n.startswith(("/", "./", "..")) or "/../" in n], "unsafe member names"
    epochs = {v[4] for v in members.values()}
    assert len(epochs) == 1, f"more than one mtime: {epochs}"
    assert {(v[2], v[3]) for v in members.values()} == {(0, 0)}
    for name in ("bin/anywhered", "bin/anywhere", "bin/anywherectl"):
        kind, mode = members[name][:2]
        assert mode == 0o755 or kind == tarfile.LNKTYPE, (name, oct(mode))
    assert members["credential/server.key"][1] == members["credential/client.key"][1] == 0o600
    assert members["credential/server.crt"][1] == 0o644
    with tarfile.open(tarball / "dist-a" / "anywhere.tar.gz") as tar:
        unit = tar.extractfile("systemd/anywhered.service").read().decode()
    assert "ExecStart=/usr/local/anywhere/bin/anywhered start" in unit and "/usr/bin/" not in unit, unit


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"hello from the target\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def web_target():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_tarball_quickstart(tarball, tmp_path, web_target):
    """README's QuickStart from /usr/local/anywhere-like tree, with the bundled credential/ and
    only what a test must add: its own ports, admin socket and state directory."""
    root = tmp_path / "usr-local-anywhere"
    root.mkdir()
    subprocess.run(["tar", "-xf", str(tarball / "dist-a" / "anywhere.tar.gz"), "-C", str(root)], check=True, timeout=120)
    bindir = root / "bin"
    commit = baked_commit(tarball / "work-a")
    check_commit(commit)
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": str(tmp_path)}
    for name, usage in (("anywhered", "usage: anywhered"), ("anywhere", "usage: anywhere "),
                        ("anywherectl", "usage: anywherectl")):
        res = subprocess.run([bindir / name, "--help"], capture_output=True, text=True, timeout=60, env=env)
        assert res.returncode == 0 and res.stdout.startswith(usage), (name, res.stdout, res.stderr)
        res = subprocess.run([bindir / name, "--version"], capture_output=True, text=True, timeout=60, env=env)
        prog = "anywhere agent" if name == "anywhere" else name
        assert res.returncode == 0 and res.stdout == f'{prog} {VERSION} ("{commit}")\n', (name, res.stdout, res.stderr)

    cwd = tmp_path / "elsewhere"  # not the install root: credential/ is found beside bin/
    cwd.mkdir()
    port, remote = free_port(), free_port()
    sock, state = tmp_path / "anywhered.sock", tmp_path / "state"
    admin = ["--admin-socket", str(sock)]
    procs: list[Proc] = []
    daemon_pid: int | None = None
    old = os.getcwd()
    os.chdir(cwd)
    try:
        server = Proc([str(bindir / "anywhered"), "start", "--wl", "127.0.0.1,::1", "-p", str(port), *admin,
                       "--state-dir", str(state)], tmp_path / "server.log", env=env)
        procs.append(server)
        server.wait_log("listening for agents", timeout=30)
        agent = Proc([str(bindir / "anywhere"), "-i", "agent-1", "-s", "127.0.0.1", "-p", str(port)],
                     tmp_path / "agent.log", env=env)
        procs.append(agent)

        def connected() -> bool:
            res = subprocess.run([bindir / "anywhered", "agent", "list", "--json", *admin], capture_output=True,
                                 text=True, timeout=30, env=env)
            return res.returncode == 0 and any(a["agent_id"] == "agent-1" for a in json.loads(res.stdout)["agents"])
        wait_for(connected, 30, what=f"agent-1 to connect:\n{agent.log()}\n{server.log()}")
        res = subprocess.run([bindir / "anywhered", "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1",
                              "--local-port", str(web_target), "--remote-port", str(remote), *admin],
                             capture_output=True, text=True, timeout=30, env=env)
        assert res.returncode == 0, res.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{remote}/", timeout=30) as reply:
            assert reply.read() == b"hello from the target\n"
        assert "Traceback" not in server.log() + agent.log(), server.log() + agent.log()

        # without systemd: the agent detached (python-daemon is in the bundle), replacing the first one
        assert agent.stop() == 0, agent.log()
        pidfile, daemon_log = tmp_path / "agent.pid", tmp_path / "agent-daemon.log"
        res = subprocess.run([bindir / "anywhere", "-i", "agent-1", "-s", "127.0.0.1", "-p", str(port), "--daemon",
                              "--pidfile", str(pidfile), "--log-file", str(daemon_log)], capture_output=True,
                             text=True, timeout=60, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        daemon_pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 15, what="the pid file"))
        wait_for(connected, 30, what=f"the detached agent to connect:\n{daemon_log.read_text()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{remote}/", timeout=30) as reply:
            assert reply.read() == b"hello from the target\n"
        stop_pid(daemon_pid, bindir / "anywhere")
        wait_for(lambda: not pidfile.exists(), 15, what="the detached agent to remove its pid file")
        daemon_pid = None
    finally:
        os.chdir(old)
        if daemon_pid:
            stop_pid(daemon_pid, bindir / "anywhere")
        for proc in reversed(procs):
            proc.stop()
    assert server.popen.returncode == 0, server.log()


def stop_pid(pid: int, executable: Path, timeout: float = 10) -> None:
    """SIGTERM to `pid` if it is still `executable` (a detached process we started), SIGKILL after `timeout`."""
    import signal

    def ours() -> bool:
        try:
            return os.readlink(f"/proc/{pid}/exe") == str(executable)
        except OSError:
            return False
    if not ours():
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while ours() and time.monotonic() < deadline:
        time.sleep(0.05)
    if ours():
        os.kill(pid, signal.SIGKILL)


# -- the .deb -------------------------------------------------------------------------------------------------
UPGRADE = f"{VERSION}+test1"


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    base = tmp_path_factory.mktemp("deb")
    make("deb", base / "dist", base / "work")
    make("deb", base / "dist", base / "work-upgrade", f"PKG_VERSION={UPGRADE}")
    return base


@pytest.mark.slow
def test_deb_lintian_clean(debs):
    install_tools("lint")
    deb = debs / "dist" / f"anywhere_{VERSION}_all.deb"
    res = subprocess.run(["lintian", "--pedantic", "--fail-on", "error,warning", str(deb)], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, PATH=SYSTEM_PATH))
    tags = [line for line in res.stdout.splitlines() if re.match(r"[EWX]: ", line)]
    assert res.returncode == 0 and not tags, res.stdout + res.stderr


@pytest.mark.slow
def test_deb_contents(debs):
    deb = debs / "dist" / f"anywhere_{VERSION}_all.deb"
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, timeout=60).stdout
    files = {line.split()[-1].lstrip(".") if "->" not in line else line.split()[-3].lstrip("."): line.split()[0]
             for line in listing.splitlines()}
    for path, mode in {"/usr/bin/anywhered": "-rwxr-xr-x", "/usr/bin/anywhere": "-rwxr-xr-x",
                       "/usr/bin/anywherectl": "-rwxr-xr-x", "/lib/systemd/system/anywhered.service": "-rw-r--r--",
                       "/lib/systemd/system/anywhere-agent@.service": "-rw-r--r--",
                       "/lib/systemd/system/anywhere-agents.target": "-rw-r--r--",
                       "/usr/lib/sysusers.d/anywhere.conf": "-rw-r--r--", "/etc/anywhere/anywhered.conf": "-rw-r--r--",
                       "/etc/anywhere/agents/agent.conf.example": "-rw-r--r--",
                       "/etc/anywhere/proxies.d/example.conf": "-rw-r--r--",
                       "/usr/share/doc/anywhere/examples/haproxy.cfg": "-rw-r--r--",
                       "/usr/share/man/man8/anywhered.8.gz": "-rw-r--r--", "/usr/share/man/man8/anywhere.8.gz": "-rw-r--r--",
                       "/usr/share/man/man8/anywherectl.8.gz": "-rw-r--r--",
                       "/usr/share/bash-completion/completions/anywhere": "-rw-r--r--",
                       "/usr/share/bash-completion/completions/anywhered": "lrwxrwxrwx",
                       "/var/lib/anywhere/": "drwxr-xr-x", "/etc/anywhere/credential/": "drwxr-xr-x",
                       "/usr/lib/python3/dist-packages/anywhere/_build.py": "-rw-r--r--"}.items():
        assert files.get(path) == mode, f"{path}: {files.get(path)} (expected {mode})\n{listing}"
    control = subprocess.run(["dpkg-deb", "-e", str(deb), str(debs / "control")], capture_output=True, timeout=60)
    assert control.returncode == 0
    conffiles = (debs / "control" / "conffiles").read_text().split()
    assert conffiles == ["/etc/anywhere/agents/agent.conf.example", "/etc/anywhere/anywhered.conf",
                         "/etc/anywhere/proxies.d/example.conf"], conffiles
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Architecture"], capture_output=True, text=True,
                            timeout=60).stdout
    for dist in pyproject_dependencies():
        assert re.search(rf"\b{re.escape(debian_name(dist))}\b", fields), (dist, fields)
    assert "Architecture: all" in fields


def installed_packages(tree: Path) -> set[str]:
    """Packages installed in a Debian root file system (its dpkg status file)."""
    installed = set()
    for stanza in (tree / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
        if fields.get("Status") == "install ok installed":
            installed.add(fields["Package"])
            installed |= {p.strip().split(" ")[0] for p in fields.get("Provides", "").split(",") if p.strip()}
    return installed


def unmet_dependencies(deb: Path, tree: Path) -> list[str]:
    """The first alternative of every Depends: group of `deb` that nothing in `tree` satisfies."""
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    installed = installed_packages(tree)
    unmet = []
    for group in depends.split(","):
        names = [alt.strip().split(" ")[0].split(":")[0] for alt in group.split("|") if alt.strip()]
        if names and not any(name in installed for name in names):
            unmet.append(names[0])
    return unmet


@pytest.fixture(scope="module")
def guest(debs):
    import systemd_guest
    from systemd_guest import Guest, Unavailable
    deb = debs / "dist" / f"anywhere_{VERSION}_all.deb"
    try:
        systemd_guest.ensure_host_tools()
        tree = systemd_guest.base_tree()
        # the guest has no network: every dependency of the .deb must be in its root file system
        missing = unmet_dependencies(deb, tree) + [p for p in ("curl",) if p not in installed_packages(tree)]
        if missing:  # a cached variant of the shared root file system, with them (its own recipe hash)
            systemd_guest.log(f"the shared root file system lacks {missing}: using a variant with them")
            shared = systemd_guest.PACKAGES
            systemd_guest.PACKAGES = sorted(set(shared) | set(missing))
            try:
                tree = systemd_guest.base_tree()
            finally:
                systemd_guest.PACKAGES = shared
            assert not unmet_dependencies(deb, tree), unmet_dependencies(deb, tree)
    except Unavailable as exc:
        pytest.skip(f"the .deb test needs a systemd-nspawn guest: {exc}")
    g = Guest(tree)
    try:
        try:
            g.boot()
        except Unavailable as exc:
            pytest.skip(f"the .deb test needs a systemd-nspawn guest: {exc}")
        stage = g.workdir / "stage"
        (stage / "srv" / "debs").mkdir(parents=True)
        for deb in (debs / "dist").glob("*.deb"):
            shutil.copy2(deb, stage / "srv" / "debs" / deb.name)
        (stage / "srv" / "www").mkdir()
        (stage / "srv" / "www" / "index.html").write_text("hello from the target\n")
        g.install(stage)
        yield g
    finally:
        g.close()


class Sys:
    """systemctl and friends inside the guest, with the journal in every failure message."""

    def __init__(self, guest) -> None:
        self.guest = guest

    def run(self, *cmd: str, check: bool = True, timeout: float = 120, user: str | None = None):
        argv = list(cmd) if user is None else ["runuser", "-u", user, "--", *cmd]
        res = self.guest.run(argv, check=False, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"`{shlex.join(argv)}` exited {res.returncode}:\n{res.stdout}{res.stderr}\n{self.journal()}")
        return res

    def journal(self, lines: int = 60) -> str:
        res = self.guest.run(["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines), "-u", "anywhere*"],
                             check=False, timeout=30)
        return f"--- journal ---\n{res.stdout.rstrip()}"

    def prop(self, unit: str, name: str) -> str:
        return self.run("systemctl", "show", unit, f"--property={name}", "--value").stdout.strip()

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.journal()}")
            time.sleep(0.3)

    def agent_connected(self) -> bool:
        res = self.run("anywherectl", "agent", "list", "--json", check=False)
        return res.returncode == 0 and any(a["agent_id"] == "agent-1" for a in json.loads(res.stdout)["agents"])

    def tunnel_works(self, port: int = 8080) -> bool:
        res = self.guest.run(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/index.html"], check=False,
                             timeout=30)
        return res.returncode == 0 and res.stdout == "hello from the target\n"

    def active_units(self) -> list[str]:
        out = self.run("systemctl", "list-units", "--all", "--plain", "--no-legend", "anywhere*").stdout
        return [line for line in out.splitlines()
                if len(line.split()) > 2 and line.split()[2] in ("active", "activating", "deactivating", "reloading")]


@pytest.mark.slow
def test_deb_install_tunnel_upgrade_purge(guest, debs):
    s = Sys(guest)
    # install: the user, the overrides, host credentials, anywhered enabled and running
    res = s.run("dpkg", "-i", f"/srv/debs/anywhere_{VERSION}_all.deb", timeout=300)
    assert "made a CA and a certificate for the server" in res.stdout, res.stdout + res.stderr
    assert s.prop("anywhered.service", "ActiveState") == "active", s.journal()
    assert s.run("systemctl", "is-enabled", "anywhered.service", "anywhere-agents.target").stdout.split() == \
        ["enabled", "enabled"]
    assert s.prop("anywhere-agents.target", "ActiveState") == "active"
    assert s.run("getent", "passwd", "anywhere").stdout.strip().split(":")[5:] == ["/var/lib/anywhere", "/usr/sbin/nologin"]
    modes = s.run("stat", "-c", "%n %a %U:%G", "/etc/anywhere/anywhered.conf", "/etc/anywhere/credential",
                  "/var/lib/anywhere", "/etc/anywhere/credential/server.key", "/etc/anywhere/credential/ca.key").stdout
    assert modes.splitlines() == ["/etc/anywhere/anywhered.conf 640 root:anywhere",
                                  "/etc/anywhere/credential 750 root:anywhere",
                                  "/var/lib/anywhere 750 anywhere:anywhere",
                                  "/etc/anywhere/credential/server.key 640 root:anywhere",
                                  "/etc/anywhere/credential/ca.key 600 root:root"], modes
    for command, prog in (("anywhered", "anywhered"), ("anywhere", "anywhere agent"), ("anywherectl", "anywherectl")):
        line = s.run(command, "--version").stdout
        assert re.fullmatch(rf'{prog} {re.escape(VERSION)} \("[^"]+-[0-9a-f]{{12}}(-dirty)?"\)\n', line), line
        assert s.run(command, "--help").stdout.startswith(f"usage: {command}")

    # an agent instance, as an operator sets one up, and a request through the tunnel
    s.run("/bin/sh", "-ec", """
        cd /etc/anywhere/credential
        anywherectl credentials issue agent-1 /etc/anywhere/credential
        chgrp anywhere agent-1.key && chmod 0640 agent-1.key
        printf '[agent]\\nserver = 127.0.0.1\\nallow = 127.0.0.1:8000\\n' > /etc/anywhere/agents/agent-1.conf
        chgrp anywhere /etc/anywhere/agents/agent-1.conf && chmod 0640 /etc/anywhere/agents/agent-1.conf
        systemd-run --quiet --unit=web-target --service-type=exec \
            python3 -m http.server 8000 --bind 127.0.0.1 --directory /srv/www
    """)
    s.run("systemctl", "start", "anywhere-agent@agent-1", timeout=120)
    assert s.prop("anywhere-agent@agent-1.service", "ActiveState") == "active", s.journal()
    s.wait(s.agent_connected, 30, "agent-1 to connect")
    s.run("anywherectl", "proxy", "add", "--agent-id", "agent-1", "--local-ip", "127.0.0.1", "--local-port", "8000",
          "--remote-port", "8080")
    s.wait(s.tunnel_works, 30, "a request through the tunnel")

    # proxies as files: the package's proxies.d holds only its example, which declares nothing; a
    # file dropped in serves after `systemctl reload`, a bad one fails the reload and changes nothing
    assert s.run("ls", "/etc/anywhere/proxies.d").stdout.split() == ["example.conf"]
    assert "# /etc/anywhere/proxies.d: OK; 0 proxies declared" in s.run("anywhered", "check-config").stdout
    web = "[web]\nagent = agent-1\nlocal_ip = 127.0.0.1\nlocal_port = 8000\nremote_port = 8081\n"
    s.guest.write("/etc/anywhere/proxies.d/web.conf", web)
    s.run("systemctl", "reload", "anywhered.service")
    s.wait(lambda: s.tunnel_works(8081), 30, "a request through the proxy declared in web.conf")
    s.guest.write("/etc/anywhere/proxies.d/bad.conf", web.replace("web", "bad").replace("8081", "70000"))
    res = s.run("systemctl", "reload", "anywhered.service", check=False)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "/etc/anywhere/proxies.d/bad.conf [bad] remote_port = 70000: must be 1..65535" in s.journal(), s.journal()
    assert s.prop("anywhered.service", "ActiveState") == "active" and s.tunnel_works(8081) and s.tunnel_works()
    s.run("rm", "/etc/anywhere/proxies.d/bad.conf")

    # anywherectl for members of group anywhere, nobody else
    s.run("useradd", "--no-create-home", "--groups", "anywhere", "operator1")
    status = json.loads(s.run("anywherectl", "status", "--json", user="operator1").stdout)
    assert status["agents"] == 1 and status["proxies"] == 2, status
    denied = s.run("anywherectl", "status", user="nobody", check=False)
    assert denied.returncode == 1 and "permission denied" in denied.stderr, denied

    # upgrade to a rebuilt package: anywhered and the agent instance are restarted, the proxy kept
    before = {u: s.prop(u, "InvocationID") for u in ("anywhered.service", "anywhere-agent@agent-1.service")}
    s.run("dpkg", "-i", f"/srv/debs/anywhere_{UPGRADE}_all.deb", timeout=300)
    assert s.run("dpkg-query", "-W", "-f", "${Version}", "anywhere").stdout == UPGRADE
    for unit, invocation in before.items():  # the instance's restart (PartOf) may still be finishing
        s.wait(lambda unit=unit: s.prop(unit, "ActiveState") == "active", 30, f"{unit} to be active after the upgrade")
        assert s.prop(unit, "InvocationID") != invocation, f"{unit} was not restarted by the upgrade"
    s.wait(s.agent_connected, 30, "agent-1 to reconnect after the upgrade")
    s.wait(s.tunnel_works, 30, "the tunnel after the upgrade")
    s.wait(lambda: s.tunnel_works(8081), 30, "the declared proxy after the upgrade")

    # purge: every unit stopped, nothing of user anywhere left running, the package's files gone
    s.run("dpkg", "--purge", "anywhere", timeout=300)
    assert s.active_units() == [], s.active_units()
    survivors = s.run("/bin/sh", "-c", 'uid=$(id -u anywhere); for d in /proc/[0-9]*; do '
                                       '[ "$(stat -c %u "$d" 2>/dev/null)" = "$uid" ] && cat "$d/cmdline"; done; true').stdout
    assert survivors == "", f"processes of user anywhere survive the purge: {survivors!r}"
    leftovers = s.run("/bin/sh", "-c", "ls -d /usr/bin/anywhere* /etc/anywhere/credential /etc/anywhere/anywhered.conf "
                                       "/var/lib/anywhere /lib/systemd/system/anywhere* 2>/dev/null", check=False).stdout
    assert leftovers == "", leftovers
    # the package's example went with it; the operator's own file stays
    assert s.run("ls", "/etc/anywhere/proxies.d").stdout.split() == ["web.conf"]
    assert s.run("dpkg-statoverride", "--list").stdout.count("anywhere") == 0
    assert not s.tunnel_works()


# -- the .rpm -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rpm(tmp_path_factory):
    base = tmp_path_factory.mktemp("rpm")
    install_tools("lint", "test")
    make("rpm", base / "dist", base / "work")
    found = list((base / "dist").glob("*.rpm"))
    assert [p.name for p in found] == [f"anywhere-{VERSION}-1.noarch.rpm"], found
    return found[0]


@pytest.mark.slow
def test_rpmlint_clean(rpm):
    res = subprocess.run(["rpmlint", "-r", str(REPO / "packaging/rpm/anywhere.rpmlintrc"), str(rpm)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PATH=SYSTEM_PATH))
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"\b0 errors, 0 warnings\b", res.stdout), res.stdout


@pytest.mark.slow
def test_rpm_files_modes_and_config(rpm):
    out = subprocess.run(["rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} "
                          "%{FILEFLAGS:fflags} %{FILENAMES}\n]", str(rpm)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    files = {line.split(" ", 4)[4]: tuple(line.split(" ", 4)[:4]) for line in out.splitlines()}
    expected = {
        "/usr/bin/anywhered": ("-rwxr-xr-x", "root", "root", ""),
        "/usr/bin/anywhere": ("-rwxr-xr-x", "root", "root", ""),
        "/usr/bin/anywherectl": ("-rwxr-xr-x", "root", "root", ""),
        "/usr/lib/anywhere/anywhere/server_cli.py": ("-rw-r--r--", "root", "root", ""),
        "/usr/lib/anywhere/anywhere/_build.py": ("-rw-r--r--", "root", "root", ""),
        "/usr/lib/systemd/system/anywhered.service": ("-rw-r--r--", "root", "root", ""),
        "/usr/lib/systemd/system/anywhere-agent@.service": ("-rw-r--r--", "root", "root", ""),
        "/usr/lib/systemd/system/anywhere-agents.target": ("-rw-r--r--", "root", "root", ""),
        "/usr/lib/sysusers.d/anywhere.conf": ("-rw-r--r--", "root", "root", ""),
        "/etc/anywhere": ("drwxr-xr-x", "root", "root", ""),
        "/etc/anywhere/anywhered.conf": ("-rw-r-----", "root", "anywhere", "cn"),
        "/etc/anywhere/agents/agent.conf.example": ("-rw-r--r--", "root", "root", "cn"),
        "/etc/anywhere/proxies.d": ("drwxr-xr-x", "root", "root", ""),
        "/etc/anywhere/proxies.d/example.conf": ("-rw-r--r--", "root", "root", "cn"),
        f"/usr/share/doc/anywhere-{VERSION}/haproxy.cfg": ("-rw-r--r--", "root", "root", "d"),  # %doc: versioned dir
        "/etc/anywhere/credential": ("drwxr-x---", "root", "anywhere", ""),
        "/var/lib/anywhere": ("drwxr-x---", "anywhere", "anywhere", ""),
        "/usr/share/man/man8/anywhered.8.gz": ("-rw-r--r--", "root", "root", "d"),
        "/usr/share/man/man8/anywhere.8.gz": ("-rw-r--r--", "root", "root", "d"),
        "/usr/share/man/man8/anywherectl.8.gz": ("-rw-r--r--", "root", "root", "d"),
        "/usr/share/bash-completion/completions/anywhere": ("-rw-r--r--", "root", "root", ""),
        "/usr/share/bash-completion/completions/anywhered": ("lrwxrwxrwx", "root", "root", ""),
        "/usr/share/bash-completion/completions/anywherectl": ("lrwxrwxrwx", "root", "root", ""),
    }
    wrong = {path: (files.get(path), want) for path, want in expected.items() if files.get(path) != want}
    assert not wrong, f"(found, expected): {wrong}\n{out}"
    listed = subprocess.run(["rpm", "-qlp", str(rpm)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert set(expected) <= set(listed.split()), sorted(set(expected) - set(listed.split()))
    assert not [p for p in listed.split() if p.endswith("ca.key")]
    wrapper = subprocess.run(f"rpm2cpio {shlex.quote(str(rpm))} | cpio -i --to-stdout ./usr/bin/anywhered",
                             shell=True, capture_output=True, text=True, timeout=60).stdout
    assert wrapper.startswith("#!/usr/bin/python3") and "from anywhere.server_cli import main" in wrapper, wrapper


@pytest.mark.slow
def test_rpm_scriptlets_parse(rpm):
    out = subprocess.run(["rpm", "-qp", "--scripts", str(rpm)], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    scripts: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        header = re.fullmatch(r"(\w+) scriptlet(?: \(using (\S+)\))?:", line)
        if header:
            assert header.group(2) == "/bin/sh", line
            current = header.group(1)
            scripts[current] = []
        elif current:
            scripts[current].append(line)
    assert set(scripts) == {"preinstall", "postinstall", "preuninstall", "postuninstall"}, out
    for name, lines in scripts.items():
        body = "\n".join(lines) + "\n"
        res = subprocess.run(["sh", "-n"], input=body, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"{name}: {res.stderr}\n{body}"
        assert "%{" not in body and "%(" not in body, f"{name} has an unexpanded macro:\n{body}"
    assert "systemd-sysusers" in "\n".join(scripts["preinstall"]) and 'u anywhere - "Anywhere' in "\n".join(scripts["preinstall"])
    assert "anywhere-agents.target" in "\n".join(scripts["preuninstall"])  # removal stops the agent instances
    assert "try-restart" in "\n".join(scripts["postuninstall"])  # upgrades restart them
