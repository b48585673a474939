"""The node's one engine: a single worker thread, and a fair queue of who uses it next.

Every piece of torch work a node does (a local job, its rank 0 of a split it coordinates, a
rank of another node's split) runs on this thread, one at a time: each already uses all of
the node's torch threads. Work first takes a *slot* (FIFO), holds it while it runs, and gives
it back; a distributed run holds the slots of all its members at once (taken in a fixed
order, see agent/cluster/reserve.py), which is why taking a slot and running on the thread
are separate steps. ``depth`` (holders and waiters) is the queue health reports, so peer
work is counted too; ``depth_for`` splits off the ranks held for each coordinator, so a
coordinator pricing its next split does not count its own previous run as a rival, and
``jobs`` the node's own jobs, which a peer asked for its engine does not queue behind.

A caller that stops waiting for its work (a deadline passed, a peer left) gets control back
at once, but the slot stays taken until the thread is really done: the next work never
overlaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Slot:
    """The right to run on the engine thread, held by one piece of work."""

    def __init__(self, engine: Engine, what: str) -> None:
        self.engine = engine
        self.what = what
        self._busy: asyncio.Future[Any] | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread. If this await is cancelled, the thread
        finishes on its own and the slot is given back only then."""
        loop = asyncio.get_running_loop()
        self._busy = loop.run_in_executor(self.engine._executor, functools.partial(fn, *args))
        return await asyncio.shield(self._busy)

    @property
    def busy(self) -> asyncio.Future[Any] | None:
        """The thread's work, while it has not finished."""
        return self._busy if self._busy is not None and not self._busy.done() else None


class Engine:
    """One worker thread and a FIFO of slots (see the module docstring)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._lock = asyncio.Lock()
        self._waiting = 0
        self.holder: str | None = None
        self._owners: Counter[str] = Counter()  # coordinator -> ranks of its runs holding or waiting

    @property
    def depth(self) -> int:
        """Work holding or waiting for the engine."""
        return self._waiting + (1 if self._lock.locked() else 0)

    def working(self) -> bool:
        """Whether any work holds or waits for the engine (the link probes then hold back)."""
        return self.depth > 0

    def depth_for(self) -> dict[str, int]:
        """Of ``depth``: the ranks held or awaited for each coordinator's runs (this node's rank 0 of its own too)."""
        return {node: n for node, n in self._owners.items() if node and n > 0}

    @property
    def jobs(self) -> int:
        """Of ``depth``: this node's own jobs (work that is no rank of a split); while any hold or
        wait for the engine, a peer answers a ``reserve`` with ``busy`` (agent/cluster/reserve.py)."""
        return self._owners[""]

    @contextlib.asynccontextmanager
    async def slot(self, what: str, timeout_s: float | None = None, owner: str = "") -> AsyncIterator[Slot]:
        """Hold the engine for ``what`` (a rank of ``owner``'s run, if given: else one of this node's jobs); raises
        ``TimeoutError`` when it is not free in ``timeout_s``."""
        self._waiting += 1
        self._owners[owner] += 1
        try:
            if timeout_s is None:
                await self._lock.acquire()
            else:
                await asyncio.wait_for(self._lock.acquire(), timeout_s)
        except BaseException:
            self._owners[owner] -= 1
            raise
        finally:
            self._waiting -= 1
        slot = Slot(self, what)
        self.holder = what
        try:
            yield slot
        finally:
            busy = slot.busy
            if busy is None:
                self._release(owner)
            else:  # abandoned mid-run: the next work starts once the thread is done
                busy.add_done_callback(functools.partial(self._release_after, owner))

    def _release_after(self, owner: str, work: asyncio.Future[Any]) -> None:
        if not work.cancelled():
            work.exception()  # retrieved: the caller who abandoned it has answered already
        self._release(owner)

    def _release(self, owner: str) -> None:
        self.holder = None
        self._owners[owner] -= 1
        self._lock.release()

    def shutdown(self) -> None:
        """Stop taking work (the running work finishes)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
