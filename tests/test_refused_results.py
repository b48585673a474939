"""A result the broker refuses: real mosquitto with an ACL that denies one response topic, a
real agent, stock MQTT clients.

mosquitto answers a denied QoS 1 PUBLISH with PUBACK reason code 0x87 (not authorized) and
drops it. The agent must not take that for delivered (issue 22: it logged ``job_done``, its
journal said ``sent``, the client got nothing): it logs ``result_refused``, counts it, and
answers on the job's default results topic with the error ``result_refused``.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mqtt_env import agent, mosquitto, need, sub
from transport.localcluster import free_port

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(180)]

CLUSTER = "acltest"
DENIED = f"prism/v1/{CLUSTER}/denied"
#: Anonymous clients may do anything but use the denied subtree (a deny rule wins in mosquitto 2).
ACL = f"topic readwrite #\ntopic deny {DENIED}/#\n"


@dataclass
class Setup:
    port: int
    metrics_port: int
    node: subprocess.Popen[str]
    state_dir: Path


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        (tmp / "prism.acl").write_text(ACL)
        port = stack.enter_context(mosquitto(extra_conf=f"acl_file {tmp / 'prism.acl'}\n"))
        metrics_port = free_port()
        env = {"PRISM_METRICS_PORT": str(metrics_port), "PRISM_STATE_DIR": str(tmp / "state")}
        node = stack.enter_context(agent(port, CLUSTER, "r1", "bert=tiny-bert", env=env))
        yield Setup(port, metrics_port, node, tmp / "state")


def publish_job(port: int, job: dict[str, object], response_topic: str) -> None:
    """``mosquitto_pub`` a job to the node, with an MQTT 5 response topic and correlation data."""
    subprocess.run(
        [
            need("mosquitto_pub"),
            *("-p", str(port), "-V", "mqttv5", "-q", "1", "-t", f"prism/v1/{CLUSTER}/nodes/r1/jobs"),
            *("-D", "publish", "response-topic", response_topic),
            *("-D", "publish", "correlation-data", str(job["id"])),
            *("-m", json.dumps(job)),
        ],
        check=True,
        timeout=10,
    )


def answer_on_results(port: int, job: dict[str, object], response_topic: str) -> dict[str, object]:
    """Publish ``job`` and return what arrives on its default results topic."""
    waiter = sub(port, f"prism/v1/{CLUSTER}/results/{job['id']}", 1, timeout_s=60)
    publish_job(port, job, response_topic)
    out, err = waiter.communicate(timeout=90)
    assert out.strip(), f"nothing on the results topic: {err}"
    answer: dict[str, object] = json.loads(out)
    return answer


def refused_count(metrics_port: int) -> float:
    """``prism_results_refused_total`` over its labels, scraped like Prometheus would."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = [line.split()[-1] for line in text.splitlines() if line.startswith("prism_results_refused_total{")]
    return sum(float(v) for v in values)


def journal_rows(state_dir: Path) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for path in state_dir.glob("journal-*.sqlite3"):
        with sqlite3.connect(path, timeout=5) as db:
            rows += db.execute("SELECT state, topic FROM jobs").fetchall()
    return rows


def test_a_refused_result_is_answered_on_the_results_topic_counted_and_not_journalled_as_sent(
    setup: Setup,
) -> None:
    job = {"id": "acl1", "model": "bert", "inputs": {"text": ["hello"]}, "mode": "local"}
    before = refused_count(setup.metrics_port)
    got = answer_on_results(setup.port, job, f"{DENIED}/acl1")
    assert got["ok"] is False
    assert got["error"]["code"] == "result_refused"  # type: ignore[index]
    assert f"{DENIED}/acl1" in got["error"]["message"]  # type: ignore[index]
    assert refused_count(setup.metrics_port) == before + 1
    log = Path(setup.node.log_path).read_text()  # type: ignore[attr-defined]
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    refused = [line for line in lines if line["event"] == "result_refused"]
    assert len(refused) == 1
    assert refused[0]["topic"] == f"{DENIED}/acl1"
    assert refused[0]["reason"] == "Not authorized"
    # Nothing in the journal claims the refused result reached anyone: the job is forgotten
    # once its error is on the broker, so a retry (with a permitted topic, say) runs again.
    deadline = time.monotonic() + 10
    while any(topic == f"{DENIED}/acl1" for _, topic in journal_rows(setup.state_dir)):
        assert time.monotonic() < deadline, journal_rows(setup.state_dir)
        time.sleep(0.05)
    again = answer_on_results(setup.port, job, f"{DENIED}/acl1")
    assert again["error"]["code"] == "result_refused"  # type: ignore[index]
    assert refused_count(setup.metrics_port) == before + 2


def test_results_on_permitted_topics_still_arrive(setup: Setup) -> None:
    job = {"id": "ok1", "model": "bert", "inputs": {"text": ["hello"]}, "mode": "local"}
    waiter = sub(setup.port, f"prism/v1/{CLUSTER}/clients/c/ok1", 1, timeout_s=60)
    publish_job(setup.port, job, f"prism/v1/{CLUSTER}/clients/c/ok1")
    out, err = waiter.communicate(timeout=90)
    assert json.loads(out)["ok"] is True, err
