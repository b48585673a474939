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

A generate job's partials (:class:`PartialSink`) go through the same outbox, so they reach
the broker in order and before the job's final result; they are not journalled (a job run
again after a crash streams again from seq 0) and always keep their bytes (a few dozen,
and :mod:`agent.jobs.token_feed` bounds how many of a job wait).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import msgpack

from agent.jobs.token_feed import Partial

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
    partial: bool = False  # a generate job's partial: not journalled
    on_sent: Callable[[], None] | None = None  # called once the broker has it (partials)


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
        if self.bytes + size > self.max_bytes and not (pinned or reply.partial):  # in no journal
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


class PartialSink:
    """A generate job's partials into the outbox, on the job's reply topic with its
    correlation data, in the job's own format (JSON or msgpack)."""

    def __init__(
        self,
        outbox: Outbox,
        key: bytes,
        route: tuple[str | None, bytes | None],
        result_topic: Callable[[str], str],
        as_msgpack: bool = False,
    ) -> None:
        self.outbox = outbox
        self.key = key
        self.topic = route[0]
        self.correlation = route[1]
        self.result_topic = result_topic  # for a job without a response topic: results/{id}
        self.as_msgpack = as_msgpack
        self._waiting = 0

    def put(self, partial: Partial) -> None:
        """Queue ``partial`` behind what the outbox holds."""
        data = partial.to_dict()
        payload = bytes(msgpack.packb(data, use_bin_type=True)) if self.as_msgpack else json.dumps(data).encode()
        topic = self.topic or self.result_topic(partial.job_id)
        self._waiting += 1
        reply = Reply(self.key, topic, payload, self.correlation, partial.job_id, partial=True, on_sent=self._sent)
        self.outbox.put(reply)

    def _sent(self) -> None:
        self._waiting -= 1

    def waiting(self) -> int:
        """This job's partials the broker has not acknowledged yet."""
        return self._waiting
