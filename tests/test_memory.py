"""The heap upkeep: two arenas, and trims of freed memory now and then (never on every result)."""

from __future__ import annotations

import time

from agent.base import memory


def test_trims_are_rate_limited_and_give_memory_back() -> None:
    assert memory.tame_malloc()  # glibc on Linux takes it
    start = time.monotonic() + 2 * memory.TRIM_EVERY_S  # well past any trim of another test
    assert memory.trim_heap(start)
    assert not memory.trim_heap(start + memory.TRIM_EVERY_S / 2)  # a burst of results: one trim
    assert memory.trim_heap(start + memory.TRIM_EVERY_S)
