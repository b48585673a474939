"""Keeping glibc from hoarding the memory freed results leave behind, without taxing the engine.

Results of a few hundred kB are built and freed on several threads; with glibc's defaults
every thread gets an arena of its own and freed results stay in the process as fragmented
heap. Two arenas (``M_ARENA_MAX``) and a ``malloc_trim(0)`` from the thread that encodes
results, when the resident size has grown :data:`TRIM_SLACK_BYTES` over the working set
(looked at most every :data:`TRIM_EVERY_S`), keep the resident size flat.

Otherwise freed memory stays in the process for the next job: the mmap threshold is fixed
at 32 MiB and the trim threshold at 1 GiB. With glibc's sliding defaults a vit-base batch-8
job still had many of its activations mmapped, or the heap's top given back after them, and
faulted ~56,000 pages in again every job. vit-base batch 8 locally, interleaved, one process
per setting, 12 runs each (scripts/bench_malloc.py, docs/benchmarks.md §10): 163 ms per
sample with these settings, 176 with two arenas alone, 178 with glibc's defaults, 167 with a
trim before every job. A trim every 5 s whatever the size (the first version of this) made
the job after it fault its pages in again: in 16 interleaved rounds through the agent, half
its jobs took 177-186 ms per sample against 158-171.

An earlier fix fixed the mmap threshold at 128 KiB instead: every tensor over it (every
activation of a layer) was then mmapped and unmapped on each use: 208 ms per sample against
174 with glibc's defaults in the same kind of run.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Any

#: Least seconds between two looks at the resident size (and so between two trims).
TRIM_EVERY_S = 5.0
#: Resident growth over the working set that a trim gives back. A trim returns the engine's
#: freed pages too, which the next job faults in again (a vit-base batch-8 job: +12 %), so it
#: is kept for memory that piles up, not done on a timer alone.
TRIM_SLACK_BYTES = 32 << 20
_M_ARENA_MAX = -8
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap (glibc's own upper bound for the setting on
#: 64-bit): every activation of a job, where the dynamic default let many be mmapped.
MMAP_THRESHOLD = 32 << 20
#: Free memory at the heap's top that free() leaves in the process (a trim returns it).
TRIM_THRESHOLD = 1 << 30


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class _Heap:
    def __init__(self) -> None:
        self.libc: Any = None
        self.last_s = 0.0
        self.lock = threading.Lock()
        self.working_set: int | None = None  # resident bytes of a steady process (None: measure next)


_heap = _Heap()


def tame_malloc() -> bool:
    """Two malloc arenas, and freed memory kept for the next job until a trim. True
    when the C library took the settings (glibc on Linux)."""
    try:
        libc = ctypes.CDLL(None)
        settings = ((_M_ARENA_MAX, 2), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        ok = all(libc.mallopt(option, value) for option, value in settings)
        libc.malloc_trim  # noqa: B018 (glibc has it; others may not)
    except (OSError, AttributeError):
        return False
    _heap.libc = libc
    return ok


def trim_heap(now_s: float | None = None, rss_bytes: int | None = None) -> bool:
    """Give freed heap memory back to the system when the resident size has grown more than
    :data:`TRIM_SLACK_BYTES` over the working set; looks at most every :data:`TRIM_EVERY_S`
    (and only after :func:`tame_malloc`). True when it trimmed. Blocking: call it off the loop.

    The working set is the resident size at the first look, and again at the first look
    after each trim (what the jobs since needed back), so a workload that grows for good
    costs one trim, and memory that piles up is returned once it passes the slack.
    """
    now = time.monotonic() if now_s is None else now_s
    with _heap.lock:
        if _heap.libc is None or now - _heap.last_s < TRIM_EVERY_S:
            return False
        _heap.last_s = now
        rss = resident_bytes() if rss_bytes is None else rss_bytes
        if _heap.working_set is None:
            _heap.working_set = rss
            return False
        if rss <= _heap.working_set + TRIM_SLACK_BYTES:
            return False
        _heap.working_set = None
    _heap.libc.malloc_trim(0)
    return True


def resident_bytes() -> int:
    """This process's resident size (Linux: /proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0
