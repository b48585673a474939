"""Taking every member's engine for one run: the coordinator's side of ``reserve`` and ``grant``.

A run needs every member's engine (agent/base/engine.py) at once. The coordinator takes them in node-id order: its
own slot in turn (waiting up to ``group_s``, like any work on its engine), a peer's with ``reserve``, answered by
``grant`` once that peer's engine is held for the run. Everyone takes engines in the same order, so two coordinators
sharing peers never wait on each other. Whatever fails on the way gives back what was taken: the slot, and a
``release`` to every peer asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from agent.base.engine import Engine, Slot
from agent.cluster.beats import Silence
from agent.cluster.channel import ControlChannel
from agent.cluster.failures import unless_failed
from agent.cluster.group import Group, Timing
from engine.errors import FailureReason, GroupError
from transport.control import Release, Reserve


@dataclass(eq=False)
class Reservations:
    """The coordinator's side of taking its members' engines for its runs."""

    node: str
    engine: Engine
    channel: ControlChannel
    silence: Silence  # the group manager's: a reservation watches its peer from the ``reserve``
    timing: Timing
    on_unresponsive: Callable[[str], None]

    @contextlib.asynccontextmanager
    async def engines(self, group: Group, run_id: int) -> AsyncIterator[Slot]:
        """Every member's engine for ``run_id``, taken in node-id order; mine is yielded."""
        mine: Slot | None = None
        asked: list[str] = []
        try:
            async with contextlib.AsyncExitStack() as stack:
                for node in sorted(group.members):
                    if node == self.node:
                        try:
                            what = f"rank 0 of {group.gid}"
                            mine = await stack.enter_async_context(self.engine.slot(what, self.timing.group_s))
                        except asyncio.TimeoutError:
                            busy = f"this node's engine was not free in {self.timing.group_s:g} s"
                            raise GroupError(busy, reason=FailureReason.ENGINE_BUSY) from None
                        continue
                    asked.append(node)
                    await self._reserve(group, run_id, node)
                assert mine is not None
                yield mine
        except BaseException:
            for node in asked:  # they may hold their engine for a run that will not come
                with contextlib.suppress(Exception):
                    await self.channel.tell(node, Release(gid=group.gid, run=run_id))
            raise
        finally:
            for node in group.members:
                group.grants.pop((run_id, node), None)

    async def _reserve(self, group: Group, run_id: int, node: str) -> None:
        """Ask ``node`` to hold its engine for ``run_id``; return once it says ``grant``."""
        fut = asyncio.get_running_loop().create_future()
        group.grants[(run_id, node)] = fut
        self.silence.watch(group.gid, run_id, node, time.monotonic())
        await self.channel.tell(node, Reserve(gid=group.gid, run=run_id))
        try:
            await unless_failed(group, asyncio.wait_for(fut, self.timing.group_s))
        except asyncio.TimeoutError:
            self.on_unresponsive(node)
            why = f"{node} did not free its engine in {self.timing.group_s:g} s"
            raise GroupError(why, reason=FailureReason.GRANT_TIMEOUT) from None
