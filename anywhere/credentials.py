"""Make the credentials: a CA, the server's certificate, one client certificate per agent.

`init(DIR, server_name, server_ips)` writes ca.crt, ca.key, server.crt and server.key;
`issue(agent_id, DIR)` writes AGENT_ID.crt and AGENT_ID.key (or another base name), signed by
DIR/ca.key.  Keys are ECDSA P-256, written 0600; certificates 0644.  Nothing is overwritten
unless `force` is set, and nothing is written at all if any target exists.  The CA key stays
in DIR: keep it off the public server once the server's and agents' files are issued.

Works with cryptography 38 (Debian 12): no *_utc properties, naive UTC datetimes.

It owns the credential files it writes; the daemons only read them (tls.py).  It must not
overwrite a file unless asked (`force`), nor write the CA key anywhere but DIR.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .common import CredentialsError, valid_agent_id

CA_DAYS = 3650
LEAF_DAYS = 825


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Anywhere"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_all(files: dict[str, tuple[bytes, int]], force: bool) -> None:
    if not force:
        existing = [path for path in files if os.path.exists(path)]
        if existing:
            raise CredentialsError(f"{', '.join(existing)} already exist(s); use --force to overwrite")
    for path, (data, mode) in files.items():
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)


def _leaf(subject: str, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
          ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def init(directory: str, server_name: str, server_ips: list[str] | tuple[str, ...] = (), force: bool = False) -> list[str]:
    """Make the CA and the server certificate; returns the paths written."""
    sans: list[x509.GeneralName] = []
    if not server_name:
        raise CredentialsError("--server-name must not be empty")
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(server_name)))
    except ValueError:
        sans.append(x509.DNSName(server_name))
    for ip in server_ips:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CredentialsError(f"--server-ip {ip!r} is not an IP address") from None
    os.makedirs(directory, mode=0o755, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Anywhere CA"))
        .issuer_name(_name("Anywhere CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_cert, server_key = _leaf(server_name, sans, ExtendedKeyUsageOID.SERVER_AUTH, ca_cert, ca_key)
    files = {
        os.path.join(directory, "ca.crt"): (_cert_bytes(ca_cert), 0o644),
        os.path.join(directory, "ca.key"): (_key_bytes(ca_key), 0o600),
        os.path.join(directory, "server.crt"): (_cert_bytes(server_cert), 0o644),
        os.path.join(directory, "server.key"): (_key_bytes(server_key), 0o600),
    }
    _write_all(files, force)
    return list(files)


def issue(agent_id: str, directory: str, basename: str | None = None, force: bool = False) -> list[str]:
    """Make AGENT_ID's client certificate signed by DIR/ca.{crt,key}; returns the paths written."""
    if not valid_agent_id(agent_id):
        raise CredentialsError(f"agent id {agent_id!r} is not valid: use 1-64 letters, digits, '.', '_' or '-'")
    ca_cert_path = os.path.join(directory, "ca.crt")
    ca_key_path = os.path.join(directory, "ca.key")
    try:
        with open(ca_cert_path, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(ca_key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
    except FileNotFoundError as exc:
        raise CredentialsError(f"{exc.filename}: no such file (run 'anywherectl credentials init {directory}' first)") from None
    except ValueError as exc:
        raise CredentialsError(f"CA in {directory} is unreadable: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{ca_key_path}: not an ECDSA key")
    if basename is not None and not valid_agent_id(basename):
        raise CredentialsError(f"--basename {basename!r} is not valid: a file name of letters, digits, '.', '_' or '-'")
    cert, key = _leaf(agent_id, [], ExtendedKeyUsageOID.CLIENT_AUTH, ca_cert, ca_key)
    base = os.path.join(directory, basename or agent_id)
    files = {base + ".crt": (_cert_bytes(cert), 0o644), base + ".key": (_key_bytes(key), 0o600)}
    _write_all(files, force)
    return list(files)
