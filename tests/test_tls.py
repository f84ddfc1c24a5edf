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
