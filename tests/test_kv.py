"""Method ``kv`` in the in-process runner: coded K/V of every row, receivers project nothing."""

from __future__ import annotations

import pytest
import torch

from engine.adapters import Task
from engine.coded import payload_bits
from engine.cost import block_macs_rank, macs_reduction, rank_macs
from engine.errors import BadRequest
from engine.fidelity import planned_bytes, run_fidelity
from engine.inputs import make_inputs
from engine.plan import PartitionPlan
from engine.program import plan_job, spec_from_dict, spec_to_dict
from engine.segments import Compression, Method
from engine.sim import run_local, run_simulated
from tests.conftest import Models, inputs_for, max_diff, rel_diff
from tests.test_codes import CASES as CODES_CASES

CASES = [case for case in CODES_CASES if case[:2] != ("tiny-bert", Task.CLASSIFY)]


def kv(cr: float | None) -> Compression:
    return Compression(cr=cr, method=Method.KV)


def test_kv_is_a_method_that_travels_in_the_spec(models: Models) -> None:
    assert Compression(cr=4, method="kv").method is Method.KV  # type: ignore[arg-type]
    assert kv(4).coded
    assert kv(4).uses_kv
    assert not kv(4).uses_codes
    assert not kv(None).coded
    assert kv(4).label() == "kv cr=4"
    with pytest.raises(BadRequest, match="does not apply to method 'kv'"):
        Compression(cr=4, method=Method.KV, wire_dtype="fp16")
    adapter = models("tiny-bert").adapter
    spec = plan_job(adapter, "tiny-bert", Task.EMBED, inputs_for("bert"), ranks=3, comp=kv(4))
    assert spec_from_dict(spec_to_dict(spec)) == spec
    with pytest.raises(BadRequest, match="too tight for method 'kv'"):
        plan_job(adapter, "tiny-bert", Task.EMBED, inputs_for("bert"), ranks=2, comp=kv(40))


@pytest.mark.parametrize(("name", "task", "key"), CASES)
@pytest.mark.parametrize("ranks", [2, 4])
def test_at_eight_bits_outputs_are_close_and_bytes_are_the_budget(
    models: Models, name: str, task: Task, key: str, ranks: int
) -> None:
    adapter = models(name).adapter
    inputs = inputs_for(adapter.family)
    ref = run_local(adapter, task, inputs).outputs
    spec = plan_job(adapter, name, task, inputs, ranks=ranks, comp=kv(2), gather_hidden=True)
    for q in range(ranks):
        assert payload_bits(spec.plan, spec.comp, spec.batch, q, adapter.hidden_size, adapter.n_layers).b == 8
    result = run_simulated(adapter, spec, inputs)
    got = result.outputs
    assert rel_diff(got[key], ref[key]) <= 2e-3
    mask = inputs.get("attention_mask")
    assert max_diff(got["hidden"], ref["hidden"], mask) > 1e-7  # coded, not exact
    # Each sender sends its 1/CR of full-exchange bytes (layer 0 is rebuilt), once per receiver.
    coded_layers = adapter.n_layers - 1
    for q, trace in enumerate(result.traces):
        receivers = ranks - 1 - q if adapter.causal else ranks - 1
        bits = payload_bits(spec.plan, spec.comp, spec.batch, q, adapter.hidden_size, adapter.n_layers)
        assert bits.rows == 2 * spec.batch * spec.plan.sizes[q]  # a K row and a V row per token
        assert trace.exchange_bytes_sent == bits.nbytes * coded_layers * receivers
        full = spec.batch * spec.plan.sizes[q] * adapter.hidden_size * 4 * adapter.n_layers
        assert bits.nbytes * coded_layers <= full / 2
    assert planned_bytes(adapter, spec, inputs) == result.exchange_bytes


@pytest.mark.parametrize(("name", "task", "key"), CASES)
def test_chunks_and_overlap_give_the_same_bits(models: Models, name: str, task: Task, key: str) -> None:
    adapter = models(name).adapter
    inputs = inputs_for(adapter.family, batch=4)
    one = plan_job(adapter, name, task, inputs, ranks=3, comp=kv(6), overlap=False)
    many = plan_job(adapter, name, task, inputs, ranks=3, comp=kv(6), overlap=True, chunks=2)
    a, b = run_simulated(adapter, one, inputs), run_simulated(adapter, many, inputs)
    assert max_diff(a.outputs[key], b.outputs[key]) <= 1e-6
    assert a.exchange_bytes == b.exchange_bytes
    full = sum(4 * one.batch * n * adapter.hidden_size * adapter.n_layers * 2 for n in one.plan.sizes)
    if not adapter.causal:  # below 8 bits nearly all of every sender's 1/6 is used
        assert 0.97 * full / 6 <= a.exchange_bytes <= full / 6


def test_receivers_project_no_remote_row(models: Models, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under kv every projection a rank makes after layer 0 is of its own rows; codes project all."""
    adapter = models("tiny-bert").adapter
    inputs = inputs_for("bert")
    projected: list[int] = []
    real = adapter.project

    def counting(i: int, x_q: torch.Tensor, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if i > 0:
            projected.append(x_kv.shape[1])
        return real(i, x_q, x_kv)

    monkeypatch.setattr(adapter, "project", counting)
    spec = plan_job(adapter, "tiny-bert", Task.EMBED, inputs, ranks=2, comp=kv(4), overlap=False)
    run_simulated(adapter, spec, inputs)
    assert sorted(projected) == sorted(list(spec.plan.sizes) * (adapter.n_layers - 1))


def test_kv_costs_what_segment_means_cost() -> None:
    """ViT-B, P = 2 to 4: kv's block MACs are within 3.5 % of Segment Means' (the attention over
    every row, less the means' K/V) and well under codes' (no received row projected)."""
    for ranks, saving in ((2, 0.15), (3, 0.24), (4, 0.30)):
        plan = PartitionPlan.equal(197, ranks)
        means = max(rank_macs(plan, Compression(cr=9.9), d=768, f=4))
        coded = max(rank_macs(plan, Compression(cr=8, method=Method.CODES), d=768, f=4))
        keyval = max(rank_macs(plan, kv(4), d=768, f=4))
        assert keyval <= 1.035 * means
        assert keyval <= (1 - saving) * coded
    plan = PartitionPlan.equal(12, 3)
    assert rank_macs(plan, kv(4), d=8, f=4) == [block_macs_rank(4, 8, 8, 4, projects_received=False)] * 3
    assert macs_reduction(plan, kv(4), d=8, f=4, causal=True) > macs_reduction(plan, kv(4), d=8, f=4)


@pytest.mark.parametrize(("ranks", "cr", "floor"), [(2, 4, 0.9995), (4, 4, 0.999), (2, 8, 0.99), (4, 8, 0.985)])
def test_minilm_keeps_its_embeddings(models: Models, ranks: int, cr: float, floor: float) -> None:
    """What `prism-agent fidelity --model minilm --method kv --cr 4` reports (real weights)."""
    model = models("minilm")
    report = run_fidelity(model.adapter, "minilm", Task.EMBED, make_inputs(model, batch=4), ranks=ranks, comp=kv(cr))
    assert report["method"] == "kv"
    assert report["mean_cosine"] >= floor
    assert report["bytes_ratio"] <= 1 / cr
