"""The process's one scratch buffer, into which the data paths read (relay.py, trunk.py).

It owns `SCRATCH` (SCRATCH_SIZE bytes, allocated once) and `SCRATCH_VIEW`, a memoryview over it.
Rules: the loop is single-threaded, so one buffer serves every relay and stream; a reader fills it
and passes its bytes on (writes them, or copies what a socket did not take) before its callback
returns, so nothing in it outlives the callback that read it.  It must never be used from another
thread, nor kept (a view of it must not be stored).  Import the names, not the module: the
per-chunk paths read them as globals of their own module.
"""

from __future__ import annotations

SCRATCH_SIZE = 256 * 1024
SCRATCH = bytearray(SCRATCH_SIZE)
SCRATCH_VIEW = memoryview(SCRATCH)

__all__ = ["SCRATCH", "SCRATCH_SIZE", "SCRATCH_VIEW"]
