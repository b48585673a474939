"""The heap upkeep: two arenas, freed memory kept for the next job, and trims only of memory
that piles up (never on every result)."""

from __future__ import annotations

import ctypes
import resource
import time

from agent.base import memory


def test_a_trim_comes_only_when_memory_piles_up_over_the_working_set() -> None:
    assert memory.tame_malloc()  # glibc on Linux takes it
    every, slack = memory.TRIM_EVERY_S, memory.TRIM_SLACK_BYTES
    t = time.monotonic() + 2 * every  # well past any look of another test
    memory._heap.working_set = None
    base = 800 << 20
    assert not memory.trim_heap(t, base)  # the first look: the working set
    assert not memory.trim_heap(t + every, base + slack)  # steady jobs: no trim, no faults after one
    assert not memory.trim_heap(t + 1.5 * every, base + 4 * slack)  # too soon after the last look
    assert memory.trim_heap(t + 2 * every, base + slack + 1)  # results piled up: given back
    grown = base + 3 * slack  # the jobs since needed more (bigger batches): the new working set
    assert not memory.trim_heap(t + 3 * every, grown)
    assert not memory.trim_heap(t + 4 * every, grown + slack)
    assert memory.trim_heap(t + 5 * every, grown + slack + 1)


def test_the_resident_size_is_read() -> None:
    held = bytearray(64 << 20)  # written: resident
    assert memory.resident_bytes() > len(held)


def _faults_touching(libc: ctypes.CDLL, size: int) -> int:
    """Minor page faults of malloc(size), writing every byte, and free."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    assert block
    ctypes.memset(block, 1, size)
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_freed_activation_is_reused_without_faulting_its_pages_in_again() -> None:
    """What a job's activations see: a 16 MiB block freed and asked for again comes back from
    the heap, its pages still mapped (glibc's sliding defaults mmapped the first and gave the
    heap's top back after the next, ~4,000 faults each time), until the timed trim."""
    assert memory.tame_malloc()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 16 << 20
    _faults_touching(libc, size)  # the first time, the pages are new
    again = [_faults_touching(libc, size) for _ in range(3)]
    assert max(again) < 64, again  # 4,096 pages each: all of them still there
    memory._heap.working_set = 0  # memory has piled up: the next look trims
    assert memory.trim_heap(time.monotonic() + 100 * memory.TRIM_EVERY_S)  # the trim gives them back ...
    assert _faults_touching(libc, size) > 1000  # ... so the next job faults them in once
