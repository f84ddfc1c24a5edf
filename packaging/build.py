#!/usr/bin/env python3
"""Build Anywhere's release artifacts: the PyInstaller tarball, the .deb and the .rpm.

    python3 packaging/build.py tarball [--out dist] [--work build/tarball] [--no-credentials]
    python3 packaging/build.py deb     [--out dist] [--work build/deb] [--version V]
    python3 packaging/build.py rpm     [--out dist] [--work build/rpm] [--version V]
    python3 packaging/build.py deps    tarball|deb|rpm|lint|all     (install the build tools)

(`make`, `make deb` and `make rpm` run these.)  Standard library only; runs on Debian 12's python3.

Theory of operation
-------------------
Every build starts from a *staged copy* of the source (`stage_source`): the files a package
needs, copied from the work tree, with ``anywhere/_build.py`` regenerated there to name the
commit being built (``BRANCH-SHA12``, ``-dirty`` if tracked files differ from it).  The
repository itself is never written to, except build/ and dist/ (both ignored by git).

* tarball: PyInstaller (pinned in packaging/requirements-tarball.txt, installed in its own venv
  build/venv) runs packaging/pyinstaller/anywhere.spec in onedir mode: bin/anywhered, bin/anywhere
  and bin/anywherectl share one runtime, bin/_internal (they are byte-identical and dispatch on
  their own name, so the archive stores them once, as hard links).  Beside bin/: credential/
  (a CA, server and client certificate made now by the bundled anywherectl, for this build
  only; the CA key is thrown away), etc/, systemd/ (ExecStart= pointing into
  /usr/local/anywhere/bin), share/man, share/bash-completion, README.md.
  Reproducible: PYTHONHASHSEED=0, SOURCE_DATE_EPOCH (the commit's time) for every mtime, one
  normalized mode per kind of file, `tar --sort=name --owner=0 --group=0 --numeric-owner
  --format=gnu` and `gzip -n`.  Two builds of one commit differ only in credential/, which is
  fresh each time: anywhere.tar.gz.sha256 lists the archive's checksum and the *payload*
  checksum, that of `gzip -dc anywhere.tar.gz | tar --delete credential`, which is the same for
  every build of the commit, and equal to the checksum of the uncompressed archive made with
  --no-credentials (whose compressed checksum is then the same for every build, too).
* deb: packaging/debian becomes debian/ of the staged copy; dpkg-buildpackage -b with debhelper
  and dh-python against Debian's python3-* packages, with a clean PATH (the first python3 on a
  developer's PATH may not be Debian's).  --version V adds a changelog entry for V (tests
  use it to build an upgrade).
* rpm: rpmbuild -bb of packaging/rpm/anywhere.spec on a deterministic tarball of the staged
  copy, with --nodeps (the rpm database of a Debian host is empty) and the spec's macro
  fallbacks.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
PACKAGING = REPO / "packaging"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
COMMANDS = ("anywhered", "anywhere", "anywherectl")
UNITS = ("anywhered.service", "anywhere-agent@.service", "anywhere-agents.target")
TARBALL_PREFIX = "/usr/local/anywhere"
# What a package is built from (copied from the work tree; anything else is left out).
SOURCE_FILES = ("pyproject.toml", "README.md")
SOURCE_DIRS = ("anywhere", "systemd", "etc", "man", "completion")

# Host tools per artifact, as Debian 12 packages (python3-venv for the PyInstaller venv).
DEPS = {
    "tarball": {"gzip": "gzip", "tar": "tar", "/usr/bin/python3": "python3", "git": "git",
                "python3-venv": "python3-venv"},
    "deb": {"dpkg-buildpackage": "dpkg-dev", "dh": "debhelper", "dh_python3": "dh-python",
            "pybuild-plugin-pyproject": "pybuild-plugin-pyproject", "python3-all": "python3-all",
            "python3-setuptools": "python3-setuptools", "git": "git"},
    "rpm": {"rpmbuild": "rpm", "git": "git"},
    "lint": {"lintian": "lintian", "rpmlint": "rpmlint"},
    # what tests/test_packaging.py uses besides: man pages rendered, completion run in bash
    "test": {"man": "man-db", "groff": "groff-base", "/usr/share/bash-completion/bash_completion": "bash-completion",
             "cpio": "cpio"},
}


class BuildError(Exception):
    pass


def log(message: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(cmd: Sequence[str | os.PathLike], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 900, quiet: bool = False) -> str:
    """Run a command; raise BuildError with the tail of its output if it fails."""
    shown = " ".join(str(c) for c in cmd)
    if not quiet:
        log(f"$ {shown}")
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        output = (res.stdout + res.stderr).strip().splitlines()
        raise BuildError(f"`{shown}` exited {res.returncode}:\n" + "\n".join(output[-40:]))
    return res.stdout


# -- what is being built ----------------------------------------------------------------------------
def version() -> str:
    text = (REPO / "anywhere" / "common.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not match:
        raise BuildError("no __version__ in anywhere/common.py")
    return match.group(1)


def commit_id() -> str:
    """ANYWHERE_COMMIT if set, else BRANCH-SHA12[-dirty] of the checkout, else "unknown"."""
    if os.environ.get("ANYWHERE_COMMIT"):
        return os.environ["ANYWHERE_COMMIT"]
    sys.path.insert(0, str(REPO))
    try:
        from anywhere.common import git_commit  # standard library only
    finally:
        sys.path.pop(0)
    return git_commit(str(REPO)) or "unknown"


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH if set, else the commit's time, else now (not reproducible then)."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        res = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct", "HEAD"], capture_output=True,
                             text=True, timeout=30, env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"))
        if res.returncode == 0 and res.stdout.strip().isdigit():
            return int(res.stdout.strip())
    except OSError:
        pass
    log("warning: not a git checkout and no SOURCE_DATE_EPOCH: this build is not reproducible")
    return int(time.time())


BUILD_MODULE = '''"""Build information, generated by packaging/build.py for this build (never committed)."""

commit: str | None = {commit!r}
'''


def stage_source(dest: Path, commit: str, epoch: int) -> None:
    """Copy what the packages are built from into `dest`, with anywhere/_build.py naming `commit`."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in SOURCE_FILES:
        shutil.copy2(REPO / name, dest / name)
    for name in SOURCE_DIRS:
        shutil.copytree(REPO / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*"))
    (dest / "anywhere" / "_build.py").write_text(BUILD_MODULE.format(commit=commit))
    normalize_tree(dest, epoch)


def normalize_tree(root: Path, epoch: int) -> None:
    """Modes 0755 for directories and executables, 0644 for other files (0600 for keys); every
    mtime = epoch."""
    paths = [root, *root.rglob("*")]
    for path in paths:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        elif path.suffix == ".key":
            path.chmod(0o600)
        else:
            path.chmod(0o755 if path.stat().st_mode & 0o111 else 0o644)
    for path in sorted(paths, key=lambda p: -len(p.parts)):  # children before their directory
        os.utime(path, (epoch, epoch), follow_symlinks=False)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for build tools: no venv, no PYTHON*/PIP* settings of the caller, C.UTF-8."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "PYTEST", "DEB_", "DH_"))}
    env.update(PATH=SYSTEM_PATH, LC_ALL="C.UTF-8", LANG="C.UTF-8", TZ="UTC")
    env.update(extra)
    return env


@contextlib.contextmanager
def locked(path: Path, timeout: float = 1800) -> Iterator[None]:
    """An exclusive lock on `path` across processes (bounded wait)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildError(f"{path} stayed locked for {timeout:.0f} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- host tools -------------------------------------------------------------------------------------
def missing_deps(kinds: Sequence[str]) -> list[str]:
    missing = []
    for kind in kinds:
        for tool, package in DEPS[kind].items():
            if tool.startswith(("python3-", "pybuild-")):
                status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True,
                                        text=True).stdout.split()
                ok = status[-1:] == ["installed"]  # "unknown ok not-installed" is a package dpkg only knows of
            elif tool.startswith("/"):
                ok = os.path.exists(tool)
            else:
                ok = shutil.which(tool, path=SYSTEM_PATH) is not None
            if not ok and package not in missing:
                missing.append(package)
    return missing


def ensure_deps(kinds: Sequence[str]) -> None:
    """Install the Debian packages the given builds need, with apt-get, if any is missing."""
    missing = missing_deps(kinds)
    if not missing:
        return
    if os.geteuid() != 0 and not shutil.which("sudo"):
        raise BuildError(f"missing Debian packages {' '.join(missing)} (run as root, or install them)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    log(f"installing Debian packages: {' '.join(missing)}")
    env = clean_env(DEBIAN_FRONTEND="noninteractive")
    with locked(REPO / "build" / ".apt.lock"):
        run([*sudo, "apt-get", "update", "-qq"], env=env, timeout=600)
        run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, timeout=900)
    still = missing_deps(kinds)
    if still:
        raise BuildError(f"still missing after apt-get install: {' '.join(still)}")


# -- the tarball ------------------------------------------------------------------------------------
def build_venv() -> Path:
    """build/venv (or $ANYWHERE_BUILD_VENV): Debian's python3 with packaging/requirements-tarball.txt,
    made once and remade when that file or the interpreter changes."""
    venv = Path(os.environ.get("ANYWHERE_BUILD_VENV") or REPO / "build" / "venv")
    requirements = PACKAGING / "requirements-tarball.txt"
    interpreter = "/usr/bin/python3"
    py_version = run([interpreter, "-c", "import sys; print(sys.version)"], quiet=True).strip()
    want = hashlib.sha256(requirements.read_bytes() + py_version.encode()).hexdigest()
    stamp = venv / ".anywhere-build-stamp"
    with locked(venv.parent / (venv.name + ".lock")):
        if stamp.exists() and stamp.read_text().strip() == want and (venv / "bin" / "pyinstaller").exists():
            return venv
        log(f"making the build venv {venv} (PyInstaller and the pinned runtime dependencies)")
        if venv.exists():
            shutil.rmtree(venv)
        env = clean_env()
        run([interpreter, "-m", "venv", venv], env=env)
        run([venv / "bin" / "pip", "install", "--quiet", "--no-deps", "--prefer-binary", "-r", requirements],
            env=env, timeout=1200)
        run([venv / "bin" / "pip", "check"], env=env, quiet=True)
        stamp.write_text(want + "\n")
    return venv


def build_tarball(out: Path, work: Path, credentials: bool, server_name: str, server_ips: list[str]) -> Path:
    ensure_deps(["tarball"])
    started = time.monotonic()
    commit, epoch = commit_id(), source_date_epoch()
    log(f"tarball of anywhere {version()} ({commit}), SOURCE_DATE_EPOCH={epoch}")
    venv = build_venv()
    if work.exists():
        shutil.rmtree(work)
    src = work / "src"
    stage_source(src, commit, epoch)
    env = clean_env(PYTHONHASHSEED="0", SOURCE_DATE_EPOCH=str(epoch), ANYWHERE_SRC=str(src),
                    PYINSTALLER_CONFIG_DIR=str(work / "pyinstaller-config"))
    run([venv / "bin" / "pyinstaller", "--noconfirm", "--clean", "--log-level", "WARN",
         "--distpath", work / "pyinstaller-dist", "--workpath", work / "pyinstaller-work",
         PACKAGING / "pyinstaller" / "anywhere.spec"], env=env, timeout=1200)

    root = work / "root"
    root.mkdir()
    shutil.copytree(work / "pyinstaller-dist" / "bin", root / "bin", symlinks=True)
    bins = root / "bin"
    (root / "etc" / "agents").mkdir(parents=True)
    (root / "etc" / "proxies.d").mkdir()
    (root / "etc" / "examples").mkdir()
    shutil.copy2(src / "etc" / "examples" / "haproxy.cfg", root / "etc" / "examples" / "haproxy.cfg")
    shutil.copy2(src / "etc" / "proxies.d" / "example.conf", root / "etc" / "proxies.d" / "example.conf")
    shutil.copy2(src / "etc" / "anywhered.conf", root / "etc" / "anywhered.conf")
    shutil.copy2(src / "etc" / "agents" / "agent.conf.example", root / "etc" / "agents" / "agent.conf.example")
    (root / "systemd").mkdir()
    for unit in UNITS:  # the same units, running the tarball's binaries
        text = (src / "systemd" / unit).read_text()
        text = re.sub(r"(?m)^(Exec\w+=[-+!@:]*)/usr/bin/", rf"\g<1>{TARBALL_PREFIX}/bin/", text)
        (root / "systemd" / unit).write_text(text)
    shutil.copy2(src / "systemd" / "anywhere.sysusers", root / "systemd" / "anywhere.sysusers")
    (root / "share" / "man" / "man8").mkdir(parents=True)
    for page in sorted((src / "man").glob("*.8")):
        shutil.copy2(page, root / "share" / "man" / "man8" / page.name)
    completions = root / "share" / "bash-completion" / "completions"
    completions.mkdir(parents=True)
    shutil.copy2(src / "completion" / "anywhere", completions / "anywhere")
    for name in ("anywhered", "anywherectl"):
        (completions / name).symlink_to("anywhere")
    shutil.copy2(src / "README.md", root / "README.md")

    # the smoke test of the bundle: every command answers --version with the commit
    for name in COMMANDS:
        line = run([bins / name, "--version"], env=clean_env(), quiet=True).strip()
        log(f"bin/{name} --version: {line}")
    if credentials:
        make_credentials(bins / "anywherectl", root / "credential", server_name, server_ips)
    normalize_tree(root, epoch)
    dedupe_binaries(bins)

    out.mkdir(parents=True, exist_ok=True)
    archive = out / "anywhere.tar.gz"
    members = sorted(p.name for p in root.iterdir())
    tar_cmd = ["tar", "--sort=name", "--format=gnu", f"--mtime=@{epoch}", "--owner=0", "--group=0", "--numeric-owner",
               "-C", str(root), "-cf", "-", *members]
    partial = archive.with_name(archive.name + ".partial")
    with open(partial, "wb") as f:
        tar = subprocess.Popen(tar_cmd, stdout=subprocess.PIPE, env=clean_env())
        gz = subprocess.run(["gzip", "-n", "-9"], stdin=tar.stdout, stdout=f, env=clean_env(), timeout=600)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait(timeout=600) != 0 or gz.returncode != 0:
            raise BuildError(f"tar ({tar.returncode}) | gzip ({gz.returncode}) failed")
    os.replace(partial, archive)
    digest, payload = sha256(archive), payload_sha256(archive, credentials)
    how = "gzip -dc anywhere.tar.gz | tar --delete credential" if credentials else "gzip -dc anywhere.tar.gz"
    (out / "anywhere.tar.gz.sha256").write_text(
        f"{digest}  anywhere.tar.gz\n"
        f"# payload (everything but the per-build credential/): {payload}\n"
        f"#   = sha256 of: {how}\n")
    size = archive.stat().st_size / 1e6
    log(f"{archive}: {size:.1f} MB, sha256 {digest}, payload sha256 {payload} "
        f"({time.monotonic() - started:.0f} s)")
    return archive


def make_credentials(anywherectl: Path, directory: Path, server_name: str, server_ips: list[str]) -> None:
    """credential/ for the QuickStart, made for this build only: CA, server and client (agent-1)
    certificates; the CA key is deleted (never shipped)."""
    env = clean_env()
    ips = [arg for ip in server_ips for arg in ("--server-ip", ip)]
    run([anywherectl, "credentials", "init", directory, "--server-name", server_name, *ips], env=env)
    run([anywherectl, "credentials", "issue", "agent-1", directory, "--basename", "client"], env=env)
    (directory / "ca.key").unlink()


def dedupe_binaries(bins: Path) -> None:
    """anywhere and anywherectl become hard links to anywhered when they are byte-identical."""
    first = bins / "anywhered"
    for name in ("anywhere", "anywherectl"):
        other = bins / name
        if sha256(other) == sha256(first):
            other.unlink()
            os.link(first, other)


def payload_sha256(archive: Path, credentials: bool) -> str:
    """sha256 of the uncompressed archive without credential/ (the reproducible part)."""
    gz = subprocess.Popen(["gzip", "-dc", str(archive)], stdout=subprocess.PIPE)
    assert gz.stdout is not None
    stream, tar = gz.stdout, None
    if credentials:  # deleting the directory's member deletes what is under it
        tar = subprocess.Popen(["tar", "--delete", "-f", "-", "credential"], stdin=gz.stdout, stdout=subprocess.PIPE,
                               env=clean_env())
        assert tar.stdout is not None
        gz.stdout.close()
        stream = tar.stdout
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    stream.close()
    if (tar is not None and tar.wait(timeout=600) != 0) or gz.wait(timeout=600) != 0:
        raise BuildError(f"gzip -dc {archive} | tar --delete credential failed")
    return digest.hexdigest()


# -- the .deb ---------------------------------------------------------------------------------------
def changelog_entry(package_version: str, text: str) -> str:
    """A new top entry for `package_version`, with the trailer (maintainer, date) of the current top entry."""
    trailer = next(line for line in text.splitlines() if line.startswith(" -- "))
    return (f"anywhere ({package_version}) unstable; urgency=medium\n\n"
            f"  * Rebuild as {package_version}.\n\n{trailer}\n\n")


def build_deb(out: Path, work: Path, package_version: str | None) -> Path:
    ensure_deps(["deb"])
    commit, epoch = commit_id(), source_date_epoch()
    package_version = package_version or version()
    log(f"deb of anywhere {package_version} ({commit})")
    if work.exists():
        shutil.rmtree(work)
    tree = work / f"anywhere-{package_version}"
    stage_source(tree, commit, epoch)
    shutil.copytree(PACKAGING / "debian", tree / "debian")
    changelog = tree / "debian" / "changelog"
    if package_version != changelog.read_text().split("(", 1)[1].split(")", 1)[0]:
        changelog.write_text(changelog_entry(package_version, changelog.read_text()) + changelog.read_text())
    # SOURCE_DATE_EPOCH comes from debian/changelog
    run(["dpkg-buildpackage", "-b", "-us", "-uc", "--no-sign"], cwd=tree,
        env=clean_env(HOME=str(work)), timeout=900)
    deb = work / f"anywhere_{package_version}_all.deb"
    if not deb.exists():
        raise BuildError(f"dpkg-buildpackage made no {deb.name}")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(deb, out / deb.name)
    log(f"{out / deb.name}: sha256 {sha256(out / deb.name)}")
    return out / deb.name


# -- the .rpm ---------------------------------------------------------------------------------------
def deterministic_tarball(tree: Path, archive: Path, epoch: int) -> None:
    """tree → archive (tar.gz with one top directory), sorted, fixed owners and mtimes, gzip without a name or time."""
    def normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = epoch
        return info

    with open(archive, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted([tree, *tree.rglob("*")]):
            tar.add(path, arcname=str(Path(tree.name) / path.relative_to(tree)), recursive=False, filter=normalize)


def build_rpm(out: Path, work: Path, package_version: str | None) -> Path:
    ensure_deps(["rpm"])
    commit, epoch = commit_id(), source_date_epoch()
    package_version = package_version or version()
    log(f"rpm of anywhere {package_version} ({commit})")
    if work.exists():
        shutil.rmtree(work)
    for sub in ("SOURCES", "SPECS", "BUILD", "RPMS", "SRPMS", "BUILDROOT"):
        (work / sub).mkdir(parents=True)
    tree = work / "stage" / f"anywhere-{package_version}"
    stage_source(tree, commit, epoch)
    deterministic_tarball(tree, work / "SOURCES" / f"anywhere-{package_version}.tar.gz", epoch)
    shutil.copy2(tree / "systemd" / "anywhere.sysusers", work / "SOURCES" / "anywhere.sysusers")
    shutil.copy2(PACKAGING / "rpm" / "anywhere.spec", work / "SPECS" / "anywhere.spec")
    run(["rpmbuild", "-bb", "--nodeps",
         "--define", f"_topdir {work}",
         "--define", "_sharedstatedir /var/lib",
         "--define", f"anywhere_version {package_version}",
         "--define", "_buildhost reproducible",
         "--define", "use_source_date_epoch_as_buildtime 1",
         "--define", "clamp_mtime_to_source_date_epoch 1",
         "--define", "_binary_payload w9.gzdio",
         work / "SPECS" / "anywhere.spec"], env=clean_env(HOME=str(work), SOURCE_DATE_EPOCH=str(epoch)), timeout=600)
    rpms = sorted((work / "RPMS" / "noarch").glob("anywhere-*.noarch.rpm"))
    if len(rpms) != 1:
        raise BuildError(f"rpmbuild made {[p.name for p in rpms]}, expected one noarch rpm")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(rpms[0], out / rpms[0].name)
    log(f"{out / rpms[0].name}: sha256 {sha256(out / rpms[0].name)}")
    return out / rpms[0].name


# -- command line -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packaging/build.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for what in ("tarball", "deb", "rpm"):
        p = sub.add_parser(what)
        p.add_argument("--out", type=Path, default=REPO / "dist", help="where the artifact goes (default dist/)")
        p.add_argument("--work", type=Path, default=None, help=f"scratch directory (default build/{what}; emptied)")
        if what == "tarball":
            p.add_argument("--no-credentials", action="store_true",
                           help="leave credential/ out: the archive's checksum is then the same for every build")
            p.add_argument("--server-name", default="localhost",
                           help="name in the bundled server certificate (default localhost)")
            p.add_argument("--server-ip", action="append", default=None,
                           help="IP address in the bundled server certificate, repeatable (default 127.0.0.1 and ::1)")
        else:
            p.add_argument("--version", dest="package_version", default=None,
                           help="package version (default: anywhere's own, from anywhere/common.py)")
    deps = sub.add_parser("deps", help="install the Debian packages the builds (and the linters) need")
    deps.add_argument("kinds", nargs="+", choices=[*DEPS, "all"])
    args = parser.parse_args(argv)
    try:
        if args.what == "deps":
            ensure_deps(list(DEPS) if "all" in args.kinds else args.kinds)
            return 0
        work = (args.work or REPO / "build" / args.what).resolve()
        out = args.out.resolve()
        if args.what == "tarball":
            build_tarball(out, work, not args.no_credentials, args.server_name,
                          args.server_ip or ["127.0.0.1", "::1"])
        elif args.what == "deb":
            build_deb(out, work, args.package_version)
        else:
            build_rpm(out, work, args.package_version)
    except (BuildError, subprocess.TimeoutExpired) as exc:
        print(f"build.py {args.what}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
