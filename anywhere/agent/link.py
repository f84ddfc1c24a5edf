"""`ServerLink`: everything the agent has with one server: its session, its trunks, its data connections.

Theory of operation
-------------------
An agent configured with several servers (``server = a.example.net, b.example.net:1111``) keeps
one `ServerLink` per server, active-active: each has its own admin connection, reconnect
backoff, heartbeats, trunks and data connections, and every server may send clients at once.
The links share only what the agent shares: the loop, the allowlist (`target.Targets`) and the
buffer budget (trunk.py's, per process).  The servers share nothing: there is no protocol
between them, and a link never looks at another.  One server going away (killed, unreachable)
is its link's business alone: the other links, their trunks and their streams do not notice.

The wiring inside a link, as it was for the agent's one server: a welcome (and, with trunks on
demand, the server's ``trunks``) refills the trunks;
a lost session retires its trunks and drops its warm connections (relays and streams carry on);
the server's ``open`` on the admin connection starts a requested data connection; a warm
connection that leaves the pool refills the trunks.

A link ends in one of two ways: `leave` (its server was removed by a reload: the session is
closed, its trunks retired and its warm connections dropped, but streams and relays under way
carry on until they end; `idle` says when nothing is left) or `close` (the agent stops:
everything goes).

Rules: no protocol and no I/O of its own here; every line it logs names its server (the
session's `log`).
"""

from __future__ import annotations

import ssl

from ..loop import Loop
from .dataconns import DataConns
from .session import Session, SessionState
from .settings import AgentConfig, ServerAddress
from .target import Targets
from .trunks import Trunks


class ServerLink:
    def __init__(self, loop: Loop, config: AgentConfig, server: ServerAddress, targets: Targets) -> None:
        self.server = server
        self.session = Session(loop, config, server, on_welcome=self._on_welcome, on_lost=self._on_lost,
                               on_open=self._on_open, on_trunks=self._on_trunks)
        self.trunks = Trunks(loop, self.session, targets)
        self.data = DataConns(loop, self.session, targets, on_warm_left=self.trunks.refill)

    def start(self, ctx: ssl.SSLContext) -> None:
        self.session.start(ctx)
        self.trunks.start()

    # -- the wiring ----------------------------------------------------------------------------------
    def _on_welcome(self) -> None:
        self.trunks.refill()

    def _on_lost(self) -> None:
        self.data.drop_warm()
        self.trunks.retire("agent session lost")

    def _on_trunks(self) -> None:
        self.trunks.refill()

    def _on_open(self, request: dict) -> None:
        self.data.open(request)

    # -- operating -----------------------------------------------------------------------------------
    def reconfigure(self, config: AgentConfig, ctx: ssl.SSLContext, changed: list[str]) -> None:
        """A reload kept this server: use `config` and `ctx`; reconnect only if reaching it changed."""
        if self.session.reconfigure(config, ctx, changed):
            self.trunks.retire("reconnecting with a new configuration")

    @property
    def relays(self) -> list:
        """Every client connection through this server: data connections' relays and trunk streams."""
        return self.data.relays + self.trunks.streams

    @property
    def idle(self) -> bool:
        """Nothing under way: no data connection and no stream."""
        return not self.data.all and not self.trunks.streams

    @property
    def status(self) -> str:
        """This server's state, for STATUS=: e.g. "a.example.net:1111 connected (2 trunks)"."""
        session = self.session
        if session.state is SessionState.WELCOMED:
            count = len(self.trunks.current)
            state = f"connected ({count} trunk{'' if count == 1 else 's'})"
        elif session.state is SessionState.CLOSED:
            state = "removed"
        elif session.retry_in is not None:
            state = f"reconnecting in {session.retry_in:.0f} s"
        else:
            state = "connecting"
        return f"{self.server} {state}"

    # -- ending --------------------------------------------------------------------------------------
    def leave(self, reason: str) -> None:
        """The server was removed: close the session, retire its trunks and drop its warm connections;
        streams and relays under way carry on (`idle` once they have ended; then `close`)."""
        self.session.close()
        self.data.drop_warm()
        self.trunks.retire(reason)

    def close(self, reason: str) -> None:
        """Stop: the session, then every data connection and trunk.  Idempotent."""
        self.session.close()
        self.data.close(reason)
        self.trunks.close(reason)
