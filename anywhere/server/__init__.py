"""anywhered, the server: agents in on the agent port, clients in on each proxy's public port, joined.

The package, by what each module owns (each module's docstring states its rules):

  settings.py  ServerConfig: every key's check, default and help, once; the configspec, the flags'
               help, check-config and the reload list are derived from it
  proxy.py     what a proxy is (Proxy) and its validation, from every source
  proxies.py   the running proxies and their listeners (ProxyTable); a declared set applied
  ranges.py    port ranges: a range START-END as one proxy per port; deleting a range
  sessions.py  the agent port: TLS connections, their explicit Role, first frames, agent sessions,
               heartbeats, the deny list (AgentPort)
  paths.py     the data paths that place a waiting client: trunk streams (the default), warm data
               connections, `open` on the admin connection
  routing.py   clients from accept to close: whitelist, limits, pending, joined (Router); the next
               agent of a proxy of several when one fails
  balance.py   which of a proxy's agents takes a client; passive health (back-off) per agent
  declared.py  proxies declared in proxies_dir's files: read and checked
  limits.py    rate limits and caps, throttled warnings
  counters.py  per-proxy and per-agent counters, stored and live; refusals audited in aggregate
  views.py     the read side and the operations the API may use (View), over the parts
  api.py       the admin API's routes over View (HTTP ↔ operations, errors ↔ status codes)
  metrics.py   the Prometheus exposition over View, and the recent errors
  core.py      Server: the composition root of the parts, life cycle, reload, drain, state file

Imports go one way: core → views → routing → paths → sessions → limits/settings, and api and
metrics see only the Protocols they declare (tests/test_layout.py checks that no module imports
another that imports it back, not even under TYPE_CHECKING).  The entry point (server_cli.py)
reads the configuration, builds a Server and runs the loop.  Nothing outside this package may
reach into its parts: the entry point and the tests use `Server` and `ServerConfig`.
"""

from .core import Server
from .settings import ServerConfig

__all__ = ["Server", "ServerConfig"]
