"""OpenSSL read-ahead (tls.py): on for both roles, and no record it holds is ever stranded.

With read-ahead OpenSSL reads whatever the kernel holds into its own buffer; records waiting
there are neither reported by the selector nor counted by SSLSocket.pending(), so a reader that
stopped early and waited for the selector would strand them.  The second test sends a burst of
many small TLS records and then falls silent: every byte must still come out.
"""

from __future__ import annotations

import ctypes
import os
import socket
import ssl
import threading

import pytest

from anywhere import mux, tls
from conftest import recv_all, wait_for
from test_pool import _frames, _hand_trunk

SSL_CTRL_GET_READ_AHEAD = 40


def _read_ahead_of(ctx: ssl.SSLContext) -> int:
    ptr = ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    return tls._libssl.SSL_CTX_ctrl(ptr, SSL_CTRL_GET_READ_AHEAD, 0, None)


def test_read_ahead_is_on_for_both_roles(creds):
    server = tls.server_context(str(creds.ca), str(creds.server_cert), str(creds.server_key))
    cert, key = creds.agent("agent-1")
    client = tls.client_context(str(creds.ca), str(cert), str(key))
    if not tls._libssl:
        pytest.skip(f"read-ahead is not available with this Python/OpenSSL ({ssl.OPENSSL_VERSION}); "
                    "the tunnel runs without it")
    assert _read_ahead_of(server) == 1 and _read_ahead_of(client) == 1
    assert _read_ahead_of(ssl.create_default_context()) == 0  # only our contexts are changed


def test_a_burst_of_records_then_silence_is_delivered_whole(world, creds, peers):
    world.start_server()
    _admin, trunk = _hand_trunk(world, creds, peers)
    port = world.add_proxy(9)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        decoder = mux.MuxDecoder()
        frames = _frames(trunk, decoder, 5, until=lambda f: any(k == mux.OPEN for k, _, _ in f))
        sid = next(s for k, s, _ in frames if k == mux.OPEN)
        blob = os.urandom(900 * 1024)  # more than a trunk reads per event (trunk.READ_SIZE), within the window
        trunk.send_raw(mux.frame(mux.READY, sid))
        for i in range(0, len(blob), 4096):  # one TLS record per frame, back to back
            trunk.send_raw(mux.frame(mux.DATA, sid, blob[i:i + 4096]))
        trunk.send_raw(mux.frame(mux.END, sid))
        # and now nothing more arrives on the trunk: whatever OpenSSL holds must come out by itself
        client.shutdown(socket.SHUT_WR)
        got = recv_all(client, 20)
        assert len(got) == len(blob) and got == blob
    wait_for(lambda: world.api("GET", "/v1/status")["connections"] == 0, 5, what="the stream to end")


def test_has_pending_sees_the_records_read_ahead_holds(creds):
    """The trunk stops reading after a short read when OpenSSL holds nothing more: that answer
    must count records read ahead but not yet decrypted, or they would be stranded."""
    server = tls.server_context(str(creds.ca), str(creds.server_cert), str(creds.server_key))
    cert, key = creds.agent("agent-1")
    client = tls.client_context(str(creds.ca), str(cert), str(key))
    a, b = socket.socketpair()
    writer = server.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
    reader = client.wrap_socket(b, server_hostname="localhost", do_handshake_on_connect=False)
    try:
        hs = threading.Thread(target=writer.do_handshake)
        hs.start()
        reader.do_handshake()
        hs.join(10)
        probe = tls.has_pending(reader)
        if probe is None:
            pytest.skip(f"SSL_has_pending is not reachable with this Python/OpenSSL ({ssl.OPENSSL_VERSION}); "
                        "the trunk reads until SSLWantReadError instead")
        reader.setblocking(False)
        assert probe() == 0  # nothing read yet: the bytes are in the kernel, which the selector reports
        for i in range(3):
            writer.sendall(bytes([65 + i]) * 1000)  # three records
        assert reader.recv(1) == b"A"  # sendall has put all three in the kernel: read-ahead takes them at once
        assert probe() == 1
        assert reader.recv(999) == b"A" * 999
        assert probe() == 1  # two records still buffered, not yet decrypted
        assert reader.recv(1000) == b"B" * 1000
        assert probe() == 1
        assert reader.recv(1000) == b"C" * 1000
        assert probe() == 0
        with pytest.raises(ssl.SSLWantReadError):
            reader.recv(1000)
    finally:
        reader.close()
        writer.close()


# -- the agent's own certificate name, read without cryptography -------------------------------------------
def _cert_pem(subject_attrs, *, key=None) -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(subject_attrs)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(x509.Name([]) if not subject_attrs else name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_common_name_matches_what_cryptography_reads(creds):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    for path in [creds.ca, creds.agent("agent-1")[0], *(creds.agent(f"a{i}.x_y-{i}")[0] for i in range(3))]:
        pem = path.read_bytes()
        want = x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        assert tls.certificate_common_name(pem) == want
        assert tls.certificate_common_name(b"junk before\n" + pem + pem) == want  # the first of a chain


def test_common_name_of_odd_subjects():
    from cryptography.x509 import NameAttribute
    from cryptography.x509.oid import NameOID
    assert tls.certificate_common_name(_cert_pem([NameAttribute(NameOID.ORGANIZATION_NAME, "no cn here")])) is None
    many = [NameAttribute(NameOID.COUNTRY_NAME, "NL"), NameAttribute(NameOID.ORGANIZATION_NAME, "O" * 300),
            NameAttribute(NameOID.COMMON_NAME, "agent-ü-7")]  # a long field (two-byte length), UTF-8
    assert tls.certificate_common_name(_cert_pem(many)) == "agent-ü-7"


def test_common_name_refuses_malformed_input(creds):
    pem = creds.agent("agent-1")[0].read_bytes()
    body = b"".join(pem.split(b"\n")[1:-2])
    for bad in (b"", b"not a certificate", pem.replace(b"-----END CERTIFICATE-----", b""),
                b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
                b"-----BEGIN CERTIFICATE-----\n" + body[:40] + b"\n-----END CERTIFICATE-----\n"):
        with pytest.raises(ValueError):
            tls.certificate_common_name(bad)


def test_common_name_fuzz_never_raises_anything_but_valueerror(creds):
    """A real certificate with bytes changed and cut: a name, None or ValueError, nothing else."""
    import base64

    from hypothesis import given, settings, strategies as st
    pem = creds.agent("agent-1")[0].read_bytes()
    der = base64.b64decode(b"".join(pem.split(b"\n")[1:-2]))

    @settings(max_examples=600, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, len(der) - 1), st.integers(0, 255)), max_size=6),
           st.integers(0, len(der)))
    def check(edits: list[tuple[int, int]], cut: int) -> None:
        mutated = bytearray(der)
        for pos, value in edits:
            mutated[pos] = value
        text = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(mutated[:cut])) + b"-----END CERTIFICATE-----\n"
        try:
            name = tls.certificate_common_name(text)
        except ValueError:
            return
        assert name is None or isinstance(name, str)
    check()


def test_the_agent_reads_its_identity_without_loading_cryptography(creds):
    import subprocess
    import sys
    code = ("import sys; from anywhere import agent_cli; from anywhere.agent.settings import certificate_identity; "
            "print(certificate_identity(sys.argv[1])); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))")
    res = subprocess.run([sys.executable, "-c", code, str(creds.agent("agent-1")[0])], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["agent-1", "[]"], res.stdout
