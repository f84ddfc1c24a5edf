"""A Debian guest with a real systemd as PID 1, booted with systemd-nspawn, for tests/test_systemd.py.

Theory of operation
-------------------
These machines are containers whose PID 1 is not systemd, but a real systemd boots inside
systemd-nspawn (see shared/notes/systemd-container-tests.md):

1. Host tools: debootstrap, systemd-nspawn (systemd-container) and zstd; `ensure_host_tools()`
   installs the missing ones with apt-get (CI starts on a fresh machine) or raises Unavailable.
2. Root file system, built once: `debootstrap --variant=minbase --include=systemd,python3,<the
   project's dependencies as Debian packages>` from the host's own Debian mirror (the guest has no
   network), trimmed, with an empty /etc/machine-id, and cached outside the repository as
   ``~/.cache/anywhere-test/rootfs-<hash of the recipe>.tar.zst``, unpacked once beside it
   (``rootfs-<hash>.d``; override the directory with ANYWHERE_TEST_CACHE; entries with another
   hash are from older recipes and may be deleted).  An fcntl lock makes concurrent runs build it once.
3. `Guest` boots that tree in the background with `--volatile=overlay` (the tree is the read-only
   lower layer, every write goes to a tmpfs: guests never change the cache and can run side by
   side), `--private-network` (the guest's only network is its own loopback) and
   `--register=no --keep-unit` (the host has no machined), from a shell that first moves itself
   into a cgroup of its own in every hierarchy (otherwise nspawn's payload/ and supervisor/
   cgroups collide between runs).  `run()` executes commands inside with
   `nsenter -t <host pid of the guest's systemd> -a`, with a clean environment.
4. `stage_project()` lays the project out as a package would (code under /usr/lib/anywhere,
   /usr/bin wrappers, units, sysusers.d, /etc/anywhere) and `Guest.install()` copies such a tree
   in with tar (existing directories keep their metadata).
5. `Guest.close()` powers the guest off with SIGTERM to nspawn (SIGKILL to the guest's init,
   then nspawn, after a timeout), removes the cgroups and its temporary directory.  It ends only the
   processes it started, by pid, and is safe to call at any point, also twice.

Every wait is bounded.  Run ``python tests/systemd_guest.py build`` to build the cache alone, or
``python tests/systemd_guest.py shell`` to boot a guest with the project installed and get a
shell in it (for debugging; the guest is powered off when the shell exits).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
SUITE = "bookworm"
# The project's runtime dependencies as Debian 12 packages (pyproject.toml), plus what the test uses.
# debootstrap does not resolve virtual packages: python3-cryptography needs python3-cffi-backend
# (it provides python3-cffi-backend-api-min/max) named explicitly.
PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "python3", "python3-h11", "python3-cryptography", "python3-cffi-backend",
    "python3-requests", "python3-configobj", "python3-sdnotify", "python3-daemon", "python3-prometheus-client",
    "iproute2", "curl",
]
RECIPE_VERSION = 1  # bump when the way the root file system is made changes
HOST_TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "zstd": "zstd",
              "nsenter": "util-linux"}
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUEST_ENV = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0",
             "SYSTEMD_LOG_COLOR": "0"}
CGROUP_ROOT = Path("/sys/fs/cgroup")


class Unavailable(Exception):
    """This machine cannot run the guest; the message says why (tests skip with it)."""


def log(message: str) -> None:
    print(f"[systemd-guest {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SYSTEM_PATH)


# -- host tools ----------------------------------------------------------------------------------------
def ensure_host_tools() -> None:
    if sys.platform != "linux":
        raise Unavailable(f"needs Linux, this is {sys.platform}")
    if os.geteuid() != 0:
        raise Unavailable(f"needs root to boot a systemd-nspawn container (running as uid {os.geteuid()})")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if which(tool) is None})
    if not missing:
        return
    apt = which("apt-get")
    if apt is None:
        raise Unavailable(f"needs the packages {' '.join(missing)} and there is no apt-get to install them")
    log(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SYSTEM_PATH)
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "--no-install-recommends", *missing]):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"`{' '.join(cmd)}` took longer than 600 s") from None
        if res.returncode != 0:
            raise Unavailable(f"`{' '.join(cmd)}` failed ({res.returncode}): {tail(res.stderr or res.stdout)}")
    still = [tool for tool in HOST_TOOLS if which(tool) is None]
    if still:
        raise Unavailable(f"{', '.join(still)} still missing after installing {' '.join(missing)}")


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# -- the cached root file system -----------------------------------------------------------------------
def cache_dir() -> Path:
    if os.environ.get("ANYWHERE_TEST_CACHE"):
        return Path(os.environ["ANYWHERE_TEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "anywhere-test"


def host_arch() -> str:
    try:
        res = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, timeout=30)
    except OSError:
        return os.uname().machine
    return res.stdout.strip() or os.uname().machine


def recipe_hash() -> str:
    recipe = {"version": RECIPE_VERSION, "suite": SUITE, "packages": sorted(PACKAGES), "arch": host_arch()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def debian_mirror() -> str:
    """The first Debian mirror in the host's apt sources (the deb822 file, else sources.list)."""
    for path in ("/etc/apt/sources.list.d/debian.sources",):
        try:
            for line in Path(path).read_text().splitlines():
                if line.strip().lower().startswith("uris:"):
                    for uri in line.split(":", 1)[1].split():
                        if "security" not in uri:
                            return uri
        except OSError:
            pass
    try:
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and "security" not in words[1]:
                return words[2] if words[1].startswith("[") else words[1]
    except OSError:
        pass
    return "http://deb.debian.org/debian"


NETWORK_ERRORS = ("Failed getting release file", "Couldn't download", "Temporary failure resolving",
                  "Could not resolve", "Connection refused", "Network is unreachable", "Connection timed out")


def base_rootfs(timeout: float = 1800) -> Path:
    """The cached root file system (a tar.zst), built first if needed; one builder at a time."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    tarball = directory / f"rootfs-{recipe_hash()}.tar.zst"
    if tarball.exists():
        return tarball
    with _cache_lock(directory, timeout):
        if tarball.exists():  # built by the run we waited for
            return tarball
        _build(tarball)
    return tarball


@contextlib.contextmanager
def _cache_lock(directory: Path, timeout: float) -> Iterator[None]:
    """One builder or unpacker at a time, across processes; waits at most `timeout` seconds."""
    with open(directory / "rootfs.lock", "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Unavailable(f"another run has held {lock.name} for {timeout:.0f} s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(tarball: Path) -> None:
    mirror = debian_mirror()
    work = Path(tempfile.mkdtemp(prefix="rootfs-build-", dir=tarball.parent))
    root = work / "root"
    started = time.monotonic()
    try:
        log(f"building the guest's root file system from {mirror} (once; cached as {tarball})")
        cmd = [which("debootstrap") or "debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
               SUITE, str(root), mirror]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1500,
                             env=dict(os.environ, PATH=SYSTEM_PATH, DEBIAN_FRONTEND="noninteractive"))
        if res.returncode != 0:
            output = res.stdout + res.stderr
            debootstrap_log = root / "debootstrap" / "debootstrap.log"
            if debootstrap_log.exists():
                output += debootstrap_log.read_text(errors="replace")
            message = f"`{' '.join(cmd)}` failed ({res.returncode}):\n{tail(output)}"
            if any(e in output for e in NETWORK_ERRORS):
                raise Unavailable("cannot reach the Debian mirror to build the guest: " + message)
            raise RuntimeError(message)
        _trim(root)
        partial = work / tarball.name
        with open(partial, "wb") as out:
            tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "--xattrs", "--acls", "-cf", "-", "."],
                                   stdout=subprocess.PIPE)
            zst = subprocess.run(["zstd", "-q", "-T0", "-10", "-c"], stdin=tar.stdout, stdout=out, timeout=600)
            assert tar.stdout is not None
            tar.stdout.close()
            if tar.wait(timeout=600) != 0 or zst.returncode != 0:
                raise RuntimeError(f"packing {root} failed (tar {tar.returncode}, zstd {zst.returncode})")
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, tarball)
        log(f"root file system cached: {tarball} ({tarball.stat().st_size / 1e6:.0f} MB, "
            f"{time.monotonic() - started:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _trim(root: Path) -> None:
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "usr/share/doc/*", "usr/share/man/*", "usr/share/info/*", "var/log/*.log",
                    "var/cache/debconf/*-old"):
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.name != "lock":
                path.unlink()
    (root / "etc" / "machine-id").write_text("")  # each boot makes its own
    (root / "etc" / "hostname").write_text("anywhere-guest\n")


def base_tree(timeout: float = 1800) -> Path:
    """The cached root file system unpacked once beside its tarball (read-only lower layer of the guests)."""
    tarball = base_rootfs(timeout)
    tree = tarball.with_name(tarball.name.replace(".tar.zst", ".d"))
    done = tree.with_name(tree.name + ".ok")  # written after a complete unpack
    if done.exists():
        return tree
    with _cache_lock(tarball.parent, timeout):
        if done.exists():
            return tree
        started = time.monotonic()
        partial = Path(tempfile.mkdtemp(prefix="unpack-", dir=tarball.parent))
        try:
            extract(tarball, partial)
            partial.chmod(0o755)
            if tree.exists():
                shutil.rmtree(tree)
            os.rename(partial, tree)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        done.write_text(f"{tarball.name}\n")
        log(f"unpacked {tarball.name} into {tree} in {time.monotonic() - started:.1f} s")
    return tree


def extract(tarball: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    zst = subprocess.Popen(["zstd", "-q", "-d", "-c", str(tarball)], stdout=subprocess.PIPE)
    res = subprocess.run(["tar", "-C", str(dest), "--numeric-owner", "--xattrs", "--acls", "-xf", "-"],
                         stdin=zst.stdout, capture_output=True, text=True, timeout=600)
    assert zst.stdout is not None
    zst.stdout.close()
    if zst.wait(timeout=600) != 0 or res.returncode != 0:
        raise RuntimeError(f"unpacking {tarball} failed: {res.stderr.strip()}")


# -- staging the project as a package would install it -------------------------------------------------
WRAPPER = """#!/usr/bin/python3
# {name}: Anywhere, installed under /usr/lib/anywhere (as the test installs it).
import sys
sys.path.insert(0, "/usr/lib/anywhere")
from {module} import main
sys.exit(main())
"""
ENTRY_POINTS = {"anywhered": "anywhere.server_cli", "anywhere": "anywhere.agent_cli", "anywherectl": "anywhere.ctl"}


def stage_project(stage: Path, repo: Path = REPO) -> None:
    """The code, /usr/bin wrappers, systemd units and the sysusers.d file under `stage`, unchanged from the repo."""
    shutil.copytree(repo / "anywhere", stage / "usr/lib/anywhere/anywhere",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    bindir = stage / "usr/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for name, module in ENTRY_POINTS.items():
        path = bindir / name
        path.write_text(WRAPPER.format(name=name, module=module))
        path.chmod(0o755)
    units = stage / "usr/lib/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for unit in ("anywhered.service", "anywhere-agent@.service", "anywhere-agents.target"):
        shutil.copy2(repo / "systemd" / unit, units / unit)
    sysusers = stage / "usr/lib/sysusers.d"
    sysusers.mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo / "systemd" / "anywhere.sysusers", sysusers / "anywhere.conf")


# -- the guest -------------------------------------------------------------------------------------------
def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of the direct children of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid:
            found.append((int(entry), comm))
    return found


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Guest:
    """One booted guest.  Use as a context manager or call close(); everything it made goes away."""

    def __init__(self, tree: Path, name: str | None = None) -> None:
        self.root = tree  # never written: the guest runs on a tmpfs overlay (--volatile=overlay)
        self.name = name or f"anywhere-test-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.console_log = self.workdir / "console.log"
        self.cgroups: list[Path] = []
        self.nspawn: subprocess.Popen | None = None
        self.init_pid: int | None = None
        self.closed = False

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- boot -----------------------------------------------------------------------------------------
    def _make_cgroups(self) -> None:
        """A cgroup of our own in every hierarchy nspawn uses (the v2 one, and name=systemd on v1/hybrid)."""
        candidates = [CGROUP_ROOT / "unified", CGROUP_ROOT / "systemd"]
        if (CGROUP_ROOT / "cgroup.controllers").exists():  # pure cgroup v2
            candidates = [CGROUP_ROOT]
        for base in candidates:
            if not (base / "cgroup.procs").exists():
                continue
            path = base / self.name
            try:
                path.mkdir()
            except OSError as exc:
                raise Unavailable(f"cannot create a cgroup under {base} ({exc.strerror}): nspawn could not run here") from None
            self.cgroups.append(path)
        if not self.cgroups:
            raise Unavailable(f"no usable cgroup hierarchy under {CGROUP_ROOT}")

    def boot(self, timeout: float = 90) -> None:
        started = time.monotonic()
        self._make_cgroups()
        joins = "; ".join(f"echo $$ > {p}/cgroup.procs" for p in self.cgroups)
        nspawn = [which("systemd-nspawn") or "systemd-nspawn", "-D", str(self.root), "--volatile=overlay", "--boot",
                  f"--machine={self.name}", "--register=no", "--keep-unit", "--private-network",
                  "--console=read-only"]
        script = f"{joins}; exec \"$@\""
        with open(self.console_log, "wb") as console:
            self.nspawn = subprocess.Popen(["/bin/sh", "-c", script, "sh", *nspawn], stdin=subprocess.DEVNULL,
                                           stdout=console, stderr=subprocess.STDOUT, start_new_session=True,
                                           env=dict(os.environ, PATH=SYSTEM_PATH))
        try:
            self.init_pid = wait_until(self._find_init, 30, "the guest's systemd to start")  # type: ignore[assignment]
            wait_until(lambda: os.path.exists(f"/proc/{self.init_pid}/root/run/systemd/private"), timeout,
                       "/run/systemd/private in the guest")
            res = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                           timeout=max(5.0, timeout - (time.monotonic() - started)))
        except (TimeoutError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"the guest did not boot: {exc}\n{self.console()}") from None
        state = res.stdout.strip()
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout
            log(f"guest is degraded; failed units:\n{failed.rstrip()}")
        elif state != "running":
            raise RuntimeError(f"guest system state {state!r}:\n{self.console()}")
        log(f"guest {self.name} booted ({state}) in {time.monotonic() - started:.1f} s, init pid {self.init_pid}")

    def _find_init(self) -> int | None:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:  # it could not even start the guest: this machine does not allow it
            raise Unavailable(f"systemd-nspawn exited {self.nspawn.returncode} before the guest's systemd started:\n"
                              f"{self.console()}")
        for pid, comm in _children(self.nspawn.pid):
            if comm == "systemd":
                return pid
        return None

    def console(self) -> str:
        try:
            return tail(self.console_log.read_text(errors="replace"), 40)
        except OSError:
            return "(no console log)"

    # -- commands inside ------------------------------------------------------------------------------
    def command(self, cmd: Sequence[str]) -> list[str]:
        if self.init_pid is None:
            raise RuntimeError("the guest is not running")
        return [which("nsenter") or "nsenter", "-t", str(self.init_pid), "-a", *cmd]

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60, input: str | None = None
            ) -> subprocess.CompletedProcess:
        res = subprocess.run(self.command(cmd), capture_output=True, text=True, timeout=timeout, input=input,
                             env=GUEST_ENV)
        if check and res.returncode != 0:
            raise AssertionError(f"in the guest, `{' '.join(cmd)}` exited {res.returncode}:\n"
                                 f"{res.stdout}{res.stderr}")
        return res

    def popen(self, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen:
        """A command inside the guest, in the background; the caller waits for it (bounded)."""
        return subprocess.Popen(self.command(cmd), env=GUEST_ENV, text=True, **kwargs)  # type: ignore[call-overload]

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(["/bin/sh", "-ec", script], check=check, timeout=timeout)

    def write(self, path: str, text: str, mode: str = "0644", owner: str = "root:root") -> None:
        self.run(["/bin/sh", "-ec", f'umask 077; cat > "$1"; chown {owner} "$1"; chmod {mode} "$1"', "sh", path],
                 input=text)

    def install(self, stage: Path) -> None:
        """Copy a staged tree into the guest's / (existing directories keep owner and mode)."""
        pack = subprocess.Popen(["tar", "-C", str(stage), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
        res = subprocess.run(self.command(["tar", "-C", "/", "--no-overwrite-dir", "-xf", "-"]), stdin=pack.stdout,
                             capture_output=True, text=True, timeout=120, env=GUEST_ENV)
        assert pack.stdout is not None
        pack.stdout.close()
        if pack.wait(timeout=60) != 0 or res.returncode != 0:
            raise RuntimeError(f"copying {stage} into the guest failed: {res.stderr.strip()}")

    # -- the end --------------------------------------------------------------------------------------
    def close(self, timeout: float = 30) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._poweroff(timeout)
        finally:
            self._remove_cgroups()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _poweroff(self, timeout: float) -> None:
        proc = self.nspawn
        if proc is None or proc.poll() is not None:
            return
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # nspawn asks the guest's systemd to power off
        try:
            proc.wait(timeout)
            log(f"guest {self.name} powered off in {time.monotonic() - started:.1f} s (nspawn exit {proc.returncode})")
            return
        except subprocess.TimeoutExpired:
            log(f"guest {self.name} did not power off within {timeout:.0f} s; killing it")
        if self.init_pid is not None and any(pid == self.init_pid for pid, _ in _children(proc.pid)):
            os.kill(self.init_pid, signal.SIGKILL)  # the guest's PID 1: takes its whole PID namespace along
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def _remove_cgroups(self) -> None:
        for top in self.cgroups:
            if not top.exists():
                continue
            deadline = time.monotonic() + 10
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(Path(w[0]).parts)):
                while True:
                    try:
                        os.rmdir(dirpath)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as exc:  # EBUSY while the last processes exit
                        if time.monotonic() > deadline:
                            log(f"cannot remove cgroup {dirpath}: {exc.strerror}")
                            break
                        time.sleep(0.1)


def credentials_tree(etc_anywhere: Path, agents: Sequence[str] = ("agent-1",)) -> None:
    """CA, server and agent credentials for a server reached as 127.0.0.1 / ::1 / localhost (no CA key kept)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # run as a script without the venv's editable install
    from anywhere import credentials
    cred = etc_anywhere / "credential"
    with tempfile.TemporaryDirectory() as scratch:
        credentials.init(scratch, "localhost", ["127.0.0.1", "::1"])
        for agent in agents:
            credentials.issue(agent, scratch)
        cred.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(scratch):
            if name != "ca.key":
                shutil.copy2(os.path.join(scratch, name), cred / name)


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        ensure_host_tools()
        print(base_tree())
        return 0
    if argv[:1] == ["shell"]:
        ensure_host_tools()
        with Guest(base_tree()) as guest:
            guest.boot()
            stage = guest.workdir / "stage"
            stage_project(stage)
            guest.install(stage)
            guest.run(["systemd-sysusers"])
            guest.run(["systemctl", "daemon-reload"])
            log(f"project installed (no configuration); nsenter -t {guest.init_pid} -a /bin/bash")
            subprocess.run(guest.command(["/bin/bash", "-l"]), env=dict(GUEST_ENV, TERM=os.environ.get("TERM", "dumb")))
        return 0
    print(__doc__)
    print("usage: systemd_guest.py build | shell", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
