"""The README's main job, and the zero-config broker."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.mqtt_env import REPO, agent

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


def test_without_a_broker_the_first_agent_hosts_one_and_the_second_finds_it() -> None:
    from agent.broker import port_free

    if not port_free("127.0.0.1", 1883):
        pytest.fail("port 1883 on 127.0.0.1 is taken; the zero-config test needs it free")
    with (
        agent(1883, "zc", "z1", "bert=tiny-bert", no_broker=True) as first,
        agent(1883, "zc", "z2", "bert=tiny-bert", no_broker=True) as second,
    ):
        assert first.poll() is None
        assert second.poll() is None
    out = first.log_path.read_text() + second.log_path.read_text()  # type: ignore[attr-defined]
    assert '"event": "broker_hosted"' in out
    assert '"event": "broker_found"' in out
