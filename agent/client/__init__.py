"""``prism-agent submit``: publish one job, wait for its result on a private response topic;
:func:`stream`: many jobs over one persistent session that survives broker restarts;
:func:`generate`: a generate job's partial results as they come, then its final result.

A message with ``"final": false`` is a generate job's partial, never its result: every
waiting function here skips it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import structlog

from agent.base.config import Broker, Settings, mqtt_credentials, tls_context
from agent.client.job import build_job
from agent.compat import BaseExceptionGroup, TaskGroup
from engine.errors import BadRequest
from transport.health import parse_status
from transport.mqtt import NO_SUBSCRIBERS, MqttLink, Topics, TransportError, backoff_s, transport_error

log = structlog.get_logger("prism.client")

__all__ = ["Auth", "build_job", "client_auth", "generate", "is_partial", "peers", "stream", "submit", "submit_all"]

Auth = dict[str, Any]

#: Pauses before sending a job again that a node could not journal (``submit``).
RETRY_S = (0.5, 1.0, 2.0, 4.0)


def client_auth(settings: Settings) -> Auth:
    """Username, password and TLS context for a client, from the same settings the agent reads."""
    username, password = mqtt_credentials(settings)
    return {"username": username, "password": password, "tls": tls_context(settings)}


def is_partial(data: Any) -> bool:
    """Whether a reply is a generate job's partial (not its result)."""
    return isinstance(data, dict) and data.get("final") is False


async def _replies(link: MqttLink, job_id: str) -> AsyncIterator[dict[str, Any]]:
    """Replies to ``job_id``: its partials, if any, then its result (the last)."""
    async for message in link.messages():
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        data = json.loads(payload)
        if isinstance(data, dict) and data.get("id") == job_id:
            yield data
            if not is_partial(data):
                return
    raise TransportError("connection closed before the result arrived")


async def _result(link: MqttLink, job_id: str) -> Any:
    async for data in _replies(link, job_id):
        if not is_partial(data):
            return data
    raise TransportError("connection closed before the result arrived")


@contextlib.asynccontextmanager
async def _sent(
    broker: Broker, cluster: str, job: dict[str, Any], node: str | None, auth: Auth | None
) -> AsyncIterator[tuple[MqttLink, Callable[[], Awaitable[None]]]]:
    """A link subscribed to a private response topic, with ``job`` published to it; and a
    function that publishes it again (the same bytes)."""
    topics = Topics(f"prism/v1/{cluster}", node or "-")
    reply = f"prism/v1/{cluster}/clients/{uuid.uuid4().hex}/result"
    target = topics.node_jobs(node) if node else topics.jobs
    async with MqttLink(
        broker.host, broker.port, client_id=f"prism-submit-{uuid.uuid4().hex[:8]}", **(auth or {})
    ) as link:
        await link.subscribe(reply)

        async def send() -> None:
            await link.publish(target, json.dumps(job).encode(), response_topic=reply, correlation=job["id"].encode())

        await send()
        yield link, send


async def generate(
    broker: Broker, cluster: str, job: dict[str, Any], *, node: str | None, timeout_s: float, auth: Auth | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Publish a generate ``job`` and yield its partials as they come (``"final": false``,
    in ``seq`` order), then its final result, the last item. ``timeout_s`` bounds the wait
    for each next message (``asyncio.TimeoutError``)."""
    async with _sent(broker, cluster, job, node, auth) as (link, _):
        replies = _replies(link, job["id"])
        while True:
            try:
                data = await asyncio.wait_for(replies.__anext__(), timeout_s)
            except StopAsyncIteration:
                return
            yield data
            if not is_partial(data):
                return


async def submit(
    broker: Broker, cluster: str, job: dict[str, Any], *, node: str | None, timeout_s: float, auth: Auth | None = None
) -> Any:
    """Publish ``job`` and return the decoded result; raises ``asyncio.TimeoutError``.

    A node that could not journal the job (``journal_unavailable``: not taken, not remembered)
    gets it again, the same bytes, after :data:`RETRY_S` (and to any node, when ``node`` is
    None), while ``timeout_s`` lasts; the last answer is returned."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with _sent(broker, cluster, job, node, auth) as (link, send):
        for pause_s in RETRY_S:
            result = await asyncio.wait_for(_result(link, job["id"]), deadline - loop.time())
            if _error_code(result) != "journal_unavailable" or loop.time() + pause_s >= deadline:
                return result
            log.warning("job_sent_again", job=job["id"], code="journal_unavailable", after_s=pause_s)
            await asyncio.sleep(pause_s)  # the disk's time to recover; the job is held nowhere meanwhile
            await send()
        return await asyncio.wait_for(_result(link, job["id"]), deadline - loop.time())


def _error_code(result: Any) -> Any:
    error = result.get("error") if isinstance(result, dict) else None
    return error.get("code") if isinstance(error, dict) else None


async def submit_all(
    broker: Broker,
    cluster: str,
    jobs: Sequence[dict[str, Any]],
    *,
    on_result: Callable[[dict[str, Any]], None],
    node: str | None = None,
    in_flight: int = 4,
    idle_s: float = 60.0,
    auth: Auth | None = None,
) -> int:
    """Run ``jobs`` over one :func:`stream`, ``on_result`` called for each result as it comes.

    Gives up when no result came for ``idle_s`` (returns how many results came, fewer than
    ``jobs``). An unreachable broker raises :class:`TransportError` at once, as :func:`submit` does.
    """
    async with MqttLink(broker.host, broker.port, client_id=f"prism-submit-{uuid.uuid4().hex[:8]}", **(auth or {})):
        pass  # stream() retries a broker it cannot reach; a person at a prompt wants to hear at once
    progress = asyncio.Event()
    count = 0

    def took(result: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        progress.set()
        on_result(result)

    async def idle() -> None:
        while True:
            progress.clear()
            await asyncio.wait_for(progress.wait(), idle_s)

    try:
        async with TaskGroup() as tg:
            watch = tg.create_task(idle(), name="idle-watch")
            await stream(
                broker, cluster, jobs, node=node, in_flight=in_flight, timeout_s=1e9, auth=auth,
                on_result=took, keep_results=False,
            )  # fmt: skip
            watch.cancel()
    except BaseExceptionGroup as group:
        inner = group.exceptions[0]
        while isinstance(inner, BaseExceptionGroup):
            inner = inner.exceptions[0]
        if not isinstance(inner, asyncio.TimeoutError):
            raise inner from None
    return count


@dataclass
class _Stream:
    """A stream's state, which outlives its connections."""

    payloads: dict[str, bytes]
    in_flight: int
    on_result: Callable[[dict[str, Any]], None] | None = None
    order: list[str] = field(default_factory=list)
    keep: bool = True
    sent: int = 0
    unacked: dict[str, None] = field(default_factory=dict)  # published, PUBACK not seen (ordered)
    waiting: set[str] = field(default_factory=set)  # acknowledged by the broker, no result yet
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    duplicates: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.payloads)

    def took(self, job_id: str, result: dict[str, Any]) -> None:
        if job_id in self.results:
            self.duplicates += 1  # at-least-once: the first result wins
            return
        self.results[job_id] = result if self.keep else {"id": job_id}
        self.unacked.pop(job_id, None)
        self.waiting.discard(job_id)
        self.changed.set()
        if self.on_result is not None:
            self.on_result(result)


async def stream(
    broker: Broker,
    cluster: str,
    jobs: Sequence[dict[str, Any]],
    *,
    node: str | None = None,
    in_flight: int = 8,
    timeout_s: float = 600.0,
    auth: Auth | None = None,
    session_expiry_s: int = 600,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    stats: dict[str, int] | None = None,
    keep_results: bool = True,
) -> list[dict[str, Any]]:
    """Run ``jobs`` (unique ids) with at most ``in_flight`` unanswered; one result per job, in order.

    One persistent MQTT 5 session with a stable client id: across a broker restart (with
    persistence on) the broker keeps our reply subscription and queues results for us while
    we reconnect (with backoff), and jobs whose PUBLISH was not acknowledged are published
    again. Delivery is at-least-once: a job may run twice, the first result for an id wins.
    Raises ``asyncio.TimeoutError`` when not every result came within ``timeout_s``.
    ``stats`` (when given) gets ``duplicates``: results that came more than once. With
    ``keep_results`` off, only ``on_result`` sees each result (memory stays flat for huge runs)
    and the list holds ``{"id": ...}`` stubs.
    """
    ids = [str(job["id"]) for job in jobs]
    if len(set(ids)) != len(ids):
        raise BadRequest("job ids must be unique within a stream")
    if in_flight < 1:
        raise BadRequest("in_flight must be >= 1")
    state = _Stream({str(job["id"]): json.dumps(job).encode() for job in jobs}, in_flight, on_result, ids, keep_results)
    try:
        await asyncio.wait_for(_connections(broker, cluster, state, node, auth, session_expiry_s), timeout_s)
    finally:
        if stats is not None:
            stats["duplicates"] = state.duplicates
            stats["answered"] = len(state.results)
    if state.duplicates:
        log.info("stream_duplicates", results=state.duplicates)
    return [state.results[i] for i in ids]


async def _connections(
    broker: Broker, cluster: str, state: _Stream, node: str | None, auth: Auth | None, session_expiry_s: int
) -> None:
    client_id = f"prism-stream-{uuid.uuid4().hex[:12]}"
    reply = f"prism/v1/{cluster}/clients/{client_id}/result"
    topics = Topics(f"prism/v1/{cluster}", node or "-")
    target = topics.node_jobs(node) if node else topics.jobs
    attempt = 0
    while not state.done:
        try:
            async with MqttLink(
                broker.host, broker.port, client_id=client_id, session_expiry_s=session_expiry_s, **(auth or {})
            ) as link:
                await link.subscribe(reply)
                attempt = 0
                async with TaskGroup() as tg:
                    tg.create_task(_collect(link, state), name="collect")
                    tg.create_task(_feed(link, state, target, reply), name="feed")
                with contextlib.suppress(TransportError):
                    await link.unsubscribe(reply)  # done: the session keeps nothing to queue
        except (TransportError, BaseExceptionGroup) as exc:
            error = transport_error(exc)
            if error is None or error.fatal:
                raise
            delay = backoff_s(attempt, 0.1, 2.0)
            attempt += 1
            log.warning("stream_reconnect", error=str(error), in_s=round(delay, 3), results=len(state.results))
            await asyncio.sleep(delay)


async def _feed(link: MqttLink, state: _Stream, target: str, reply: str) -> None:
    """Publish jobs again that the last connection did not get acknowledged, then new ones."""

    async def publish(job_id: str) -> None:
        state.unacked[job_id] = None
        attempt = 0
        while True:
            code = await link.publish(target, state.payloads[job_id], response_topic=reply, correlation=job_id.encode())
            if code != NO_SUBSCRIBERS:
                break
            # No agent subscribed (after a broker restart, until they re-subscribe): again, shortly.
            await asyncio.sleep(backoff_s(attempt, 0.05, 1.0))
            attempt += 1
        if code >= 0x80:
            raise TransportError(f"the broker refused job {job_id} (reason code {code})", fatal=True)
        if job_id in state.unacked:  # acknowledged, and no result yet
            del state.unacked[job_id]
            state.waiting.add(job_id)

    for job_id in list(state.unacked):
        await publish(job_id)
    while state.sent < len(state.order):
        while len(state.unacked) + len(state.waiting) >= state.in_flight:
            state.changed.clear()
            await state.changed.wait()
        state.sent += 1
        await publish(state.order[state.sent - 1])


async def _collect(link: MqttLink, state: _Stream) -> None:
    if state.done:
        return
    async for message in link.messages():
        job_id, result = _reply(message)
        if job_id in state.payloads and result is not None and not is_partial(result):
            state.took(job_id, result)
            if state.done:
                return


def _reply(message: aiomqtt.Message) -> tuple[str | None, dict[str, Any] | None]:
    """(job id, result) of a reply: the id from its correlation data, else from the result."""
    payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
    try:
        data = json.loads(payload)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    correlation = getattr(message.properties, "CorrelationData", None)
    if isinstance(correlation, bytes):
        return correlation.decode(errors="replace"), data
    return str(data.get("id")), data


async def peers(
    broker: Broker, cluster: str, *, listen_s: float = 1.5, auth: Auth | None = None
) -> list[dict[str, Any]]:
    """Every node's retained status and health in ``cluster``, one dict per node."""
    root = f"prism/v1/{cluster}"
    nodes: dict[str, dict[str, Any]] = {}
    async with MqttLink(
        broker.host, broker.port, client_id=f"prism-peers-{uuid.uuid4().hex[:8]}", **(auth or {})
    ) as link:
        await link.subscribe(f"{root}/nodes/+/status", f"{root}/nodes/+/health")

        async def collect() -> None:
            async for message in link.messages():
                parts = str(message.topic).split("/")
                payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                entry = nodes.setdefault(parts[-2], {"node": parts[-2], "status": "unknown"})
                if parts[-1] == "status":
                    entry["status"] = parse_status(payload)[0]
                else:
                    with contextlib.suppress(ValueError):
                        entry["health"] = json.loads(payload)

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(collect(), listen_s)
    return [nodes[n] for n in sorted(nodes)]
