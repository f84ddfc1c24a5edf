"""A compromised agent for tests: a valid certificate, the wire protocol spoken by hand, and
whatever a hostile process holding that certificate could send.

`HostileAgent` opens the admin connection (``hello``) and trunks (``trunk``) as a real agent
does, then lets a test answer the server's OPENs any way it likes: READY then FAIL, DATA beyond
the window, frames for streams it never got, and so on.  Everything is blocking `ssl` with
timeouts; nothing here is mocked.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

from anywhere import mux
from anywhere.wire import PROTO_VERSION
from handpeer import HandPeer, client_ctx


class HostileTrunk:
    """One trunk: mux frames both ways, read with a deadline."""

    def __init__(self, peer: HandPeer) -> None:
        self.peer = peer
        self.decoder = mux.MuxDecoder()
        self.frames: list[tuple[int, int, bytes]] = []  # read but not yet taken
        self.closed = False

    def send(self, kind: int, sid: int, payload: bytes = b"") -> None:
        self.peer.send_raw(mux.frame(kind, sid, payload))

    def send_raw(self, data: bytes) -> None:
        self.peer.send_raw(data)

    def _read(self, deadline: float) -> bool:
        """Read what arrives before `deadline` into `frames`; False once the server has closed the trunk."""
        left = deadline - time.monotonic()
        if left <= 0 or self.closed:
            return not self.closed
        self.peer.sock.settimeout(left)
        try:
            data = self.peer.sock.recv(262144)
        except (TimeoutError, socket.timeout):
            return True
        except (ConnectionResetError, ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        for kind, sid, payload in self.decoder.feed(memoryview(data)):
            self.frames.append((kind, sid, bytes(payload)))
        return True

    def next(self, kind: int | None = None, timeout: float = 5.0) -> tuple[int, int, bytes]:
        """The next frame (of `kind`, skipping others); AssertionError on timeout or close."""
        deadline = time.monotonic() + timeout
        while True:
            for i, frame in enumerate(self.frames):
                if kind is None or frame[0] == kind:
                    del self.frames[i]
                    return frame
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {mux.NAMES.get(kind, 'frame')} from the server within {timeout} s")
            if not self._read(deadline):
                raise AssertionError("the server closed the trunk")

    def expect_open(self, timeout: float = 5.0) -> tuple[int, str, int]:
        _kind, sid, payload = self.next(mux.OPEN, timeout)
        host, port = mux.parse_open(payload)
        return sid, host, port

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed this trunk (within `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._read(deadline):
                return True
        return self.closed

    def close(self) -> None:
        self.peer.close()


class HostileAgent:
    """An agent process gone bad: the certificate of `agent_id`, no agent code."""

    def __init__(self, port: int, ca: Path, cert: tuple[Path, Path], agent_id: str, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.agent_id = agent_id
        self.ctx: ssl.SSLContext = client_ctx(ca, cert)
        self.admin: HandPeer | None = None
        self.welcome: dict = {}
        self.trunks: list[HostileTrunk] = []
        self.peers: list[HandPeer] = []
        self.admin_messages: list[dict] = []  # what keep_alive() read besides pings

    def connect(self, **hello_fields) -> dict:
        """Admin connection and hello (fields may be overridden); returns the server's answer."""
        self.admin = self.raw()
        fields = {"proto": PROTO_VERSION, "agent_id": self.agent_id, "version": "hostile", **hello_fields}
        self.admin.send("hello", **fields)
        answer = self.admin.recv()
        if answer["type"] == "welcome":
            self.welcome = answer
        return answer

    def keep_alive(self) -> None:
        """Answer the server's pings on the admin connection from a thread, until it closes: the
        session stays up while a test makes a trunk misbehave."""
        admin = self.admin
        assert admin is not None

        def run() -> None:
            while True:
                try:
                    msg = admin.recv(3600)
                except (AssertionError, OSError, ValueError):
                    return
                self.admin_messages.append(msg)
        threading.Thread(target=run, daemon=True).start()

    def raw(self) -> HandPeer:
        """A bare TLS connection to the agent port with this agent's certificate."""
        peer = HandPeer(self.port, self.ctx, host=self.host)
        self.peers.append(peer)
        return peer

    def trunk(self, **fields) -> HostileTrunk:
        peer = self.raw()
        fields = {k: v for k, v in fields.items() if v is not None}  # session=None: an agent that names none
        peer.send("trunk", proto=PROTO_VERSION, agent_id=self.agent_id, **fields)
        trunk = HostileTrunk(peer)
        self.trunks.append(trunk)
        return trunk

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
