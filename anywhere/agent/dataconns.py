"""Data paths 2 and 3, the fallbacks when there is no trunk: a data connection of its own per client.

Theory of operation
-------------------
2. Requested: the server sends ``open`` {conn, host, port} on the admin connection (`Session`
   hands it to `DataConns.open`).  The agent dials the target within ``dial_timeout`` (through
   `target.Targets`, the allowlist).  If that fails it sends ``fail`` on the admin connection at
   once, so the server closes the client without waiting for its timeout.  Otherwise it opens a
   connection to the server at the address the admin connection reached, sends ``data`` naming
   the client connection and, on ``ready``, joins target and data connection in a `relay.Relay`.
3. Warm: a relay whose both directions ENDed cleanly hands its connection back (``reuse``); it
   waits, warm, for the server's next ``open`` on it, dials that target and answers ``ready``
   (then relays) or ``fail`` (and stays warm).  Warm connections belong to the session: they go
   when it is lost.

Each `DataConn` records its role in `state` (`DataState`): CONNECTING → RELAYING for a
requested one, WARM → DIALING → RELAYING (or back to WARM) for a warm one, RELAYING → WARM
when its relay ends cleanly, DONE when it is finished.  Which messages it accepts follows from
the state alone; anything else aborts it.

Rules: a relay does not depend on the admin connection: it carries on if the session drops.
Nothing here opens trunks; a warm connection leaving the pool (used, or closed) is reported
through ``on_warm_left`` (the agent tops its trunks up then: the server is using data
connections, perhaps for want of trunks).
"""

from __future__ import annotations

import enum
import logging
import socket
from typing import Callable

from ..common import printable
from ..framed import FramedConn
from ..loop import Loop
from ..net import Dialer
from ..relay import Relay
from ..wire import PROTO_VERSION
from .session import Session
from .target import Targets, target_name

class DataState(enum.Enum):
    CONNECTING = "connecting"  # requested by ``open``: dialing the target, then the server; waiting for ``ready``
    WARM = "warm"  # idle, waiting for the server's next ``open`` on this connection
    DIALING = "dialing"  # warm and asked to ``open``: dialing the target, then ``ready`` or ``fail``
    RELAYING = "relaying"  # joined to its target in a Relay
    DONE = "done"  # finished: aborted, or closed while warm


class DataConn:
    """A data connection of its own for one client at a time (see the module's docstring)."""

    def __init__(self, loop: Loop, session: Session, targets: Targets, *, on_done: Callable[["DataConn"], None],
                 on_warm_left: Callable[[], None]) -> None:
        self.loop = loop
        self.session = session
        self.targets = targets
        self.on_done = on_done
        self.on_warm_left = on_warm_left
        self.state = DataState.CONNECTING
        self.conn_id = 0
        self.target = ""
        self.target_sock: socket.socket | None = None
        self.data: FramedConn | None = None
        self.dialer: Dialer | None = None
        self.relay: Relay | None = None

    # -- the target -------------------------------------------------------------------------------
    def dial_target(self, request: dict) -> None:
        """Reach the target of `request` (an ``open``): the start of either path."""
        self.conn_id = request["conn"]
        host, port = request["host"], request["port"]
        self.target = target_name(host, port)
        self.dialer = self.targets.dial(host, port, self._on_target)

    def _on_target(self, sock: socket.socket | None, error: str | None) -> None:
        self.dialer = None
        if sock is None:
            reason = error or "unknown error"
            self.session.log.warning("connection %d: cannot reach %s: %s", self.conn_id, self.target, reason)
            if self.state is DataState.DIALING and self.data is not None:  # answer here and stay warm
                self.data.send("fail", conn=self.conn_id, reason=reason)
                self._become_warm(self.data)
            else:
                self.session.report_failure(self.conn_id, reason)
                self.abort(None)
            return
        self.target_sock = sock
        if self.state is DataState.DIALING and self.data is not None:
            self.data.send("ready", conn=self.conn_id)
            self._join()
        else:
            self._dial_server()

    # -- the server ---------------------------------------------------------------------------------
    def _dial_server(self) -> None:
        self.dialer = self.session.connect_server(self._on_server)
        if self.dialer is None:
            self.abort("no server address yet")

    def _on_server(self, sock: socket.socket | None, error: str | None) -> None:
        self.dialer = None
        if sock is None:
            self.abort(f"cannot open a data connection to the server: {error}")
            return
        self.data = self.session.secure(sock, on_message=self._on_message, on_close=self._on_data_close,
                                        on_handshake=self._on_handshake)

    def _on_handshake(self, conn: FramedConn) -> None:
        conn.send("data", proto=PROTO_VERSION, agent_id=self.session.agent_id, conn=self.conn_id)

    def _become_warm(self, conn: FramedConn) -> None:
        self.state = DataState.WARM
        self.conn_id = 0
        self.target = ""
        self.data = conn

    def _on_message(self, conn: FramedConn, msg: dict) -> None:
        kind = msg["type"]
        if self.state is DataState.WARM and kind == "open":
            self.state = DataState.DIALING
            self.on_warm_left()
            self.dial_target(msg)
        elif self.state is DataState.CONNECTING and kind == "ready" and msg["conn"] == self.conn_id:
            self._join()
        elif kind == "error":
            self.abort(f"server refused the data connection: {printable(msg['reason'])}")
        else:
            self.abort(f"unexpected {kind} on a data connection in state {self.state.value}")

    def _join(self) -> None:
        conn, self.data = self.data, None
        assert conn is not None and self.target_sock is not None  # both dialled before joining
        sock, leftover = conn.detach()
        target, self.target_sock = self.target_sock, None
        self.state = DataState.RELAYING
        self.relay = Relay(self.loop, target, sock, b_framed=True, a_name=f"target {self.target}", b_name="server",
                           on_close=self._on_relay_close, reuse=True)
        self.relay.start(b_initial=leftover)

    def _on_relay_close(self, relay: Relay, reason: str) -> None:
        self.relay = None
        level = logging.DEBUG if reason in ("done", "agent stopping") else logging.INFO
        self.session.log.log(level, "connection %d to %s ended (%s): %d bytes to the target, %d back", self.conn_id,
                             self.target, reason, relay.bytes_b_to_a, relay.bytes_a_to_b)
        if relay.handoff is None or self.session.closed:
            self._finish()
            return
        sock, trailing = relay.handoff
        conn = FramedConn.resume(self.loop, sock, trailing, peer=self.session.server_peer, identity=None,
                                 on_message=self._on_message, on_close=self._on_data_close)
        self._become_warm(conn)

    def _on_data_close(self, conn: FramedConn, reason: str) -> None:
        if conn is not self.data:
            return
        self.data = None
        if self.state is DataState.WARM:
            self.session.log.debug("warm data connection closed: %s", reason)
            self._finish()
            self.on_warm_left()
        else:
            self.abort(f"data connection closed: {reason}")

    # -- ending -----------------------------------------------------------------------------------
    def abort(self, reason: str | None) -> None:
        """Give up on this data connection (and its target); `reason` None: already logged.
        Idempotent, never raises."""
        if self.state is DataState.DONE:
            return
        if reason is not None and reason != "agent stopping":
            self.session.log.warning("data connection%s: %s", f" {self.conn_id} to {self.target}" if self.conn_id else "",
                                     reason)
        if self.dialer:
            self.dialer.cancel()
            self.dialer = None
        if self.data:
            data, self.data = self.data, None
            data.close(reason or "aborted")
        if self.target_sock:
            self.target_sock.close()
            self.target_sock = None
        if self.relay:
            relay, self.relay = self.relay, None
            relay.close(reason or "aborted")
        self._finish()

    def _finish(self) -> None:
        if self.state is not DataState.DONE:
            self.state = DataState.DONE
            self.on_done(self)


class DataConns:
    """Every data connection of the agent, whatever its state."""

    def __init__(self, loop: Loop, session: Session, targets: Targets, on_warm_left: Callable[[], None]) -> None:
        self.loop = loop
        self.session = session
        self.targets = targets
        self.on_warm_left = on_warm_left
        self.all: set[DataConn] = set()

    def open(self, request: dict) -> None:
        """The server's ``open`` on the admin connection: a requested data connection (path 2)."""
        conn = DataConn(self.loop, self.session, self.targets, on_done=self.all.discard,
                        on_warm_left=self.on_warm_left)
        self.all.add(conn)
        conn.dial_target(request)

    @property
    def warm(self) -> list[DataConn]:
        return [d for d in self.all if d.state is DataState.WARM]

    @property
    def relays(self) -> list[Relay]:
        return [d.relay for d in self.all if d.relay is not None]

    def drop_warm(self) -> None:
        """The session is lost: its warm connections go with it (relays carry on)."""
        for conn in self.warm:
            conn.abort(None)

    def close(self, reason: str) -> None:
        for conn in list(self.all):
            conn.abort(reason)
