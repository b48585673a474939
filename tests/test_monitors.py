"""Load readers on fake /proc and /sys trees, link smoothing, and a real TCP probe."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.base.monitors import read_load
from agent.cluster.links import LinkTable
from agent.cluster.probes import ProbeServer, probe


def fake_root(tmp_path: Path, gpu: str | None) -> Path:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/loadavg").write_text("1.50 0.75 0.25 2/300 4242\n")
    (tmp_path / "proc/meminfo").write_text("MemTotal:       8000000 kB\nMemFree: 100 kB\nMemAvailable:   2048000 kB\n")
    if gpu is not None:
        (tmp_path / "sys/devices/platform/gpu.0").mkdir(parents=True)
        (tmp_path / "sys/devices/platform/gpu.0/load").write_text(gpu)
        (tmp_path / "var/lib/nvpmodel").mkdir(parents=True)
        (tmp_path / "var/lib/nvpmodel/status").write_text("pmode:0002 fmode:quiet\n")
    return tmp_path


def test_load_on_a_jetson(tmp_path: Path) -> None:
    load = read_load(fake_root(tmp_path, "473\n"))
    assert (load["load1"], load["load5"]) == (1.5, 0.75)
    assert (load["mem_total_mb"], load["mem_available_mb"]) == (7812, 2000)
    assert load["gpu_load"] == pytest.approx(0.473)
    assert load["power_mode"] == "2"


def test_load_without_a_gpu_or_proc(tmp_path: Path) -> None:
    plain = read_load(fake_root(tmp_path, None))
    assert "gpu_load" not in plain
    assert "power_mode" not in plain
    empty = read_load(tmp_path / "nothing")
    assert empty["load1"] is None
    assert empty["mem_available_mb"] is None


def test_link_estimates_are_smoothed_and_aged() -> None:
    links = LinkTable(alpha=0.5)
    links.observe("b", 10.0, rtt_ms=2.0, mbps=100.0, source="probe")
    links.observe("b", 12.0, rtt_ms=4.0, mbps=60.0, source="probe")
    links.observe("b", 13.0, mbps=100.0, source="probe")
    report = links.report(now_s=15.0)["b"]
    assert report["rtt_ms"] == 3.0
    assert report["mbps"] == 90.0
    assert report["age_s"] == 2.0
    assert report["samples"] == 3


def test_the_link_estimate_carries_how_far_probes_stray_from_it() -> None:
    links = LinkTable(alpha=0.5)
    links.observe("b", 1.0, mbps=100.0, source="probe")
    assert links.report(now_s=1.0)["b"]["mbps_err"] == 0.0  # one sample: nothing to stray from yet
    links.observe("b", 2.0, mbps=60.0, source="probe")  # 40 off the estimate of 100
    links.observe("b", 3.0, mbps=80.0, source="probe")  # 0 off the estimate of 80
    report = links.report(now_s=3.0)["b"]
    assert report["mbps"] == 80.0
    assert report["mbps_err"] == 10.0  # EWMA of 0, 40, 0 at alpha 0.5
    links.observe("b", 4.0, mbps=8.0, source="probe")  # a step: a new link, its error starts over
    assert links.report(now_s=4.0)["b"]["mbps_err"] == 0.0


def test_a_step_change_in_bandwidth_replaces_the_estimate_at_once() -> None:
    links = LinkTable(alpha=0.3)
    links.observe("b", 1.0, mbps=1000.0, source="probe")
    links.observe("b", 2.0, mbps=20.0, source="probe")  # the link was throttled
    assert links.report(now_s=2.0)["b"]["mbps"] == 20.0


def test_gloo_throughput_is_reported_apart_and_never_moves_the_link_estimate() -> None:
    links = LinkTable(alpha=0.5)
    links.observe("b", 1.0, mbps=100.0, source="probe")
    links.observe_gloo("b", 2.0, 5.0)  # mostly waiting for the other rank's compute
    report = links.report(now_s=2.0)["b"]
    assert report["mbps"] == 100.0
    assert report["gloo_mbps"] == 5.0


def test_probe_measures_rtt_and_bandwidth_on_loopback() -> None:
    async def scenario() -> tuple[float, float]:
        async with ProbeServer("127.0.0.1") as server:
            return await probe("127.0.0.1", server.port, payload_bytes=1 << 20)

    rtt_ms, mbps = asyncio.run(scenario())
    assert 0 < rtt_ms < 100
    assert mbps > 10  # loopback moves far more than 10 Mbit/s


def test_probe_to_nothing_fails_quickly() -> None:
    from transport.localcluster import free_port

    with pytest.raises(ConnectionRefusedError):
        asyncio.run(probe("127.0.0.1", free_port(), timeout_s=2))
