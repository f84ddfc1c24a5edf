"""Heartbeats on an admin connection: a ping every interval, the peer gone after three silent ones.

Theory of operation
-------------------
Both ends of an admin connection keep it alive the same way: the agent's `Session`
(agent/session.py) and anywhered's per-agent session each run one `Heartbeat` on it.  Every
`interval` seconds the heartbeat looks at when the connection last received anything
(`conn.last_rx`: any frame counts, not only a pong):

* nothing for `MISSED` intervals (3): the peer is gone.  ``on_timeout(silence)`` is called with
  the silence allowed (``MISSED * interval`` seconds), for the owner to log it in its own words,
  then the connection is closed with the reason ``"heartbeat timeout"``; its ``on_close`` does
  the owner's clean-up as for any other close.  No further beat is scheduled.
* a *passive* heartbeat (the agent's: anywhered pings every interval, and each of its pings is
  a sign of life) sends no ping while it has heard from the peer within the last `PASSIVE_AFTER`
  intervals; it pings only when the peer has gone quiet, so that a peer which does not ping
  (one that is itself passive, or gone) is still asked.  That halves the heartbeat messages a
  server of thousands of idle agents handles.
* otherwise a ``ping`` with the next sequence number (1, 2, ... per heartbeat) is sent, its send
  time remembered (only the last ping's: a pong for an earlier one does not count), the next
  beat scheduled, and then ``after_beat()`` called (anywhered checks its trunks there).

Rules:

* The owner dispatches the connection's messages, so it answers the peer's ``ping`` (``conn.send
  ("pong", seq=msg["seq"])``) and hands each ``pong``'s ``seq`` to `on_pong`, which returns the
  round-trip time in seconds, or None for a pong that answers no outstanding ping.  wire.py has
  already checked that ``seq`` is an int.
* `interval` may be changed at any time (a reload): the next beat is scheduled with the new
  value.  The first beat comes one interval after the heartbeat is made, rounded up to the
  beat grid (`GRID`, at most an eighth of the interval): the beats of thousands of connections
  then fall on a few instants a second, each one loop pass that sends many pings (and gets many
  pongs back in one wait) instead of one wake-up per connection.
* A connection that is no longer open (closed, detached) ends the beats by itself; `stop()` ends
  them at once, is idempotent and never raises.  Call it when the session ends.
* Nothing here logs, reads the clock other than `loop.time()`, or touches the connection other
  than through `last_rx`, `open`, `send("ping", ...)` and `close("heartbeat timeout")`.

Adopting it in anywhered's session object (its ``_tick`` and the pong branch of ``on_message``)::

    self.heartbeat = Heartbeat(loop, conn, config.heartbeat, on_timeout=self._silent,
                               after_beat=lambda: server.check_trunks(self))
    ...
    elif kind == "pong":
        rtt = self.heartbeat.on_pong(msg["seq"])
        if rtt is not None:
            self.rtt = rtt  # and last_pong, the RTT metric
    ...
    def stop(self): self.heartbeat.stop()

and, where a reload changes ``heartbeat``, ``session.heartbeat.interval = new.heartbeat`` for each
session (anywhered read the interval from its config at every beat).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

from .loop import Loop, Timer

MISSED = 3  # intervals of silence after which the peer is taken for gone
PASSIVE_AFTER = 1.5  # a passive heartbeat pings after this many intervals of silence
GRID = 0.25  # seconds: beats are due on multiples of this (or of interval / 8 if less)


class Beating(Protocol):
    """What a heartbeat needs of its connection (`framed.FramedConn` has it)."""

    last_rx: float

    @property
    def open(self) -> bool: ...

    def send(self, msg_type: str, **fields: Any) -> None: ...

    def close(self, reason: str) -> None: ...


class Heartbeat:
    """Pings on `conn` every `interval` seconds; closes it after `MISSED` silent intervals."""

    def __init__(self, loop: Loop, conn: Beating, interval: float, *, on_timeout: Callable[[float], None],
                 after_beat: Callable[[], None] | None = None, passive: bool = False) -> None:
        self.loop = loop
        self.passive = passive
        self.conn = conn
        self.interval = interval
        self.on_timeout = on_timeout
        self.after_beat = after_beat
        self.seq = 0  # of the last ping sent
        self.sent_at: float | None = None  # when it was sent, until its pong comes back
        self.rtt: float | None = None  # the last round trip measured
        self._timer: Timer | None = self._next()

    def _next(self) -> Timer:
        """The next beat, one interval from now rounded up to the grid."""
        now = self.loop.time()
        grid = min(GRID, self.interval / 8)
        return self.loop.call_later(math.ceil((now + self.interval) / grid) * grid - now, self._beat)

    def _beat(self) -> None:
        self._timer = None
        conn = self.conn
        if not conn.open:
            return
        silence, quiet = MISSED * self.interval, self.loop.time() - conn.last_rx
        if quiet > silence:
            self.on_timeout(silence)
            conn.close("heartbeat timeout")
            return
        if not self.passive or quiet >= PASSIVE_AFTER * self.interval:
            self.seq += 1
            self.sent_at = self.loop.time()
            conn.send("ping", seq=self.seq)
        self._timer = self._next()
        if self.after_beat is not None:
            self.after_beat()

    def on_pong(self, seq: int) -> float | None:
        """The round-trip time of the ping `seq` answers, in seconds; None if it answers none outstanding."""
        if seq != self.seq or self.sent_at is None:
            return None
        self.rtt = self.loop.time() - self.sent_at
        self.sent_at = None
        return self.rtt

    def stop(self) -> None:
        """No more beats.  Idempotent, never raises."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
