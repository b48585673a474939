"""Taking every member's engine for one run: the coordinator's side of ``reserve``, ``grant`` and ``busy``.

A run needs every member's engine (agent/base/engine.py) at once. The coordinator takes them in node-id order: its
own slot in turn (waiting up to ``group_s``, like any work on its engine), a peer's with ``reserve``. The peer
(agent/cluster/groups.py, ``_hold``) answers ``busy`` at once, holding nothing, when any of its own jobs hold or wait
for its engine: they take as long as they take. Otherwise it queues (FIFO) and answers ``grant`` once its engine is
held for the run: at once when it is free, else when the ranks of splits ahead of it end (this or other
coordinators' runs, which end with their runs, every collective under a deadline).

On ``busy`` the coordinator stops: it gives back what it took (its slot, a ``release`` to every peer asked) and the
job runs locally (``peer_busy``). The peer is not blamed: it only counts as busy (``on_busy``: its known queue
grows until its next health says otherwise, so ``auto`` prices it so). The group stays as it was, ready. No answer
in ``group_s`` is ``grant_timeout``: a queue of splits that long, a peer of an older version (which never says
``busy`` but queues behind its jobs too), or one that cannot answer. Only a peer that said nothing at all since the
``reserve`` (not even ``beat``) is unresponsive and sits out splits; one that beat was there, busy.

So while it waits on a peer the coordinator holds its own engine one control round trip when the peer is busy with
its own jobs, as long as the splits ahead of it there when it is busy with splits (at most ``group_s``), and at most
``group_s`` for an older peer (``peer_silence_s`` for a silent one, agent/cluster/beats.py). No two runs wait on each
other: each waits only for an engine later in node-id order than all it holds (docs/design.md §6).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from agent.base.engine import Engine, Slot
from agent.cluster.beats import Silence
from agent.cluster.channel import ControlChannel
from agent.cluster.failures import unless_failed
from agent.cluster.group import Group, Timing
from engine.errors import FailureReason, GroupError
from transport.control import Busy, Grant, Release, Reserve

log = structlog.get_logger("prism.groups")


@dataclass(eq=False)
class Reservations:
    """The coordinator's side of taking its members' engines for its runs."""

    node: str
    engine: Engine
    channel: ControlChannel
    silence: Silence  # the group manager's: a reservation watches its peer from the ``reserve``
    timing: Timing
    on_unresponsive: Callable[[str], None]  # a peer that said nothing: it sits out splits a while
    on_busy: Callable[[str, int], None]  # a peer that is busy (this much work on its engine): no suspension

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
                            slot = self.engine.slot(f"rank 0 of {group.gid}", self.timing.group_s, self.node)
                            mine = await stack.enter_async_context(slot)
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
        answer: asyncio.Future[Grant | Busy] = asyncio.get_running_loop().create_future()
        group.grants[(run_id, node)] = answer
        asked_s = time.monotonic()
        self.silence.watch(group.gid, run_id, node, asked_s)
        await self.channel.tell(node, Reserve(gid=group.gid, run=run_id))
        try:
            got = await unless_failed(group, asyncio.wait_for(answer, self.timing.group_s))
        except asyncio.TimeoutError:
            if self.silence.heard_since(group.gid, node, asked_s):
                self.on_busy(node, 1)  # it is there (it beat) and did not grant: an older peer, busy
            else:
                self.on_unresponsive(node)
            why = f"{node} did not free its engine in {self.timing.group_s:g} s"
            raise GroupError(why, reason=FailureReason.GRANT_TIMEOUT) from None
        if isinstance(got, Busy):
            log.info("peer_busy", gid=group.gid, run=run_id, node=node, queue=got.queue)
            self.on_busy(node, got.queue)
            why = f"{node}'s engine is busy with its own jobs ({got.queue} job(s) or rank(s) hold or wait for it)"
            raise GroupError(why, reason=FailureReason.PEER_BUSY)
