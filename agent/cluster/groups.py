"""GLOO groups between agents: formed over MQTT control, reused across jobs, dropped on failure.

The coordinator (rank 0) picks a port, tells each peer ``form`` (rank, size, rendezvous
address) on its control topic, and joins as rank 0; the group is kept for later jobs with
the same peers. Each job is announced with ``run`` (the spec, as control data); inputs,
per-layer rows and outputs then travel over GLOO. Any failure drops the group (``teardown``)
and the caller falls back to local execution. Peers handle control messages one at a time,
in order, so a ``run`` never overtakes its ``form``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from agent.cluster.admission import Admission
from agent.cluster.peers import Peer
from agent.jobs.service import Served
from engine.adapters import Tensors
from engine.distributed import run_rank
from engine.errors import GroupError, PrismError
from engine.localcluster import free_port
from engine.program import JobSpec, spec_from_dict, spec_to_dict
from engine.trace import RunResult
from transport.gloo import GlooComm, connect_store, make_group

log = structlog.get_logger("prism.groups")
Publish = Callable[[str, bytes], Awaitable[None]]


@dataclass(slots=True)
class Group:
    """A formed GLOO group and who is in it (rank order)."""

    gid: str
    members: tuple[str, ...]
    comm: GlooComm
    store: Any  # keeps the rendezvous alive


def _form(host: str, port: int, rank: int, size: int, timeout_s: float, address: str, gid: str) -> tuple[Any, GlooComm]:
    store = connect_store(host, port, rank, size, timeout_s=timeout_s)
    return store, GlooComm(make_group(store, rank, size, timeout_s=timeout_s, address=address, prefix=gid))


class GroupManager:
    """Both sides of distributed jobs for one node."""

    def __init__(
        self,
        node: str,
        address: str,
        timeout_s: float,
        served: Mapping[str, Served],
        publish: Publish,
        control_topic: Callable[[str], str],
        admission: Admission,
    ) -> None:
        self.admission = admission
        self.node = node
        self.address = address
        self.timeout_s = timeout_s
        self.served = served
        self.publish = publish
        self.control_topic = control_topic
        self._mine: dict[tuple[str, ...], Group] = {}  # groups I coordinate, by members
        self._joined: dict[str, Group] = {}  # groups I joined as a peer, by gid
        self._control: asyncio.Queue[bytes] = asyncio.Queue(maxsize=256)
        self._running: dict[tuple[str, ...], asyncio.Event] = {}  # set when a member of the run leaves

    async def _tell(self, peer: str, msg: dict[str, Any]) -> None:
        body = json.dumps({**msg, "from": self.node}, sort_keys=True)
        signed = self.admission.sign({"body": body, "to": peer}, time.time())
        await self.publish(self.control_topic(peer), json.dumps(signed).encode())

    def _open_envelope(self, payload: bytes) -> dict[str, Any] | None:
        """The control message, if it is for us and carries a valid, fresh proof."""
        envelope = json.loads(payload)
        if not isinstance(envelope, dict) or not isinstance(envelope.get("body"), str):
            raise ValueError("control message without a body")
        if envelope.get("to") != self.node or not self.admission.verify(envelope, time.time()):
            log.warning("admission_refused", via="control", to=envelope.get("to"))
            return None
        msg = json.loads(envelope["body"])
        if not isinstance(msg, dict):
            raise ValueError("control body is not an object")
        return msg

    # -- coordinator ------------------------------------------------------------------
    async def run(self, served: Served, spec: JobSpec, inputs: Tensors, peers: list[Peer]) -> RunResult:
        """Run ``spec`` with ``peers`` as ranks 1..; raises GroupError (the group is dropped)."""
        members = tuple(p.node for p in peers)
        group = self._mine.get(members)
        try:
            if group is None:
                group = await self._form_as_coordinator(members)
            for peer in members:
                await self._tell(peer, {"op": "run", "gid": group.gid, "spec": spec_to_dict(spec)})
            result = await self._run_unless_left(members, group, served, spec, inputs)
        except asyncio.CancelledError:
            self._mine.pop(members, None)  # its run may still be in flight in a thread: never reuse it
            raise
        except PrismError as exc:
            await self.drop(members, reason=str(exc))
            raise GroupError(f"distributed run with {', '.join(members)} failed: {exc}") from exc
        assert result is not None
        return result

    async def _run_unless_left(
        self, members: tuple[str, ...], group: Group, served: Served, spec: JobSpec, inputs: Tensors
    ) -> RunResult | None:
        """Rank 0's part, abandoned as soon as a member is reported gone: a peer whose TCP reset
        never arrives would otherwise hold the job for the whole GLOO timeout. The abandoned
        thread ends at that timeout; its group is never used again."""
        left = self._running[members] = asyncio.Event()
        work = asyncio.ensure_future(asyncio.to_thread(run_rank, group.comm, served.model.adapter, spec, inputs))
        gone = asyncio.ensure_future(left.wait())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            self._running.pop(members, None)
        if not work.done():
            work.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, never raised
            raise GroupError("a peer of the run went offline")
        return work.result()

    async def _form_as_coordinator(self, members: tuple[str, ...]) -> Group:
        gid = uuid.uuid4().hex[:12]
        port = free_port(self.address)
        size = len(members) + 1
        for rank, peer in enumerate(members, start=1):
            await self._tell(
                peer,
                {
                    "op": "form",
                    "gid": gid,
                    "rank": rank,
                    "size": size,
                    "host": self.address,
                    "port": port,
                    "timeout_s": self.timeout_s,
                },
            )
        store, comm = await asyncio.to_thread(_form, self.address, port, 0, size, self.timeout_s, self.address, gid)
        group = Group(gid, members, comm, store)
        self._mine[members] = group
        log.info("group_formed", gid=gid, members=list(members))
        return group

    async def drop(self, members: tuple[str, ...], reason: str) -> None:
        """Forget a group we coordinate and tell its peers."""
        group = self._mine.pop(members, None)
        if group is None:
            return
        log.warning("group_dropped", gid=group.gid, members=list(members), reason=reason[:200])
        for peer in members:
            with contextlib.suppress(PrismError):  # the peer may be why we drop the group
                await self._tell(peer, {"op": "teardown", "gid": group.gid})

    async def membership_changed(self, gone: set[str]) -> None:
        """Drop every group that includes a node that went away (as peer or as coordinator)."""
        for gid in [g for g, group in self._joined.items() if gone & set(group.members)]:
            self._joined.pop(gid, None)
        for members, left in list(self._running.items()):
            if gone & set(members):
                left.set()
        for members in [m for m in self._mine if gone & set(m)]:
            await self.drop(members, reason=f"peer left: {', '.join(sorted(gone & set(members)))}")

    # -- peer -------------------------------------------------------------------------
    def control(self, payload: bytes) -> None:
        """Queue a control message (called from the intake loop)."""
        try:
            self._control.put_nowait(payload)
        except asyncio.QueueFull:
            log.warning("control_dropped", reason="queue full")

    async def serve_control(self) -> None:
        """Handle control messages in order, forever."""
        while True:
            payload = await self._control.get()
            try:
                msg = self._open_envelope(payload)
                if msg is not None:
                    await self._handle(msg)
            except Exception as exc:  # noqa: BLE001 - a malformed or hostile control message must not stop the node
                log.warning("control_failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")

    async def _handle(self, msg: dict[str, Any]) -> None:
        op, gid = msg["op"], str(msg["gid"])
        if op == "form":
            rank, size, port = int(msg["rank"]), int(msg["size"]), int(msg["port"])
            if not (1 <= rank < size <= 64 and 1 <= port <= 65535):
                raise GroupError(f"form with rank {rank}, size {size}, port {port} makes no sense")
            timeout_s = min(self.timeout_s, max(0.1, float(msg["timeout_s"])))  # never wait longer than we would
            store, comm = await asyncio.to_thread(
                _form, str(msg["host"]), port, rank, size, timeout_s, self.address, gid
            )
            self._joined[gid] = Group(gid, (str(msg["from"]),), comm, store)
            log.info("group_joined", gid=gid, rank=msg["rank"], coordinator=msg["from"])
        elif op == "run":
            group = self._joined.get(gid)
            if group is None:
                raise GroupError(f"run for unknown group {gid}")
            spec = spec_from_dict(msg["spec"])
            served = self.served.get(spec.model)
            if served is None:
                raise GroupError(f"run for model {spec.model!r}, which this node does not serve")
            try:
                await asyncio.to_thread(run_rank, group.comm, served.model.adapter, spec)
            except PrismError:
                self._joined.pop(gid, None)
                raise
        elif op == "teardown":
            self._joined.pop(gid, None)
