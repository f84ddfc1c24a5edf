"""Limits on what clients and agents may ask of the server, and the throttled warnings they log.

Owns the per-(proxy, source address) token buckets of `rate_limit`/`rate_burst`, the checks of
`max_connections`, `max_connections_per_proxy` and `max_pending_per_agent` (`over_limit`: why a
new client must be refused, or None), and `throttled_log`: at most one warning per key every
`LOG_THROTTLE` seconds, then a count of what was left out.  Every table is bounded
(`MAX_ENTRIES`): a flood of spoofed sources costs bounded memory.

It must not close sockets or count refusals (the caller does both, once, with the reason).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .settings import ServerConfig

log = logging.getLogger("anywhere.server")

LOG_THROTTLE = 10.0
MAX_ENTRIES = 100_000


class Limits:
    def __init__(self, now: Callable[[], float], config: Callable[[], ServerConfig]) -> None:
        self._now = now
        self._config = config
        self.rates: dict[tuple, tuple[float, float]] = {}  # (proxy, source ip) → (tokens, when counted)
        self.log_throttle: dict[tuple, tuple[float, int]] = {}

    def over_limit(self, proxy: Any, ip: Any, live_total: int, live_proxy: int, pending_agent: int,
                   agent_id: str | None = None) -> str | None:
        """Why a new client of `proxy` from `ip` must be refused, or None."""
        cfg = self._config()
        if live_total >= cfg.max_connections:
            return f"max_connections = {cfg.max_connections} reached"
        if live_proxy >= cfg.max_connections_per_proxy:
            return f"max_connections_per_proxy = {cfg.max_connections_per_proxy} reached"
        if pending_agent >= cfg.max_pending_per_agent:
            return f"agent {agent_id or proxy.agent_id} already has {cfg.max_pending_per_agent} clients waiting (max_pending_per_agent)"
        if cfg.rate_limit:
            # a token bucket per (proxy, source address): rate_limit a minute sustained, bursts of
            # rate_burst (never more than rate_limit); a source that has been quiet has a full bucket
            now = self._now()
            key = (proxy.name, ip)
            burst = min(cfg.rate_burst, cfg.rate_limit)
            entry = self.rates.get(key)
            tokens = burst if entry is None else min(burst, entry[0] + (now - entry[1]) * cfg.rate_limit / 60.0)
            if tokens < 1.0:
                self.rates[key] = (tokens, now)
                return (f"more than {cfg.rate_limit} connections a minute (bursts of {burst}) from {ip} "
                        f"(rate_limit)")
            if entry is None and len(self.rates) >= MAX_ENTRIES:
                self.prune_rates(now, force=True)
            self.rates[key] = (tokens - 1.0, now)
        return None

    def prune_rates(self, now: float, force: bool = False) -> None:
        """Forget sources whose bucket has filled up again (they start full anyway); bounded memory
        under a spoofed-source flood."""
        cfg = self._config()
        rate = cfg.rate_limit / 60.0
        burst = min(cfg.rate_burst, cfg.rate_limit)
        for key, (tokens, when) in list(self.rates.items()):
            if not rate or tokens + (now - when) * rate >= burst:
                del self.rates[key]
        if force and len(self.rates) >= MAX_ENTRIES:
            self.rates.clear()

    def limited(self, what: str, detail: str) -> None:
        self.throttled_log(("limit", what), f"limit on {what}: {detail}")

    def throttled_log(self, key: tuple, message: str) -> None:
        """At most one warning per key every LOG_THROTTLE seconds, then a count of what was left out."""
        now = self._now()
        last, suppressed = self.log_throttle.get(key, (-LOG_THROTTLE, 0))
        if now - last < LOG_THROTTLE:
            self.log_throttle[key] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more like it in the last {LOG_THROTTLE:.0f} s not logged)" if suppressed else ""
        log.warning("%s%s", message, more)
        if len(self.log_throttle) >= MAX_ENTRIES:
            self.log_throttle.clear()
        self.log_throttle[key] = (now, 0)
