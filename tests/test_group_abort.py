"""A peer that freezes mid-run (no TCP reset ever comes) is abandoned as soon as it is reported
offline, not after the GLOO timeout: the job is answered locally within seconds."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.mqtt_env import agent, ask_node, mosquitto, pub, sub, wait_peer

pytestmark = [pytest.mark.mqtt, pytest.mark.gloo]

CLUSTER = "gabort"
# A long GLOO timeout, so only the offline report can end the run early.
ENV = {"PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_PROBE_INTERVAL_S": "0.5", "PRISM_GROUP_TIMEOUT_S": "120"}


def job(job_id: str) -> dict[str, object]:
    return {
        "id": job_id,
        "model": "bert",
        "inputs": {"text": ["a frozen peer", "must not hold the job"]},
        "mode": "distributed",
    }


def test_a_peer_reported_offline_mid_run_is_abandoned_at_once() -> None:
    with (
        mosquitto() as port,
        agent(port, CLUSTER, "g1", "bert=tiny-bert", env=ENV),
        agent(port, CLUSTER, "g2", "bert=tiny-bert", env=ENV) as peer,
    ):
        wait_peer(port, CLUSTER, "g1", "g2")
        warm = ask_node(port, CLUSTER, "g1", [job("warm")])["warm"]
        assert warm["mode"] == "distributed"  # the group is formed and works
        peer.send_signal(signal.SIGSTOP)  # frozen: its sockets stay open, no reset will come
        try:
            waiter = sub(port, f"prism/v1/{CLUSTER}/results/#", 1, timeout_s=60)
            time.sleep(0.3)
            pub(port, f"prism/v1/{CLUSTER}/nodes/g1/jobs", json.dumps(job("stuck")))
            time.sleep(3)  # g1 now waits in a collective on the frozen g2
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
