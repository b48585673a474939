"""The node in-process (pytest-asyncio): a real mosquitto on loopback, the node's own objects,
and faults injected where a real one cannot be aimed (a loop that crashes once, a connection
that drops in the middle of sending a result)."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.base.config import Broker, ModelSpec, Settings
from agent.base.sdnotify import Notifier
from agent.jobs.journal import Entry, Journal
from agent.jobs.replies import job_key
from agent.jobs.service import Served
from agent.node.daemon import Node
from engine.models import fingerprint
from tests.conftest import Models
from tests.mqtt_env import Mosquitto, mosquitto_process
from transport.mqtt import MqttLink, TransportError

pytestmark = pytest.mark.mqtt


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    with mosquitto_process() as b:  # mosquitto's default limits, as users run it
        yield b


def settings(broker: Mosquitto, tmp_path: Path, **extra: Any) -> Settings:
    return Settings(
        node_id="n1",
        cluster=f"inproc-{uuid.uuid4().hex[:6]}",
        broker=Broker("127.0.0.1", broker.port),
        models=(ModelSpec("bert", "tiny-bert"),),
        health_interval_s=0.2,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        state_dir=str(tmp_path),
        mdns_name_check_ms=100,  # loopback answers in milliseconds; the bed tests name conflicts
        **extra,
    )


def served(models: Models) -> dict[str, Served]:
    model = models("tiny-bert")
    return {"bert": Served(ModelSpec("bert", "tiny-bert"), model, fingerprint(model.adapter))}


@asynccontextmanager
async def running(node: Node) -> AsyncIterator[Node]:
    task = asyncio.create_task(node.run(), name="node")
    try:
        await asyncio.wait_for(node.connected.wait(), 60)
        yield node
    finally:
        node.stop.set()
        await asyncio.wait_for(task, 60)


class Client:
    """A test client on the same broker: publish jobs, collect results by id."""

    def __init__(self, link: MqttLink, root: str) -> None:
        self.link = link
        self.root = root
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.changed = asyncio.Event()

    async def collect(self) -> None:
        async for message in self.link.messages():
            data = json.loads(message.payload if isinstance(message.payload, bytes) else str(message.payload))
            self.results.setdefault(str(data["id"]), []).append(data)
            self.changed.set()

    async def job(self, payload: bytes) -> None:
        await self.link.publish(f"{self.root}/nodes/n1/jobs", payload)

    async def result(self, job_id: str, count: int = 1, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        async def wait() -> list[dict[str, Any]]:
            while len(self.results.get(job_id, [])) < count:
                self.changed.clear()
                await self.changed.wait()
            return self.results[job_id]

        return await asyncio.wait_for(wait(), timeout_s)


@asynccontextmanager
async def client(broker: Mosquitto, s: Settings) -> AsyncIterator[Client]:
    async with MqttLink("127.0.0.1", broker.port, client_id=f"test-{uuid.uuid4().hex[:8]}") as link:
        await link.subscribe(f"{s.topic_root}/results/+")
        c = Client(link, s.topic_root)
        collector = asyncio.create_task(c.collect(), name="collect")
        try:
            yield c
        finally:
            collector.cancel()


def job(job_id: str, **extra: Any) -> bytes:
    return json.dumps({"id": job_id, "model": "bert", "inputs": {"text": ["hello"]}, **extra}).encode()


async def test_a_background_loop_that_crashes_is_logged_restarted_and_the_node_keeps_serving(
    broker: Mosquitto, tmp_path: Path, models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    restarted = asyncio.Event()

    async def flaky_probes(*args: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected: the probe loop hit a bug")
        restarted.set()
        await asyncio.Event().wait()

    monkeypatch.setattr("agent.node.daemon.probe_loop", flaky_probes)
    s = settings(broker, tmp_path)
    with capture_logs() as logs:
        async with running(Node(s, served(models))) as node, client(broker, s) as c:
            await asyncio.wait_for(restarted.wait(), 30)
            await c.job(job("after-crash"))
            answer = (await c.result("after-crash"))[0]
            health = json.loads(node.health())
    crashed = [e for e in logs if e["event"] == "loop_crashed"]
    assert [e["loop"] for e in crashed] == ["link-probes"]
    assert crashed[0]["exc_info"] is True  # the traceback goes to the log
    assert len(calls) == 2  # restarted
    assert health["loops"]["link-probes"] >= 1
    assert answer["ok"] is True


async def test_a_duplicate_runs_once_and_gets_the_same_answer(
    broker: Mosquitto, tmp_path: Path, models: Models
) -> None:
    s = settings(broker, tmp_path)
    with capture_logs() as logs:
        async with running(Node(s, served(models))), client(broker, s) as c:
            await c.job(job("dup"))
            first = await c.result("dup")
            await c.job(job("dup"))  # the same bytes again, as a QoS 1 redelivery would be
            both = await c.result("dup", count=2)
    assert first[0]["ok"] is True
    assert both[0]["output"] == both[1]["output"]
    assert [e["job"] for e in logs if e["event"] == "job_started"] == ["dup"]


async def test_a_busy_answer_is_not_remembered_so_a_retry_runs(
    broker: Mosquitto, tmp_path: Path, models: Models
) -> None:
    s = settings(broker, tmp_path, queue_max=1)
    async with running(Node(s, served(models))) as node, client(broker, s) as c:
        async with node.engine.slot("the test holds the engine"):
            await c.job(job("first"))
            await asyncio.sleep(0.3)  # admitted: it waits for the engine
            await c.job(job("retry"))
            busy = (await c.result("retry"))[0]
        await c.result("first")
        await c.job(job("retry"))  # the same bytes, now that there is room
        again = await c.result("retry", count=2)
    assert busy["error"]["code"] == "busy"
    assert again[1]["ok"] is True


async def test_a_job_journalled_before_a_crash_is_answered_after_the_restart(
    broker: Mosquitto, tmp_path: Path, models: Models
) -> None:
    s = settings(broker, tmp_path)
    left = Journal(s.journal_path())
    await left.open()
    payload = job("left-behind")
    await left.take(Entry(job_key(payload), None, None, None, payload))  # taken, acked, then the crash
    await left.close()
    async with client(broker, s) as c, running(Node(s, served(models))):
        answer = (await c.result("left-behind"))[0]
    assert answer["ok"] is True


class DropsOnce:
    """An injected MQTT link that drops the connection the first time it sends a result."""

    dropped = 0

    def __init__(self, real: MqttLink, root: str) -> None:
        self.real = real
        self.root = root

    async def __aenter__(self) -> DropsOnce:
        await self.real.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.real.__aexit__(*exc)

    async def publish(self, topic: str, payload: bytes, **kw: Any) -> int:
        if "/results/" in topic and DropsOnce.dropped == 0:
            DropsOnce.dropped += 1
            raise TransportError("injected: connection lost while publishing a result")
        return await self.real.publish(topic, payload, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_result_whose_publish_fails_goes_out_on_the_next_connection(
    broker: Mosquitto, tmp_path: Path, models: Models
) -> None:
    s = settings(broker, tmp_path)
    node = Node(s, served(models))
    real_factory = node._mqtt_link

    def factory() -> AbstractAsyncContextManager[MqttLink]:
        return DropsOnce(real_factory(), s.topic_root)  # type: ignore[return-value]

    node._link_factory = factory
    with capture_logs() as logs:
        async with running(node), client(broker, s) as c:
            await c.job(job("resent"))
            answer = (await c.result("resent"))[0]
    assert DropsOnce.dropped == 1
    assert answer["ok"] is True
    assert any(e["event"] == "mqtt_reconnect" for e in logs)


async def test_the_watchdog_keeps_pinging_while_the_broker_is_gone(
    broker: Mosquitto, tmp_path: Path, models: Models
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    s = settings(broker, tmp_path)
    async with running(Node(s, served(models), notifier=Notifier(str(path)), watchdog_s=0.1)):
        await asyncio.wait_for(loop.sock_recv(sock, 64), 30)  # READY or a first ping
        broker.stop()
        pings = 0
        deadline = loop.time() + 2.0
        while loop.time() < deadline:
            data = await asyncio.wait_for(loop.sock_recv(sock, 64), 1.0)
            pings += data.count(b"WATCHDOG=1")
        broker.start()
    sock.close()
    assert pings >= 10  # every ~0.1 s, for 2 s without a broker
