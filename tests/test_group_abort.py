"""A peer that freezes mid-run (no TCP reset ever comes) is abandoned as soon as it is reported
offline, not after the GLOO timeout: the job is answered locally within seconds."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.mqtt_env import Agent, agents, ask_node, mosquitto, pub, sub, wait_peer

pytestmark = [pytest.mark.mqtt, pytest.mark.gloo]

CLUSTER = "gabort"
# Long group and collective timeouts and a long silence limit (no beats from the frozen peer
# would otherwise fail the run after 3 s): only the offline report can end the run early.
ENV = {
    "PRISM_HEALTH_INTERVAL_S": "0.5",
    "PRISM_PROBE_INTERVAL_S": "0.5",
    "PRISM_GROUP_TIMEOUT_S": "120",
    "PRISM_COLLECTIVE_TIMEOUT_S": "120",
    "PRISM_PEER_SILENCE_S": "120",
}


def job(job_id: str) -> dict[str, object]:
    return {
        "id": job_id,
        "model": "bert",
        "inputs": {"text": ["a frozen peer", "must not hold the job"]},
        "mode": "distributed",
    }


def started(proc: subprocess.Popen[str], job_id: str, timeout_s: float) -> None:
    """Until the agent's log says it started ``job_id`` with a peer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in Path(proc.log_path).read_text().splitlines():  # type: ignore[attr-defined]
            if '"job_started"' in line and job_id in line:
                event = json.loads(line)
                assert event["peers"], event  # the job is split, not run alone
                return
        time.sleep(0.05)
    raise AssertionError(f"{job_id} not started in {timeout_s} s")


def test_a_peer_reported_offline_mid_run_is_abandoned_at_once() -> None:
    with (
        mosquitto() as port,
        agents(port, CLUSTER, Agent("g1", env=ENV), Agent("g2", env=ENV)) as (coordinator, peer),
    ):
        wait_peer(port, CLUSTER, "g1", "g2")
        warm = ask_node(port, CLUSTER, "g1", [job("warm")])["warm"]
        assert warm["mode"] == "distributed"  # the group is formed and works
        peer.send_signal(signal.SIGSTOP)  # frozen: its sockets stay open, no reset will come
        try:
            waiter = sub(port, f"prism/v1/{CLUSTER}/results/#", 1, timeout_s=60)
            pub(port, f"prism/v1/{CLUSTER}/nodes/g1/jobs", json.dumps(job("stuck")))
            started(coordinator, "stuck", timeout_s=30)
            time.sleep(1)  # into the run: g1 waits on the frozen g2, and nothing but the report ends that
            reported = time.monotonic()
            pub(port, f"prism/v1/{CLUSTER}/nodes/g2/status", "offline")  # what the broker's Last Will says
            out, err = waiter.communicate(timeout=90)
            answered_after = time.monotonic() - reported
        finally:
            peer.send_signal(signal.SIGCONT)
        result = json.loads(out.splitlines()[0]) if out.strip() else {}
        assert result.get("id") == "stuck", err
        assert result["ok"] is True
        assert result["mode"] == "local"
        assert result["fallback"] is True
        assert "went offline" in result["decision"]["fallback_reason"]
        assert answered_after < 15  # the GLOO timeout is 120 s
