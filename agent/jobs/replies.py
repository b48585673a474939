"""What makes jobs survive a broker restart: results queued until a connection takes them,
and a bounded memory of recent jobs so a redelivered one is not run twice.

MQTT QoS 1 is at-least-once: after a reconnect the broker sends again what we had not
acknowledged, and a client sends again a job whose PUBLISH was not acknowledged. A job
that is back while it runs is ignored (its result will go out); one that was answered
gets the stored result again. Transport-free, so it is tested without a broker.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger("prism.replies")
T = TypeVar("T")

#: Results kept for a disconnected agent; past it the oldest is dropped (and logged).
OUTBOX_MAX = 10_000
#: Jobs remembered for redeliveries.
RECENT_MAX = 1024


def job_key(payload: bytes) -> bytes:
    """What identifies a job for redeliveries: a digest of its bytes (so its id and content)."""
    return hashlib.blake2b(payload, digest_size=16).digest()


class Recent(Generic[T]):
    """The last ``size`` jobs by key: ``None`` while in flight, then their result."""

    def __init__(self, size: int = RECENT_MAX) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, T | None] = OrderedDict()

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> T | None:
        """The stored result; ``None`` while the job runs (or when unknown)."""
        return self._entries.get(key)

    def start(self, key: bytes) -> None:
        """A job is admitted."""
        self._set(key, None)

    def finish(self, key: bytes, result: T) -> None:
        """A job is answered."""
        self._set(key, result)

    def forget(self, key: bytes) -> None:
        """A job was cancelled without a result: a redelivery may run it."""
        self._entries.pop(key, None)

    def _set(self, key: bytes, value: T | None) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


@dataclass(frozen=True, slots=True)
class Reply:
    """One encoded result and where it goes."""

    topic: str
    payload: bytes
    correlation: bytes | None = None
    job: str | None = None


class Outbox:
    """Results waiting for the broker, oldest first; bounded, the oldest dropped when full.

    A sender takes :meth:`first`, publishes it and calls :meth:`sent` once the broker
    acknowledged it, so a result whose publish failed is still first on the next connection.
    """

    def __init__(self, size: int = OUTBOX_MAX) -> None:
        self._size = size
        self._items: deque[Reply] = deque()
        self._changed = asyncio.Event()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, reply: Reply) -> None:
        """Queue ``reply`` (dropping the oldest when full)."""
        if len(self._items) >= self._size:
            old = self._items.popleft()
            self.dropped += 1
            log.warning("result_dropped", job=old.job, limit=self._size, dropped=self.dropped)
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
            self._changed.set()

    async def flushed(self) -> None:
        """Return once nothing is queued."""
        while self._items:
            self._changed.clear()
            await self._changed.wait()
