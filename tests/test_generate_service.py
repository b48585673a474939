"""GPT-2 writes text through the job service, in-process (tiny GPT-2, no broker): partials in
order that add up to the final result, the local text, the checks before any work, and a
coalescing feed when the broker is slow."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from agent.base.config import ModelSpec, Settings
from agent.jobs.service import JobService, Served
from agent.jobs.token_feed import MAX_WAITING, Feed, Partial
from engine.generate import decode
from tests.conftest import Models, token_inputs

PROMPT = token_inputs(1, 30, seed=7)["input_ids"][0].tolist()


class Collect:
    """A sink that keeps every partial; ``acked`` of them have reached the 'broker'."""

    def __init__(self) -> None:
        self.partials: list[Partial] = []
        self.acked = 0

    def put(self, partial: Partial) -> None:
        self.partials.append(partial)

    def waiting(self) -> int:
        return len(self.partials) - self.acked


def service(models: Models, **settings: Any) -> JobService:
    spec = ModelSpec("gpt", "tiny-gpt2", max_new_tokens=settings.pop("cap", None))
    return JobService(Settings(node_id="t", **settings), {"gpt": Served(spec, models("tiny-gpt2"))})


def job(**fields: Any) -> bytes:
    body = {"id": "g1", "model": "gpt", "task": "generate", "inputs": {"token_ids": PROMPT}, **fields}
    return json.dumps(body).encode()


async def test_partials_come_in_order_and_add_up_to_the_local_text(models: Models) -> None:
    svc, sink = service(models), Collect()
    result = await asyncio.wait_for(svc.handle(job(max_new_tokens=20, stop=[]), sink), 60)
    assert result.ok, result.error
    assert result.output is not None
    local = decode(models("tiny-gpt2").adapter, token_inputs(1, 30, seed=7)["input_ids"], max_new_tokens=20)
    assert result.output["tokens"] == local.tokens
    assert result.output["reason"] == "length"
    assert [p.seq for p in sink.partials] == list(range(len(sink.partials)))
    assert [t for p in sink.partials for t in p.tokens] == result.output["tokens"]
    assert result.final is True
    assert result.seq == len(sink.partials)
    assert result.to_dict()["final"] is True
    for key in ("queue", "prefill", "first_token", "decode", "tokens_per_s"):
        assert key in result.latency_ms


async def test_the_energy_of_a_generate_job_covers_its_decode(models: Models) -> None:
    svc = service(models)  # no sensor here: the CPU-time model, this process's CPU seconds x 4 W
    cpu0 = time.process_time()
    result = await asyncio.wait_for(svc.handle(job(max_new_tokens=200, stop=[]), None), 60)
    cpu_s = time.process_time() - cpu0
    assert result.ok, result.error
    assert result.output is not None
    assert len(result.output["tokens"]) == 200
    assert result.latency_ms["decode"] > 4 * result.latency_ms["prefill"]  # most of the work is the decode
    assert result.energy is not None
    assert result.energy["joules"] >= 0.6 * cpu_s * 4.0, (result.energy, cpu_s)  # before: the prefill's alone


async def test_the_model_s_end_of_text_stops_by_default_and_a_deadline_cuts(models: Models) -> None:
    svc = service(models, max_new_tokens=480)
    greedy = await svc.handle(job(max_new_tokens=40, stop=[]))
    assert greedy.output is not None
    stop = greedy.output["tokens"][3]
    cut = await svc.handle(job(max_new_tokens=40, stop=[stop]))
    assert cut.output is not None
    assert cut.output["reason"] == "stop"
    assert cut.output["tokens"] == greedy.output["tokens"][: greedy.output["tokens"].index(stop) + 1]
    start = time.monotonic()
    # 480 tokens take this model ~0.3 s on a quiet core (more under load); the prefill a few ms
    late = await svc.handle(job(max_new_tokens=480, stop=[], deadline_ms=120))
    assert late.ok, late.error
    assert late.output is not None
    assert late.output["reason"] == "deadline"
    assert 0 < len(late.output["tokens"]) < 480
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    ("fields", "code", "said"),
    [
        ({"temperature": -1}, "bad_request", "temperature"),
        ({"top_k": 0}, "bad_request", "top_k"),
        ({"top_p": 1.5}, "bad_request", "top_p"),
        ({"max_new_tokens": 0}, "bad_request", "max_new_tokens"),
        ({"max_new_tokens": 300}, "bad_request", "from 1 to 256"),
        ({"seed": -3}, "bad_request", "seed"),
        ({"stop": [5000]}, "bad_request", "stop token"),
        ({"temperature": "hot"}, "invalid_job", "temperature"),
        ({"inputs": {"text": "Once upon a time"}}, "bad_request", "no tokenizer"),
        ({"inputs": {"token_ids": [PROMPT, PROMPT]}}, "bad_request", "one prompt"),
        ({"inputs": {"token_ids": PROMPT * 17}, "max_new_tokens": 10}, "too_large", "context of 512"),
    ],
)  # fmt: skip
async def test_bad_values_are_refused_before_any_work(
    models: Models, fields: dict[str, Any], code: str, said: str
) -> None:
    svc = service(models)
    result = await svc.handle(job(**fields))
    assert result.error is not None
    assert (result.error.code, said in result.error.message) == (code, True), result.error


async def test_the_cache_budget_and_the_model_s_cap_are_kept(models: Models) -> None:
    small = await service(models, kv_cache_max_bytes=1 << 16).handle(job(max_new_tokens=100))
    assert small.error is not None
    assert small.error.code == "too_large"
    assert "kv_cache_max_bytes" in small.error.message
    capped = await service(models, cap=8).handle(job(max_new_tokens=9))
    assert capped.error is not None
    assert "from 1 to 8" in capped.error.message
    other = await service(models).handle(job(task="next_token", top_k=3))
    assert other.error is not None
    assert other.error.code == "invalid_job"


async def test_a_slow_broker_gets_coalesced_partials_and_nothing_is_lost() -> None:
    sink = Collect()
    feed = Feed("g", sink, asyncio.get_running_loop())
    made = list(range(100))
    await asyncio.get_running_loop().run_in_executor(None, lambda: [feed.on_token(t) for t in made])
    await asyncio.sleep(0)  # the one wake-up runs
    assert len(sink.partials) <= MAX_WAITING  # nothing acknowledged: at most this many wait
    sink.acked = len(sink.partials)  # the broker catches up
    feed.close()
    assert [t for p in sink.partials for t in p.tokens] == made
    assert [p.seq for p in sink.partials] == list(range(len(sink.partials)))
    assert len(sink.partials) <= MAX_WAITING + 1
