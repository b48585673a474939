"""The Prometheus endpoint: what an operator scrapes from a real agent, and the pure parts."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.base.config import ConfigError, load_settings
from agent.node.daemon import VERSION
from agent.node.metrics import MAX_OPTIONS, Metrics
from engine.errors import FailureReason
from tests.mqtt_env import Agent, agents, ask_node, mosquitto, need, wait_peer
from transport.localcluster import free_port
from transport.schema import Result

CLUSTER = "mtest"
FAST = {"PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_PROBE_INTERVAL_S": "0.5"}


def scrape_text(port: int) -> str:
    """The endpoint's exposition text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def promtool_check(text: str) -> None:
    """Prometheus' own lint of an exposition (``promtool check metrics``, Debian's ``prometheus``;
    scripts/setup.sh dev installs it): the test fails on any complaint, or without promtool."""
    result = subprocess.run(
        [need("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"promtool check metrics: {result.stdout}{result.stderr}"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, parsed by prometheus-client's own parser."""
    text = scrape_text(port)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels`` (0 when absent, as Prometheus would read it)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of ``name`` over every series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.mark.mqtt
@pytest.mark.gloo
def test_an_agent_that_served_local_and_split_jobs_exports_them() -> None:
    metrics_port = free_port()
    env = {**FAST, "PRISM_METRICS_PORT": str(metrics_port)}
    with (
        mosquitto() as port,
        agents(port, CLUSTER, Agent("m1", env=env), Agent("m2", env=FAST)),
    ):
        wait_peer(port, CLUSTER, "m1", "m2")
        text = {"text": ["the quick brown fox jumps over the lazy dog"] * 2}
        jobs: list[dict[str, Any]] = [
            {"id": "loc1", "model": "bert", "inputs": text, "mode": "local"},
            {"id": "loc2", "model": "bert", "inputs": text, "mode": "local"},
            {"id": "dist1", "model": "bert", "inputs": text, "mode": "distributed", "cr": 4},
            {"id": "nope", "model": "no-such-model", "inputs": text},
        ]
        results = ask_node(port, CLUSTER, "m1", jobs)
        assert results["dist1"]["mode"] == "distributed", results["dist1"]

        deadline = time.monotonic() + 30
        samples = scrape(metrics_port)
        while value(samples, "prism_admitted_peers") != 1 or not total(samples, "prism_link_rtt_seconds", peer="m2"):
            assert time.monotonic() < deadline, "the health tick never reported the peer and its link"
            time.sleep(0.2)
            samples = scrape(metrics_port)
        promtool_check(scrape_text(metrics_port))  # every family the agent filled, as Prometheus lints it

    jobs_total = "prism_jobs_total"
    assert value(samples, jobs_total, requested="local", ran="local", outcome="ok") == 2
    assert value(samples, jobs_total, requested="distributed", ran="distributed", outcome="ok") == 1
    assert value(samples, jobs_total, requested="none", ran="none", outcome="unknown_model") == 1
    assert total(samples, jobs_total) == 4

    count = "prism_job_latency_seconds_count"
    assert value(samples, count, stage="total", ran="local") == 2
    assert value(samples, count, stage="total", ran="distributed") == 1
    assert value(samples, count, stage="comm", ran="distributed") == 1
    assert value(samples, count, stage="comm", ran="local") == 0  # a local job exchanges nothing
    sum_s = value(samples, "prism_job_latency_seconds_sum", stage="total", ran="distributed")
    assert sum_s == pytest.approx(results["dist1"]["latency_ms"]["total"] / 1e3)

    exchanged = value(samples, "prism_exchange_bytes_total", ran="distributed")
    assert exchanged == results["dist1"]["latency_ms"]["exchange_bytes"] > 0
    assert value(samples, "prism_exchange_bytes_total", ran="local") == 0
    assert value(samples, "prism_wire_bytes_total", ran="distributed") == results["dist1"]["latency_ms"]["wire_bytes"]

    # No map here: every decision is the interim rule's or a forced mode's.
    assert value(samples, "prism_decisions_total", requested="local", option="local", basis="rule") == 2
    option = results["dist1"]["decision"]["option"]
    assert value(samples, "prism_decisions_total", requested="distributed", option=option, basis="rule") == 1
    assert total(samples, "prism_fallbacks_total") == 0
    joules = sum(r["energy"]["joules"] for r in results.values() if r["ok"])
    assert total(samples, "prism_energy_joules_total") == pytest.approx(joules)
    assert total(samples, "prism_link_bandwidth_bytes_per_second", peer="m2", source="probe") > 0
    assert value(samples, "prism_agent_info", node="m1", version=VERSION) == 1


def _result(**fields: Any) -> Result:
    base: dict[str, Any] = {
        "id": "j",
        "ok": True,
        "mode": "local",
        "latency_ms": {"total": 10.0, "engine": 9.0, "queue": 1.0, "exchange_bytes": 0.0, "wire_bytes": 0.0},
        "decision": {"requested": "auto", "option": "local", "predicted_ms": 8.0, "mode": "local"},
        "energy": {"joules": 0.5, "source": "cpu-model"},
    }
    return Result(**{**base, **fields})


def test_a_fallback_counts_under_the_reason_its_result_carries_whatever_its_words_say() -> None:
    m = Metrics("a", "1")
    words = {"requested": "distributed", "fallback_reason": "b went offline"}  # the text once matched
    m.job_done(_result(fallback=True, fallback_reason=FailureReason.COLLECTIVE_TIMEOUT, decision=words))
    m.job_done(_result(fallback=True, fallback_reason=FailureReason.PEER_SILENT, decision={"requested": "distributed"}))
    samples = _samples(m)
    assert value(samples, "prism_fallbacks_total", reason="collective_timeout") == 1
    assert value(samples, "prism_fallbacks_total", reason="peer_silent") == 1
    assert value(samples, "prism_fallbacks_total", reason="peer_offline") == 0
    assert total(samples, "prism_fallbacks_total") == 2


def test_a_generate_job_counts_its_tokens_and_its_time_to_first_token() -> None:
    m = Metrics("a", "1")
    latency = {"total": 900.0, "engine": 120.0, "first_token": 140.0, "decode": 700.0, "tokens_per_s": 40.0}
    output = {"text": "and so on", "tokens": [262, 523, 319], "reason": "length", "prompt_tokens": 12}
    m.job_done(_result(output=output, latency_ms=latency, final=True, seq=3))
    m.job_done(_result())  # not a generate job: no tokens, no first token
    samples = _samples(m)
    assert value(samples, "prism_generated_tokens_total") == 3
    assert value(samples, "prism_job_latency_seconds_sum", stage="first_token", ran="local") == pytest.approx(0.14)
    assert value(samples, "prism_job_latency_seconds_count", stage="first_token", ran="local") == 1
    assert value(samples, "prism_job_latency_seconds_sum", stage="decode", ran="local") == pytest.approx(0.7)


def test_labels_stay_bounded_and_agents_do_not_share_a_registry() -> None:
    first, second = Metrics("a", "1"), Metrics("b", "1")  # the global registry would refuse the second
    for i in range(MAX_OPTIONS + 10):  # a job may ask for any CR: option names must not grow without bound
        decision = {"requested": "distributed", "option": f"codes@{i + 1}", "mode": "distributed"}
        first.job_done(_result(mode="distributed", decision=decision))
    first.job_done(_result(ok=False, mode=None, decision=None))
    offline = FailureReason.PEER_OFFLINE
    first.job_done(_result(fallback=True, fallback_reason=offline, decision={"requested": "distributed"}))
    samples = _samples(first)
    options = {dict(labels)["option"] for name, labels in samples if name == "prism_decisions_total"}
    assert len(options) == MAX_OPTIONS + 1
    assert (
        value(samples, "prism_decisions_total", requested="distributed", option="other", basis="rule") == 11
    )  # with the fallback job
    assert value(samples, "prism_fallbacks_total", reason="peer_offline") == 1
    assert value(samples, "prism_jobs_total", requested="none", ran="none", outcome="other") == 1
    assert not [key for key in _samples(second) if key[0] == "prism_jobs_total"]


def test_health_tick_follows_peers_that_leave() -> None:
    m = Metrics("a", "1")
    link = {"rtt_ms": 2.0, "mbps": 80.0, "age_s": 1.0, "gloo_mbps": None}
    m.health_tick(
        {"load": {"queue": 3, "load1": 0.5}, "peers": ["b", "c"], "links": {"b": link, "c": link}}, {"k": 1.5}
    )
    first = _text(m)
    assert 'prism_link_rtt_seconds{peer="c"} 0.002' in first
    assert 'prism_link_bandwidth_bytes_per_second{peer="b",source="probe"} 1e+07' in first
    assert 'prism_map_correction_ratio{key="k"} 1.5' in first
    assert "prism_queue_jobs 3.0" in first
    m.health_tick({"load": {"queue": 0}, "peers": ["b"], "links": {"b": link}}, {})
    later = _text(m)
    assert 'peer="c"' not in later
    assert "prism_map_correction_ratio{" not in later
    assert "prism_admitted_peers 1.0" in later


def test_loop_restarts_count_up_from_health_and_the_start_time_marks_a_process_restart() -> None:
    before = time.time()
    m = Metrics("a", "1")
    m.health_tick({"loops": {"probes": 2}})
    m.health_tick({"loops": {"probes": 2, "upkeep": 1}})  # health repeats totals: only news counts
    m.health_tick({"loops": {"probes": 3, "upkeep": 1}})
    samples = _samples(m)
    assert value(samples, "prism_loop_restarts_total", loop="probes") == 3
    assert value(samples, "prism_loop_restarts_total", loop="upkeep") == 1
    assert before <= value(samples, "prism_agent_start_time_seconds") <= time.time()


def test_every_family_filled_passes_promtool() -> None:
    m = Metrics("a", "1")
    m.job_done(_result())
    m.job_done(_result(id="f", fallback=True, fallback_reason=FailureReason.COLLECTIVE_FAILED,
                       decision={"requested": "distributed", "option": "means@8",
                                 "fallback_reason": "gloo collective failed"}))  # fmt: skip
    m.job_done(Result.failure("x", "busy", "full"))
    link = {"rtt_ms": 2.0, "mbps": 80.0, "age_s": 1.0, "gloo_mbps": 20.0}
    m.health_tick({"load": {"queue": 1, "load1": 0.5, "gpu_load": 0.2}, "peers": ["b"], "links": {"b": link},
                   "loops": {"probes": 1}}, {"means@8/fast": 1.2})  # fmt: skip
    promtool_check(_text(m))


def test_metrics_port_is_validated() -> None:
    assert load_settings(None, {"PRISM_METRICS_PORT": "9100"}, {}).metrics_port == 9100
    assert load_settings(None, {}, {}).metrics_port == 0
    with pytest.raises(ConfigError, match="metrics_port"):
        load_settings(None, {"PRISM_METRICS_PORT": "70000"}, {})


def _text(m: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


def _samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(_text(m))
        for s in family.samples
    }


def test_the_endpoint_serves_while_inside_and_a_taken_port_is_one_clear_error() -> None:
    import asyncio
    import socket

    port = free_port()

    async def scenario() -> str:
        first, second = Metrics("a", "1"), Metrics("b", "1")
        async with first.serving("127.0.0.1", port):
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read())
            with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                async with second.serving("127.0.0.1", port):
                    pass
        async with Metrics("c", "1").serving("127.0.0.1", 0):  # 0: off, nothing listens
            pass
        return text.decode()

    assert 'prism_agent_info{node="a",version="1"} 1.0' in asyncio.run(asyncio.wait_for(scenario(), 30))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # stopped with the agent
