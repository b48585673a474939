"""From a job message to a result on the broker, with nothing lost and nothing answered twice.

For each job message the intake (1) drops retained copies, (2) tells duplicates by their
journal key — a copy of a job still running is ignored, a copy of an answered one gets the
stored result again — (3) journals a new job *before* the broker is acknowledged (the caller
acks after :meth:`Intake.take` returns) and (4) runs it as a task of the node; (3) and (4)
happen together even if the connection drops in between. The result is
encoded off the event loop, journalled, and queued in the outbox, which a sender per
connection publishes in order. At start, :meth:`Intake.recover` re-runs what a crash
interrupted and re-sends what it had not sent.

A result the broker refuses (a PUBACK reason code >= 0x80, such as an ACL's "not
authorized" on the job's response topic) is not taken for sent: it is logged
(``result_refused``), counted, and replaced by the error ``result_refused`` on the job's
default results topic (see :meth:`Intake._refused`).

A journal the disk refuses (full, failing; :class:`~agent.jobs.journal.JournalError`) never
stops the flow of messages: a job it cannot take is answered at once with the transient
error ``journal_unavailable`` (not remembered, so the same job sent again runs once the disk
has room) and acknowledged like any other, since a broker redelivers an unacknowledged
message only on the next connection and meanwhile counts it against the client's in-flight
window (mosquitto's default is 20), past which it sends the node nothing, control included.
A result the journal cannot store, or a sent mark, is logged and the result goes out from
memory: only a crash before it is sent loses the difference (the job then runs again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from agent.base.memory import trim_heap
from agent.jobs.journal import Entry, Journal, JournalError, Recovery, State
from agent.jobs.replies import TRANSIENT, Outbox, PartialSink, Reply, job_key
from agent.jobs.service import JobService
from transport.mqtt import REFUSED, MqttLink, Topics, TransportError, reason_name
from transport.schema import Limits, Result, WireError, decode

log = structlog.get_logger("prism.intake")
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def _job_id(payload: bytes) -> str | None:
    """The id in a journalled job or result (jobs are journalled before they are parsed)."""
    try:
        raw = decode(payload, Limits(max_payload_bytes=max(len(payload), 1)))
    except WireError:
        return None
    value = raw.get("id")
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Arrival:
    """A message as it came: a job's payload (None for control or health, handled as they
    came), its reply route and retain flag, and how to acknowledge it."""

    payload: bytes | None
    route: tuple[str | None, bytes | None]
    retained: bool
    ack: Callable[[], None]


class Counts(Protocol):
    """What the intake reports (agent/node/metrics.py)."""

    def job_done(self, result: Result) -> None:
        """One job answered."""

    def result_refused(self, reason: str) -> None:
        """One result the broker refused, with the name of its reason code."""

    def journal_failed(self, op: str) -> None:
        """One journal operation (``take``, ``answer``, ``sent``, ``result``) the disk refused."""


class Intake:
    """Jobs in, results out (see the module docstring)."""

    def __init__(
        self,
        service: JobService,
        journal: Journal,
        outbox: Outbox,
        topics: Topics,
        spawn: Spawn,
        counts: Counts | None = None,
    ) -> None:
        self.service = service
        self.counts = counts
        self.journal = journal
        self.outbox = outbox
        self.topics = topics
        self.spawn = spawn
        self._seq = 0
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode")
        self.running = 0
        self.idle = asyncio.Event()  # set while no job runs
        self.idle.set()

    async def take_all(self, arrivals: asyncio.Queue[Arrival]) -> None:
        """Take every arrival's job (journal I/O, however slow the disk) and acknowledge every
        arrival, in the order they came (MQTT wants acknowledgements in order), off the loop
        that reads them: a control message is handled when it comes, never behind a job's
        journal write. A job that could not be taken is acknowledged all the same (left
        unacknowledged, it would hold the broker's in-flight window)."""
        while True:
            arrival = await arrivals.get()
            if arrival.payload is not None:
                try:
                    await self.take(arrival.payload, arrival.route, arrival.retained)
                except Exception:
                    log.exception("job_not_taken")
            arrival.ack()

    async def take(self, payload: bytes, route: tuple[str | None, bytes | None], retained: bool) -> None:
        """Handle one job message; when this returns the broker may be acknowledged."""
        if retained:  # a retained job would re-run on every (re)subscribe
            log.warning("retained_job_ignored")
            return
        key = job_key(payload)
        state = self.journal.state(key)
        if state is not None:  # redelivered (QoS 1 is at-least-once), or sent twice by its client
            log.info("duplicate_job", state=state.name.lower())
            if state is State.SENT:  # an answered one is in the outbox already
                await self._resend(key, route)
            return
        entry = Entry(key, None, route[0], route[1], payload)
        # Journalled and started as one step: if the connection drops while the journal
        # writes, this handler is cancelled, and a job journalled as taken but never started
        # would be ignored as "running" when the broker redelivers it: lost until a restart.
        await asyncio.shield(self._take(entry))

    async def _take(self, entry: Entry) -> None:
        try:
            await self.journal.take(entry)
        except JournalError as exc:
            self._not_taken(entry, exc)
            return
        self._start(entry)

    def _not_taken(self, entry: Entry, exc: JournalError) -> None:
        """Answer ``journal_unavailable`` at once: the job was not taken, a retry may run it."""
        assert entry.payload is not None
        job_id = _job_id(entry.payload)
        self._journal_failed("take", job_id, exc)
        result = Result.failure(
            job_id,
            exc.code,
            "this node cannot write its job journal (disk full or failing), so it did not take the job;"
            " send it again later or to another node",
            node=self.service.settings.node_id,
        )
        if self.counts is not None:
            self.counts.job_done(result)
        topic = entry.topic or (self.topics.result(job_id) if job_id else None)
        if topic is None:
            log.warning("unanswerable_payload", head=entry.payload[:80].decode(errors="replace"))
            return
        encoded = result.encode(not entry.payload.lstrip().startswith(b"{"))
        self.outbox.put(Reply(entry.key, topic, encoded, entry.correlation, job_id, transient=True), pinned=True)

    def _journal_failed(self, op: str, job_id: str | None, exc: JournalError) -> None:
        log.error("journal_unavailable", op=op, job=job_id, error=str(exc.__cause__ or exc)[:200])
        if self.counts is not None:
            self.counts.journal_failed(op)

    def _start(self, entry: Entry) -> None:
        self._seq += 1
        self.spawn(self._answer(entry), f"job-{self._seq}")

    async def _answer(self, entry: Entry) -> None:
        assert entry.payload is not None
        self.running += 1
        self.idle.clear()
        try:
            as_msgpack = not entry.payload.lstrip().startswith(b"{")
            route = (entry.topic, entry.correlation)
            sink = PartialSink(self.outbox, entry.key, route, self.topics.result, as_msgpack)
            result = await self.service.handle(entry.payload, sink)
            if self.counts is not None:
                self.counts.job_done(result)
            await self._reply(entry.key, entry.payload, (entry.topic, entry.correlation), result)
        finally:  # idle only once the result is queued: a stop waits for idle, then flushes the outbox
            self.running -= 1
            if not self.running:
                self.idle.set()

    async def _reply(self, key: bytes, payload: bytes, route: tuple[str | None, bytes | None], result: Result) -> None:
        topic = route[0] or (self.topics.result(result.id) if result.id else None)
        if topic is None:
            log.warning("unanswerable_payload", head=payload[:80].decode(errors="replace"))
            await self._mark_sent(key, result.id, forget=True)
            return
        as_msgpack = not payload.lstrip().startswith(b"{")
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(self._encoder, _encode, result, as_msgpack)
        except Exception:
            log.exception("result_unencodable", job=result.id)
            encoded = Result.failure(result.id, "internal", "the result could not be encoded").encode(as_msgpack)
        journalled = await self._store(key, encoded, result.id)
        transient = result.error is not None and result.error.code in TRANSIENT
        self.outbox.put(Reply(key, topic, encoded, route[1], result.id, transient), pinned=not journalled)

    async def _store(self, key: bytes, encoded: bytes, job_id: str | None) -> bool:
        """Journal a result; False when the disk refused it (it then goes out from memory)."""
        try:
            await self.journal.answer(key, encoded)
        except JournalError as exc:
            self._journal_failed("answer", job_id, exc)
            return False
        return True

    async def _resend(self, key: bytes, route: tuple[str | None, bytes | None]) -> None:
        try:
            stored = await self.journal.result(key)
        except JournalError as exc:
            self._journal_failed("result", None, exc)
            return
        if stored is None:
            return  # sent long ago and pruned: the client has it
        topic = route[0]
        if topic is None:
            job_id = _job_id(stored)
            topic = self.topics.result(job_id) if job_id else None
        if topic is not None:
            self.outbox.put(Reply(key, topic, stored, route[1]))

    async def recover(self, recovery: Recovery) -> None:
        """Owe what a crash left: re-send stored results, re-run taken jobs, give up on poison."""
        for entry in recovery.resend:
            stored = await self.journal.result(entry.key)
            topic = entry.topic or (self.topics.result(entry.job_id) if entry.job_id else None)
            if stored is not None and topic is None:
                job_id = _job_id(stored)
                topic = self.topics.result(job_id) if job_id else None
            if stored is not None and topic is not None:
                self.outbox.put(Reply(entry.key, topic, stored, entry.correlation, entry.job_id))
        for entry in recovery.given_up:
            assert entry.payload is not None
            result = Result.failure(
                _job_id(entry.payload),
                "internal",
                f"the node stopped {entry.attempts} times while running this job; not running it again",
                node=self.service.settings.node_id,
            )
            log.error("job_given_up", job=result.id, attempts=entry.attempts)
            await self._reply(entry.key, entry.payload, (entry.topic, entry.correlation), result)
        for entry in recovery.rerun:
            log.info("job_recovered", job=_job_id(entry.payload or b""), attempts=entry.attempts)
            self._start(entry)
        if recovery.rerun or recovery.resend or recovery.given_up:
            log.warning(
                "recovered_after_crash",
                rerun=len(recovery.rerun),
                resend=len(recovery.resend),
                given_up=len(recovery.given_up),
            )

    async def send(self, link: MqttLink) -> None:
        """Publish queued results in order, forever; one stays queued until the broker has it."""
        while True:
            reply = await self.outbox.first()
            payload = reply.payload if reply.payload is not None else await self.journal.result(reply.key)
            code = 0
            if payload is not None:
                try:
                    code = await link.publish(reply.topic, payload, correlation=reply.correlation)
                except TransportError as exc:
                    if not isinstance(exc.__cause__, ValueError):
                        raise  # the connection is gone: the next one sends it
                    log.warning("reply_failed", job=reply.job, error=str(exc))
            if reply.partial:  # not journalled; refused, the final result says so
                self.outbox.sent(reply)
                if reply.on_sent is not None:
                    reply.on_sent()
                continue
            if payload is not None and code >= REFUSED:
                await self._refused(reply, payload, code)
                continue
            await self._mark_sent(reply.key, reply.job, forget=reply.transient)
            self.outbox.sent(reply)

    async def _mark_sent(self, key: bytes, job_id: str | None, *, forget: bool) -> None:
        try:
            await self.journal.sent(key, forget=forget)
        except JournalError as exc:  # marked in memory all the same; a crash would send it again
            self._journal_failed("sent", job_id, exc)

    async def _refused(self, reply: Reply, payload: bytes, code: int) -> None:
        """The broker refused ``reply``: answer on the job's results topic with an error instead.

        The error, not the result: a topic may be denied to keep an output off the broker, and
        whoever reads ``results/#`` should not get it round the ACL. The error is transient:
        once the broker has it the job is forgotten (never journalled as sent), so a retry runs
        again. Refused on the results topic too, the job is forgotten with nothing sent.
        """
        reason = reason_name(code)
        job_id = reply.job or _job_id(payload)
        fallback = self.topics.result(job_id) if job_id else None
        if fallback == reply.topic:
            fallback = None
        log.warning("result_refused", job=job_id, topic=reply.topic[:200], reason=reason, code=code, answer_on=fallback)
        if self.counts is not None:
            self.counts.result_refused(reason)
        if fallback is None:
            await self._mark_sent(reply.key, job_id, forget=True)
            self.outbox.sent(reply)
            return
        message = f"the broker refused this job's result on its response topic {reply.topic[:200]} ({reason})"
        error = Result.failure(job_id, "result_refused", message, node=self.service.settings.node_id)
        encoded = error.encode(not payload.lstrip().startswith(b"{"))  # in the result's own format
        await self._store(reply.key, encoded, job_id)  # a copy of the job gets the error, not the result
        self.outbox.replace(reply, Reply(reply.key, fallback, encoded, reply.correlation, job_id, transient=True))


def _encode(result: Result, as_msgpack: bool) -> bytes:
    """The result's bytes; then, now and then, the freed memory of earlier ones back to the system."""
    encoded = result.encode(as_msgpack)
    trim_heap()
    return encoded
