"""A forming GLOO group hears only its members and a formed one listens no more, on real groups
in one process; and the descriptor ceiling at which a node drops its groups."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from agent.cluster.group import open_descriptors
from agent.cluster.upkeep import descriptor_ceiling
from testbed.rogue import burst
from tests.test_rendezvous import relay_stores
from transport.gloo import GlooComm, make_group
from transport.listener import listening_sockets
from transport.rendezvous import RelayStore
from transport.sockfilter import admit_program

pytestmark = pytest.mark.gloo


def summed(comms: dict[int, GlooComm]) -> float:
    """Rank 0's sum of 1 and 2 (each rank's number plus one), reduced over the group."""
    sums: dict[int, float] = {}

    def reduce(c: GlooComm) -> None:
        sums[c.rank] = float(c.reduce_sum({"x": torch.full((4,), float(c.rank + 1))})["x"][0])

    threads = [threading.Thread(target=reduce, args=(c,)) for c in comms.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return sums[0]


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
    assert summed(comms) == 3.0


def test_a_forming_group_hears_only_its_members() -> None:
    """Rank 0 waits for rank 1 with its port open; strangers (127.0.0.3) who find the port get no
    connection and cost no descriptor (without the filter gloo kept each one open)."""
    published, stores = threading.Event(), []

    def to(r: int):  # type: ignore[no-untyped-def]
        def publish(key: str, value: bytes) -> None:
            stores[1 - r].deliver(key, value)
            published.set()

        return publish

    stores.extend(RelayStore(to(r), 20) for r in (0, 1))
    listening, comms = set(listening_sockets()), {}

    def rank(r: int) -> None:
        group = make_group(stores[r], r, 2, timeout_s=20, address="127.0.0.1", prefix="a", admit=["127.0.0.1"])
        comms[r] = GlooComm(group)

    threads = [threading.Thread(target=rank, args=(0,))]
    threads[0].start()
    assert published.wait(20)  # rank 0 is in the group's constructor, waiting for rank 1
    (port,) = [port for fd, (_, port) in listening_sockets().items() if fd not in listening]
    held = open_descriptors()
    assert burst("127.0.0.1", [port], 300, source="127.0.0.3", wait_s=0.1) == {
        "connects": 0,
        "refused": 0,
        "timeouts": 300,
    }
    assert open_descriptors() == held
    assert burst("127.0.0.1", [port], 1, source="127.0.0.1")["connects"] == 1  # a member's address gets in
    threads.append(threading.Thread(target=rank, args=(1,)))
    threads[1].start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(comms) == [0, 1]
    assert set(listening_sockets()) == listening  # formed: closed
    assert summed(comms) == 3.0


@pytest.mark.parametrize("addresses", [[], ["::1"], ["10.0.0.300"], [f"10.0.{i // 250}.{i % 250}" for i in range(251)]])
def test_a_listener_filter_needs_a_few_ipv4_addresses(addresses: list[str]) -> None:
    with pytest.raises(ValueError, match="a listener admits"):
        admit_program(addresses)


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
