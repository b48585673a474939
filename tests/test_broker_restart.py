"""A mosquitto restart during a stream of jobs loses no job: real broker (with persistence),
two real agents, one client streaming over a persistent session."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from agent.base.config import Broker
from agent.client import stream
from tests.mqtt_env import Agent, Mosquitto, agents, logged, mosquitto_process, wait_logged, wait_online

pytestmark = pytest.mark.mqtt

CLUSTER = "restart"
JOBS = 200
RESTART_AT = (50, 120)  # results in when the broker is restarted


async def stream_with_restarts(broker: Mosquitto, jobs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """Stream ``jobs``; restart the broker each time RESTART_AT results are in.

    Returns the results and how many had come in at each restart."""
    progress = asyncio.Event()
    count = 0

    def on_result(_result: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        progress.set()

    run = asyncio.create_task(
        stream(Broker("127.0.0.1", broker.port), CLUSTER, jobs, in_flight=8, timeout_s=120, on_result=on_result)
    )
    at_restart = []
    for threshold in RESTART_AT:
        while count < threshold and not run.done():
            progress.clear()
            await asyncio.wait({run, asyncio.ensure_future(progress.wait())}, return_when=asyncio.FIRST_COMPLETED)
        assert not run.done(), f"the stream ended before {threshold} results: {run}"
        at_restart.append(count)
        await asyncio.to_thread(broker.restart)
    return await run, at_restart


def test_two_broker_restarts_mid_stream_lose_no_job(tmp_path: Path) -> None:
    conf = f"persistence true\npersistence_location {tmp_path}/\nautosave_interval 1\n"
    env = {"PRISM_RECONNECT_MAX_S": "0.5"}
    jobs = [
        {"id": f"s{i:03d}", "model": "bert", "inputs": {"text": [f"job number {i}"]}, "mode": "local"}
        for i in range(JOBS)
    ]
    with (
        mosquitto_process(extra_conf=conf) as broker,
        agents(broker.port, CLUSTER, Agent("r1", env=env), Agent("r2", env=env)) as (first, second),
    ):
        results, at_restart = asyncio.run(stream_with_restarts(broker, jobs))
        assert all(n < JOBS for n in at_restart), at_restart  # both restarts hit a running stream
        assert [r["id"] for r in results] == [j["id"] for j in jobs]
        assert all(r["ok"] is True for r in results), [r for r in results if not r["ok"]][:3]
        assert {r["node"] for r in results} == {"r1", "r2"}  # the shared subscription spread them
        for proc, node in ((first, "r1"), (second, "r2")):
            # Back after each restart: a node the other served the stream's tail for may still be
            # reconnecting when the last result comes (the retained `online` is the old one).
            wait_logged(proc, "mqtt_connected", 30, count=3)  # re-published `online` each time
            wait_online(broker.port, CLUSTER, node, timeout_s=30)
            assert len(logged(proc, "mqtt_reconnect")) >= 2, node  # said so, once per restart at least
            ran = Counter(e["job"] for e in logged(proc, "job_done"))
            assert max(ran.values()) == 1, ran.most_common(3)  # a redelivered job is not run again
