"""The agent's wall clock: the one function the cluster code reads wall-clock time through.

Signatures carry wall-clock times (agent/cluster/admission.py), so tests need agents whose
clocks are off. ``clock_offset_s`` (``PRISM_CLOCK_OFFSET_S``), set once by ``main()``, adds
that many seconds to every reading of this process, without touching the machine's clock.
It is a test hook: production leaves it at 0. (libfaketime was tried: 0.9.10 makes Python's
``time.sleep`` fail with EINVAL once the monotonic clock is left real.)
"""

from __future__ import annotations

import time

_offset_s = 0.0


def set_offset(offset_s: float) -> None:
    """Shift this process's wall clock by ``offset_s`` seconds (a test hook; see the module docstring)."""
    global _offset_s
    _offset_s = float(offset_s)


def wall_s() -> float:
    """Wall-clock seconds since the epoch, as this agent believes them."""
    return time.time() + _offset_s
