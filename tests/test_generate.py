"""GPT-2 writes text: a split prefill leaves the coordinator every position's K/V, and the
local decode from it gives the text a local run gives (tiny GPT-2, real GLOO for the split)."""

from __future__ import annotations

import time

import pytest

from engine.adapters import Task
from engine.errors import BadRequest
from engine.generate import Sampling, cache_bytes, decode
from engine.plan import PartitionPlan
from engine.program import plan_job, spec_from_dict, spec_to_dict
from engine.segments import Compression, Method
from engine.sim import run_local, run_simulated
from tests.conftest import Models, max_diff, token_inputs
from transport.localcluster import LocalCluster

NEW = 24


def test_a_root_last_plan_puts_rank_0_on_the_final_block() -> None:
    plan = PartitionPlan.equal(40, 3).root_last()
    assert [plan.span(r) for r in (1, 2, 0)] == [range(13), range(13, 26), range(26, 40)]
    assert plan.last_rank == 0
    assert plan.precedes(2, 0)
    assert not plan.precedes(0, 1)
    assert [plan.later(r) for r in range(3)] == [0, 2, 1]
    assert plan.owner(39) == 0
    assert plan.owner(0) == 1
    with pytest.raises(BadRequest, match="order"):
        PartitionPlan((3, 3), (1, 1))


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_full_exchange_prefill_holds_the_local_cache_and_writes_the_same_text(models: Models, ranks: int) -> None:
    adapter = models("tiny-gpt2").adapter
    inputs = token_inputs(1, 41)
    ref = run_local(adapter, Task.GENERATE, inputs).outputs["past_kv"]
    spec = plan_job(adapter, "tiny-gpt2", Task.GENERATE, inputs, ranks=ranks, comp=Compression(cr=None))
    got = run_simulated(adapter, spec, inputs).outputs["past_kv"]
    assert got.shape == ref.shape  # (layers, K/V, 1, heads, N, d)
    assert max_diff(got, ref) <= 1e-5  # position by position: the decode drops the last and computes it again
    local = decode(adapter, inputs["input_ids"], max_new_tokens=NEW)
    split = decode(adapter, inputs["input_ids"], max_new_tokens=NEW, past=got)
    assert split.tokens == local.tokens
    assert len(local.tokens) == NEW
    assert local.reason == "length"


@pytest.mark.parametrize(
    "comp", [Compression(cr=8, method=Method.CODES), Compression(cr=4, method=Method.KV), Compression(cr=4)]
)
def test_every_method_leaves_one_cache_row_per_prompt_position(models: Models, comp: Compression) -> None:
    adapter = models("tiny-gpt2").adapter
    inputs = token_inputs(1, 41, seed=3)
    spec = plan_job(adapter, "tiny-gpt2", Task.GENERATE, inputs, ranks=3, comp=comp)
    past = run_simulated(adapter, spec, inputs).outputs["past_kv"]
    assert past.shape[-2] == 41  # segment means stand once for every position they cover
    made = decode(adapter, inputs["input_ids"], max_new_tokens=8, past=past)
    assert len(made.tokens) == 8


@pytest.mark.gloo
@pytest.mark.parametrize("comp", [Compression(cr=None), Compression(cr=4, method=Method.KV)])
def test_over_gloo_the_coordinator_ends_the_prefill_with_the_cache(
    cluster: LocalCluster, models: Models, comp: Compression
) -> None:
    model = models("tiny-gpt2")
    inputs = token_inputs(1, 37, seed=5)
    spec = plan_job(model.adapter, "tiny-gpt2", Task.GENERATE, inputs, ranks=2, comp=comp)
    spec = spec_from_dict(spec_to_dict(spec))  # as it travels between agents
    assert spec.plan.order == (1, 0)
    real = cluster.run(model, spec, inputs).outputs
    sim = run_simulated(model.adapter, spec, inputs).outputs
    assert max_diff(real["past_kv"], sim["past_kv"]) <= 1e-5
    assert max_diff(real["logits"], sim["logits"]) <= 1e-5


def test_generate_takes_one_prompt(models: Models) -> None:
    adapter = models("tiny-gpt2").adapter
    with pytest.raises(BadRequest, match="one prompt"):
        plan_job(adapter, "tiny-gpt2", Task.GENERATE, token_inputs(2, 20), ranks=2, comp=Compression(cr=None))


def test_the_same_seed_writes_the_same_text_and_stops_are_kept(models: Models) -> None:
    adapter = models("tiny-gpt2").adapter
    ids = token_inputs(1, 30, seed=7)["input_ids"]
    warm = Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    first = decode(adapter, ids, max_new_tokens=NEW, sampling=warm).tokens
    assert decode(adapter, ids, max_new_tokens=NEW, sampling=warm).tokens == first
    other = decode(adapter, ids, max_new_tokens=NEW, sampling=Sampling(temperature=0.9, top_k=40, seed=12)).tokens
    assert other != first
    greedy = decode(adapter, ids, max_new_tokens=NEW).tokens
    stop = greedy[4]
    cut = decode(adapter, ids, max_new_tokens=NEW, stop_ids=(stop,))
    assert cut.reason == "stop"
    assert cut.tokens == greedy[: greedy.index(stop) + 1]
    streamed: list[int] = []
    # A deadline already passed when the decode starts: it stops after the one token a decode makes.
    late = decode(adapter, ids, max_new_tokens=400, deadline=time.monotonic(), on_token=streamed.append)
    assert late.reason == "deadline"
    assert len(late.tokens) == 1
    assert streamed == late.tokens


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p")],
)
def test_bad_sampling_values_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        Sampling(**kwargs)  # type: ignore[arg-type]


def test_the_cache_is_counted_in_bytes(models: Models) -> None:
    adapter = models("tiny-gpt2").adapter  # 2 layers, 64 wide, fp32
    assert cache_bytes(adapter, 100) == 2 * 2 * 100 * 64 * 4
