"""TLS contexts for both roles and the peer's identity.

Both sides use TLS 1.2 or newer with CERT_REQUIRED: the server demands an agent certificate
signed by the CA (extended key usage clientAuth, checked by OpenSSL), the agent demands a server
certificate signed by the same CA whose SAN matches the name it dialled or `--server-name`.
The identity of an agent is the commonName of its certificate (`credentials.py` writes the agent
id there); the server compares it with the id the agent claims in its hello.
"""

from __future__ import annotations

import os
import ssl


class CredentialError(Exception):
    """A certificate or key file is missing or unusable; the message names the file."""


def _load(ctx: ssl.SSLContext, ca: str, cert: str, key: str) -> None:
    for label, path in (("CA certificate", ca), ("certificate", cert), ("private key", key)):
        if not os.path.exists(path):
            raise CredentialError(f"{label} {path}: no such file")
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise CredentialError(f"CA certificate {ca}: {exc}") from None
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except (ssl.SSLError, OSError) as exc:
        raise CredentialError(f"certificate {cert} / key {key}: {exc}") from None


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION
    # ECDHE + AEAD only for TLS 1.2; TLS 1.3 suites are AEAD by definition.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")


def server_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    _load(ctx, ca, cert, key)
    return ctx


def client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = True
    _load(ctx, ca, cert, key)
    return ctx


def peer_identity(sock: ssl.SSLSocket) -> str | None:
    """The commonName of the verified peer certificate, or None."""
    cert = sock.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return value
    return None


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failed handshake, for logs."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.__class__.__name__
        return f"TLS error: {reason}"
    return f"{exc.__class__.__name__}: {exc}"


def peer_serial(sock: ssl.SSLSocket) -> str | None:
    """The verified peer certificate's serial number as uppercase hex without leading zeros, or None."""
    cert = sock.getpeercert()
    serial = cert.get("serialNumber") if cert else None
    return normalize_serial(serial) if serial else None


def normalize_serial(text: str) -> str:
    return text.replace(":", "").upper().lstrip("0") or "0"
