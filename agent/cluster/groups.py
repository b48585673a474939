"""GLOO groups between agents: formed over the control channel, run under reserved engines.

**Forming.** The coordinator (rank 0) tells each peer ``form`` with a group id and the members in rank order; each
builds its ProcessGroupGloo over a :class:`~transport.rendezvous.RelayStore` (keys travel as ``store`` messages: no
store port anywhere). A formed group is kept for jobs with the same members, keyed by member tuple, and dropped
after ``group_idle_s`` unused (closing its GLOO listeners), on any failure, on a teardown or when a member leaves.

**Running.** A run needs every member's engine at once; the coordinator takes them (agent/cluster/reserve.py), then
tells every peer ``run``. Every collective has a deadline (:class:`~transport.deadline.DeadlineGroup`): a frozen peer
or a cut link fails the run in seconds, the group is dropped and the job runs locally; so does a peer that stops
saying ``beat`` while the coordinator waits on it (agent/cluster/beats.py), in any phase. A peer's failure is reported
with ``failed``, so the coordinator stops waiting at once. Each group's messages are handled by its own tasks: a slow
group never holds up another.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from agent.base.engine import Engine
from agent.cluster.beats import Silence
from agent.cluster.channel import ControlChannel
from agent.cluster.failures import reason_of, unless_failed
from agent.cluster.group import EarlyKeys, Group, LinkUse, Timing, collective_floor, gather_all, quietly, release
from agent.cluster.group_state import GroupEvent, GroupState
from agent.cluster.peers import Peer
from agent.cluster.reserve import Reservations
from agent.jobs.service import Served
from engine.adapters import Tensors
from engine.distributed import run_rank
from engine.errors import FailureReason, GroupError
from engine.program import JobSpec, spec_from_dict, spec_to_dict
from engine.trace import RunResult
from transport.control import Busy, Control, Failed, Form, Grant, Release, Reserve, Run, StoreSet, Teardown
from transport.deadline import DeadlineGroup
from transport.gloo import GlooComm, make_group
from transport.rendezvous import RelayStore
from transport.sealed import SealedComm, run_key

log = structlog.get_logger("prism.groups")
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class GroupManager:
    """Both sides of distributed jobs for one node (see the module docstring)."""

    def __init__(
        self,
        node: str,
        address: str,
        served: Mapping[str, Served],
        channel: ControlChannel,
        engine: Engine,
        spawn: Spawn,
        timing: Timing | None = None,
        link_mbps: Callable[[str], float | None] = lambda node: None,
        data_key: bytes | None = None,
        on_unresponsive: Callable[[str], None] = lambda node: None,
        on_silent: Callable[[str], None] = lambda node: None,
        on_busy: Callable[[str, int], None] = lambda node, queue: None,
        address_of: Callable[[str], str | None] = lambda node: None,
    ) -> None:
        self.node = node
        self.address = address
        self.served = served
        self.channel = channel
        self.engine = engine
        self.spawn = spawn
        self.timing = timing or Timing()
        self.link_mbps = link_mbps
        self.data_key = data_key  # with a cluster secret: every run's traffic is sealed
        self.on_unresponsive = on_unresponsive
        self.on_silent = on_silent
        self.address_of = address_of  # a member's IPv4 address: its GLOO connects come from there
        self.silence = Silence(self.timing.silence_s, stall_s=3 * self.timing.beat_s)
        self.reservations = Reservations(node, engine, channel, self.silence, self.timing, on_unresponsive, on_busy)
        self._mine: dict[tuple[str, ...], Group] = {}  # groups I coordinate, by members
        self._groups: dict[str, Group] = {}  # every live group, by gid
        self.early = EarlyKeys()  # store keys that came before their group's form
        self._runs = itertools.count(1)
        self.link_use = LinkUse()  # runs with each peer: the probes keep off a link in use
        self._reaper = ThreadPoolExecutor(max_workers=2, thread_name_prefix="group-reaper")
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def groups(self) -> list[Group]:
        """Every live group (both roles)."""
        return list(self._groups.values())

    # -- incoming control -------------------------------------------------------------
    def control(self, sender: str, msg: Control) -> None:
        """Handle one opened control message (never blocks: slow work is spawned per group)."""
        group = self._groups.get(msg.gid)
        if isinstance(msg, Form):
            self._on_form(sender, msg)
        elif isinstance(msg, StoreSet):
            self._on_store(sender, msg, group)
        elif group is None or sender not in group.members:
            log.info("control_ignored", op=msg.op, gid=msg.gid, sender=sender, why="no such group here")
        elif group.rank == 0:
            self.silence.heard(group.gid, sender, time.monotonic())
            if isinstance(msg, Grant | Busy):
                answer = group.grants.get((msg.run, sender))
                if answer is not None and not answer.done():
                    answer.set_result(msg)
            elif isinstance(msg, Failed):
                group.fail(FailureReason.PEER_FAILED, f"{sender}: {msg.error}")
        elif sender != group.coordinator:
            log.info("control_ignored", op=msg.op, gid=msg.gid, sender=sender, why="not from the coordinator")
        elif isinstance(msg, Reserve):
            if msg.run not in group.holds:
                group.holds[msg.run] = self.spawn(self._hold(group, msg.run), f"hold-{group.gid}-{msg.run}")
        elif isinstance(msg, Run):
            fut = group.runs.setdefault(msg.run, asyncio.get_running_loop().create_future())
            if not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, Release):
            hold = group.holds.get(msg.run)
            if hold is not None:
                hold.cancel()
        elif isinstance(msg, Teardown):
            self.drop(group, GroupEvent.TEARDOWN, FailureReason.TORN_DOWN, "the coordinator tore it down")

    def _on_form(self, sender: str, msg: Form) -> None:
        members = tuple(msg.members)
        if members[0] != sender or self.node not in members[1:] or len(set(members)) != len(members):
            log.warning("control_ignored", op="form", gid=msg.gid, sender=sender, why="not a group I am a peer of")
            return
        if msg.gid in self._groups:
            return  # a copy: the first one is being formed
        group = self._new_group(msg.gid, members, min(self.timing.group_s, msg.timeout_s))
        for member, key, value in self.early.take(msg.gid):
            self._deliver(group, member, key, value)
        self.spawn(self._join(group), f"group-join-{msg.gid}")

    def _on_store(self, sender: str, msg: StoreSet, group: Group | None) -> None:
        if group is not None:
            self._deliver(group, sender, msg.key, msg.value)
            return
        self.early.keep(msg.gid, (sender, msg.key, msg.value), time.monotonic())

    def _deliver(self, group: Group, sender: str, key: str, value: str) -> None:
        if sender not in group.members or sender == self.node:
            return
        try:
            group.store.deliver(key, base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            log.info("control_ignored", op="store", gid=group.gid, sender=sender, why="not base64")

    # -- forming ----------------------------------------------------------------------
    def _new_group(self, gid: str, members: tuple[str, ...], timeout_s: float) -> Group:
        self._loop = asyncio.get_running_loop()
        group = Group(gid, members, members.index(self.node), RelayStore(self._publisher(gid, members), timeout_s))
        self._groups[gid] = group
        return group

    def _publisher(self, gid: str, members: tuple[str, ...]) -> Callable[[str, bytes], None]:
        """What a group's store calls (on the forming thread) to send a key to the other members."""

        def publish(key: str, value: bytes) -> None:
            assert self._loop is not None
            msg = StoreSet(gid=gid, key=key, value=base64.b64encode(value).decode())
            sends = [self.channel.tell(m, msg) for m in members if m != self.node]
            asyncio.run_coroutine_threadsafe(gather_all(sends), self._loop).result(timeout=self.timing.group_s)

        return publish

    async def _attach(self, group: Group) -> None:
        """Build this member's ProcessGroupGloo (on a thread: it blocks on the rendezvous)."""
        size, timeout_s = len(group.members), self.timing.group_s
        admit = group.addresses(self.address_of)  # no one else may connect

        def build() -> Any:
            pg = make_group(
                group.store, group.rank, size, timeout_s=timeout_s, address=self.address, prefix=group.gid,
                closed_ports=group.ports, admit=admit,
            )  # fmt: skip
            if not group.failed.is_set():
                return pg
            del pg  # given up on while it was built: freed here (no work pending: at once)
            raise group.error()

        pg = await unless_failed(group, asyncio.to_thread(build))  # the thread ends at its timeout
        group.deadline = DeadlineGroup(pg, self.timing.collective_s)
        group.comm = GlooComm(group.deadline) if self.data_key is None else SealedComm(group.deadline)
        group.move(GroupEvent.FORMED)
        group.used_s = time.monotonic()  # a peer says beat a while yet: the coordinator may still form
        group.formed.set()

    async def _join(self, group: Group) -> None:
        try:
            await self._attach(group)
        except Exception as exc:  # noqa: BLE001 - any failure to form just drops the group
            reason = reason_of(exc, FailureReason.FORMATION_FAILED)
            self.drop(group, GroupEvent.FAILED, reason, f"forming failed: {exc}")
            return
        log.info("group_joined", gid=group.gid, rank=group.rank, coordinator=group.coordinator, closed=group.ports)

    async def _form(self, members: tuple[str, ...]) -> Group:
        group = self._new_group(uuid.uuid4().hex[:12], members, self.timing.group_s)
        self._mine[members] = group
        form = Form(gid=group.gid, members=list(members), timeout_s=self.timing.group_s)
        for peer in members[1:]:
            self.silence.watch(group.gid, "form", peer, time.monotonic())
        try:
            await gather_all([self.channel.tell(peer, form) for peer in members[1:]])
            await self._attach(group)
            self.silence.unwatch(group.gid, "form")
        except Exception as exc:
            reason = group.reason or reason_of(exc, FailureReason.FORMATION_FAILED)
            self.drop(group, GroupEvent.FAILED, reason, f"forming failed: {group.failure or exc}")
            for peer in [] if group.silent else members[1:]:  # a silent one sits out already
                self.on_unresponsive(peer)
            raise GroupError(f"could not form a group with {', '.join(members[1:])}: {exc}", reason=reason) from exc
        log.info("group_formed", gid=group.gid, members=list(members), closed=group.ports)
        return group

    # -- coordinator ------------------------------------------------------------------
    async def run(self, served: Served, spec: JobSpec, inputs: Tensors, peers: list[Peer]) -> RunResult:
        """Run ``spec`` with ``peers`` as ranks 1..; any failure raises GroupError (group dropped)."""
        members = (self.node, *(p.node for p in peers))
        group = self._mine.get(members)
        if group is None or group.state is GroupState.DROPPED:
            group = await self._form(members)
        elif not group.formed.is_set():  # another job is forming it: its run needs it formed
            await unless_failed(group, group.formed.wait())
        run_id = next(self._runs)
        group.users += 1  # not idle while a job uses it, however long it takes to reserve the engines
        try:
            async with self.reservations.engines(group, run_id) as slot:
                links = [self.link_mbps(p.node) for p in peers]
                floor = collective_floor(self.timing.collective_s, spec, served.model.adapter.hidden_size, links)
                await gather_all(
                    [
                        self.channel.tell(
                            p, Run(gid=group.gid, run=run_id, spec=spec_to_dict(spec), collective_s=floor)
                        )
                        for p in members[1:]
                    ]
                )
                group.move(GroupEvent.RUN_START)
                if group.comm is None or group.deadline is None:
                    raise group.error()
                self._begin(group, run_id)
                group.deadline.restart(floor)
                with self.link_use.during(m for m in group.members if m != self.node):
                    work = slot.run(run_rank, group.comm, served.model.adapter, spec, inputs)
                    result = await unless_failed(group, work)
                group.move(GroupEvent.RUN_END)
                group.used_s = time.monotonic()
        except asyncio.CancelledError:
            self.drop(group, GroupEvent.FAILED, FailureReason.CANCELLED, "the job was cancelled")
            raise
        except Exception as exc:
            why = group.failure or str(exc) or type(exc).__name__
            reason = group.reason or reason_of(exc, FailureReason.INTERNAL)
            if reason is not FailureReason.PEER_BUSY:  # a busy peer leaves the group ready for the next run
                self.drop(group, GroupEvent.FAILED, reason, why)
            raise GroupError(f"distributed run with {', '.join(members[1:])} failed: {why}", reason=reason) from exc
        finally:
            group.users -= 1
            self.silence.unwatch(group.gid, run_id)
        assert result is not None
        return result

    def _begin(self, group: Group, run_id: int) -> None:
        """Key this run's sealed traffic (every member derives the same key)."""
        if isinstance(group.comm, SealedComm):
            assert self.data_key is not None
            group.comm.begin(run_key(self.data_key, group.gid, run_id))

    # -- peer -------------------------------------------------------------------------
    async def _hold(self, group: Group, run_id: int) -> None:
        """Reserve my engine for the coordinator's run ``run_id`` and run my rank when told."""
        lease_s = self.timing.group_s
        try:
            await asyncio.wait_for(group.formed.wait(), lease_s)
            if self.engine.jobs:  # my own jobs are ahead: say so now, hold nothing (agent/cluster/reserve.py)
                queue = self.engine.depth
                log.info("reserve_refused", gid=group.gid, run=run_id, coordinator=group.coordinator, queue=queue)
                await self.channel.tell(group.coordinator, Busy(gid=group.gid, run=run_id, queue=queue))
                return
            async with self.engine.slot(f"rank {group.rank} of {group.gid}", lease_s, group.coordinator) as slot:
                fut = group.runs.setdefault(run_id, asyncio.get_running_loop().create_future())
                await self.channel.tell(group.coordinator, Grant(gid=group.gid, run=run_id))
                run = await asyncio.wait_for(fut, lease_s)
                spec = spec_from_dict(run.spec)
                served = self.served.get(spec.model)
                if served is None:
                    why = f"run for model {spec.model!r}, which this node does not serve"
                    raise GroupError(why, reason=FailureReason.MODEL_NOT_SERVED)
                if group.comm is None or group.deadline is None:
                    return  # dropped while waiting for the run
                self._begin(group, run_id)
                group.move(GroupEvent.RUN_START)
                group.deadline.restart(run.collective_s)
                with self.link_use.during(m for m in group.members if m != self.node):
                    await slot.run(run_rank, group.comm, served.model.adapter, spec)
                group.move(GroupEvent.RUN_END)
                group.used_s = time.monotonic()
        except asyncio.CancelledError:
            if group.state is GroupState.RUNNING:  # released mid-run: the collectives are in an unknown state
                self.drop(group, GroupEvent.FAILED, FailureReason.RELEASED, "released mid-run")
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator, the group is dropped
            late = isinstance(exc, asyncio.TimeoutError)
            why = "no run came" if late else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                await self.channel.tell(group.coordinator, Failed(gid=group.gid, run=run_id, error=why[:480]))
            reason = FailureReason.NO_RUN if late else reason_of(exc, FailureReason.INTERNAL)
            self.drop(group, GroupEvent.FAILED, reason, why)
        finally:
            group.holds.pop(run_id, None)
            group.runs.pop(run_id, None)

    # -- dropping ---------------------------------------------------------------------
    def drop(
        self, group: Group, event: GroupEvent, reason: FailureReason, why: str, *, tell: bool = True
    ) -> asyncio.Task[None] | None:
        """Drop ``group`` for good (GLOO freed on a reaper thread); returns the task telling peers."""
        if group.state is GroupState.DROPPED:
            return None
        group.move(event)
        group.fail(reason, why)
        self._groups.pop(group.gid, None)
        self.silence.forget(group.gid)
        if self._mine.get(group.members) is group:
            del self._mine[group.members]
        group.store.close(why)
        for hold in group.holds.values():
            hold.cancel()
        log.warning("group_dropped", gid=group.gid, members=list(group.members), code=reason.value, reason=why[:200])
        telling = None
        if tell and group.rank == 0 and event is not GroupEvent.TEARDOWN:
            sends = [self.channel.tell(p, Teardown(gid=group.gid)) for p in group.members[1:]]
            telling = self.spawn(quietly(gather_all(sends)), f"teardown-{group.gid}")
        comm, deadline = group.comm, group.deadline
        group.comm = group.deadline = None
        # Destroying a ProcessGroupGloo waits for its pending work (up to the GLOO timeout):
        # that wait is the reaper's, never the event loop's (agent/cluster/group.py, release).
        self._reaper.submit(release, comm, deadline, self.timing.group_s)
        return telling

    def membership_changed(self, gone: set[str]) -> None:
        """Drop every group with a member that went away (runs in progress fail at once)."""
        for group in self.groups:
            if left := gone & set(group.members):
                why = f"{', '.join(sorted(left))} went offline"
                self.drop(group, GroupEvent.MEMBER_LEFT, FailureReason.PEER_OFFLINE, why)

    def stop(self, *, tell: bool = True) -> list[asyncio.Task[None]]:
        """Drop every group: the node is stopping (returns the tasks telling peers)."""
        return self.drop_all(FailureReason.NODE_STOPPING, "the node is stopping", tell=tell)

    def drop_all(self, reason: FailureReason, why: str, *, tell: bool = True) -> list[asyncio.Task[None]]:
        """Drop every group (at stop, or to free descriptors); returns the tasks telling peers."""
        telling = (self.drop(group, GroupEvent.FAILED, reason, why, tell=tell) for group in self.groups)
        return [task for task in telling if task is not None]
