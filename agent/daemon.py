"""``prism-agent run``: the daemon's lifecycle (DESIGN.md §6).

One root task group per broker connection; every task named. On connect: subscribe
(shared job topic and this node's own), publish a retained ``online`` birth (the Last Will
says ``offline``), then take jobs. A lost connection is retried with capped full-jitter
backoff; a refused login is not retried. SIGTERM stops intake, lets in-flight jobs finish
within the grace period, publishes ``offline`` and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import aiomqtt
import structlog

from agent.compat import BaseExceptionGroup, TaskGroup
from agent.config import Settings
from agent.sdnotify import Notifier
from agent.service import JobService, Served
from engine.models import load
from transport.mqtt import MqttLink, Topics, TransportError, backoff_s, reply_route

log = structlog.get_logger("prism.daemon")
VERSION = "0.1.0"
GRACE_S = 30.0


def load_models(settings: Settings) -> dict[str, Served]:
    """Load every configured model once (at start, before taking jobs)."""
    served = {}
    for spec in settings.models:
        start = time.monotonic()
        served[spec.name] = Served(spec, load(spec.source))
        log.info("model_loaded", model=spec.name, source=spec.source, s=round(time.monotonic() - start, 2))
    return served


class Daemon:
    """A node: its settings, models, job service and broker connection."""

    def __init__(self, settings: Settings, models: Mapping[str, Served], notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.service = JobService(settings, models)
        self.topics = Topics(settings.topic_root, settings.node_id)
        self.notifier = notifier or Notifier(None)
        self.stop = asyncio.Event()
        self._jobs: set[asyncio.Task[None]] = set()
        self._job_seq = 0

    async def run(self) -> None:
        """Serve until :attr:`stop` is set; reconnect on failures."""
        broker = self.settings.broker
        assert broker is not None
        attempt = 0
        while not self.stop.is_set():
            try:
                await self._connected(broker.host, broker.port)
                attempt = 0
            except TransportError as exc:
                if exc.fatal:
                    log.error("mqtt_refused", error=str(exc), hint="check username/password; not retrying")
                    raise
                delay = backoff_s(attempt, self.settings.reconnect_min_s, self.settings.reconnect_max_s)
                attempt += 1
                log.warning("mqtt_reconnect", error=str(exc), in_s=round(delay, 3), attempt=attempt)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)
        self.notifier.notify("STOPPING=1")

    async def _connected(self, host: str, port: int) -> None:
        will = (self.topics.status, b"offline")
        try:
            async with MqttLink(host, port, client_id=f"prism-{self.settings.node_id}", will=will) as link:
                await link.subscribe(self.topics.shared_jobs, self.topics.my_jobs)
                await link.publish(self.topics.status, b"online", retain=True)
                log.info("mqtt_connected", broker=f"{host}:{port}", node=self.settings.node_id)
                self.notifier.notify("READY=1")
                async with TaskGroup() as tg:
                    intake = tg.create_task(self._intake(link, tg), name="intake")
                    health = tg.create_task(self._health(link), name="health")
                    stop = tg.create_task(self.stop.wait(), name="stop-signal")
                    await asyncio.wait({intake, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if intake.done():  # the connection dropped: let the group raise it
                        stop.cancel()
                        health.cancel()
                        intake.result()
                    intake.cancel()
                    await self._drain()
                    await link.publish(self.topics.status, b"offline", retain=True)
                    health.cancel()
                log.info("stopped", **self.service.stats)
        except BaseExceptionGroup as group:
            transport = [e for e in group.exceptions if isinstance(e, TransportError)]
            if transport:
                raise transport[0] from group
            raise

    async def _drain(self) -> None:
        if self._jobs:
            log.info("draining", jobs=len(self._jobs), grace_s=GRACE_S)
            _done, pending = await asyncio.wait(set(self._jobs), timeout=GRACE_S)
            for task in pending:
                task.cancel()

    async def _intake(self, link: MqttLink, tg: TaskGroup) -> None:
        async for message in link.messages():
            self._job_seq += 1
            task = tg.create_task(self._answer(link, message), name=f"job-{self._job_seq}")
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)

    async def _answer(self, link: MqttLink, message: aiomqtt.Message) -> None:
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        result = await self.service.handle(payload)
        response_topic, correlation = reply_route(message)
        topic = response_topic or (self.topics.result(result.id) if result.id else None)
        if topic is None:
            log.warning("unanswerable_payload", topic=str(message.topic), head=payload[:80].decode(errors="replace"))
            return
        as_msgpack = not payload.lstrip().startswith(b"{")
        try:
            await link.publish(topic, result.encode(as_msgpack), correlation=correlation)
        except TransportError as exc:
            log.warning("reply_failed", job=result.id, error=str(exc))

    def health(self) -> dict[str, Any]:
        """The retained health document."""
        load1, load5, _ = os.getloadavg()
        return {
            "node": self.settings.node_id,
            "time": time.time(),
            "version": VERSION,
            "load": {"load1": load1, "load5": load5, "cpus": os.cpu_count(), "queue": self.service.queue_depth},
            "jobs": dict(self.service.stats),
            "models": sorted(self.service.models),
            "links": {},
        }

    async def _health(self, link: MqttLink) -> None:
        while True:
            await link.publish(self.topics.health, json.dumps(self.health()).encode(), retain=True, qos=0)
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(self.settings.health_interval_s)


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM and SIGINT start a graceful stop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop.set)


async def main_async(settings: Settings) -> None:
    """Load models, then serve until signalled."""
    models = await asyncio.to_thread(load_models, settings)
    daemon = Daemon(settings, models, Notifier(os.environ.get("NOTIFY_SOCKET")))
    install_signal_handlers(daemon)
    await daemon.run()
