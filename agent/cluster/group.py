"""One GLOO group as one member sees it, the timings groups keep, and small helpers.

The life of a group is the state machine of agent/cluster/group_state.py; what a member
does with it (forming, reserving engines, running) is agent/cluster/groups.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.cluster.group_state import GroupEvent, GroupState, next_state
from engine.errors import FailureReason, GroupError
from engine.program import JobSpec
from transport.control import Busy, Grant, Run
from transport.deadline import DeadlineGroup
from transport.gloo import GlooComm
from transport.rendezvous import RelayStore


@dataclass(frozen=True, slots=True)
class Timing:
    """How long groups may take: formation and reservations, every collective, idle life; how
    often peers say ``beat`` and how long a silent peer is waited for (agent/cluster/beats.py)."""

    group_s: float = 10.0
    collective_s: float = 2.0
    idle_s: float = 60.0
    silence_s: float = 3.0
    beat_s: float = 0.5


@dataclass(eq=False)
class Group:
    """One group, seen from one member."""

    gid: str
    members: tuple[str, ...]  # rank order, the coordinator first
    rank: int
    store: RelayStore
    state: GroupState = GroupState.FORMING
    comm: GlooComm | None = None
    deadline: DeadlineGroup | None = None
    formed: asyncio.Event = field(default_factory=asyncio.Event)
    failed: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str = ""  # why it failed, in words ...
    reason: FailureReason | None = None  # ... and typed (both set by fail)
    silent: str = ""  # the member whose silence failed it (agent/cluster/beats.py)
    ports: list[int] = field(default_factory=list)  # its GLOO listeners, closed once formed
    used_s: float = field(default_factory=time.monotonic)
    users: int = 0  # coordinator: jobs running on it now (from formed to their end)
    grants: dict[tuple[int, str], asyncio.Future[Grant | Busy]] = field(default_factory=dict)  # coordinator: answers
    runs: dict[int, asyncio.Future[Run]] = field(default_factory=dict)  # peer: Run per reservation
    holds: dict[int, asyncio.Task[None]] = field(default_factory=dict)  # peer: reservations held

    @property
    def coordinator(self) -> str:
        """The member that runs rank 0."""
        return self.members[0]

    def addresses(self, address_of: Callable[[str], str | None]) -> list[str]:
        """The other members' addresses (the only ones a forming group's listener hears); a
        member with none known fails the forming."""
        known = {m: address_of(m) for i, m in enumerate(self.members) if i != self.rank}
        missing = [m for m, a in known.items() if not a]
        if missing:
            raise GroupError(f"no address known for {', '.join(missing)}", reason=FailureReason.FORMATION_FAILED)
        return [a for a in known.values() if a]

    def move(self, event: GroupEvent) -> None:
        """Apply ``event`` (group_state.next_state)."""
        self.state = next_state(self.state, event)

    def fail(self, reason: FailureReason, why: str) -> None:
        """Fail it (the first failure is the one it keeps): whatever waits on it stops."""
        if not self.failure:
            self.failure, self.reason = why, reason
        self.failed.set()

    def error(self) -> GroupError:
        """Its failure as an error (once it failed)."""
        return GroupError(self.failure or "the group failed", reason=self.reason or FailureReason.INTERNAL)


def collective_floor(base_s: float, spec: JobSpec, hidden: int, links_mbps: list[float | None]) -> float:
    """A run's floor for every collective's deadline: ``base_s`` plus twice the time the largest
    exchange (a rank's rows at full exchange in fp32, to every other rank) takes on the slowest
    link (unknown links count as 10 Mbit/s)."""
    largest = max(spec.plan.sizes) * spec.batch * hidden * 4 * len(links_mbps)
    mbps = min((m or 10.0) for m in links_mbps) if links_mbps else 10.0
    return base_s + 2 * largest * 8 / (mbps * 1e6)


class LinkUse:
    """Runs with each peer: on now, and begun so far (the link probes keep off a link in use
    and throw away a sample a run overlapped, agent/cluster/links.py)."""

    def __init__(self) -> None:
        self._on: Counter[str] = Counter()
        self._begun: Counter[str] = Counter()

    def of(self, node: str) -> tuple[bool, int]:
        """Is a run with ``node`` on now, and how many have begun."""
        return self._on[node] > 0, self._begun[node]

    @contextlib.contextmanager
    def during(self, peers: Iterable[str]) -> Iterator[None]:
        """A run with ``peers``."""
        others = list(peers)
        self._on.update(others)
        self._begun.update(others)
        try:
            yield
        finally:
            self._on.subtract(others)


class EarlyKeys:
    """Rendezvous keys that came before their group's ``form`` (messages of different senders
    race on the broker), bounded: a flood of keys for groups that never form is dropped."""

    GROUPS = 64
    KEYS = 64

    def __init__(self) -> None:
        self._keys: dict[str, tuple[float, list[tuple[str, str, str]]]] = {}  # gid -> (since, keys)

    def keep(self, gid: str, key: tuple[str, str, str], now_s: float) -> None:
        """Hold (sender, key, value) for group ``gid``."""
        if gid not in self._keys and len(self._keys) >= self.GROUPS:
            return
        keys = self._keys.setdefault(gid, (now_s, []))[1]
        if len(keys) < self.KEYS:
            keys.append(key)

    def take(self, gid: str) -> list[tuple[str, str, str]]:
        """What came for ``gid`` (its form is here now)."""
        return self._keys.pop(gid, (0.0, []))[1]

    def expire(self, before_s: float) -> None:
        """Forget groups whose first key came before ``before_s``."""
        for gid in [g for g, (since, _) in self._keys.items() if since < before_s]:
            del self._keys[gid]


def open_descriptors() -> int:
    """This process's open file descriptors (0 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def release(comm: Any, deadline: DeadlineGroup | None, drain_s: float = 0.0) -> None:
    """On a reaper thread: let a dropped group's pending collectives end (up to ``drain_s``,
    its GLOO timeout), then drop these references (the last ones, if no traceback holds any)."""
    if deadline is not None:
        deadline.drain(drain_s)
    del comm, deadline


async def gather_all(sends: list[Any]) -> None:
    if sends:
        await asyncio.gather(*sends)


async def quietly(work: Any) -> None:
    with contextlib.suppress(Exception):
        await work
