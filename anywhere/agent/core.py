"""`Agent`: one agent process's parts, put together; start, reload, status and stop.

Theory of operation
-------------------
The agent is four parts over one loop, each in its own module, and this class only wires them:

* `session.Session`: the admin connection (hello/welcome, heartbeats, reconnecting);
* `trunks.Trunks`: data path 1, the default (streams on trunks);
* `dataconns.DataConns`: data paths 2 and 3, per-client and warm data connections;
* `target.Targets`: how every path reaches its target (the allowlist).

The wiring: a welcome refills the trunks; a lost session retires its trunks and drops its warm
connections (relays and streams carry on); the server's ``open`` on the admin connection starts
a requested data connection; a warm connection that leaves the pool refills the trunks.

`reload` is all or nothing: the new credentials and allowlist are built before anything
changes (a bad one raises tls.CredentialError / ValueError and changes nothing); relays and
streams are never touched; if anything about reaching the server changed, the session
reconnects at once and the old session's trunks are retired.

Rules: no protocol and no I/O of its own here; the parts do not know each other beyond the
`Session` they share and the callbacks this class passes them.
"""

from __future__ import annotations

import logging
from dataclasses import fields

from .. import tls
from ..allow import Allowlist, parse_allowlist
from ..common import __version__
from ..net import hostport
from ..loop import Loop
from ..trunk import set_buffer_budget
from .dataconns import DataConns
from .session import Session
from .settings import AgentConfig
from .target import Targets
from .trunks import Trunks

log = logging.getLogger("anywhere.agent")


class Agent:
    def __init__(self, loop: Loop, config: AgentConfig) -> None:
        self.loop = loop
        self.config = config
        self.targets = Targets(loop, parse_allowlist(config.allow), config.dial_timeout)
        self.session = Session(loop, config, on_welcome=self._on_welcome, on_lost=self._on_lost,
                               on_open=self._on_open)
        self.trunks = Trunks(loop, self.session, self.targets)
        self.data = DataConns(loop, self.session, self.targets, on_warm_left=self.trunks.refill)

    @property
    def allowlist(self) -> Allowlist:
        return self.targets.allowlist

    def start(self, config_path: str | None = None) -> None:
        """Start connecting, and say so, with a warning for an allowlist of everything or of nothing
        (naming `config_path`, or --allow).  Raises tls.CredentialError (and starts nothing) for bad
        credentials."""
        config = self.config
        ctx = tls.client_context(config.ca, config.cert, config.key)
        set_buffer_budget(config.buffer_budget)
        self.session.start(ctx)
        self.trunks.start()
        log.info("anywhere agent %s (%s) starting; server %s; targets allowed: %s", config.agent_id, __version__,
                 hostport(config.server_host, config.server_port), self.allowlist)
        if self.allowlist.everything:
            log.warning("allow = *: this agent connects to any target the server asks for; list the targets with "
                        "--allow or allow = in its configuration")
        elif not self.allowlist.entries:
            log.warning("allow is empty: this agent refuses every target; list them with allow = in %s",
                        config_path or "--allow")

    # -- the wiring ----------------------------------------------------------------------------------
    def _on_welcome(self) -> None:
        self.trunks.refill()

    def _on_lost(self) -> None:
        self.data.drop_warm()
        self.trunks.retire("agent session lost")

    def _on_open(self, request: dict) -> None:
        self.data.open(request)

    # -- operating -----------------------------------------------------------------------------------
    def reload(self, new: AgentConfig) -> list[str]:
        """Apply a new configuration; all or nothing (raises tls.CredentialError and changes nothing).
        Returns the names of the settings that changed."""
        ctx = tls.client_context(new.ca, new.cert, new.key)
        allowlist = parse_allowlist(new.allow)
        old = self.config
        changed = [f.name for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]
        self.config = new
        self.targets.allowlist = allowlist
        self.targets.timeout = new.dial_timeout
        set_buffer_budget(new.buffer_budget)
        if self.session.reconfigure(new, ctx, changed):
            self.trunks.retire("reconnecting with a new configuration")
        log.info("configuration reloaded%s", f"; changed: {', '.join(changed)}" if changed else "; nothing changed")
        return changed

    @property
    def relays(self) -> list:
        """Every client connection this agent carries: data connections' relays and trunk streams."""
        return self.data.relays + self.trunks.streams

    def status_line(self) -> str:
        session = self.session
        where = hostport(self.config.server_host, self.config.server_port)
        state = f"connected to {session.server_id or where}" if session.welcomed else f"connecting to {where}"
        return f"agent {self.config.agent_id}: {state}, {len(self.relays)} connection(s)"

    def close(self) -> None:
        """Stop: the session, then every data connection and trunk.  Idempotent."""
        if self.session.closed:
            return
        self.session.close()
        self.data.close("agent stopping")
        self.trunks.close("agent stopping")
