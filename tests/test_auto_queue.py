"""The coordinator's view of a peer's queue: its own previous run is no rival (agent/jobs/auto.py).

A peer's health counts every rank its engine holds or awaits; a coordinator whose last split
still showed there priced its next split as if the peer were busy with someone else's work."""

from __future__ import annotations

import asyncio

from agent.base.config import Settings
from agent.base.engine import Engine
from agent.cluster.peers import Peer, PeerTable
from agent.jobs.auto import AutoPolicy
from policy.decide import Request
from tests.policy_maps import synthetic_map


def peer(queue: int, queue_for: dict[str, int]) -> Peer:
    return Peer(node="p", cluster="c", address="10.0.0.2", models={"m": 1.0}, queue=queue, queue_for=queue_for)


def test_my_own_ranks_on_a_peer_do_not_make_it_look_busy() -> None:
    auto = AutoPolicy(Settings(node_id="me"), {"m": 1.0}, synthetic_map(), None)
    links = {"p": {"mbps": 1000.0, "rtt_ms": 0.1}}

    def choice(p: Peer) -> tuple[str, float | None]:
        got = auto.decide(Request("m", 4, 128), [p], links, 0.0, 1)
        assert got is not None
        return got.option, got.predicted_ms

    idle = choice(peer(0, {}))
    assert idle[0] != "local"
    assert choice(peer(1, {"me": 1})) == idle  # my previous run's rank
    assert choice(peer(1, {"other": 1}))[0] == "local"  # another coordinator's rank: a rival


def test_a_peer_that_answered_busy_is_priced_busy_until_its_next_health() -> None:
    auto = AutoPolicy(Settings(node_id="me"), {"m": 1.0}, synthetic_map(), None)
    links = {"p": {"mbps": 1000.0, "rtt_ms": 0.1}}
    table = PeerTable("c", me="me")
    table.seen(peer(0, {}), now_s=0)

    def option() -> str:
        got = auto.decide(Request("m", 4, 128), table.able("m", 1.0, now_s=1), links, 0.0, 1)
        assert got is not None
        return got.option

    assert option() != "local"
    table.busy("p", 1)
    assert option() == "local"
    table.seen(peer(0, {}), now_s=1)  # its health: free again
    assert option() != "local"


def test_the_engine_counts_the_ranks_it_holds_and_awaits_per_coordinator() -> None:
    async def scenario() -> None:
        engine = Engine()
        try:
            async with engine.slot("rank 1 of g1", 1.0, "a"):
                waiting = asyncio.ensure_future(_hold(engine, "rank 2 of g2", "b"))
                await asyncio.sleep(0)
                assert engine.depth == 2
                assert engine.depth_for() == {"a": 1, "b": 1}
                assert engine.jobs == 0  # ranks of splits only: a reserve queues behind them
            await waiting
            assert engine.depth == 0
            assert engine.depth_for() == {}
            async with engine.slot("a local job"):
                assert engine.depth_for() == {}  # a node's own work belongs to no coordinator
                assert engine.jobs == 1  # and a reserve is answered busy while it holds the engine
        finally:
            engine.shutdown()

    asyncio.run(scenario())


async def _hold(engine: Engine, what: str, owner: str) -> None:
    async with engine.slot(what, 1.0, owner):
        pass
