"""Method ``codes`` in the in-process runner: exactness, error at 8 bits, bytes as budgeted."""

from __future__ import annotations

import pytest
import torch

from engine.adapters import Task
from engine.codec import GAUSSIAN_REL_ERROR, rotation
from engine.coded import payload_bits
from engine.cost import macs_reduction, received_rows
from engine.errors import BadRequest
from engine.fidelity import full_bytes, job_fidelity, planned_bytes
from engine.plan import PartitionPlan
from engine.program import RankProgram, plan_job, spec_from_dict, spec_to_dict, split_inputs
from engine.segments import Compression, Method
from engine.sim import run_local, run_simulated
from tests.conftest import Models, inputs_for, max_diff, rel_diff

CASES = [
    ("tiny-vit", Task.CLASSIFY, "logits"),
    ("tiny-bert", Task.CLASSIFY, "logits"),
    ("tiny-bert", Task.EMBED, "embedding"),  # padded batch
    ("tiny-gpt2", Task.NEXT_TOKEN, "logits"),
]


def codes(cr: float | None) -> Compression:
    return Compression(cr=cr, method=Method.CODES)


# -- the method as data -------------------------------------------------------------------------
def test_method_parses_strings_and_refuses_unknown_ones() -> None:
    assert Compression(cr=8, method="codes").method is Method.CODES  # type: ignore[arg-type]
    assert Compression(cr=8).method is Method.MEANS
    assert Compression(cr=None, method=Method.CODES).is_full
    assert not Compression(cr=None, method=Method.CODES).uses_codes
    assert codes(8).label() == "codes cr=8"
    assert Compression(cr=8).label() == "cr=8"
    with pytest.raises(BadRequest, match="unknown exchange method"):
        Compression(cr=8, method="topk")  # type: ignore[arg-type]


def test_spec_carries_the_method_and_old_specs_mean_means(models: Models) -> None:
    model = models("tiny-bert")
    inputs = inputs_for("bert")
    spec = plan_job(model.adapter, "tiny-bert", Task.EMBED, inputs, ranks=3, comp=codes(8))
    data = spec_to_dict(spec)
    assert data["method"] == "codes"
    assert spec_from_dict(data) == spec
    old = {k: v for k, v in data.items() if k != "method"}
    assert spec_from_dict(old).comp.method is Method.MEANS
    with pytest.raises(BadRequest):
        spec_from_dict({**data, "method": "nope"})


def test_a_budget_below_one_bit_per_value_is_refused_when_planned(models: Models) -> None:
    model = models("tiny-bert")
    inputs = inputs_for("bert")
    with pytest.raises(BadRequest, match="too tight for method 'codes'"):
        plan_job(model.adapter, "tiny-bert", Task.EMBED, inputs, ranks=2, comp=codes(64))


# -- the math ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-bert", "tiny-gpt2"])
def test_rotated_kv_equals_kv_of_the_plain_rows(models: Models, name: str) -> None:
    adapter = models(name).adapter
    x = torch.randn(2, 5, adapter.hidden_size)
    with torch.inference_mode():
        for i in range(adapter.n_layers):
            _, k, v = adapter.project(i, x, x)
            rk, rv = adapter.rotated_kv(i, x @ rotation(adapter.hidden_size))
            assert max_diff(rk, k) <= 1e-5
            assert max_diff(rv, v) <= 1e-5


def test_vit_ranks_get_the_whole_image_under_codes(models: Models) -> None:
    adapter = models("tiny-vit").adapter
    inputs = inputs_for("vit")
    means = plan_job(adapter, "tiny-vit", Task.CLASSIFY, inputs, ranks=3, comp=Compression(cr=4))
    coded = plan_job(adapter, "tiny-vit", Task.CLASSIFY, inputs, ranks=3, comp=codes(4))
    shared_m, local_m = split_inputs(adapter, means, inputs)
    shared_c, local_c = split_inputs(adapter, coded, inputs)
    assert shared_m == {}
    assert torch.equal(shared_c["pixel_values"], inputs["pixel_values"])
    with torch.inference_mode():
        for r in range(3):
            span = coded.plan.span(r)
            own = adapter.embed(shared_m, local_m[r], span)
            assert torch.equal(adapter.embed(shared_c, local_c[r], span), own)


def test_payloads_are_packed_bytes_of_a_size_every_rank_knows(models: Models) -> None:
    adapter = models("tiny-bert").adapter
    inputs = inputs_for("bert")
    spec = plan_job(adapter, "tiny-bert", Task.EMBED, inputs, ranks=2, comp=codes(8), overlap=False)  # one chunk
    shared, local = split_inputs(adapter, spec, inputs)
    with torch.inference_mode():
        sender, receiver = (RankProgram(adapter, spec, r, shared, local[r]) for r in range(2))
        h = sender.embed()
        x, first = sender.send(0, h)
        assert first.numel() == 0  # layer 0 is rebuilt, not sent
        assert not sender.exchanges(0)
        h = sender.finish(0, h, x, [receiver.send(0, receiver.embed())[1]])
        _, payload = sender.send(1, h)
    assert payload.dtype == torch.uint8
    assert sender.exchanges(1)
    assert receiver.recv_shape(1, 0) == tuple(payload.shape) == (sender.coded.payload_bytes(0, 1),)  # type: ignore[union-attr]


# -- runs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "task", "key"), CASES)
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_full_exchange_stays_exact_whatever_the_method(
    models: Models, name: str, task: Task, key: str, ranks: int
) -> None:
    model = models(name)
    inputs = inputs_for(model.adapter.family)
    ref = run_local(model.adapter, task, inputs).outputs
    spec = plan_job(model.adapter, name, task, inputs, ranks=ranks, comp=codes(None), gather_hidden=True)
    got = run_simulated(model.adapter, spec, inputs)
    means_spec = plan_job(model.adapter, name, task, inputs, ranks=ranks, comp=Compression())
    means = run_simulated(model.adapter, means_spec, inputs)
    assert max_diff(got.outputs[key], ref[key]) <= 1e-4
    assert max_diff(got.outputs["hidden"], ref["hidden"], inputs.get("attention_mask")) <= 1e-4
    assert torch.equal(got.outputs[key], means.outputs[key])
    assert got.exchange_bytes == means.exchange_bytes


@pytest.mark.parametrize(("name", "task", "key"), CASES)
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_at_eight_bits_outputs_are_within_quantisation_error(
    models: Models, name: str, task: Task, key: str, ranks: int
) -> None:
    model = models(name)
    adapter = model.adapter
    inputs = inputs_for(adapter.family)
    ref = run_local(adapter, task, inputs).outputs
    spec = plan_job(adapter, name, task, inputs, ranks=ranks, comp=codes(4), gather_hidden=True)
    for q in range(ranks):
        assert payload_bits(spec.plan, spec.comp, spec.batch, q, adapter.hidden_size, adapter.n_layers).b == 8
    got = run_simulated(adapter, spec, inputs).outputs
    # 8-bit codes reconstruct rows to ~0.9 % (GAUSSIAN_REL_ERROR[8]); the outputs drift far less.
    assert rel_diff(got[key], ref[key]) <= GAUSSIAN_REL_ERROR[8] / 10
    mask = inputs.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones(got["hidden"].shape[:2], dtype=torch.bool)
    assert rel_diff(got["hidden"][real], ref["hidden"][real]) <= GAUSSIAN_REL_ERROR[8] / 10
    assert max_diff(got["hidden"], ref["hidden"], mask) > 1e-7  # coded, not exact


@pytest.mark.parametrize(("name", "task", "key"), CASES)
@pytest.mark.parametrize(("ranks", "cr"), [(2, 8.0), (3, 16.0), (4, 32.0), (3, 9.9)])
def test_bytes_on_the_wire_are_exactly_the_budget(
    models: Models, name: str, task: Task, key: str, ranks: int, cr: float
) -> None:
    model = models(name)
    adapter = model.adapter
    inputs = inputs_for(adapter.family)
    spec = plan_job(adapter, name, task, inputs, ranks=ranks, comp=codes(cr))
    result = run_simulated(adapter, spec, inputs)
    coded_layers = adapter.n_layers - 1
    for q, trace in enumerate(result.traces):
        receivers = ranks - 1 - q if adapter.causal else ranks - 1
        bits = payload_bits(spec.plan, spec.comp, spec.batch, q, adapter.hidden_size, adapter.n_layers)
        assert trace.exchange_bytes_sent == bits.nbytes * coded_layers * receivers
        full = spec.batch * spec.plan.sizes[q] * adapter.hidden_size * 4 * adapter.n_layers
        assert bits.nbytes * coded_layers <= full / cr  # the sender's budget, over the layers
        assert bits.nbytes * coded_layers >= 0.97 * full / cr  # and nearly all of it is used
    recv = [t.exchange_bytes_recv for t in result.traces]
    assert sum(recv) == result.exchange_bytes
    assert result.exchange_bytes <= full_bytes(adapter, spec) / cr


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-bert", "tiny-gpt2"])
def test_full_bytes_is_what_full_exchange_measures(models: Models, name: str) -> None:
    model = models(name)
    inputs = inputs_for(model.adapter.family)
    task = model.adapter.tasks[0]
    ref = run_local(model.adapter, task, inputs).outputs
    for ranks in (2, 3):
        spec = plan_job(model.adapter, name, task, inputs, ranks=ranks, comp=Compression())
        result = run_simulated(model.adapter, spec, inputs)
        assert full_bytes(model.adapter, spec) == result.exchange_bytes
        assert job_fidelity(model.adapter, spec, ref, result)["bytes_ratio"] == 1.0
        coded = plan_job(model.adapter, name, task, inputs, ranks=ranks, comp=codes(8))
        report = job_fidelity(model.adapter, coded, ref, run_simulated(model.adapter, coded, inputs))
        assert report["method"] == "codes"
        assert 0.12 <= report["bytes_ratio"] <= 1 / 8


@pytest.mark.parametrize(("name", "task", "key"), CASES)
def test_planned_bytes_are_the_measured_bytes(models: Models, name: str, task: Task, key: str) -> None:
    model = models(name)
    inputs = inputs_for(model.adapter.family)
    comps = [Compression(), Compression(cr=3.3, keep_last=True), Compression(cr=8, keep_first=False), codes(9.9)]
    for ranks in (2, 4):
        for comp in comps:
            spec = plan_job(model.adapter, name, task, inputs, ranks=ranks, comp=comp)
            measured = run_simulated(model.adapter, spec, inputs).exchange_bytes
            assert planned_bytes(model.adapter, spec, inputs) == measured


@pytest.mark.parametrize("comp", [codes(32), Compression(cr=8, method=Method.KV)])
def test_gpt2_rank0_stays_exact_and_the_last_rank_sends_nothing(models: Models, comp: Compression) -> None:
    model = models("tiny-gpt2")
    inputs = inputs_for("gpt2")
    ref = run_local(model.adapter, Task.NEXT_TOKEN, inputs).outputs
    spec = plan_job(model.adapter, "tiny-gpt2", Task.NEXT_TOKEN, inputs, ranks=3, comp=comp, gather_hidden=True)
    got = run_simulated(model.adapter, spec, inputs)
    first = spec.plan.span(0)
    hidden = got.outputs["hidden"]
    assert max_diff(hidden[:, first.start : first.stop], ref["hidden"][:, first.start : first.stop]) <= 1e-5
    assert max_diff(hidden, ref["hidden"]) > 1e-5
    assert got.traces[-1].exchange_bytes_sent == 0
    assert got.traces[0].exchange_bytes_recv == 0


def test_gpt2_loglik_under_codes_is_close(models: Models) -> None:
    model = models("tiny-gpt2")
    inputs = inputs_for("gpt2")
    ref = run_local(model.adapter, Task.LOGLIK, inputs).outputs
    spec = plan_job(model.adapter, "tiny-gpt2", Task.LOGLIK, inputs, ranks=4, comp=codes(4))
    got = run_simulated(model.adapter, spec, inputs).outputs
    assert torch.equal(got["count"], ref["count"])
    assert max_diff(got["loglik"] / got["count"], ref["loglik"] / ref["count"]) <= 1e-3


# -- cost -------------------------------------------------------------------------------------
def test_codes_receive_every_row_and_pay_for_the_rotation() -> None:
    plan = PartitionPlan.equal(197, 2)
    assert received_rows(plan, codes(8), causal=False) == received_rows(plan, Compression(), causal=False)
    full = macs_reduction(plan, Compression(), d=768, f=4)
    coded = macs_reduction(plan, codes(8), d=768, f=4)
    means = macs_reduction(plan, Compression(cr=8), d=768, f=4)
    rotation_share = (197 / 2) * 768 * 768 / ((4 + 8) * 197 * 768 * 768 + 2 * 197 * 197 * 768)
    assert coded == pytest.approx(full - rotation_share)
    assert coded < full < means
    causal = PartitionPlan.equal(12, 3)
    assert received_rows(causal, codes(8), causal=True) == [0, 4, 8]
