"""The intake between the broker and the service: a connection lost mid-take loses no job.

Real JobService (tiny-bert), real SQLite journal, real outbox; only the broker is left out,
its redelivery played by calling ``take`` again with the same message."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.base.config import ModelSpec, Settings
from agent.jobs.intake import Intake
from agent.jobs.journal import Journal, State
from agent.jobs.replies import Outbox, job_key
from agent.jobs.service import JobService, Served
from tests.conftest import Models
from tests.disks import small_disk
from transport.mqtt import Topics


async def test_a_take_cut_off_by_a_lost_connection_still_runs_and_answers_the_job_once(
    models: Models, tmp_path: Path
) -> None:
    settings = Settings(node_id="t")
    service = JobService(settings, {"bert": Served(ModelSpec("bert", "tiny-bert"), models("tiny-bert"))})
    journal = Journal(tmp_path / "journal.sqlite3")
    await journal.open()
    outbox = Outbox(1 << 20)
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        tasks.add(task)
        return task

    intake = Intake(service, journal, outbox, Topics("prism/v1/t", "t"), spawn)
    payload = json.dumps({"id": "cut", "model": "bert", "inputs": {"text": ["hello"]}}).encode()
    route = ("prism/v1/t/clients/c/result", None)

    handler = asyncio.create_task(intake.take(payload, route, False))
    await asyncio.sleep(0)  # one step: the handler is now awaiting the journal write
    handler.cancel()  # the connection dropped: the message loop and its handler are cancelled
    await asyncio.gather(handler, return_exceptions=True)

    await intake.take(payload, route, False)  # the broker redelivers the unacknowledged job
    reply = await asyncio.wait_for(outbox.first(), 60)
    assert json.loads(reply.payload or b"{}")["id"] == "cut"
    assert json.loads(reply.payload or b"{}")["ok"] is True
    await asyncio.gather(*tasks)
    assert service.stats["received"] == 1  # run once, not once per delivery
    assert journal.state(job_key(payload)) is State.ANSWERED
    await journal.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (needs root)")
async def test_a_disk_that_fills_while_a_job_runs_still_gets_its_result_out(models: Models) -> None:
    with small_disk() as disk:
        settings = Settings(node_id="t")
        service = JobService(settings, {"bert": Served(ModelSpec("bert", "tiny-bert"), models("tiny-bert"))})
        journal = Journal(disk.path / "journal.sqlite3")
        await journal.open()
        outbox = Outbox(1 << 16)
        outbox.bytes = outbox.max_bytes  # past its budget: a journalled result would keep only its key
        tasks: list[asyncio.Task[None]] = []

        def spawn(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
            tasks.append(asyncio.create_task(coro, name=name))
            return tasks[-1]

        intake = Intake(service, journal, outbox, Topics("prism/v1/t", "t"), spawn)
        payload = json.dumps({"id": "filled", "model": "bert", "inputs": {"text": ["hello"]}}).encode()
        with capture_logs() as logs:
            await intake.take(payload, (None, None), False)  # journalled as taken
            disk.fill()  # before the job's task ran: its result cannot be journalled
            await asyncio.gather(*tasks)
        reply = await asyncio.wait_for(outbox.first(), 60)
        assert reply.payload is not None  # kept in memory: the journal does not have it
        assert json.loads(reply.payload)["ok"] is True
        assert any(e["event"] == "journal_unavailable" and e["op"] == "answer" for e in logs)
        disk.free()
        await journal.close()
