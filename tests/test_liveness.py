"""Unsigned goodbyes: checks de-duplicated and rate-limited (pure), and a full probe server
read as "unknown", never as "gone" (a real probe server, a real Observer)."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.cluster.admission import Admission
from agent.cluster.health import Observer, status_payload
from agent.cluster.liveness import CHECK_EVERY_S, Checks
from agent.cluster.peers import Peer, PeerTable
from agent.cluster.probes import GREETING, ProbeServer
from agent.cluster.trust import Trust

SECRET = b"0123456789abcdef-cluster-secret"


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([("begin", "b", 0.0)], [True]),
        ([("begin", "b", 0.0), ("begin", "b", 0.1)], [True, False]),  # one at a time
        ([("begin", "b", 0.0), ("end", "b", 1.0), ("begin", "b", 5.0)], [True, None, False]),  # rate-limited
        ([("begin", "b", 0.0), ("end", "b", 1.0), ("begin", "b", CHECK_EVERY_S)], [True, None, True]),
        ([("begin", "b", 0.0), ("begin", "c", 0.0)], [True, True]),  # per node
        ([("begin", "b", 0.0), ("begin", "b", 60.0)], [True, False]),  # still running: never two
    ],
)
def test_checks_of_a_node_run_one_at_a_time_and_at_most_once_a_period(
    steps: list[tuple[str, str, float]], expected: list[bool | None]
) -> None:
    checks = Checks()
    got = [checks.begin(node, t) if op == "begin" else checks.end(node) for op, node, t in steps]
    assert got == expected


@pytest.mark.timeout(30)
async def test_a_flood_of_unsigned_goodbyes_with_the_probe_server_full_drops_nothing() -> None:
    gone: list[set[str]] = []
    spawned: list[asyncio.Task[None]] = []
    table = PeerTable("lab", "a")
    observer = Observer(
        "a", "lab", table, Trust(Admission(SECRET, "lab")), gone.append,
        lambda coro, name: spawned.append(asyncio.get_running_loop().create_task(coro, name=name)),
    )  # fmt: skip
    async with ProbeServer("127.0.0.1", max_connections=2) as server:
        held = []
        for _ in range(2):  # every slot held, greeted, as an attacker would
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(GREETING)
            await reader.readexactly(len(GREETING))
            held.append(writer)
        table.seen(Peer("b", "lab", "127.0.0.1", probe_port=server.port), time.monotonic())
        unsigned = status_payload(Trust(Admission(None, "lab")), "b", "offline")
        for _ in range(50):
            observer.status("b", unsigned)
            observer.check("b")  # an mDNS goodbye
        assert len(spawned) == 1  # one check, however many goodbyes
        await asyncio.wait_for(spawned[0], 10)
        assert server.refused >= 1  # the check found the server full
        for writer in held:
            writer.transport.abort()
    assert not gone
    assert [p.node for p in table.alive(time.monotonic())] == ["b"]
