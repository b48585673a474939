"""CPU kernels: a model's ``nn.Linear`` layers through oneDNN on x86 CPUs.

On one thread, MKL's GEMM (what ``F.linear`` calls on CPU) loses speed as the rows shrink:
a 768 -> 3072 projection costs 52 µs a row at 1,576 rows (vit-base, batch 8, the whole
model), 58 at 196 (a split rank's chunk of 2 samples) and 65 at 99 (a split rank's share of
one image). oneDNN's kernels (``torch.ops.mkldnn._linear_pointwise``, the ones
``torch.compile`` emits for CPU linears) take 46, 47 and 53: faster at every size, and
nearly flat down to ~200 rows (docs/benchmarks.md §7). The outputs differ from MKL's in
the last bits only (summation order: ~2e-6 per projection of unit-scale rows).

Given a plain weight, that kernel reorders it into oneDNN's blocked layout on every call, a
cost that does not shrink with the rows. :func:`packed` does it once per weight and keeps
the result on the weight (as ``torch.compile`` prepacks): 4-5 % off a projection at 197
rows, 5-11 % at 99, a third at 10 (the received segment rows' K/V). The outputs are the
same bit for bit (vit-base's hidden rows at batch 1 and 8), except that a one-row product
may move in its last bit (vit-base's logits at batch 1: 1.3e-6). The price is a second copy
of every linear weight (vit-base: 816 MB resident after loading, against 484 with
``PRISM_CPU_LINEAR=blas``).

:func:`use_onednn` swaps the class of every plain ``nn.Linear`` of a model for
:class:`OneDnnLinear`, so the plain `transformers` forward (the local path) and the
engine's split both use it. It applies only where it helps and is safe: fp32 tensors on
the CPU, gradients off; anything else (CUDA, half precision, training) takes
``nn.Linear``'s own path. ``PRISM_CPU_LINEAR`` picks it: ``auto`` (default: oneDNN on
x86-64 CPUs with oneDNN in torch), ``onednn`` (wherever torch has oneDNN), ``blas``
(never).
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from engine.errors import ModelError

#: Values ``PRISM_CPU_LINEAR`` may take.
MODES = ("auto", "onednn", "blas")


#: Whether this torch has oneDNN and its fused-linear op.
_HAS_KERNEL = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")  # type: ignore[no-untyped-call]

#: Whether it can also prepack weights.
_HAS_PACK = _HAS_KERNEL and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")

#: Rows oneDNN picks the packed layout for. Measured on x86-64 (AVX-512), one thread: 16 is
#: as fast as any hint from 10 to 396 rows; 1 is no faster than no packing at all.
PACK_ROWS = 16

_PACKED = "_prism_packed"  # attribute of a weight holding ((data_ptr, version), packed copy)


def packed(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's blocked layout for :func:`linear`: built once, kept on the weight,
    rebuilt if the weight is changed in place (its version moves) or moved. Views (a weight
    reshaped per call) and torches without the op get the plain weight back."""
    if not _HAS_PACK or weight._base is not None:
        return weight
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor keeps no version; nothing here changes one in place
        version = -1
    key = (weight.data_ptr(), version)
    cached = getattr(weight, _PACKED, None)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS))
        setattr(weight, _PACKED, cached)
    return cached[1]


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` whose CPU fp32 inference forward runs oneDNN's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, onednn: bool = True) -> torch.Tensor:
    """``F.linear`` (x @ weight^T + bias); through oneDNN when ``onednn`` and the tensors are
    ones :class:`OneDnnLinear` takes that way."""
    if (
        onednn
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and _HAS_KERNEL
    ):
        return torch.ops.mkldnn._linear_pointwise(x, packed(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)


def mode(env: dict[str, str] | None = None) -> str:
    """The configured mode (``PRISM_CPU_LINEAR``); a bad value is a ModelError."""
    value = (os.environ if env is None else env).get("PRISM_CPU_LINEAR", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ModelError(f"PRISM_CPU_LINEAR must be one of {', '.join(MODES)}, got {value!r}")
    return value


def wanted(env: dict[str, str] | None = None) -> bool:
    """Whether models loaded now get oneDNN linears (see the module docstring)."""
    chosen = mode(env)
    if chosen == "blas" or not _HAS_KERNEL:
        return False
    return chosen == "onednn" or platform.machine().lower() in ("x86_64", "amd64")


def uses_onednn(model: Any) -> bool:
    """Whether :func:`use_onednn` was applied to ``model``."""
    return any(type(module) is OneDnnLinear for module in model.modules())


def drop_packed(model: Any) -> None:
    """Free the packed copies of ``model``'s weights (before it moves off the CPU)."""
    for param in model.parameters():
        if hasattr(param, _PACKED):
            delattr(param, _PACKED)


def use_onednn(model: Any) -> int:
    """Route every plain ``nn.Linear`` of ``model`` through oneDNN (in place), weights packed
    now for those on the CPU in fp32 (so the first job does not pay for it); how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDnnLinear
            if module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
                with torch.no_grad():
                    packed(module.weight)
            count += 1
    return count
