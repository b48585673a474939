"""The daemon end to end: real mosquitto, real agent processes, stock MQTT clients."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.mqtt_env import REPO, agent, mosquitto, pub, sub, wait_online
from tests.volumes import volume
from transport.localcluster import free_port

pytestmark = pytest.mark.mqtt

CLUSTER = "itest"


@pytest.fixture(scope="module")
def broker() -> Iterator[int]:
    with mosquitto() as port:
        yield port


@pytest.fixture(scope="module")
def node(broker: int) -> Iterator[subprocess.Popen[str]]:
    with agent(broker, CLUSTER, "n1", "bert=tiny-bert", "gpt=tiny-gpt2", "vit=tiny-vit") as proc:
        yield proc


def ask(port: int, payloads: list[tuple[str, str | bytes]], count: int) -> dict[str, dict[str, object]]:
    """Publish payloads to the jobs topic, collect ``count`` results by id."""
    waiter = sub(port, f"prism/v1/{CLUSTER}/results/#", count)
    for topic, payload in payloads:
        pub(port, topic, payload)
    out, err = waiter.communicate(timeout=60)
    results = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(results) == count, f"got {len(results)} of {count} results; stderr: {err}"
    return {str(r["id"]): r for r in results}


def test_json_jobs_from_mosquitto_pub_come_back(broker: int, node: subprocess.Popen[str]) -> None:
    jobs = f"prism/v1/{CLUSTER}/jobs"
    got = ask(
        broker,
        [
            (jobs, json.dumps({"id": "local1", "model": "bert", "inputs": {"text": ["hello world"]}, "mode": "local"})),
            (jobs, json.dumps({"id": "tok1", "model": "gpt", "inputs": {"token_ids": [[5, 6, 7, 8]]}})),
            (
                f"prism/v1/{CLUSTER}/nodes/n1/jobs",
                json.dumps({"id": "direct1", "model": "bert", "inputs": {"text": "to one node"}, "task": "embed"}),
            ),
        ],
        3,
    )
    assert got["local1"]["ok"] is True
    assert got["local1"]["mode"] == "local"
    assert len(got["local1"]["output"]["logits"][0]) == 3  # type: ignore[index]
    assert got["tok1"]["ok"] is True
    assert len(got["tok1"]["output"]["top_ids"][0]) == 5  # type: ignore[index]
    assert got["direct1"]["ok"] is True
    assert len(got["direct1"]["output"]["embedding"][0]) == 64  # type: ignore[index]
    for r in got.values():
        assert r["node"] == "n1"
        assert set(r) >= {"id", "ok", "error", "output", "mode", "cr", "peers", "latency_ms", "decision", "fallback"}


def test_bad_jobs_get_error_results_and_the_agent_keeps_serving(broker: int, node: subprocess.Popen[str]) -> None:
    jobs = f"prism/v1/{CLUSTER}/jobs"
    got = ask(
        broker,
        [
            (jobs, "{this is not json"),  # unparseable: logged and counted, no id to answer
            (jobs, json.dumps({"id": "bad-model", "model": "nope", "inputs": {"text": ["x"]}})),
            (jobs, json.dumps({"id": "bad-size", "model": "bert", "inputs": {"text": ["word " * 30000]}})),
            (jobs, json.dumps({"id": "bad-type", "model": "bert", "inputs": {"text": ["x"]}, "cr": "lots"})),
            (jobs, json.dumps({"id": "bad-kind", "model": "vit", "inputs": {"text": ["not an image"]}})),
            (jobs, json.dumps({"id": "bad-task", "model": "gpt", "inputs": {"text": ["x"]}, "task": "classify"})),
            (jobs, json.dumps({"id": "after", "model": "bert", "inputs": {"text": ["still here"]}})),
        ],
        6,
    )
    assert got["bad-model"]["error"]["code"] == "unknown_model"  # type: ignore[index]
    assert got["bad-size"]["error"]["code"] == "too_large"  # type: ignore[index]
    assert got["bad-type"]["error"]["code"] == "invalid_job"  # type: ignore[index]
    assert "'cr'" in got["bad-type"]["error"]["message"]  # type: ignore[index]
    assert got["bad-kind"]["error"]["code"] == "bad_request"  # type: ignore[index]
    assert got["bad-task"]["error"]["code"] == "bad_request"  # type: ignore[index]
    assert all(got[k]["ok"] is False for k in got if k != "after")
    assert got["after"]["ok"] is True
    assert node.poll() is None


def test_msgpack_job_gets_a_msgpack_result(broker: int, node: subprocess.Popen[str]) -> None:
    import msgpack

    waiter = sub(broker, f"prism/v1/{CLUSTER}/results/mp1", 1)
    pub(broker, f"prism/v1/{CLUSTER}/jobs", msgpack.packb({"id": "mp1", "model": "bert", "inputs": {"text": "hi"}}))
    try:
        assert msgpack.unpackb(waiter.next_raw(60))["ok"] is True
    finally:
        waiter.close()


def test_submit_cli_prints_the_result(broker: int, node: subprocess.Popen[str]) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "submit",
            "--broker",
            f"mqtt://127.0.0.1:{broker}",
            "--cluster",
            CLUSTER,
            "--model",
            "gpt",
            "--text",
            "the licence grants",
            "--task",
            "loglik",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is True
    assert result["output"]["perplexity"][0] > 1


def test_sigterm_publishes_offline_notifies_systemd_and_exits_zero(broker: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        address = str(Path(tmp) / "notify")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(address)
        listener.settimeout(30)
        with agent(broker, CLUSTER, "n2", "bert=tiny-bert", env={"NOTIFY_SOCKET": address}) as proc:
            seen = set()
            while "WATCHDOG=1" not in seen or "READY=1" not in seen:
                seen.add(listener.recv(256).decode())
            status = sub(broker, f"prism/v1/{CLUSTER}/nodes/n2/status", 2)
            assert status.next(30).strip() == "online"  # the retained birth
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            while "STOPPING=1" not in seen:
                seen.add(listener.recv(256).decode())
            assert status.next(30).strip() == "offline"
            status.close()
        listener.close()


def test_agent_reconnects_and_resubscribes_after_the_broker_restarts() -> None:
    import time

    from tests.mqtt_env import wait_online
    from transport.localcluster import free_port

    port = free_port()
    first = mosquitto(port)
    first.__enter__()
    try:
        with agent(port, CLUSTER, "n3", "bert=tiny-bert", env={"PRISM_RECONNECT_MAX_S": "1"}) as proc:
            first.__exit__(None, None, None)  # the broker goes away under the agent
            first = None
            time.sleep(1.5)
            with mosquitto(port):  # and comes back, empty (no persistence)
                wait_online(port, CLUSTER, "n3", timeout_s=30)  # birth re-published after the reconnect
                job = {"id": "again", "model": "bert", "inputs": {"text": ["back"]}}
                got = ask(port, [(f"prism/v1/{CLUSTER}/nodes/n3/jobs", json.dumps(job))], 1)  # re-subscribed
                assert got["again"]["ok"] is True
            log = proc.log_path.read_text()  # type: ignore[attr-defined]
    finally:
        if first is not None:
            first.__exit__(None, None, None)
    assert '"event": "mqtt_reconnect"' in log


def notified(listener: socket.socket, until: Callable[[list[str]], bool], deadline: float) -> list[str]:
    """What the agent tells its NOTIFY_SOCKET, until ``until(seen)`` holds; fails at ``deadline`` (monotonic)."""
    seen: list[str] = []
    while not until(seen):
        listener.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            seen.append(listener.recv(256).decode())
        except TimeoutError:
            pytest.fail(f"the agent only said {seen} by the deadline")
    return seen


def test_ready_before_any_broker_and_jobs_once_one_appears() -> None:
    """Under Type=notify, an agent whose broker is not up yet must still say READY=1 (systemd
    would kill and restart it) and keep feeding the watchdog; with its default backoff it
    answers its first job within 5 s of the broker appearing, however long it waited."""
    port = free_port()  # where the broker will be; nothing listens there yet
    with tempfile.TemporaryDirectory() as tmp:
        address = str(Path(tmp) / "notify")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(address)
        # WATCHDOG_USEC as systemd sets it for WatchdogSec=1: a ping every half second.
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
        launched = time.monotonic()
        with agent(port, CLUSTER, "n4", "bert=tiny-bert", env=env, online=False) as proc:
            seen = notified(listener, lambda seen: "READY=1" in seen, launched + 60.0)
            ready_s = time.monotonic() - launched
            assert ready_s < 15.0, f"READY=1 came {ready_s:.1f} s after launch"
            # 30 pings, some 15 s without a broker (the soak: 120, a minute): its reconnect backoff has reached its cap.
            pings = volume(30, 120)
            seen += notified(listener, lambda more: more.count("WATCHDOG=1") >= pings, time.monotonic() + pings + 10.0)
            assert "STOPPING=1" not in seen
            assert proc.poll() is None
            with mosquitto(port):
                appeared = time.monotonic()
                wait_online(port, CLUSTER, "n4", timeout_s=30)  # subscribed: a job now reaches it
                job = {"id": "late-broker", "model": "bert", "inputs": {"text": ["the broker came later"]}}
                got = ask(port, [(f"prism/v1/{CLUSTER}/nodes/n4/jobs", json.dumps(job))], 1)
                answered_s = time.monotonic() - appeared
            assert got["late-broker"]["ok"] is True
            assert answered_s < 5.0, f"first job answered {answered_s:.1f} s after the broker appeared"
            log = proc.log_path.read_text()  # type: ignore[attr-defined]
        waits = [json.loads(line)["in_s"] for line in log.splitlines() if '"event": "mqtt_reconnect"' in line]
        assert len(waits) >= 5
        assert max(waits) <= 2.0  # the longest it ever waits to try again: how late it may notice a broker
        listener.close()
