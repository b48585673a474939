"""A peer that freezes mid-run (no TCP reset ever comes) is abandoned as soon as it is reported
offline, not after the GLOO timeout: the job is answered locally within seconds. A peer
SIGKILLed mid-split does the same through the broker's Last Will; either fallback's result
and ``/metrics`` name the typed reason (``peer_offline``)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.mqtt_env import Agent, agent, agents, ask_node, mosquitto, pub, sub, wait_peer
from tests.test_metrics import scrape, total, value
from transport.localcluster import free_port

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
        assert result["fallback_reason"] == "peer_offline"
        assert answered_after < 15  # the GLOO timeout is 120 s


def test_a_peer_sigkilled_mid_split_falls_back_with_its_typed_reason_in_the_result_and_metrics() -> None:
    metrics_port = free_port()
    with (
        mosquitto() as port,
        agent(port, CLUSTER, "k1", "bert=tiny-bert", env={**ENV, "PRISM_METRICS_PORT": str(metrics_port)}) as coord,
        agent(port, CLUSTER, "k2", "bert=tiny-bert", env=ENV) as peer,
    ):
        wait_peer(port, CLUSTER, "k1", "k2")
        assert ask_node(port, CLUSTER, "k1", [job("warm")])["warm"]["mode"] == "distributed"
        peer.send_signal(signal.SIGSTOP)  # it cannot answer the reserve: the split waits on it ...
        waiter = sub(port, f"prism/v1/{CLUSTER}/results/#", 1, timeout_s=60)
        pub(port, f"prism/v1/{CLUSTER}/nodes/k1/jobs", json.dumps(job("killed")))
        started(coord, "killed", timeout_s=30)  # logged as the split begins, with no await between
        peer.send_signal(signal.SIGKILL)  # ... until it dies: the broker publishes its Last Will
        peer.wait(timeout=10)
        out, err = waiter.communicate(timeout=90)
        result = json.loads(out.splitlines()[0]) if out.strip() else {}
        assert result.get("id") == "killed", err
        assert (result["ok"], result["mode"], result["fallback"]) == (True, "local", True)
        assert result["fallback_reason"] == "peer_offline", result
        assert "k2 went offline" in result["decision"]["fallback_reason"]  # the words stay beside the code
        # The next split finds no peer at all: a fallback of another reason.
        after = ask_node(port, CLUSTER, "k1", [job("after")])["after"]
        assert (after["mode"], after["fallback"], after["fallback_reason"]) == ("local", True, "no_peer")

        deadline = time.monotonic() + 30
        samples = scrape(metrics_port)
        while total(samples, "prism_fallbacks_total") < 2:
            assert time.monotonic() < deadline, "the fallbacks never reached /metrics"
            time.sleep(0.2)
            samples = scrape(metrics_port)
    assert value(samples, "prism_fallbacks_total", reason="peer_offline") == 1
    assert value(samples, "prism_fallbacks_total", reason="no_peer") == 1
    assert total(samples, "prism_fallbacks_total") == 2  # nothing lands in a catch-all
