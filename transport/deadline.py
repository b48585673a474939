"""A GLOO group whose every wait has its own deadline (a frozen peer or a cut link is noticed
in seconds, not at the group's timeout)."""

from __future__ import annotations

import contextlib
import datetime
import time
from typing import Any

#: Collective methods of a ProcessGroupGloo whose work handles get a deadline.
_COLLECTIVES = frozenset(
    {"alltoall_base", "broadcast", "send", "recv", "reduce", "allreduce", "allgather", "gather", "scatter", "barrier"}
)


class DeadlineGroup:
    """A GLOO group whose every wait has its own deadline, so a frozen peer or a cut link is
    noticed in seconds rather than at the group's timeout.

    The deadline of a collective is ``floor_s`` (the link's share: transfer time plus slack)
    plus ``factor`` times the time this rank computed since its previous collective ended
    (the other ranks compute their share of the same layer meanwhile, and the partition
    balances the shares). Anything else is passed through to the wrapped group.
    """

    def __init__(self, group: Any, floor_s: float, factor: float = 4.0) -> None:
        self.group = group
        self.floor_s = floor_s
        self.factor = factor
        self._last = time.perf_counter()
        self._works: list[Any] = []  # launched, maybe not finished (a given-up wait leaves it running)

    def drain(self, timeout_s: float) -> None:
        """Wait (without the GIL) until every launched collective has finished or failed, up to
        ``timeout_s``: destroying a group blocks until its pending work ends, and whatever
        thread drops the group's last reference (an exception's traceback may hold it on the
        event loop) must not be the one that waits."""
        end = time.monotonic() + timeout_s
        for work in self._works:
            left = end - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(Exception):  # it failed: it is finished all the same
                work.wait(datetime.timedelta(seconds=left))
        self._works.clear()

    def restart(self, floor_s: float | None = None) -> None:
        """A run starts now (its first collective waits for the other ranks to start too)."""
        if floor_s is not None:
            self.floor_s = floor_s
        self._last = time.perf_counter()

    def deadline_s(self) -> float:
        """The deadline of a collective launched now."""
        return self.floor_s + self.factor * (time.perf_counter() - self._last)

    def rank(self) -> int:
        return int(self.group.rank())

    def size(self) -> int:
        return int(self.group.size())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.group, name)
        if name not in _COLLECTIVES:
            return attr

        def launch(*args: Any, **kwargs: Any) -> _DeadlineWork:
            work = attr(*args, **kwargs)
            self._works = [w for w in self._works if not w.is_completed()] + [work]
            return _DeadlineWork(work, self)

        return launch


class _DeadlineWork:
    """A work handle whose ``wait`` gives up at the group's deadline ("Operation timed out!")."""

    def __init__(self, work: Any, group: DeadlineGroup) -> None:
        self._work = work
        self._group = group
        self._timeout = datetime.timedelta(seconds=group.deadline_s())

    def wait(self) -> bool:
        try:
            return bool(self._work.wait(self._timeout))
        finally:
            self._group._last = time.perf_counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)
