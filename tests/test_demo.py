"""The README's main job, and the zero-config broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mqtt_env import REPO, agent, wait_online

pytestmark = [pytest.mark.mqtt, pytest.mark.gloo]


def test_demo_runs_every_mode_on_two_real_agents() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--batch", "8", "--crs", "4", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        check=False,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin:/usr/sbin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert all(r["ok"] for r in results)
    modes = [(r["decision"]["requested"], r["mode"]) for r in results]
    assert modes == [
        ("local", "local"),
        ("distributed", "distributed"),
        ("distributed", "distributed"),
        ("auto", "distributed"),
        ("auto", "local"),
    ]
    assert results[1]["cosine_vs_local"] == pytest.approx(1.0, abs=1e-4)  # full exchange is exact
    assert results[2]["cosine_vs_local"] > 0.95
    assert results[2]["latency_ms"]["exchange_bytes"] < 0.4 * results[1]["latency_ms"]["exchange_bytes"]


def test_without_a_broker_the_first_agent_hosts_one_and_the_second_finds_it(tmp_path: Path) -> None:
    import os
    import signal
    import time

    log_path = tmp_path / "z1.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--cluster",
            "zc",
            "--node-id",
            "z1",
            "--model",
            "bert=tiny-bert",
            "--log-format",
            "json",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("w"),
    )
    try:
        port = None
        deadline = time.monotonic() + 90
        while port is None and time.monotonic() < deadline:
            for line in log_path.read_text().splitlines():
                event = json.loads(line)
                if event.get("event") == "broker_hosted":
                    port = int(event["broker"].rsplit(":", 1)[1])
            time.sleep(0.2)
        assert port is not None, log_path.read_text()[-1000:]
        wait_online(port, "zc", "z1")
        with agent(port, "zc", "z2", "bert=tiny-bert", no_broker=True) as second:  # finds it over mDNS
            assert '"event": "broker_found"' in second.log_path.read_text()  # type: ignore[attr-defined]
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
