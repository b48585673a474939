"""Two real agents find each other over mDNS (127.0.0.1 only) and split jobs over GLOO."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator

import pytest
import torch

from tests.mqtt_env import Agent, agents, ask_node, mosquitto, wait_peer

pytestmark = [pytest.mark.mqtt, pytest.mark.gloo]

CLUSTER = "dtest"
FAST = {"PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_PROBE_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[int, subprocess.Popen[str], subprocess.Popen[str]]]:
    with (
        mosquitto() as port,
        agents(port, CLUSTER, *(Agent(n, ("bert=tiny-bert", "gpt=tiny-gpt2"), env=FAST) for n in ("d1", "d2"))) as (
            a,
            b,
        ),
    ):
        yield port, a, b


def ask(port: int, node: str, jobs: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return ask_node(port, CLUSTER, node, jobs)


def wait_for_peer(port: int, node: str, peer: str, timeout_s: float = 30) -> None:
    wait_peer(port, CLUSTER, node, peer, timeout_s)


def test_agents_discover_each_other_and_split_jobs(
    pair: tuple[int, subprocess.Popen[str], subprocess.Popen[str]],
) -> None:
    port, _, _ = pair
    wait_for_peer(port, "d1", "d2")
    got = ask(
        port,
        "d1",
        [
            {"id": "dist1", "model": "bert", "inputs": {"text": ["hello world", "two"]}, "mode": "distributed"},
            {
                "id": "dist2",
                "model": "gpt",
                "inputs": {"token_ids": [list(range(5, 40))]},
                "mode": "distributed",
                "cr": "full",
                "task": "loglik",
            },
            {"id": "auto1", "model": "bert", "inputs": {"text": ["small batch"]}},
            {
                "id": "dist3",
                "model": "bert",
                "inputs": {"text": ["hello world", "two"]},
                "mode": "distributed",
                "cr": 4,
                "method": "kv",
            },
            {"id": "loc2", "model": "bert", "inputs": {"text": ["hello world", "two"]}, "mode": "local"},
            {
                "id": "loc1",
                "model": "gpt",
                "inputs": {"token_ids": [list(range(5, 40))]},
                "mode": "local",
                "task": "loglik",
            },
        ],
    )
    assert got["dist1"]["mode"] == "distributed"
    assert got["dist1"]["peers"] == ["d2"]
    assert got["dist1"]["cr"] == 8.0
    assert got["dist1"]["fallback"] is False
    assert got["dist1"]["latency_ms"]["exchange_bytes"] > 0  # type: ignore[index]
    assert got["dist2"]["mode"] == "distributed"
    assert got["dist2"]["cr"] == "full"
    # Full exchange is exact: the distributed log-likelihood equals the local one.
    dist_ll = got["dist2"]["output"]["loglik"][0]  # type: ignore[index]
    local_ll = got["loc1"]["output"]["loglik"][0]  # type: ignore[index]
    assert dist_ll == pytest.approx(local_ll, abs=1e-3)
    assert got["auto1"]["mode"] == "local"
    assert "batch 1 < 8" in got["auto1"]["decision"]["reason"]  # type: ignore[index]
    # Method kv through the agents: coded K/V of every row, an answer close to the local one.
    assert got["dist3"]["method"] == "kv"
    assert got["dist3"]["fallback"] is False
    kv_logits = torch.tensor(got["dist3"]["output"]["logits"])  # type: ignore[index]
    local_logits = torch.tensor(got["loc2"]["output"]["logits"])  # type: ignore[index]
    assert float(torch.cosine_similarity(kv_logits, local_logits, dim=1).min()) >= 0.99
    # Forming the group and waiting for the peer's engine (busy with the other splits here) are
    # their own field, not the split's cost: what is left is the run, which holds the compute.
    for split in ("dist1", "dist2", "dist3"):
        ms = got[split]["latency_ms"]
        assert ms["peer_wait"] > 0  # type: ignore[index,operator]
        assert ms["compute"] <= ms["engine"] - ms["peer_wait"] < ms["engine"]  # type: ignore[index,operator]
    assert got["loc1"]["latency_ms"]["peer_wait"] == 0  # type: ignore[index]


def test_peers_command_lists_both_nodes(pair: tuple[int, subprocess.Popen[str], subprocess.Popen[str]]) -> None:
    import sys

    from tests.mqtt_env import REPO

    port, _, _ = pair
    wait_for_peer(port, "d2", "d1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "peers",
            "--broker",
            f"mqtt://127.0.0.1:{port}",
            "--cluster",
            CLUSTER,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    )
    nodes = {n["node"]: n for n in json.loads(out.stdout)}
    assert set(nodes) == {"d1", "d2"}
    assert all(n["status"] == "online" for n in nodes.values())
    assert nodes["d2"]["health"]["peers"] == ["d1"]
    assert nodes["d1"]["health"]["models"] == ["bert", "gpt"]
    link = nodes["d1"]["health"]["links"]["d2"]  # active probes and GLOO transfers
    assert link["rtt_ms"] > 0
    assert link["mbps"] > 0
    assert nodes["d1"]["health"]["load"]["mem_available_mb"] > 0


def test_a_killed_peer_leaves_and_jobs_are_still_answered(
    pair: tuple[int, subprocess.Popen[str], subprocess.Popen[str]],
) -> None:
    port, _, peer = pair
    wait_for_peer(port, "d1", "d2")
    assert (
        ask(port, "d1", [{"id": "pre", "model": "bert", "inputs": {"text": ["x"]}, "mode": "distributed"}])["pre"][
            "mode"
        ]
        == "distributed"
    )
    peer.send_signal(signal.SIGKILL)
    peer.wait(timeout=10)
    got = ask(
        port,
        "d1",
        [{"id": f"post{i}", "model": "bert", "inputs": {"text": ["x"]}, "mode": "distributed"} for i in range(3)],
    )
    for result in got.values():
        assert result["ok"] is True
        assert result["mode"] == "local"
        assert result["fallback"] is True
