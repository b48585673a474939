"""A peer whose engine is busy with its own work says so at once (``busy``): the coordinator
neither waits ``group_timeout_s`` with its own engine held nor suspends that healthy peer. The
split runs locally with the typed reason ``peer_busy``, the coordinator's next local job is not
held up, and a split with the peer works again as soon as it is free (agent/cluster/reserve.py)."""

from __future__ import annotations

import json
import time

import pytest

from tests.mqtt_env import Agent, agents, ask_node, logged, mosquitto, pub, sub, wait_logged, wait_peer
from tests.test_metrics import scrape, value
from transport.localcluster import free_port

pytestmark = [pytest.mark.mqtt, pytest.mark.gloo]

CLUSTER = "pbusy"
ENV = {"PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_PROBE_INTERVAL_S": "0.5"}  # group_timeout_s: 10 s
GROUP_S = 10.0
# The peer's long local job: bert-base (random weights from its config) on 8 x 256 tokens,
# seconds of engine time on one torch thread.
BIG = {"id": "big", "model": "big", "inputs": {"token_ids": [[7 + i % 900 for i in range(256)]] * 8}}


def split(job_id: str) -> dict[str, object]:
    return {"id": job_id, "model": "bert", "inputs": {"text": ["a busy peer", "says so"]}, "mode": "distributed"}


def test_a_busy_peer_says_so_at_once_and_is_not_suspended() -> None:
    metrics_port = free_port()
    coordinator_env = {**ENV, "PRISM_METRICS_PORT": str(metrics_port)}
    peer_models = ("bert=tiny-bert", "big=bert-base")
    with (
        mosquitto() as port,
        agents(port, CLUSTER, Agent("y1", env=coordinator_env), Agent("y2", peer_models, env=ENV)) as (
            coordinator,
            peer,
        ),
    ):
        wait_peer(port, CLUSTER, "y1", "y2")
        assert ask_node(port, CLUSTER, "y1", [split("warm")])["warm"]["mode"] == "distributed"  # the group is formed
        results = sub(port, f"prism/v1/{CLUSTER}/results/#", 3, timeout_s=120)
        pub(port, f"prism/v1/{CLUSTER}/nodes/y2/jobs", json.dumps(BIG))
        wait_logged(peer, "job_started", 30, job="big")  # the peer's engine is taken by it now
        asked = time.monotonic()
        pub(port, f"prism/v1/{CLUSTER}/nodes/y1/jobs", json.dumps(split("split")))
        pub(port, f"prism/v1/{CLUSTER}/nodes/y1/jobs", json.dumps({**split("mine"), "mode": "local"}))
        answered: dict[str, tuple[dict[str, object], float]] = {}
        while len(answered) < 3:
            result = json.loads(results.next(120))
            answered[result["id"]] = (result, time.monotonic() - asked)
        results.close()

        got, took = answered["split"]
        assert (got["ok"], got["mode"], got["fallback"], got["fallback_reason"]) == (True, "local", True, "peer_busy")
        assert "y2" in got["decision"]["fallback_reason"]  # type: ignore[index,operator]
        assert value(scrape(metrics_port), "prism_fallbacks_total", reason="peer_busy") == 1  # counted before sent
        assert took < GROUP_S / 2, took  # not the grant's wait
        # Neither the split nor the coordinator's own next job waited for the peer's long job.
        assert list(answered)[-1] == "big", list(answered)
        assert answered["mine"][0]["ok"] is True

        # The peer is free again: a split with it works at once, no 30 s sitting out.
        again = ask_node(port, CLUSTER, "y1", [split("again")], timeout_s=GROUP_S)["again"]
        assert (again["mode"], again["fallback"], again["peers"]) == ("distributed", False, ["y2"])
        assert not logged(coordinator, "peer_suspended")
