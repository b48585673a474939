"""oneDNN linears (engine/kernels.py): the same answers as BLAS, on the paths they are meant for."""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from engine import kernels
from engine.adapters import Tensors
from engine.errors import ModelError
from engine.inputs import make_inputs
from engine.models import LoadedModel, build
from engine.program import plan_job
from engine.segments import Compression
from engine.sim import run_local, run_simulated

X86 = platform.machine().lower() in ("x86_64", "amd64")


def test_the_mode_comes_from_the_environment_and_a_bad_value_is_named() -> None:
    assert kernels.mode({}) == "auto"
    assert kernels.mode({"PRISM_CPU_LINEAR": " BLAS "}) == "blas"
    assert not kernels.wanted({"PRISM_CPU_LINEAR": "blas"})
    with pytest.raises(ModelError, match="PRISM_CPU_LINEAR must be one of auto, onednn, blas, got 'mkl'"):
        kernels.mode({"PRISM_CPU_LINEAR": "mkl"})


@pytest.mark.skipif(not X86, reason="auto picks oneDNN on x86-64 only")
def test_auto_routes_every_linear_of_a_loaded_model_through_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRISM_CPU_LINEAR", raising=False)
    adapter = build("tiny-bert").adapter
    linears = [m for m in adapter.model.modules() if isinstance(m, nn.Linear)]
    assert linears
    assert all(type(m) is kernels.OneDnnLinear for m in linears)
    assert adapter.onednn
    monkeypatch.setenv("PRISM_CPU_LINEAR", "blas")
    plain = build("tiny-bert").adapter
    assert not plain.onednn
    assert not any(type(m) is kernels.OneDnnLinear for m in plain.model.modules())


def _answers(model: LoadedModel, inputs: Tensors) -> list[Tensors]:
    """The local answer and a codes split's (remote rows through the folded K/V map)."""
    adapter = model.adapter
    task = adapter.default_task()
    spec = plan_job(adapter, model.name, task, inputs, ranks=2, comp=Compression(cr=4, method="codes"))
    return [run_local(adapter, task, inputs).outputs, run_simulated(adapter, spec, inputs).outputs]


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-bert"])
def test_onednn_and_blas_give_the_same_answer_local_and_split(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISM_CPU_LINEAR", "onednn")
    fast = build(name)
    monkeypatch.setenv("PRISM_CPU_LINEAR", "blas")
    plain = build(name)
    assert fast.adapter.onednn
    assert not plain.adapter.onednn
    inputs = make_inputs(plain, 3, None if name == "tiny-vit" else 24, 0, raw_pixels=True)
    for got, want in zip(_answers(fast, inputs), _answers(plain, inputs), strict=True):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_with_gradients_on_the_layer_takes_the_autograd_path() -> None:
    layer = nn.Linear(8, 4)
    layer.__class__ = kernels.OneDnnLinear
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    assert x.grad.shape == (3, 8)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not kernels._HAS_PACK, reason="this torch cannot prepack oneDNN weights")
def test_a_packed_weight_gives_the_same_bits_is_built_once_and_follows_changes_to_the_weight() -> None:
    layer = nn.Linear(96, 160)
    with torch.inference_mode():
        for rows in (1, 10, 99, 197):
            x = torch.randn(2, rows, 96)
            unpacked = torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
            assert torch.equal(kernels.linear(x, layer.weight, layer.bias), unpacked)
        first = kernels.packed(layer.weight)
        assert kernels.packed(layer.weight) is first  # kept on the weight, not rebuilt per call
    with torch.no_grad():
        layer.weight.mul_(2)  # changed in place: the packed copy must not serve the old values
    with torch.inference_mode():
        x = torch.randn(4, 96)
        assert kernels.packed(layer.weight) is not first
        torch.testing.assert_close(kernels.linear(x, layer.weight, layer.bias), x @ layer.weight.T + layer.bias)
    view = layer.weight.view(160, 96)
    assert kernels.packed(view) is view  # a per-call reshape is not worth packing


@pytest.mark.skipif(not (X86 and kernels._HAS_PACK), reason="auto picks oneDNN on x86-64 only")
def test_a_loaded_model_has_its_linear_weights_packed_before_its_first_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRISM_CPU_LINEAR", raising=False)
    adapter = build("tiny-vit").adapter
    linears = [m for m in adapter.model.modules() if isinstance(m, nn.Linear)]
    assert all(hasattr(m.weight, kernels._PACKED) for m in linears)
    kernels.drop_packed(adapter.model)  # what engine.models.to_device does before a move
    assert not any(hasattr(m.weight, kernels._PACKED) for m in linears)
