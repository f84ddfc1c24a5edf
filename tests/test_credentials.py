"""`anywherectl credentials init|issue`, run as the operator runs it: a real subprocess, real files.

Every certificate is checked with `cryptography` (names, SANs, extended key usage, the CA's
signature, key type) and, once, with OpenSSL itself: the files must make a working mutual-TLS
pair with the product's own contexts (`anywhere.tls`) on a loopback socket.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from anywhere import tls

INIT_FILES = ("ca.crt", "ca.key", "server.crt", "server.key")


# -- helpers ---------------------------------------------------------------------------------------
def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anywhere.ctl", "credentials", *args],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def ok(*args: str) -> subprocess.CompletedProcess:
    res = ctl(*args)
    assert res.returncode == 0, f"credentials {args} exited {res.returncode}:\n{res.stdout}{res.stderr}"
    return res


def init(directory: Path, name: str = "tunnel.example.com", *ips: str, force: bool = False) -> subprocess.CompletedProcess:
    args = ["init", str(directory), "--server-name", name]
    for ip in ips:
        args += ["--server-ip", ip]
    if force:
        args.append("--force")
    return ctl(*args)


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def key(path: Path) -> ec.EllipticCurvePrivateKey:
    k = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(k, ec.EllipticCurvePrivateKey), f"{path.name} is a {type(k).__name__}, not an ECDSA key"
    return k


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in `directory` (also temporary left-overs) with its bytes."""
    if not directory.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def assert_signed_by(leaf: x509.Certificate, ca: x509.Certificate) -> None:
    """The CA's key made the leaf's signature (works with cryptography 38 as well as newer)."""
    assert leaf.issuer == ca.subject
    ca_pub = ca.public_key()
    assert isinstance(ca_pub, ec.EllipticCurvePublicKey)
    ca_pub.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    if leaf is not ca:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ski.digest


def validity(c: x509.Certificate) -> tuple[datetime.datetime, datetime.datetime]:
    before = getattr(c, "not_valid_before_utc", None) or c.not_valid_before.replace(tzinfo=datetime.timezone.utc)
    after = getattr(c, "not_valid_after_utc", None) or c.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return before, after


def assert_p256(k: ec.EllipticCurvePrivateKey, c: x509.Certificate) -> None:
    assert k.curve.name == "secp256r1"
    pub = c.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    # the key file belongs to the certificate
    assert pub.public_numbers() == k.public_key().public_numbers()


def eku(c: x509.Certificate) -> list:
    return list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def common_name(c: x509.Certificate) -> str:
    return c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


@pytest.fixture
def ca_dir(tmp_path) -> Path:
    d = tmp_path / "cred"
    ok("init", str(d), "--server-name", "localhost", "--server-ip", "127.0.0.1")
    return d


# -- init ------------------------------------------------------------------------------------------
def test_init_writes_ca_and_server_files_keys_private(tmp_path):
    d = tmp_path / "new" / "cred"  # parents are made
    res = init(d, "tunnel.example.com", "127.0.0.1")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in d.iterdir()) == sorted(INIT_FILES), "exactly the four files, no left-overs"
    for name in INIT_FILES:
        assert str(d / name) in res.stdout, f"{name} not reported in {res.stdout!r}"
    assert mode(d / "ca.key") == 0o600
    assert mode(d / "server.key") == 0o600
    assert mode(d / "ca.crt") == 0o644
    assert mode(d / "server.crt") == 0o644
    ca = cert(d / "ca.crt")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True
    assert_signed_by(ca, ca)  # self-signed
    assert_p256(key(d / "ca.key"), ca)
    assert_p256(key(d / "server.key"), cert(d / "server.crt"))
    before, after = validity(cert(d / "server.crt"))
    now = datetime.datetime.now(datetime.timezone.utc)
    assert before <= now < after


@pytest.mark.parametrize("server_name, expected", [
    ("tunnel.example.com", x509.DNSName("tunnel.example.com")),
    ("203.0.113.7", x509.IPAddress(ipaddress.ip_address("203.0.113.7"))),
    ("2001:db8::7", x509.IPAddress(ipaddress.ip_address("2001:db8::7"))),
])
def test_init_server_certificate_names_usage_and_signature(tmp_path, server_name, expected):
    d = tmp_path / "cred"
    res = init(d, server_name, "127.0.0.1", "::1", "198.51.100.2")
    assert res.returncode == 0, res.stderr
    ca, server = cert(d / "ca.crt"), cert(d / "server.crt")
    sans = list(server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    assert sorted(map(repr, sans)) == sorted(map(repr, [
        expected,
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.IPAddress(ipaddress.ip_address("198.51.100.2")),
    ]))
    if isinstance(expected, x509.IPAddress):
        # an IP given as --server-name is an IP SAN, never a DNS name that would not match
        assert server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == []
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert common_name(server) == server_name
    assert_signed_by(server, ca)
    assert_p256(key(d / "server.key"), server)


def test_init_signature_check_is_real(tmp_path):
    """The signature helper above rejects a certificate from another CA (so the checks can fail)."""
    a, b = tmp_path / "a", tmp_path / "b"
    ok("init", str(a), "--server-name", "localhost")
    ok("init", str(b), "--server-name", "localhost")
    with pytest.raises((InvalidSignature, AssertionError)):
        assert_signed_by(cert(a / "server.crt"), cert(b / "ca.crt"))


def test_init_refuses_to_overwrite_without_force(ca_dir):
    before = snapshot(ca_dir)
    res = init(ca_dir, "other.example")
    assert res.returncode != 0
    for name in INIT_FILES:
        assert str(ca_dir / name) in res.stderr, f"{name} not named in {res.stderr!r}"
    assert "--force" in res.stderr
    assert snapshot(ca_dir) == before, "files changed (or left-overs written) although init refused"


def test_init_refuses_if_any_one_file_exists_and_writes_nothing(tmp_path):
    d = tmp_path / "cred"
    d.mkdir()
    (d / "server.key").write_bytes(b"precious\n")
    res = init(d, "localhost")
    assert res.returncode != 0
    assert str(d / "server.key") in res.stderr
    assert snapshot(d) == {"server.key": b"precious\n"}, "init wrote some files before refusing"


def test_init_force_overwrites_and_keeps_keys_private(ca_dir):
    before = snapshot(ca_dir)
    os.chmod(ca_dir / "server.key", 0o644)  # an operator loosened it by hand
    res = init(ca_dir, "other.example", force=True)
    assert res.returncode == 0, res.stderr
    after = snapshot(ca_dir)
    assert sorted(after) == sorted(INIT_FILES)
    for name in INIT_FILES:
        assert after[name] != before[name], f"{name} not rewritten by --force"
    assert mode(ca_dir / "server.key") == 0o600
    assert mode(ca_dir / "ca.key") == 0o600
    assert common_name(cert(ca_dir / "server.crt")) == "other.example"
    assert_signed_by(cert(ca_dir / "server.crt"), cert(ca_dir / "ca.crt"))


@pytest.mark.parametrize("bad", ["999.1.1.1", "not-an-ip", "10.0.0.0/8", ""])
def test_init_bad_server_ip_writes_nothing(tmp_path, bad):
    d = tmp_path / "cred"
    res = init(d, "localhost", "127.0.0.1", bad)
    assert res.returncode != 0
    assert "--server-ip" in res.stderr and repr(bad) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not d.exists(), f"init made {d} with {snapshot(d)} although it failed"


def test_init_empty_server_name_refused(tmp_path):
    d = tmp_path / "cred"
    res = init(d, "")
    assert res.returncode != 0
    assert "--server-name" in res.stderr
    assert not d.exists()


# -- issue -----------------------------------------------------------------------------------------
def test_issue_writes_client_certificate(ca_dir):
    res = ctl("issue", "web-01.dc_2", str(ca_dir))
    assert res.returncode == 0, res.stderr
    crt, k = ca_dir / "web-01.dc_2.crt", ca_dir / "web-01.dc_2.key"
    assert str(crt) in res.stdout and str(k) in res.stdout
    assert mode(k) == 0o600
    assert mode(crt) == 0o644
    c = cert(crt)
    assert common_name(c) == "web-01.dc_2"
    assert eku(c) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert_signed_by(c, cert(ca_dir / "ca.crt"))
    assert_p256(key(k), c)
    before, after = validity(c)
    assert before <= datetime.datetime.now(datetime.timezone.utc) < after
    # the CA files were read, not touched
    assert sorted(p.name for p in ca_dir.iterdir()) == sorted([*INIT_FILES, "web-01.dc_2.crt", "web-01.dc_2.key"])


def test_issue_basename_client(ca_dir):
    res = ctl("issue", "agent-7", str(ca_dir), "--basename", "client")
    assert res.returncode == 0, res.stderr
    assert not (ca_dir / "agent-7.crt").exists() and not (ca_dir / "agent-7.key").exists()
    c = cert(ca_dir / "client.crt")
    assert common_name(c) == "agent-7"
    assert eku(c) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert mode(ca_dir / "client.key") == 0o600
    assert_signed_by(c, cert(ca_dir / "ca.crt"))
    assert_p256(key(ca_dir / "client.key"), c)


def test_issue_refuses_to_overwrite_without_force_then_force_overwrites(ca_dir):
    ok("issue", "agent-1", str(ca_dir))
    before = snapshot(ca_dir)
    res = ctl("issue", "agent-1", str(ca_dir))
    assert res.returncode != 0
    assert str(ca_dir / "agent-1.crt") in res.stderr and str(ca_dir / "agent-1.key") in res.stderr, res.stderr
    assert "--force" in res.stderr
    assert snapshot(ca_dir) == before

    # only the key exists (the certificate was lost): still refused, nothing written
    (ca_dir / "agent-1.crt").unlink()
    before = snapshot(ca_dir)
    res = ctl("issue", "agent-1", str(ca_dir))
    assert res.returncode != 0
    assert str(ca_dir / "agent-1.key") in res.stderr
    assert snapshot(ca_dir) == before

    res = ctl("issue", "agent-1", str(ca_dir), "--force")
    assert res.returncode == 0, res.stderr
    after = snapshot(ca_dir)
    assert after["agent-1.key"] != before["agent-1.key"]
    assert mode(ca_dir / "agent-1.key") == 0o600
    assert_p256(key(ca_dir / "agent-1.key"), cert(ca_dir / "agent-1.crt"))
    assert common_name(cert(ca_dir / "agent-1.crt")) == "agent-1"


@pytest.mark.parametrize("bad", ["bad id", "../escape", "a/b", ".hidden", "a" * 65, "", "agent\n1", "agent-1\n", "ägent"])
def test_issue_invalid_agent_id_writes_nothing(ca_dir, bad):
    before = snapshot(ca_dir)
    res = ctl("issue", bad, str(ca_dir))
    assert res.returncode != 0
    assert "not valid" in res.stderr and repr(bad) in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert snapshot(ca_dir) == before
    assert snapshot(ca_dir.parent / "escape") == {} and not (ca_dir.parent / "escape.crt").exists()


def test_issue_longest_valid_agent_id(ca_dir):
    agent_id = "a" * 64
    ok("issue", agent_id, str(ca_dir))
    assert common_name(cert(ca_dir / f"{agent_id}.crt")) == agent_id


@pytest.mark.parametrize("layout", ["missing-dir", "empty-dir", "key-only", "cert-only"])
def test_issue_without_ca_fails_clearly_and_writes_nothing(tmp_path, ca_dir, layout):
    d = tmp_path / "nowhere"
    if layout != "missing-dir":
        d.mkdir()
    if layout == "key-only":
        (d / "ca.key").write_bytes((ca_dir / "ca.key").read_bytes())
    if layout == "cert-only":
        (d / "ca.crt").write_bytes((ca_dir / "ca.crt").read_bytes())
    before = snapshot(d)
    res = ctl("issue", "agent-1", str(d))
    assert res.returncode != 0
    missing = "ca.key" if layout == "cert-only" else "ca.crt"
    assert str(d / missing) in res.stderr, res.stderr
    assert "credentials init" in res.stderr
    assert "Traceback" not in res.stderr
    assert snapshot(d) == before
    assert d.exists() == (layout != "missing-dir")


def test_issue_with_unreadable_ca_fails_clearly(tmp_path):
    d = tmp_path / "cred"
    d.mkdir()
    (d / "ca.crt").write_text("not a certificate\n")
    (d / "ca.key").write_text("not a key\n")
    before = snapshot(d)
    res = ctl("issue", "agent-1", str(d))
    assert res.returncode != 0
    assert str(d) in res.stderr and "unreadable" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert snapshot(d) == before


# -- the files work with OpenSSL and the product's own TLS contexts -----------------------------------
def test_issued_files_make_a_mutual_tls_pair(ca_dir):
    ok("issue", "edge-3", str(ca_dir))
    server_ctx = tls.server_context(str(ca_dir / "ca.crt"), str(ca_dir / "server.crt"), str(ca_dir / "server.key"))
    client_ctx = tls.client_context(str(ca_dir / "ca.crt"), str(ca_dir / "edge-3.crt"), str(ca_dir / "edge-3.key"))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    results: list = []

    def serve(count: int) -> None:
        for _ in range(count):
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                results.append(exc)
                return
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    s.settimeout(10)
                    results.append(tls.peer_identity(s))
                    s.sendall(s.recv(100).upper())
            except (OSError, ssl.SSLError) as exc:
                results.append(exc)

    t = threading.Thread(target=serve, args=(3,), daemon=True)
    t.start()
    try:
        for name in ("localhost", "127.0.0.1"):  # the DNS SAN and an IP SAN
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=name) as c:
                    c.sendall(b"ping")
                    assert c.recv(100) == b"PING"
        # a name the server certificate does not carry: the client refuses the server
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with pytest.raises(ssl.SSLCertVerificationError, match="[Hh]ostname mismatch"):
                client_ctx.wrap_socket(raw, server_hostname="other.example")
        t.join(10)
        assert not t.is_alive()
        assert results[:2] == ["edge-3", "edge-3"], results
        assert isinstance(results[2], (OSError, ssl.SSLError)), results
    finally:
        listener.close()
        t.join(10)
