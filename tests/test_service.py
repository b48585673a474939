"""The job service in-process: queue bound, decisions, and outputs (no broker)."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.jobs.service import JobService, Served
from agent.node.config import ModelSpec, Settings
from tests.conftest import Models


def service(models: Models, queue_max: int = 2) -> JobService:
    settings = Settings(node_id="t", queue_max=queue_max)
    return JobService(settings, {"bert": Served(ModelSpec("bert", "tiny-bert"), models("tiny-bert"))})


def job(i: int, **extra: object) -> bytes:
    return json.dumps({"id": f"j{i}", "model": "bert", "inputs": {"text": ["hello"]}, **extra}).encode()


def test_past_the_queue_bound_jobs_are_busy_at_once(models: Models) -> None:
    async def scenario() -> list[str]:
        svc = service(models, queue_max=2)
        await svc._engine.acquire()  # the engine is busy with a long job
        first = [asyncio.create_task(svc.handle(job(i))) for i in range(2)]
        await asyncio.sleep(0.05)
        extra = await asyncio.wait_for(svc.handle(job(9)), timeout=1)  # answered without waiting
        svc._engine.release()
        done = await asyncio.gather(*first)
        return [extra.error.code if extra.error else "ok", *("ok" if r.ok else "fail" for r in done)]

    assert asyncio.run(scenario()) == ["busy", "ok", "ok"]


def test_distributed_request_without_peers_is_answered_locally_and_flagged(models: Models) -> None:
    result = asyncio.run(service(models).handle(job(1, mode="distributed")))
    assert result.ok
    assert result.mode == "local"
    assert result.fallback is True
    assert result.decision is not None
    assert result.decision["requested"] == "distributed"
    assert result.energy is not None
    assert result.energy["source"] == "cpu-model"  # no sensor in this service: the model says so
    assert result.energy["joules"] >= 0


@pytest.mark.parametrize(
    ("extra", "code"), [({"task": "dance"}, "invalid_job"), ({"task": "next_token"}, "bad_request")]
)
def test_task_errors(models: Models, extra: dict[str, object], code: str) -> None:
    result = asyncio.run(service(models).handle(job(1, **extra)))
    assert result.error is not None
    assert result.error.code == code
