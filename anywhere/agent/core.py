"""`Agent`: one agent process's parts, put together; start, reload, status and stop.

Theory of operation
-------------------
The agent is one `link.ServerLink` per server it is configured with, over one loop, all sharing
one `target.Targets` (the allowlist) and the buffer budget; this class only wires them.  Each
link holds the parts that belong to one server:

* `session.Session`: the admin connection (hello/welcome, heartbeats, reconnecting);
* `trunks.Trunks`: data path 1, the default (streams on trunks);
* `dataconns.DataConns`: data paths 2 and 3, per-client and warm data connections.

The links are independent (active-active): one server lost, refused or slow is its own link's
business, never another's.  `links` is keyed by `ServerAddress` in the configured order.

`reload` is all or nothing: the new credentials and allowlist are built before anything
changes (a bad one raises tls.CredentialError / ValueError and changes nothing); relays and
streams are never touched.  Then the server list is applied as a difference: a link to a server
still listed is kept (it reconnects at once only if something about reaching it changed: its
session's RECONNECT_ON), a removed server's link leaves (its session closes; its streams and
relays carry on until they end, swept once a second), an added server's link starts.

Rules: no protocol and no I/O of its own here; the links do not know each other.
"""

from __future__ import annotations

import logging
from dataclasses import fields

from .. import tls
from ..allow import Allowlist, parse_allowlist
from ..common import __version__
from ..loop import Loop, Timer
from ..trunk import set_buffer_budget
from .link import ServerLink
from .settings import AgentConfig, ServerAddress
from .target import Targets

log = logging.getLogger("anywhere.agent")

SWEEP_INTERVAL = 1.0  # seconds between looks at the links of removed servers, until their last stream ends


class Agent:
    def __init__(self, loop: Loop, config: AgentConfig) -> None:
        self.loop = loop
        self.config = config
        self.targets = Targets(loop, parse_allowlist(config.allow), config.dial_timeout)
        self.links: dict[ServerAddress, ServerLink] = {
            server: ServerLink(loop, config, server, self.targets) for server in config.servers}
        self.leaving: list[ServerLink] = []  # of removed servers, until their last stream or relay ends
        self._sweep: Timer | None = None
        self.closed = False

    @property
    def allowlist(self) -> Allowlist:
        return self.targets.allowlist

    def start(self, config_path: str | None = None) -> None:
        """Start connecting to every server, and say so, with a warning for an allowlist of everything
        or of nothing (naming `config_path`, or --allow).  Raises tls.CredentialError (and starts
        nothing) for bad credentials."""
        config = self.config
        ctx = tls.client_context(config.ca, config.cert, config.key)
        set_buffer_budget(config.buffer_budget)
        for link in self.links.values():
            link.start(ctx)
        servers = ", ".join(str(s) for s in self.links)
        log.info("anywhere agent %s (%s) starting; server%s %s; targets allowed: %s", config.agent_id, __version__,
                 "s" if len(self.links) > 1 else "", servers, self.allowlist)
        if self.allowlist.everything:
            log.warning("allow = *: this agent connects to any target the server asks for; list the targets with "
                        "--allow or allow = in its configuration")
        elif not self.allowlist.entries:
            log.warning("allow is empty: this agent refuses every target; list them with allow = in %s",
                        config_path or "--allow")

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
        links, self.links = self.links, {}
        for server in new.servers:
            link = links.pop(server, None)
            if link is not None:
                link.reconfigure(new, ctx, changed)
            else:
                link = ServerLink(self.loop, new, server, self.targets)
                link.session.log.info("added by a reload; connecting")
                link.start(ctx)
            self.links[server] = link
        for link in links.values():
            link.session.log.info("removed by a reload; closing its session (%d connection(s) carry on)",
                                  len(link.relays))
            link.leave("server removed from the configuration")
            self.leaving.append(link)
        self._sweep_leaving()
        log.info("configuration reloaded%s", f"; changed: {', '.join(changed)}" if changed else "; nothing changed")
        return changed

    def _sweep_leaving(self) -> None:
        """Close the links of removed servers once nothing runs through them; look again in a while."""
        self._sweep = None
        for link in [link for link in self.leaving if link.idle]:
            self.leaving.remove(link)
            link.close("server removed from the configuration")
            link.session.log.info("removed: its last connection has ended")
        if self.leaving and not self.closed:
            self._sweep = self.loop.call_later(SWEEP_INTERVAL, self._sweep_leaving)

    @property
    def relays(self) -> list:
        """Every client connection this agent carries, through every server."""
        return [relay for link in [*self.links.values(), *self.leaving] for relay in link.relays]

    def status_line(self) -> str:
        """For STATUS=: each server's state, then the connections, e.g. "agent agent-1: a.example.net:1111
        connected (2 trunks), b.example.net:1111 reconnecting in 4 s; 3 connection(s)"."""
        servers = ", ".join(link.status for link in self.links.values())
        return f"agent {self.config.agent_id}: {servers}; {len(self.relays)} connection(s)"

    def close(self) -> None:
        """Stop: every link, its session, then its data connections and trunks.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for link in [*self.links.values(), *self.leaving]:
            link.close("agent stopping")
        self.leaving.clear()
