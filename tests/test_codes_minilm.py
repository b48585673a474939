"""Method codes on real all-MiniLM-L6-v2 weights: the fidelity command's figures."""

from __future__ import annotations

from engine.adapters import Task
from engine.fidelity import run_fidelity
from engine.inputs import make_inputs
from engine.segments import Compression, Method
from tests.conftest import Models


def test_codes_at_one_eighth_of_the_bytes_keep_minilm_embeddings(models: Models) -> None:
    """What `prism-agent fidelity --model minilm --ranks 2 --cr 8 --method codes` reports (batch 4)."""
    model = models("minilm")
    inputs = make_inputs(model, batch=4)
    comp = Compression(cr=8, method=Method.CODES)
    codes = run_fidelity(model.adapter, "minilm", Task.EMBED, inputs, ranks=2, comp=comp)
    assert codes["method"] == "codes"
    assert codes["mean_cosine"] >= 0.999
    assert codes["bytes_ratio"] <= 0.13
    means = run_fidelity(model.adapter, "minilm", Task.EMBED, inputs, ranks=2, comp=Compression(cr=8))
    assert means["bytes_ratio"] > codes["bytes_ratio"]
    assert means["mean_cosine"] < 0.99 < codes["mean_cosine"]
