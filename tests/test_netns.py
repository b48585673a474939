"""Agents on separate "hosts" (network namespaces on a bridge): real multicast discovery,
a job split across hosts, and a peer SIGKILLed in the middle of a job."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import Testbed, require_netns

pytestmark = [pytest.mark.netns, pytest.mark.mqtt, pytest.mark.gloo]
CLUSTER = "nt"


@pytest.fixture(scope="module")
def bed() -> Iterator[tuple[Testbed, dict[str, subprocess.Popen[bytes]], dict[str, Path]]]:
    require_netns()
    tb = Testbed(3, cluster=CLUSTER, models=["bert=bert-base"]).up()
    try:
        tb.start_broker()
        for i in (1, 2):  # no agent on host 0: it only hosts the broker here
            tb.start_agent(i, env={"PRISM_GROUP_TIMEOUT_S": "20"})
        procs = {key: popen for key in ("broker", "h1", "h2") if (popen := tb.popen(key)) is not None}
        logs = {node: Path(tb.procs[node].log) for node in ("h1", "h2")}
        wait_peer(tb, "h1", "h2")
        yield tb, procs, logs
    finally:
        tb.down(grace_s=5)


def wait_peer(tb: Testbed, node: str, peer: str, timeout_s: float = 120) -> None:
    with tb.watch(tb.topic(f"nodes/{node}/health")) as watch:
        watch.wait_health(node, lambda health: peer in health.get("peers", []), timeout_s)


def ask(tb: Testbed, job: dict[str, object], during: float | None = None, action: object = None) -> dict[str, object]:
    waiter = subprocess.Popen(
        tb.run(
            0,
            "mosquitto_sub",
            "-h",
            tb.address(0),
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            f"prism/v1/{CLUSTER}/results/{job['id']}",
            "-C",
            "1",
            "-W",
            "120",
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    subprocess.run(
        tb.run(
            0,
            "mosquitto_pub",
            "-h",
            tb.address(0),
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            f"prism/v1/{CLUSTER}/nodes/h1/jobs",
            "-m",
            json.dumps(job),
        ),
        check=True,
    )
    if during is not None and callable(action):
        time.sleep(during)
        action()
    out, _ = waiter.communicate(timeout=150)
    assert out.strip(), f"no result for {job['id']}"
    return dict(json.loads(out))


def big_job(job_id: str) -> dict[str, object]:
    return {
        "id": job_id,
        "model": "bert",
        "mode": "distributed",
        "cr": 4,
        "inputs": {"token_ids": [[(7 * i + j) % 30000 + 1000 for j in range(256)] for i in range(8)]},
    }


def test_discovery_over_multicast_and_a_job_across_hosts(
    bed: tuple[Testbed, dict[str, subprocess.Popen[bytes]], dict[str, Path]],
) -> None:
    tb, _, logs = bed
    log = logs["h1"].read_text()
    assert '"via": "mdns"' in log  # found over real multicast on the bridge
    assert '"node": "h2"' in log
    result = ask(
        tb, {"id": "x1", "model": "bert", "inputs": {"token_ids": [[101, 2000, 3000, 102]]}, "mode": "distributed"}
    )
    assert result["ok"] is True
    assert result["mode"] == "distributed"
    assert result["peers"] == ["h2"]
    assert '"address": "10.231.0.3"' in logs["h1"].read_text()


def test_a_peer_killed_mid_job_still_gets_the_job_answered(
    bed: tuple[Testbed, dict[str, subprocess.Popen[bytes]], dict[str, Path]],
) -> None:
    tb, procs, _ = bed
    warm = ask(tb, big_job("warm"))
    assert warm["mode"] == "distributed", warm
    engine_ms = float(warm["latency_ms"]["engine"])  # type: ignore[index]
    victim = procs["h2"]
    result = ask(
        tb, big_job("killed"), during=min(0.5, engine_ms / 3000), action=lambda: victim.send_signal(signal.SIGKILL)
    )
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert result["ok"] is True
    assert result["mode"] == "local"
    assert result["fallback"] is True
    assert "fallback_reason" in result["decision"]  # type: ignore[operator]
    # Typed: the reset of the dead peer's GLOO connection, or its Last Will, whichever came first.
    assert result["fallback_reason"] in ("collective_failed", "peer_offline"), result
    after = ask(tb, big_job("after"))
    assert after["ok"] is True
    assert after["mode"] == "local"
