"""A formed GLOO group listens no more, on real groups in one process; and the descriptor
ceiling at which a node drops its groups."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from agent.cluster.group import open_descriptors
from agent.cluster.upkeep import descriptor_ceiling
from tests.test_rendezvous import relay_stores
from transport.gloo import GlooComm, make_group
from transport.listener import listening_sockets

pytestmark = pytest.mark.gloo


def test_a_formed_group_refuses_strangers_and_still_runs() -> None:
    stores, comms, ports = relay_stores(2), {}, {0: [], 1: []}  # type: ignore[var-annotated]
    listening = set(listening_sockets())

    def rank(r: int) -> None:
        group = make_group(stores[r], r, 2, timeout_s=10, address="127.0.0.1", prefix="l", closed_ports=ports[r])
        comms[r] = GlooComm(group)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(len(p) == 1 for p in ports.values()), ports  # one listener per member, closed
    assert set(listening_sockets()) == listening
    held = open_descriptors()
    for port in [*ports[0], *ports[1]] * 200:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert open_descriptors() == held
    sums: dict[int, float] = {}

    def reduce(c: GlooComm) -> None:
        sums[c.rank] = float(c.reduce_sum({"x": torch.full((4,), float(c.rank + 1))})["x"][0])

    threads = [threading.Thread(target=reduce, args=(comms[r],)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sums[0] == 3.0


@pytest.mark.parametrize(
    ("baseline", "soft", "ceiling"),
    [
        (40, 65536, 552),  # the start's count plus the slack
        (40, 1024, 552),
        (300, 1024, 768),  # a quarter of a low limit kept free
        (100, 256, 192),
    ],
)
def test_descriptor_ceiling(baseline: int, soft: int, ceiling: int) -> None:
    assert descriptor_ceiling(baseline, soft) == ceiling
