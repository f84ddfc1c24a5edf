"""What carries one tunneled client connection, as the server's connection table sees it.

A client connection reaches its agent either on a trunk stream (trunk.Stream, the default) or
on a data connection of its own (relay.Relay).  `Carrier` declares, once, what the server reads
and sets on either: the byte counts both ways, when the first byte passed and when the last one
did, `close()`, the first-byte callback, and what is left for reuse after it ended.  Each class
conforms by itself (tests/test_carrier.py checks both); neither imports this module, and this
module imports neither, so either data path can change or go without the other.

It declares; it must not implement anything, nor hold state.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Protocol, runtime_checkable


@runtime_checkable
class Carrier(Protocol):
    """One client connection joined to its agent.  "a to b" is client → agent's side (the counters'
    "in"), "b to a" the other way.  `close()` is idempotent, never raises and reports once."""

    first_byte_at: float | None  # loop time of the first payload byte either way, None before it
    last_active: float  # loop time of the last payload byte either way (for idle timeouts)
    on_first_byte: Callable[[Any], None] | None  # called with the carrier when first_byte_at is set
    handoff: tuple[socket.socket, bytes] | None  # a connection to reuse once ended (a Stream: None)

    @property
    def bytes_a_to_b(self) -> int: ...

    @property
    def bytes_b_to_a(self) -> int: ...

    def close(self, reason: str = "closed") -> None: ...


__all__ = ["Carrier"]
