"""How a group's failure reaches what waits on it, and which :class:`~engine.errors.FailureReason` it has.

A group fails once (:meth:`~agent.cluster.group.Group.fail`: a member left, went silent or
reported failure, a collective broke); whatever a member awaits for it then stops with the
group's :class:`~engine.errors.GroupError`, and that reason is the one a job's fallback reports.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.cluster.group import Group
from engine.errors import FailureReason, GroupError
from transport.mqtt import TransportError


def reason_of(exc: BaseException, default: FailureReason) -> FailureReason:
    """The typed reason of a group's failure ``exc``: a GroupError's own, else ``default``."""
    if isinstance(exc, GroupError):
        return exc.reason
    return FailureReason.CONTROL_FAILED if isinstance(exc, TransportError) else default


async def unless_failed(group: Group, work: Any) -> Any:
    """Await ``work`` unless ``group`` fails first (a member left or reported failure)."""
    task = asyncio.ensure_future(work)
    failed = asyncio.ensure_future(group.failed.wait())
    try:
        await asyncio.wait({task, failed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        failed.cancel()
    if not task.done():
        task.cancel()
        task.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise group.error()
    return task.result()
