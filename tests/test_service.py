"""The job service in-process: queue bound, decisions, and outputs (no broker)."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from agent.base.config import ModelSpec, Settings
from agent.jobs.service import JobService, Served
from engine.errors import FailureReason
from tests.conftest import Models


def service(models: Models, queue_max: int = 2) -> JobService:
    settings = Settings(node_id="t", queue_max=queue_max)
    return JobService(settings, {"bert": Served(ModelSpec("bert", "tiny-bert"), models("tiny-bert"))})


def job(i: int, **extra: object) -> bytes:
    return json.dumps({"id": f"j{i}", "model": "bert", "inputs": {"text": ["hello"]}, **extra}).encode()


async def test_past_the_queue_bound_jobs_are_busy_at_once(models: Models) -> None:
    svc = service(models, queue_max=2)
    async with svc.engine.slot("a long job"):  # the engine is busy
        first = [asyncio.create_task(svc.handle(job(i))) for i in range(2)]
        await asyncio.sleep(0.05)
        extra = await asyncio.wait_for(svc.handle(job(9)), timeout=1)  # answered without waiting
    done = await asyncio.gather(*first)
    assert [extra.error.code if extra.error else "ok", *("ok" if r.ok else "fail" for r in done)] == [
        "busy",
        "ok",
        "ok",
    ]


async def test_a_deadline_that_passes_while_the_job_waits_is_answered_at_once(models: Models) -> None:
    svc = service(models)
    async with svc.engine.slot("a long job"):
        start = asyncio.get_running_loop().time()
        result = await asyncio.wait_for(svc.handle(job(1, deadline_ms=200)), timeout=5)
        waited = asyncio.get_running_loop().time() - start
    assert result.error is not None
    assert result.error.code == "deadline_exceeded"
    assert 0.15 < waited < 1.0


async def test_a_crash_inside_a_job_is_an_internal_error_not_a_dead_service(
    models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service(models)

    def boom(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("agent.jobs.service.run_local", boom)
    broken = await svc.handle(job(1))
    assert broken.error is not None
    assert broken.error.code == "internal"
    monkeypatch.undo()
    assert (await svc.handle(job(2))).ok


def test_distributed_request_without_peers_is_answered_locally_and_flagged(models: Models) -> None:
    # A batch that computes for a while (well over os.times()' 10 ms tick), so its energy shows.
    rows = [[(7 * r + j) % 900 + 100 for j in range(512)] for r in range(16)]
    payload = json.dumps({"id": "j1", "model": "bert", "inputs": {"token_ids": rows}, "mode": "distributed"})
    start = time.monotonic()
    result = asyncio.run(service(models).handle(payload.encode()))
    took_s = time.monotonic() - start
    assert result.ok
    assert result.mode == "local"
    assert result.fallback is True
    assert result.fallback_reason is FailureReason.NO_PEER
    assert result.to_dict()["fallback_reason"] == "no_peer"
    assert result.decision is not None
    assert result.decision["requested"] == "distributed"
    assert result.energy is not None
    assert result.energy["source"] == "cpu-model"  # no sensor in this service: the model says so
    # The model's CPU seconds x 4 W a core: more than nothing, at most every core busy all along.
    joules = result.energy["joules"]
    assert 0 < joules <= 4.0 * (os.cpu_count() or 1) * (took_s + 0.01)
    assert result.energy["per_sample_j"] == pytest.approx(joules / 16)


@pytest.mark.parametrize(
    ("extra", "code"), [({"task": "dance"}, "invalid_job"), ({"task": "next_token"}, "bad_request")]
)
def test_task_errors(models: Models, extra: dict[str, object], code: str) -> None:
    result = asyncio.run(service(models).handle(job(1, **extra)))
    assert result.error is not None
    assert result.error.code == code
