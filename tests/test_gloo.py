"""The real GLOO runner: separate processes, rows moving through process groups."""

from __future__ import annotations

import pytest
import torch

from engine.adapters import Task
from engine.errors import BadRequest, GroupError
from engine.models import LoadedModel
from engine.program import plan_job
from engine.segments import Compression
from engine.sim import run_local, run_simulated
from tests.conftest import Models, inputs_for, max_diff
from transport.localcluster import LocalCluster

pytestmark = pytest.mark.gloo

FAMILIES = [
    ("tiny-vit", Task.CLASSIFY, "logits"),
    ("tiny-bert", Task.CLASSIFY, "logits"),
    ("tiny-bert", Task.EMBED, "embedding"),
    ("tiny-gpt2", Task.NEXT_TOKEN, "logits"),
]


@pytest.mark.parametrize(("name", "task", "key"), FAMILIES)
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_gloo_full_exchange_equals_plain_model(
    cluster: LocalCluster, models: Models, name: str, task: Task, key: str, ranks: int
) -> None:
    model = models(name)
    inputs = inputs_for(model.adapter.family)
    ref = run_local(model.adapter, task, inputs).outputs
    for cr in (None, 1.0):
        spec = plan_job(model.adapter, name, task, inputs, ranks=ranks, comp=Compression(cr=cr), gather_hidden=True)
        got = cluster.run(model, spec, inputs).outputs
        assert max_diff(got[key], ref[key]) <= 1e-4
        assert max_diff(got["hidden"], ref["hidden"], inputs.get("attention_mask")) <= 1e-4


@pytest.mark.parametrize(("name", "task", "key"), FAMILIES)
@pytest.mark.parametrize(
    ("ranks", "comp"),
    [
        (2, Compression(cr=4)),
        (3, Compression(cr=3.3, keep_last=True)),
        (4, Compression(cr=8, keep_first=False, count_bias=False)),
    ],
)
def test_gloo_matches_in_process_runner_under_compression(
    cluster: LocalCluster, models: Models, name: str, task: Task, key: str, ranks: int, comp: Compression
) -> None:
    model = models(name)
    inputs = inputs_for(model.adapter.family)
    spec = plan_job(model.adapter, name, task, inputs, ranks=ranks, comp=comp)
    sim = run_simulated(model.adapter, spec, inputs)
    real = cluster.run(model, spec, inputs)
    assert max_diff(real.outputs[key], sim.outputs[key]) <= 1e-5
    # The bytes that crossed the group are exactly those the plan implies.
    assert [t.exchange_bytes_sent for t in real.traces] == [t.exchange_bytes_sent for t in sim.traces]
    assert [t.exchange_bytes_recv for t in real.traces] == [t.exchange_bytes_recv for t in sim.traces]
    assert len(real.traces) == ranks


def test_gloo_loglik_matches_in_process(cluster: LocalCluster, models: Models) -> None:
    model = models("tiny-gpt2")
    inputs = inputs_for("gpt2")
    spec = plan_job(model.adapter, "tiny-gpt2", Task.LOGLIK, inputs, ranks=4, comp=Compression(cr=4))
    sim = run_simulated(model.adapter, spec, inputs).outputs
    real = cluster.run(model, spec, inputs).outputs
    assert torch.equal(real["count"], sim["count"])
    assert max_diff(real["loglik"] / real["count"], sim["loglik"] / sim["count"]) <= 1e-5


def test_bytes_follow_segment_counts(cluster: LocalCluster, models: Models) -> None:
    """BERT, 2 ranks, N = 37, CR = 4, CLS exact: rank 0 sends 1 + ceil(18/4), rank 1 ceil(18/4) rows."""
    model = models("tiny-bert")
    inputs = inputs_for("bert")
    spec = plan_job(model.adapter, "tiny-bert", Task.EMBED, inputs, ranks=2, comp=Compression(cr=4))
    result = cluster.run(model, spec, inputs)
    row = 3 * 64 * 4  # batch x hidden x fp32
    layers = 2
    assert [t.exchange_bytes_sent for t in result.traces] == [6 * row * layers, 5 * row * layers]


def test_a_job_larger_than_the_cluster_is_refused(cluster: LocalCluster, models: Models) -> None:
    model = models("tiny-bert")
    inputs = inputs_for("bert")
    spec = plan_job(model.adapter, "tiny-bert", Task.EMBED, inputs, ranks=5, comp=Compression(cr=4))
    with pytest.raises(BadRequest, match="5 ranks"):
        cluster.run(model, spec, inputs)


def test_a_model_workers_cannot_load_is_reported_and_cluster_keeps_serving(
    cluster: LocalCluster, models: Models
) -> None:
    good = models("tiny-bert")
    bad = LoadedModel("/nonexistent/model-dir", good.adapter, None)
    inputs = inputs_for("bert")
    spec = plan_job(good.adapter, bad.name, Task.EMBED, inputs, ranks=2, comp=Compression(cr=4))
    with pytest.raises(GroupError, match="does not exist"):
        cluster.run(bad, spec, inputs)
    ok_spec = plan_job(good.adapter, good.name, Task.EMBED, inputs, ranks=2, comp=Compression(cr=4))
    assert cluster.run(good, ok_spec, inputs).outputs["embedding"].shape == (3, 64)


def test_wrong_task_is_a_bad_request(models: Models) -> None:
    model = models("tiny-gpt2")
    with pytest.raises(BadRequest, match="does not do 'classify'"):
        plan_job(model.adapter, "tiny-gpt2", Task.CLASSIFY, inputs_for("gpt2"), ranks=2, comp=Compression())


def test_rank0_holding_only_cls_works(cluster: LocalCluster, models: Models) -> None:
    """A weighted plan can leave rank 0 just the CLS token (a slow coordinator)."""
    model = models("tiny-vit")
    inputs = inputs_for("vit")
    spec = plan_job(
        model.adapter, "tiny-vit", Task.CLASSIFY, inputs, ranks=2, comp=Compression(cr=1.0), weights=[1.0, 1000.0]
    )
    assert spec.plan.sizes[0] == 1
    ref = run_local(model.adapter, Task.CLASSIFY, inputs).outputs
    assert max_diff(cluster.run(model, spec, inputs).outputs["logits"], ref["logits"]) <= 1e-4


def test_a_killed_worker_fails_the_job_and_the_cluster_recovers(models: Models) -> None:
    import os
    import signal

    from transport.localcluster import ClusterConfig

    model = models("tiny-bert")
    inputs = inputs_for("bert")
    spec = plan_job(model.adapter, "tiny-bert", Task.EMBED, inputs, ranks=2, comp=Compression(cr=4))
    with LocalCluster(ClusterConfig(ranks=2, timeout_s=10)) as small:
        small.run(model, spec, inputs)
        os.kill(small.worker_pids[0], signal.SIGKILL)
        with pytest.raises(GroupError):
            small.run(model, spec, inputs)
        again = small.run(model, spec, inputs)  # re-spawned workers, fresh groups
        assert small.restarts == 1
        assert again.outputs["embedding"].shape == (3, 64)
