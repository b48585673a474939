"""The coordinator's reservation of its peers' engines (agent/cluster/reserve.py), driven with a
scripted peer: a busy answer ends the wait at once and frees the coordinator's own engine; only a
peer that says nothing at all is taken for unresponsive. The real agents are in tests/test_peer_busy.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agent.base.engine import Engine
from agent.cluster.beats import Silence
from agent.cluster.group import Group, Timing
from agent.cluster.reserve import Reservations
from engine.errors import FailureReason, GroupError
from transport.control import Busy, Control, Grant, Release, Reserve
from transport.rendezvous import RelayStore

GROUP_S = 0.5


class ScriptedPeer:
    """The control channel, with peer ``b`` answering each ``reserve`` as told."""

    def __init__(self, group: Group, silence: Silence, answer: str) -> None:
        self.group, self.silence, self.answer = group, silence, answer
        self.told: list[tuple[str, Control]] = []

    async def tell(self, to: str, msg: Control) -> None:
        self.told.append((to, msg))
        if isinstance(msg, Reserve):
            asyncio.get_running_loop().call_soon(self._answer, to, msg.run)

    def _answer(self, node: str, run: int) -> None:
        if self.answer == "beats":  # an older peer, queued behind its own work: beats, never grants in time
            self.silence.heard(self.group.gid, node, time.monotonic())
            return
        reply = {"grant": Grant(gid=self.group.gid, run=run), "busy": Busy(gid=self.group.gid, run=run, queue=2)}
        if self.answer in reply:
            self.group.grants[(run, node)].set_result(reply[self.answer])


async def reserve(answer: str) -> tuple[Any, list[tuple[str, Any]], ScriptedPeer, Engine, float]:
    """Take the engines of group (a, b) as a, with b answering ``answer``: what came of it, the
    callbacks made, what was told, the engine and how long it took."""
    engine, silence = Engine(), Silence(3.0, stall_s=10.0)
    group = Group("0123456789ab", ("a", "b"), 0, RelayStore(lambda key, value: None, 1.0))
    peer = ScriptedPeer(group, silence, answer)
    calls: list[tuple[str, Any]] = []
    timing = Timing(group_s=GROUP_S)
    on_unresponsive, on_busy = (lambda n: calls.append(("unresponsive", n))), (lambda *a: calls.append(("busy", a)))
    reservations = Reservations("a", engine, peer, silence, timing, on_unresponsive, on_busy)  # type: ignore[arg-type]
    start = time.monotonic()
    try:
        async with reservations.engines(group, 1) as slot:
            outcome: Any = slot.what
    except GroupError as exc:
        outcome = exc.reason
    took = time.monotonic() - start
    engine.shutdown()
    return outcome, calls, peer, engine, took


@pytest.mark.parametrize(
    ("answer", "outcome", "calls", "quick"),
    [
        ("grant", "rank 0 of 0123456789ab", [], True),
        ("busy", FailureReason.PEER_BUSY, [("busy", ("b", 2))], True),  # not suspended: priced busy
        ("beats", FailureReason.GRANT_TIMEOUT, [("busy", ("b", 1))], False),  # there, so not suspended
        ("nothing", FailureReason.GRANT_TIMEOUT, [("unresponsive", "b")], False),  # said nothing: sits out
    ],
)
async def test_a_peers_answer_decides_how_long_the_coordinator_waits_and_whether_it_is_blamed(
    answer: str, outcome: object, calls: list[tuple[str, object]], quick: bool
) -> None:
    got, made, peer, engine, took = await reserve(answer)
    assert got == outcome
    assert made == calls
    assert (took < GROUP_S / 5) is quick, took  # a busy peer ends the wait at once
    assert engine.depth == 0  # the coordinator's own engine is free again (after the run, for a grant)
    released = [msg for to, msg in peer.told if isinstance(msg, Release)]
    assert released == ([] if answer == "grant" else [Release(gid="0123456789ab", run=1)])
