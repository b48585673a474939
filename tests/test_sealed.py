"""Sealed GLOO traffic (clusters with a secret): members read each other, a wrong key or a
changed byte fails the run instead of changing its answer."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from engine.errors import FailureReason, GroupError
from tests.test_rendezvous import relay_stores
from transport.gloo import make_group
from transport.sealed import SealedComm, run_key

pytestmark = pytest.mark.gloo
KEY = run_key(b"k" * 32, "0123456789ab", 1)


def pair(keys: tuple[bytes, bytes], timeout_s: float = 10.0) -> list[SealedComm]:
    """Two ranks of one group; the honest rank of a failing run waits ``timeout_s`` for the other."""
    stores = relay_stores(2)
    comms: dict[int, SealedComm] = {}

    def rank(r: int) -> None:
        comms[r] = SealedComm(make_group(stores[r], r, 2, timeout_s=timeout_s, address="127.0.0.1", prefix="s"))
        comms[r].begin(keys[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return [comms[0], comms[1]]


def both(comms: list[SealedComm], work: Callable[[SealedComm], Any]) -> dict[int, Any]:
    out: dict[int, Any] = {}

    def run(c: SealedComm) -> None:
        try:
            out[c.rank] = work(c)
        except GroupError as exc:
            out[c.rank] = exc

    threads = [threading.Thread(target=run, args=(c,)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_members_exchange_broadcast_and_reduce_through_the_seal() -> None:
    comms = pair((KEY, KEY))
    ids = torch.arange(12, dtype=torch.int16).view(3, 4)

    def job(c: SealedComm) -> Any:
        shared = c.broadcast_tensors({"ids": ids} if c.rank == 0 else None)
        rows = c.exchange(torch.full((2, 3), float(c.rank + 1)), [1 - c.rank], [1 - c.rank], [(2, 3)])
        summed = c.reduce_sum({"x": torch.full((4,), float(c.rank + 1))})
        return shared["ids"], rows[0], summed["x"]

    got = both(comms, job)
    assert torch.equal(got[1][0], ids)
    assert torch.equal(got[0][1], torch.full((2, 3), 2.0))
    assert torch.equal(got[1][1], torch.full((2, 3), 1.0))
    assert torch.equal(got[0][2], torch.full((4,), 3.0))
    assert comms[0].trace.exchange_bytes_sent == 2 * 3 * 4 + 16  # the rows and their tag


def test_a_rank_without_the_key_fails_the_run() -> None:
    comms = pair((KEY, run_key(b"x" * 32, "0123456789ab", 1)), timeout_s=2)
    got = both(comms, lambda c: c.broadcast_tensors({"ids": torch.ones(3)} if c.rank == 0 else None))
    assert isinstance(got[1], GroupError)
    assert "failed authentication" in str(got[1])
    assert got[1].reason is FailureReason.SEALED_REJECTED


def test_a_changed_byte_fails_the_run() -> None:
    comms = pair((KEY, KEY), timeout_s=2)
    honest = comms[0]._seal

    def tampering(data: torch.Tensor, dst: int) -> torch.Tensor:
        sealed = honest(data, dst)
        sealed[0] ^= 1  # one bit flipped on the way
        return sealed

    comms[0]._seal = tampering  # type: ignore[method-assign]
    got = both(comms, lambda c: c.broadcast_tensors({"x": torch.ones(3)} if c.rank == 0 else None))
    assert isinstance(got[1], GroupError)
