"""Keeping glibc from hoarding the memory freed results leave behind, without taxing the engine.

Results of a few hundred kB are built and freed on several threads; with glibc's defaults
every thread gets an arena of its own and freed results stay in the process as fragmented
heap. Two arenas (``M_ARENA_MAX``) and a ``malloc_trim(0)`` at most every
:data:`TRIM_EVERY_S`, from the thread that encodes results, keep the resident size flat.

An earlier fix fixed the mmap threshold at 128 KiB instead: every tensor over it (every
activation of a layer) was then mmapped and unmapped on each use, and its pages faulted in
again: vit-base batch 8 locally, interleaved, one process per setting, 9 runs each: 208 ms
per sample against 174 with glibc's defaults, 175 with two arenas, 180 with a trim before
every job (scripts/bench_malloc.py, docs/benchmarks.md §10).
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

#: Least seconds between two trims: a trim returns the engine's freed pages too, which the
#: next job faults in again, so it is rare enough to cost a job a few per cent at most.
TRIM_EVERY_S = 5.0
_M_ARENA_MAX = -8


class _Heap:
    def __init__(self) -> None:
        self.libc: Any = None
        self.last_s = 0.0
        self.lock = threading.Lock()


_heap = _Heap()


def tame_malloc() -> bool:
    """Two malloc arenas. True when the C library took the setting (glibc on Linux)."""
    try:
        libc = ctypes.CDLL(None)
        ok = bool(libc.mallopt(_M_ARENA_MAX, 2))
        libc.malloc_trim  # noqa: B018 (glibc has it; others may not)
    except (OSError, AttributeError):
        return False
    _heap.libc = libc
    return ok


def trim_heap(now_s: float | None = None) -> bool:
    """Give freed heap memory back to the system, at most every :data:`TRIM_EVERY_S` (and
    only after :func:`tame_malloc`). True when it trimmed. Blocking: call it off the loop."""
    now = time.monotonic() if now_s is None else now_s
    with _heap.lock:
        if _heap.libc is None or now - _heap.last_s < TRIM_EVERY_S:
            return False
        _heap.last_s = now
    _heap.libc.malloc_trim(0)
    return True
