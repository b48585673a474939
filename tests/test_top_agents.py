"""``prism-agent top --once --json`` against a real mosquitto and two real agents."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.mqtt_env import REPO, Agent, agents, ask_node, mosquitto, wait_peer

CLUSTER = "toptest"
FAST = {"PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_PROBE_INTERVAL_S": "0.5"}


def top_once(port: int) -> dict[str, Any]:
    """One snapshot, as a script reads it."""
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "top", "--once", "--json", "--broker", f"mqtt://127.0.0.1:{port}",
         "--cluster", CLUSTER],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    snap: dict[str, Any] = json.loads(proc.stdout)
    return snap


@pytest.mark.mqtt
@pytest.mark.gloo
def test_top_once_json_lists_agents_links_and_last_decisions() -> None:
    with (
        mosquitto() as port,
        agents(port, CLUSTER, Agent("t1", env=FAST), Agent("t2", env=FAST)),
    ):
        wait_peer(port, CLUSTER, "t1", "t2")
        text = {"text": ["the quick brown fox jumps over the lazy dog"] * 2}
        jobs = [
            {"id": "top-split", "model": "bert", "inputs": text, "mode": "distributed", "cr": 4},
            {"id": "top-local", "model": "bert", "inputs": text, "mode": "local"},
        ]
        results = ask_node(port, CLUSTER, "t1", jobs)
        assert results["top-split"]["mode"] == "distributed", results["top-split"]

        deadline = time.monotonic() + 30
        while True:  # health comes every 0.5 s; links once a probe has run
            snap = top_once(port)
            ids = {j["id"] for j in snap["jobs"]}
            linked = {(k["node"], k["peer"]) for k in snap["links"] if k["mbps"]}
            if {"top-split", "top-local"} <= ids and {("t1", "t2"), ("t2", "t1")} <= linked:
                break
            assert time.monotonic() < deadline, f"top never showed both jobs and both links: {snap}"
            time.sleep(0.3)

    assert snap["cluster"] == CLUSTER
    assert snap["verified"] is False
    nodes = {n["node"]: n for n in snap["nodes"]}
    assert set(nodes) == {"t1", "t2"}
    for n in nodes.values():
        assert n["status"] == "online"
        assert n["models"] == ["bert"]
        assert n["engine"] >= 1
        assert n["cpus"] >= 1
        assert n["queue"] >= 0
        assert n["health_age_s"] is not None
    assert nodes["t1"]["peers"] == ["t2"]
    link = next(k for k in snap["links"] if (k["node"], k["peer"]) == ("t1", "t2"))
    assert link["source"] == "probe"
    assert link["rtt_ms"] > 0
    assert link["mbps_err"] is not None

    split = next(j for j in snap["jobs"] if j["id"] == "top-split")
    decision = results["top-split"]["decision"]
    assert split["node"] == "t1"
    assert split["ok"] is True
    assert split["mode"] == "distributed"
    assert split["option"] == decision["option"]
    assert split["peers"] == ["t2"]
    assert split["predicted_ms"] == decision["predicted_ms"]  # no map here: None, the interim rule
    assert split["measured_ms"] == pytest.approx(results["top-split"]["latency_ms"]["engine"])
    assert split["fallback"] is False
    assert split["why"] == decision["reason"][:160]
    local = next(j for j in snap["jobs"] if j["id"] == "top-local")
    assert (local["option"], local["peers"]) == ("local", [])
