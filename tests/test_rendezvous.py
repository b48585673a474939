"""The relay rendezvous store and per-collective deadlines, on real GLOO groups in one process."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from engine.errors import GroupError
from transport.deadline import DeadlineGroup
from transport.gloo import GlooComm, make_group
from transport.rendezvous import RelayStore

pytestmark = pytest.mark.gloo


def relay_stores(size: int, timeout_s: float = 10.0) -> list[RelayStore]:
    """Stores that hand every key to the other members, as agents do over MQTT."""
    stores: list[RelayStore] = []

    def publisher(me: int):  # type: ignore[no-untyped-def]
        def publish(key: str, value: bytes) -> None:
            for rank, store in enumerate(stores):
                if rank != me:
                    store.deliver(key, value)

        return publish

    stores.extend(RelayStore(publisher(r), timeout_s) for r in range(size))
    return stores


def form(stores: list[RelayStore], floor_s: float | None = None, timeout_s: float = 10.0) -> list[GlooComm]:
    """One GLOO group over ``stores``, each rank formed in its own thread, as on separate nodes."""
    comms: dict[int, GlooComm] = {}

    def rank(r: int) -> None:
        group = make_group(stores[r], r, len(stores), timeout_s=timeout_s, address="127.0.0.1", prefix="g")
        comms[r] = GlooComm(group if floor_s is None else DeadlineGroup(group, floor_s))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return [comms[r] for r in range(len(stores))]


def test_three_ranks_form_a_group_with_no_store_server() -> None:
    comms = form(relay_stores(3))
    sums: dict[int, float] = {}

    def rank(c: GlooComm) -> None:
        out = c.reduce_sum({"x": torch.full((4,), float(c.rank + 1))})
        sums[c.rank] = float(out["x"][0])

    threads = [threading.Thread(target=rank, args=(c,)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sums[0] == 6.0  # 1 + 2 + 3, reduced onto rank 0


def test_first_writer_wins_and_a_missing_key_times_out() -> None:
    store = RelayStore(lambda k, v: None, timeout_s=0.3)
    store.deliver("0/0", b"real")
    store.deliver("0/0", b"replayed")
    assert store.get("0/0") == b"real"
    start = time.monotonic()
    with pytest.raises(GroupError, match="did not arrive"):
        store.get("0/1")
    assert time.monotonic() - start < 2.0


def test_a_closed_store_wakes_its_waiter() -> None:
    store = RelayStore(lambda k, v: None, timeout_s=30)
    threading.Timer(0.2, store.close, args=("dropped",)).start()
    with pytest.raises(GroupError, match="dropped"):
        store.get("never")


def test_a_silent_peer_fails_the_collective_at_its_deadline_not_the_group_timeout() -> None:
    comms = form(relay_stores(2), floor_s=1.0)
    start = time.monotonic()
    with pytest.raises(GroupError, match="timed out"):
        comms[0].reduce_sum({"x": torch.ones(4)})  # rank 1 never joins in
    assert time.monotonic() - start < 3.0  # the group's own timeout is 10 s


def _fail_and_free(drain: bool) -> float:
    """Seconds the thread that frees a group blocks, the group's collective having been given
    up on (rank 1 never joins in; the group's own timeout is 3 s)."""
    comms: list[GlooComm | None] = list(form(relay_stores(2), floor_s=0.3, timeout_s=3.0))
    rank0 = comms[0]
    assert rank0 is not None
    with pytest.raises(GroupError, match="timed out"):
        rank0.reduce_sum({"x": torch.ones(4)})
    deadline = rank0.group
    assert isinstance(deadline, DeadlineGroup)
    if drain:
        deadline.drain(10.0)  # on an agent: its reaper thread
    del deadline, rank0
    gc.collect()
    start = time.monotonic()
    comms[0] = None  # rank 0's last reference (rank 1 stays, connected, as a live peer would)
    return time.monotonic() - start


def test_a_given_up_collective_is_drained_so_freeing_its_group_never_blocks() -> None:
    # A failed run's group is dropped while its collective is still pending inside GLOO (until
    # the group's own timeout). Whoever drops the last reference waits for it: the event loop
    # froze for seconds when a traceback held it there. Drained first, the drop is instant.
    assert _fail_and_free(drain=False) > 1.0  # the hazard
    assert _fail_and_free(drain=True) < 0.5
