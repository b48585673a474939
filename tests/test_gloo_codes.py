"""Methods ``codes`` and ``kv`` over real GLOO processes: packed uint8 payloads, same numbers as in-process."""

from __future__ import annotations

import pytest
import torch

from engine.adapters import Task
from engine.coded import payload_bits
from engine.program import plan_job
from engine.segments import Compression, Method
from engine.sim import run_local, run_simulated
from tests.conftest import Models, inputs_for, max_diff
from transport.localcluster import LocalCluster

pytestmark = pytest.mark.gloo

FAMILIES = [
    ("tiny-vit", Task.CLASSIFY, "logits"),
    ("tiny-bert", Task.CLASSIFY, "logits"),
    ("tiny-bert", Task.EMBED, "embedding"),  # padded batch
    ("tiny-gpt2", Task.NEXT_TOKEN, "logits"),
]


@pytest.mark.parametrize(("name", "task", "key"), FAMILIES)
@pytest.mark.parametrize(
    ("method", "ranks", "cr"),
    [(Method.CODES, 2, 8.0), (Method.CODES, 3, 32.0), (Method.CODES, 4, 9.9), (Method.KV, 2, 4.0), (Method.KV, 4, 9.9)],
)
def test_gloo_matches_in_process_runner_with_codes(
    cluster: LocalCluster, models: Models, name: str, task: Task, key: str, method: Method, ranks: int, cr: float
) -> None:
    model = models(name)
    adapter = model.adapter
    inputs = inputs_for(adapter.family)
    spec = plan_job(adapter, name, task, inputs, ranks=ranks, comp=Compression(cr=cr, method=method))
    sim = run_simulated(adapter, spec, inputs)
    real = cluster.run(model, spec, inputs)
    assert max_diff(real.outputs[key], sim.outputs[key]) <= 1e-5
    # What crossed the group is the packed uint8 payloads, byte for byte as budgeted.
    assert [t.exchange_bytes_sent for t in real.traces] == [t.exchange_bytes_sent for t in sim.traces]
    assert [t.exchange_bytes_recv for t in real.traces] == [t.exchange_bytes_recv for t in sim.traces]
    for q, trace in enumerate(real.traces):
        receivers = ranks - 1 - q if adapter.causal else ranks - 1
        bits = payload_bits(spec.plan, spec.comp, spec.batch, q, adapter.hidden_size, adapter.n_layers)
        assert trace.exchange_bytes_sent == bits.nbytes * (adapter.n_layers - 1) * receivers


@pytest.mark.parametrize(("name", "task", "key"), FAMILIES)
def test_gloo_codes_full_exchange_is_exact(
    cluster: LocalCluster, models: Models, name: str, task: Task, key: str
) -> None:
    model = models(name)
    inputs = inputs_for(model.adapter.family)
    ref = run_local(model.adapter, task, inputs).outputs
    spec = plan_job(model.adapter, name, task, inputs, ranks=3, comp=Compression(cr=None, method=Method.CODES))
    assert max_diff(cluster.run(model, spec, inputs).outputs[key], ref[key]) <= 1e-4


def test_gloo_codes_loglik_and_rank0_exact(cluster: LocalCluster, models: Models) -> None:
    model = models("tiny-gpt2")
    inputs = inputs_for("gpt2")
    comp = Compression(cr=16, method=Method.CODES)
    spec = plan_job(model.adapter, "tiny-gpt2", Task.LOGLIK, inputs, ranks=4, comp=comp, gather_hidden=True)
    sim = run_simulated(model.adapter, spec, inputs).outputs
    real = cluster.run(model, spec, inputs).outputs
    assert torch.equal(real["count"], sim["count"])
    assert max_diff(real["loglik"] / real["count"], sim["loglik"] / sim["count"]) <= 1e-5
    ref = run_local(model.adapter, Task.LOGLIK, inputs).outputs["hidden"]
    first = spec.plan.span(0)
    assert max_diff(real["hidden"][:, first.start : first.stop], ref[:, first.start : first.stop]) <= 1e-5
