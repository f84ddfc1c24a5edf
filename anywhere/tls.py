"""TLS contexts for both roles and the peer's identity.

Both sides use TLS 1.2 or newer with CERT_REQUIRED: the server demands an agent certificate
signed by the CA (extended key usage clientAuth, checked by OpenSSL), the agent demands a server
certificate signed by the same CA whose SAN matches the name it dialled or `--server-name`.
The identity of an agent is the commonName of its certificate (`credentials.py` writes the agent
id there); the server compares it with the id the agent claims in its hello.

Read-ahead: without it OpenSSL reads every TLS record with two system calls (its 5-byte header,
then its body), so a 16 KiB record costs two reads and a small request three with the final
EAGAIN.  With read-ahead it reads whatever the kernel holds, up to `READ_AHEAD` bytes, in one
call and hands the records out from there.  Python's `ssl` does not expose the switch
(SSL_CTX_set_read_ahead), so `_read_ahead()` sets it on the context through ctypes, guarded:
only on CPython with a known object layout, only if libssl.so.3 is the library `ssl` uses, and
only after the context pointer it found answers SSL_CTX_get_options with this context's options.
Otherwise it does nothing and the tunnel works as before, a little slower.  Every reader of a TLS
socket here reads until SSLWantReadError (or reschedules itself when it stops early), because
bytes held by read-ahead are neither reported by the selector nor counted by pending().  The
one exception is the trunk, whose reads are the hot path of every request: `has_pending()` gives
it OpenSSL's SSL_has_pending (any buffered bytes, records not yet decrypted included) through the
same guarded ctypes handle, so after a short read it can stop when nothing is buffered instead of
paying a last read that fails with SSLWantReadError (a system call and an exception, 3.2 µs
against 0.4 µs measured here); the selector reports whatever the kernel still receives.

It owns the contexts and what is read off a verified peer certificate.  It must not read or write
sockets (framed.py, relay.py and trunk.py do), nor weaken verification for any caller.  Its
reaches below the public `ssl` API (the SSL_CTX pointer found through the context's object
layout, CPython's ``SSLSocket._sslobj``) are guarded as described above and do nothing when the
guard fails.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import os
import ssl
import sys
from typing import Any, Callable

from .errors import CredentialError

log = logging.getLogger("anywhere.tls")

READ_AHEAD = 64 * 1024  # OpenSSL's read buffer with read-ahead (4 records a read; 256 KiB measured no faster)
_SSL_CTRL_SET_READ_AHEAD = 41
_libssl = None  # ctypes handle, or False once found unusable


# CredentialError (errors.py): a certificate or key file is missing or unusable; the message names the file


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
    if os.environ.get("ANYWHERE_READ_AHEAD", "1") != "0":  # 0: off, to compare (bench/)
        _read_ahead(ctx)


def _lib() -> Any:
    """libssl through ctypes, where the object layouts read below are known; None otherwise."""
    global _libssl
    if _libssl is None:
        _libssl = False
        if sys.implementation.name != "cpython" or not (3, 8) <= sys.version_info[:2] <= (3, 13) \
                or getattr(sys, "_is_gil_enabled", lambda: True)() is False \
                or not ssl.OPENSSL_VERSION.startswith("OpenSSL 3."):
            return None
        try:
            import ctypes
            lib = ctypes.CDLL("libssl.so.3")  # already loaded by _ssl: dlopen returns that copy
            lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
            lib.SSL_CTX_get_options.restype = ctypes.c_uint64
            lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
            lib.SSL_CTX_ctrl.restype = ctypes.c_long
            lib.SSL_CTX_set_default_read_buffer_len.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.SSL_CTX_set_default_read_buffer_len.restype = None
            lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
            lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
            lib.SSL_has_pending.argtypes = [ctypes.c_void_p]
            lib.SSL_has_pending.restype = ctypes.c_int
        except (OSError, AttributeError, ImportError) as exc:
            log.debug("libssl through ctypes not available: %s", exc)
            return None
        _libssl = lib
    return _libssl or None


def _word(obj: object, index: int) -> int:
    """The index-th pointer-sized word of a CPython object (0 and 1 are its header)."""
    import ctypes
    return ctypes.c_void_p.from_address(id(obj) + index * ctypes.sizeof(ctypes.c_void_p)).value or 0


def _ctx_pointer(lib: Any, ctx: ssl.SSLContext) -> int:
    """The SSL_CTX of `ctx` (PySSLContext is the object header, then its SSL_CTX pointer), once
    it answers SSL_CTX_get_options with this context's options; 0 if it does not check out."""
    ptr = _word(ctx, 2)
    return ptr if ptr and lib.SSL_CTX_get_options(ptr) == ctx.options else 0


def _read_ahead(ctx: ssl.SSLContext) -> bool:
    """Turn on OpenSSL read-ahead for `ctx` (see the module's docstring); False if it cannot."""
    global _libssl
    lib = _lib()
    if lib is None:
        return False
    ptr = _ctx_pointer(lib, ctx)
    if not ptr:
        log.debug("OpenSSL read-ahead not available: the context pointer does not check out")
        _libssl = False
        return False
    lib.SSL_CTX_set_default_read_buffer_len(ptr, READ_AHEAD)
    lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    return True


def has_pending(sock: ssl.SSLSocket) -> Callable[[], int] | None:
    """A call answering whether OpenSSL holds bytes of `sock` not yet read, decrypted or not
    (SSL_has_pending); None where it cannot be had safely.  PySSLSocket is the object header, a
    weak reference to the socket, its SSL pointer, then its context object: the pointer is used
    only when the word after it is that context and OpenSSL names that context's SSL_CTX as the
    one of the SSL.  The caller must keep `sock._sslobj` alive as long as it uses the call (the
    SSL is freed with it)."""
    lib = _lib()
    sslobj = getattr(sock, "_sslobj", None)
    if lib is None or sslobj is None:
        return None
    try:
        ctx = sock.context
        if _word(sslobj, 4) != id(ctx):
            return None
        ssl_ptr, ctx_ptr = _word(sslobj, 3), _ctx_pointer(lib, ctx)
        if not ssl_ptr or not ctx_ptr or lib.SSL_get_SSL_CTX(ssl_ptr) != ctx_ptr:
            return None
    except (OSError, AttributeError, ValueError) as exc:
        log.debug("SSL_has_pending not available: %s", exc)
        return None
    return functools.partial(lib.SSL_has_pending, ssl_ptr)


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


# -- our own certificate's name, without cryptography (which costs the agent about 11 MB) -------------
_PEM_BEGIN, _PEM_END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
_OID_COMMON_NAME = b"\x55\x04\x03"  # 2.5.4.3
_STRING_CODECS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1", 0x1E: "utf-16-be"}


def _der_items(der: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, start, end) of the content of each DER element in der[pos:end]; ValueError if malformed."""
    items = []
    while pos < end:
        if pos + 2 > end:
            raise ValueError("DER element header cut short")
        tag, length = der[pos], der[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if not 0 < n <= 4 or pos + n > end:
                raise ValueError("bad DER length")
            length = int.from_bytes(der[pos:pos + n], "big")
            pos += n
        if pos + length > end:
            raise ValueError("DER element runs past its container")
        items.append((tag, pos, pos + length))
        pos += length
    return items


def certificate_common_name(pem: bytes) -> str | None:
    """The subject commonName of the first certificate in a PEM file's bytes, or None if it has
    none; ValueError if there is no readable certificate.  (Certificate → tbsCertificate →
    [version], serial, signature, issuer, validity, subject → RDN sets → (OID, string).)"""
    start, stop = pem.find(_PEM_BEGIN), pem.find(_PEM_END)
    if start < 0 or stop < start:
        raise ValueError("no PEM certificate")
    try:
        der = base64.b64decode(b"".join(pem[start + len(_PEM_BEGIN):stop].split()), validate=True)
    except binascii.Error:
        raise ValueError("bad base64 in the PEM certificate") from None
    outer = _der_items(der, 0, len(der))
    if len(outer) != 1 or outer[0][0] != 0x30:
        raise ValueError("not a DER certificate")
    tbs = _der_items(der, outer[0][1], outer[0][2])
    if not tbs or tbs[0][0] != 0x30:
        raise ValueError("no tbsCertificate")
    fields = _der_items(der, tbs[0][1], tbs[0][2])
    if fields and fields[0][0] == 0xA0:
        fields = fields[1:]  # the explicit version
    if len(fields) < 5 or fields[4][0] != 0x30:
        raise ValueError("no subject")
    for rdn_tag, rdn_start, rdn_end in _der_items(der, fields[4][1], fields[4][2]):
        for pair_tag, pair_start, pair_end in _der_items(der, rdn_start, rdn_end) if rdn_tag == 0x31 else ():
            pair = _der_items(der, pair_start, pair_end) if pair_tag == 0x30 else []
            if len(pair) == 2 and pair[0][0] == 0x06 and der[pair[0][1]:pair[0][2]] == _OID_COMMON_NAME:
                tag, value_start, value_end = pair[1]
                codec = _STRING_CODECS.get(tag)
                if codec is None:
                    raise ValueError(f"commonName of unknown string type {tag:#x}")
                try:
                    return der[value_start:value_end].decode(codec)
                except UnicodeDecodeError:
                    raise ValueError("commonName is not valid text") from None
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
