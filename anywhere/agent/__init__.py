"""anywhere (the agent): keep a session with each server, reach the targets they ask for.

The agent runs on a host inside a private network.  It keeps one admin connection to each
anywhered it is configured with (one or more, independent of each other) and carries the
servers' clients to targets in its network, each checked against its allowlist.  A client reaches it by one of three data paths:

1. a stream on a trunk, the default (trunks.py): a few long-lived TLS connections per session,
   each carrying many clients;
2. a data connection of its own, requested by ``open`` on the admin connection (dataconns.py),
   when the server has no trunk for it;
3. a warm data connection, one that finished a client cleanly and waits for the next ``open``
   on itself (dataconns.py).

The modules, each owning one thing:

* settings.py: `AgentConfig`, the one home of every default and range; the [agent] spec, files
  and flags resolved into settings;
* session.py: the admin connection to one server: hello/welcome, heartbeats, reconnecting with backoff;
* trunks.py: path 1; dataconns.py: paths 2 and 3;
* link.py: `ServerLink`, one server's session, trunks and data connections, wired together;
* target.py: dialing a target, within the allowlist (one for every server);
* core.py: `Agent`, a link per server (start, reload, status, stop).

agent_cli.py parses the flags and builds these; nothing here imports it, nor the server.
"""

from .core import Agent
from .session import backoff_delay
from .settings import AgentConfig

__all__ = ["Agent", "AgentConfig", "backoff_delay"]
