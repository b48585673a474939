"""Shared fixtures: models load once per session, one GLOO cluster serves every test."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import structlog
import torch

from engine.adapters import Tensors
from engine.models import LoadedModel, load
from transport.localcluster import ClusterConfig, LocalCluster


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# A run killed with SIGTERM (a CI timeout, ``kill``) stops like Ctrl-C: fixtures tear down, so
# no test bed (namespaces, agents, brokers) is left behind.
signal.signal(signal.SIGTERM, _interrupt)


class Models:
    """Loads each model once per test session."""

    def __init__(self) -> None:
        self._cache: dict[str, LoadedModel] = {}

    def __call__(self, name: str) -> LoadedModel:
        if name not in self._cache:
            self._cache[name] = load(name)
        return self._cache[name]


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """A test that configures structlog (the CLI's main does) leaves no configuration behind."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def quick_name_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process nodes on loopback ask whether their mDNS name is taken for 0.1 s rather than
    1 s (twice per start): an answer there takes milliseconds, and these tests are not about
    name conflicts (the namespace bed tests those with the real wait)."""
    from agent.cluster import discovery

    monkeypatch.setattr(discovery, "NAME_CHECK_MS", 100)


@pytest.fixture(scope="session")
def models() -> Models:
    return Models()


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """Four real GLOO ranks on loopback (groups of 2, 3 and 4 share them)."""
    with LocalCluster(ClusterConfig(ranks=4, threads=1, timeout_s=120)) as c:
        yield c


def token_inputs(
    batch: int, n: int, vocab: int = 1000, pad_rows: dict[int, int] | None = None, seed: int = 0
) -> Tensors:
    """Random ids; ``pad_rows`` maps sample -> number of trailing padding tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, n), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in (pad_rows or {}).items():
        mask[row, n - pad :] = 0
        ids[row, n - pad :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(batch: int, size: int = 32, seed: int = 0) -> Tensors:
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=gen)}


def inputs_for(family: str, batch: int = 3, n: int = 37) -> Tensors:
    """Inputs for a tiny model; BERT batches are padded, N is odd (not divisible by P)."""
    if family == "vit":
        return image_inputs(batch)  # 64 patches + CLS = 65 tokens
    if family == "bert":
        return token_inputs(batch, n, pad_rows={1: 9, 2: 3})
    return token_inputs(batch, n)


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """|got - ref| / |ref| over every element (Frobenius norms)."""
    return float((got.float() - ref.float()).norm() / ref.float().norm())


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """max |a - b|, over real tokens only when ``mask`` (B, N) is given."""
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return float((a.float() - b.float()).abs().max())
