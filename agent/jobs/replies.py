"""Results on their way to the broker: an outbox that outlives connections, bounded in bytes.

A sender takes :meth:`Outbox.first`, publishes it and calls :meth:`Outbox.sent` once the
broker acknowledged it, so a result whose publish failed is still first on the next
connection; one the broker refused is replaced (:meth:`Outbox.replace`) by an error for the
job's results topic (agent/jobs/intake.py). Every result is also in the job journal
(agent/jobs/journal.py), so the outbox keeps the encoded bytes in memory only while they fit
its budget; past it a reply carries just its journal key and the sender reads the bytes back
when its turn comes — unless the journal could not store it (a full disk): such a reply is
put ``pinned`` and keeps its bytes whatever the budget. Nothing is ever dropped.
Transport-free, so it is tested without a broker.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from dataclasses import dataclass, replace

#: Result codes that say "not now" rather than "this job's answer": a retried job runs again.
TRANSIENT = frozenset({"busy", "deadline_exceeded", "journal_unavailable"})


def job_key(payload: bytes) -> bytes:
    """What identifies a job for redeliveries: a digest of its bytes (so its id and content)."""
    return hashlib.blake2b(payload, digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class Reply:
    """One result and where it goes; ``payload`` None: read it from the journal."""

    key: bytes
    topic: str
    payload: bytes | None
    correlation: bytes | None = None
    job: str | None = None
    transient: bool = False


class Outbox:
    """Replies waiting for the broker, oldest first (see the module docstring)."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: deque[Reply] = deque()
        self._changed = asyncio.Event()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, reply: Reply, *, pinned: bool = False) -> None:
        """Queue ``reply``; its bytes stay in memory only while they fit the budget, or
        whatever the budget when ``pinned`` (they are in no journal)."""
        size = len(reply.payload or b"")
        if self.bytes + size > self.max_bytes and not pinned:
            reply = replace(reply, payload=None)
        else:
            self.bytes += size
        self._items.append(reply)
        self._changed.set()

    async def first(self) -> Reply:
        """The oldest queued reply, once there is one (it stays queued)."""
        while not self._items:
            self._changed.clear()
            await self._changed.wait()
        return self._items[0]

    def sent(self, reply: Reply) -> None:
        """``reply`` reached the broker: unqueue it."""
        if self._items and self._items[0] is reply:
            self._items.popleft()
            self.bytes -= len(reply.payload or b"")
            self._changed.set()

    def replace(self, reply: Reply, new: Reply) -> None:
        """Put ``new`` where ``reply`` (the first) is: it is sent next instead (a re-routed answer)."""
        if self._items and self._items[0] is reply:
            self._items[0] = new
            self.bytes += len(new.payload or b"") - len(reply.payload or b"")
            self._changed.set()

    async def flushed(self) -> None:
        """Return once nothing is queued."""
        while self._items:
            self._changed.clear()
            await self._changed.wait()
