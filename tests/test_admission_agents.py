"""A rogue agent with a wrong or missing cluster secret is never admitted; good agents keep serving."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mqtt_env import Agent, agents, mosquitto, pub, sub

pytestmark = [pytest.mark.mqtt, pytest.mark.gloo]
CLUSTER = "adm"
FAST = {"PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_GROUP_TIMEOUT_S": "4"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, subprocess.Popen[str]]]]:
    tmp = tmp_path_factory.mktemp("secrets")
    good, bad = tmp / "good", tmp / "bad"
    good.write_text("correct horse battery staple 42\n")
    bad.write_text("wrong guess, but long enough\n")
    with (
        mosquitto() as port,
        agents(
            port,
            CLUSTER,
            Agent("g1", env={**FAST, "PRISM_SECRET_FILE": str(good)}),
            Agent("g2", env={**FAST, "PRISM_SECRET_FILE": str(good)}),
            Agent("wrong", env={**FAST, "PRISM_SECRET_FILE": str(bad)}),
            Agent("nosecret", env=FAST),
        ) as (g1, g2, wrong, nosecret),
    ):
        yield port, {"g1": g1, "g2": g2, "wrong": wrong, "nosecret": nosecret}


def health(port: int, node: str) -> dict[str, object]:
    out = subprocess.run(
        ["mosquitto_sub", "-p", str(port), "-t", f"prism/v1/{CLUSTER}/nodes/{node}/health", "-C", "1", "-W", "5"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out))


def ask(port: int, node: str, jobs: list[dict[str, object]]) -> dict[str, dict[str, object]]:

    waiter = sub(port, f"prism/v1/{CLUSTER}/results/#", len(jobs), timeout_s=60)
    for job in jobs:
        pub(port, f"prism/v1/{CLUSTER}/nodes/{node}/jobs", json.dumps(job))
    out, _ = waiter.communicate(timeout=90)
    return {str(r["id"]): r for r in (json.loads(line) for line in out.splitlines() if line.strip())}


def wait_admitted(port: int, node: str, peer: str, timeout_s: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if peer in health(port, node).get("peers", []):  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"{node} never admitted {peer}")


def log(proc: subprocess.Popen[str]) -> str:
    return Path(proc.log_path).read_text()  # type: ignore[attr-defined]


def test_good_agents_admit_each_other_and_never_the_rogues(
    cluster: tuple[int, dict[str, subprocess.Popen[str]]],
) -> None:
    port, procs = cluster
    wait_admitted(port, "g1", "g2")
    wait_admitted(port, "g2", "g1")
    got = ask(
        port,
        "g1",
        [
            {"id": f"d{i}", "model": "bert", "inputs": {"text": ["hi"]}, "mode": "distributed", "ranks": 4}
            for i in range(3)
        ],
    )
    for result in got.values():
        assert result["ok"] is True
        assert result["mode"] == "distributed"
        assert result["peers"] == ["g2"]  # asked for 4 ranks; only one peer is admitted
    for good in ("g1", "g2"):
        assert set(health(port, good)["peers"]) == {"g1", "g2"} - {good}  # type: ignore[arg-type]
        assert '"event": "admission_refused"' in log(procs[good])
    assert '"event": "running_open"' in log(procs["nosecret"])


def test_a_rogue_coordinator_cannot_pull_good_agents_into_a_group(
    cluster: tuple[int, dict[str, subprocess.Popen[str]]],
) -> None:
    port, procs = cluster
    wait_admitted(port, "nosecret", "g1")  # running open, it believes anyone
    job = {"id": "rogue1", "model": "bert", "inputs": {"text": ["x"]}, "mode": "distributed", "peers": ["g1"]}
    result = ask(port, "nosecret", [job])["rogue1"]
    assert result["ok"] is True
    assert result["mode"] == "local"  # the good agent refused to join: the rogue's own job fell back
    assert result["fallback"] is True
    deadline = time.monotonic() + 15
    while not any('"admission_refused"' in ln and '"via": "control"' in ln for ln in log(procs["g1"]).splitlines()):
        assert time.monotonic() < deadline, "g1 never refused the rogue's control messages"
        time.sleep(0.1)
    assert '"coordinator": "nosecret"' not in log(procs["g1"]) + log(procs["g2"])  # never joined its group
