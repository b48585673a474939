"""Real all-MiniLM-L6-v2 weights on real English sentences."""

from __future__ import annotations

import pytest
import torch

from engine.adapters import Task
from engine.fidelity import compare
from engine.inputs import make_inputs
from engine.program import plan_job
from engine.segments import Compression
from engine.sim import run_local, run_simulated
from tests.conftest import Models, max_diff


@pytest.fixture(scope="module")
def batch(models: Models) -> dict[str, torch.Tensor]:
    return make_inputs(models("minilm"), batch=24)


def cosine(models: Models, batch: dict[str, torch.Tensor], ranks: int, comp: Compression) -> float:
    model = models("minilm")
    ref = run_local(model.adapter, Task.EMBED, batch).outputs
    spec = plan_job(model.adapter, "minilm", Task.EMBED, batch, ranks=ranks, comp=comp)
    return compare(Task.EMBED, ref, run_simulated(model.adapter, spec, batch).outputs).mean_cosine


def test_real_weights_padded_sentences_are_exact_at_cr1(models: Models, batch: dict[str, torch.Tensor]) -> None:
    assert int((batch["attention_mask"] == 0).sum()) > 0, "the batch should contain padding"
    model = models("minilm")
    ref = run_local(model.adapter, Task.EMBED, batch).outputs
    spec = plan_job(model.adapter, "minilm", Task.EMBED, batch, ranks=3, comp=Compression(cr=1), gather_hidden=True)
    got = run_simulated(model.adapter, spec, batch).outputs
    assert max_diff(got["embedding"], ref["embedding"]) <= 1e-4
    assert max_diff(got["hidden"], ref["hidden"], batch["attention_mask"]) <= 1e-4


def test_embeddings_stay_close_under_compression(models: Models, batch: dict[str, torch.Tensor]) -> None:
    assert cosine(models, batch, 2, Compression(cr=2)) > 0.98
    assert cosine(models, batch, 2, Compression(cr=4)) > cosine(models, batch, 2, Compression(cr=16))


def test_keeping_cls_exact_matters_on_minilm(models: Models) -> None:
    """Attention in MiniLM concentrates on [CLS]; averaging it away costs ~2.5 points of cosine."""
    passages = make_inputs(models("minilm"), batch=12, seq=128)
    with_cls = cosine(models, passages, 2, Compression(cr=8))
    without = cosine(models, passages, 2, Compression(cr=8, keep_first=False))
    assert with_cls > without + 0.01
