"""In-process runner vs the plain `transformers` model: exact at CR = 1 and full exchange."""

from __future__ import annotations

import pytest
import torch

from engine.adapters import Task
from engine.program import plan_job
from engine.segments import Compression
from engine.sim import run_local, run_simulated
from tests.conftest import Models, inputs_for, max_diff, token_inputs

CASES = [
    ("tiny-vit", Task.CLASSIFY, "logits"),
    ("tiny-vit", Task.FEATURES, "features"),
    ("tiny-bert", Task.CLASSIFY, "logits"),
    ("tiny-bert", Task.EMBED, "embedding"),
    ("tiny-gpt2", Task.NEXT_TOKEN, "logits"),
]


@pytest.mark.parametrize(("name", "task", "key"), CASES)
@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("cr", [None, 1.0], ids=["full", "cr1"])
def test_exact_modes_equal_the_plain_model(
    models: Models, name: str, task: Task, key: str, ranks: int, cr: float | None
) -> None:
    model = models(name)
    inputs = inputs_for(model.adapter.family)
    ref = run_local(model.adapter, task, inputs).outputs
    spec = plan_job(model.adapter, name, task, inputs, ranks=ranks, comp=Compression(cr=cr), gather_hidden=True)
    assert spec.plan.n_tokens % ranks != 0
    got = run_simulated(model.adapter, spec, inputs).outputs
    assert max_diff(got[key], ref[key]) <= 1e-4
    assert max_diff(got["hidden"], ref["hidden"], inputs.get("attention_mask")) <= 1e-4


def test_gpt2_log_likelihood_is_exact_at_cr1(models: Models) -> None:
    model = models("tiny-gpt2")
    inputs = inputs_for("gpt2")
    ref = run_local(model.adapter, Task.LOGLIK, inputs).outputs
    spec = plan_job(model.adapter, "tiny-gpt2", Task.LOGLIK, inputs, ranks=3, comp=Compression(cr=1.0))
    got = run_simulated(model.adapter, spec, inputs).outputs
    assert torch.equal(got["count"], ref["count"])
    assert max_diff(got["loglik"] / got["count"], ref["loglik"] / ref["count"]) <= 1e-5


@pytest.mark.parametrize(("name", "task", "key"), CASES)
def test_compression_sends_fewer_bytes_and_stays_close(models: Models, name: str, task: Task, key: str) -> None:
    model = models(name)
    inputs = inputs_for(model.adapter.family)
    ref = run_local(model.adapter, task, inputs).outputs
    full = run_simulated(
        model.adapter, plan_job(model.adapter, name, task, inputs, ranks=2, comp=Compression()), inputs
    )
    spec = plan_job(model.adapter, name, task, inputs, ranks=2, comp=Compression(cr=4))
    prism = run_simulated(model.adapter, spec, inputs)
    assert prism.exchange_bytes < 0.35 * full.exchange_bytes
    cosine = torch.nn.functional.cosine_similarity(prism.outputs[key].flatten(1), ref[key].flatten(1)).min()
    assert cosine > 0.9
    assert max_diff(prism.outputs[key], ref[key]) > 1e-6  # it is an approximation, not the same run


def test_gpt2_rank0_is_exact_under_compression(models: Models) -> None:
    """Rank 0 sees only its own past, so its positions are exact at any CR."""
    model = models("tiny-gpt2")
    inputs = inputs_for("gpt2")
    ref = run_local(model.adapter, Task.NEXT_TOKEN, inputs).outputs
    spec = plan_job(
        model.adapter, "tiny-gpt2", Task.NEXT_TOKEN, inputs, ranks=2, comp=Compression(cr=8), gather_hidden=True
    )
    got = run_simulated(model.adapter, spec, inputs).outputs
    first = spec.plan.span(0)
    assert max_diff(got["hidden"][:, first.start : first.stop], ref["hidden"][:, first.start : first.stop]) <= 1e-5
    assert max_diff(got["hidden"], ref["hidden"]) > 1e-4


@pytest.mark.parametrize(
    ("name", "task"), [("tiny-vit", Task.CLASSIFY), ("tiny-bert", Task.CLASSIFY), ("tiny-gpt2", Task.NEXT_TOKEN)]
)
def test_reference_is_the_transformers_model_forward(models: Models, name: str, task: Task) -> None:
    """The local baseline (one backbone pass + head) equals the full `transformers` model call."""
    model = models(name)
    inputs = inputs_for(model.adapter.family)
    ref = run_local(model.adapter, task, inputs).outputs["logits"]
    with torch.inference_mode():
        logits = model.adapter.model(**inputs).logits
    if task is Task.NEXT_TOKEN:
        logits = logits[:, -1]
    assert max_diff(ref, logits) <= 1e-5


def test_gpt2_right_padded_batch_is_exact_at_cr1(models: Models) -> None:
    model = models("tiny-gpt2")
    inputs = token_inputs(4, 29, pad_rows={0: 16, 2: 28, 3: 3})
    for task, key in ((Task.NEXT_TOKEN, "logits"), (Task.LOGLIK, "loglik")):
        ref = run_local(model.adapter, task, inputs).outputs
        spec = plan_job(model.adapter, "tiny-gpt2", task, inputs, ranks=3, comp=Compression(cr=1.0))
        got = run_simulated(model.adapter, spec, inputs).outputs
        assert max_diff(got[key], ref[key]) <= 1e-4


def test_keep_last_is_exact_at_cr1(models: Models) -> None:
    model = models("tiny-bert")
    inputs = inputs_for("bert")
    ref = run_local(model.adapter, Task.EMBED, inputs).outputs
    spec = plan_job(model.adapter, "tiny-bert", Task.EMBED, inputs, ranks=3, comp=Compression(cr=1.0, keep_last=True))
    assert max_diff(run_simulated(model.adapter, spec, inputs).outputs["embedding"], ref["embedding"]) <= 1e-4
