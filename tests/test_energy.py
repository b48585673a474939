"""Energy meters on fake sysfs trees, and the CPU-time model that says it is one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.base.energy import CpuModelMeter, Ina3221Meter, RaplMeter, find_meter


def jetson(root: Path, mv: int, ma: int) -> Path:
    hw = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hw.mkdir(parents=True)
    (hw / "name").write_text("ina3221\n")
    for n, label, volt, curr in ((1, "VDD_CPU_GPU_CV", 5000, 100), (2, "VDD_IN", mv, ma), (3, "VDD_SOC", 5000, 50)):
        (hw / f"in{n}_label").write_text(label + "\n")
        (hw / f"in{n}_input").write_text(f"{volt}\n")
        (hw / f"curr{n}_input").write_text(f"{curr}\n")
    return hw


def test_ina3221_reads_the_input_rail(tmp_path: Path) -> None:
    hw = jetson(tmp_path, mv=5000, ma=1200)  # 6 W board input
    meter = find_meter(tmp_path)
    assert isinstance(meter, Ina3221Meter)
    assert meter.watts() == pytest.approx(6.0)
    token = meter.start()
    (hw / "curr2_input").write_text("2400\n")  # load doubles during the job
    reading = meter.stop(token)
    assert reading.source == "ina3221"
    assert 6.0 * reading.seconds <= reading.joules <= 12.0 * reading.seconds


def test_rapl_sums_packages_and_handles_wraparound(tmp_path: Path) -> None:
    for pkg, energy in ((0, 999_000_000), (1, 5_000_000)):
        zone = tmp_path / f"sys/class/powercap/intel-rapl:{pkg}"
        zone.mkdir(parents=True)
        (zone / "energy_uj").write_text(f"{energy}\n")
        (zone / "max_energy_range_uj").write_text("1000000000\n")
    (tmp_path / "sys/class/powercap/intel-rapl:0:0").mkdir()  # a sub-zone: not counted twice
    meter = find_meter(tmp_path)
    assert isinstance(meter, RaplMeter)
    token = meter.start()
    (tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj").write_text("1000000\n")  # wrapped: +2 J
    (tmp_path / "sys/class/powercap/intel-rapl:1/energy_uj").write_text("8000000\n")  # +3 J
    reading = meter.stop(token)
    assert reading.source == "rapl"
    assert reading.joules == pytest.approx(5.0)


def test_without_sensors_the_cpu_model_labels_itself(tmp_path: Path) -> None:
    meter = find_meter(tmp_path, watts_per_core=10.0)
    assert isinstance(meter, CpuModelMeter)
    cpu0 = time.process_time()
    token = meter.start()
    sum(i * i for i in range(300_000))  # burn a few ms of CPU: less than one 10 ms clock tick
    reading = meter.stop(token)
    cpu_s = time.process_time() - cpu0
    assert reading.source == "cpu-model"
    # CPU seconds x 10 W, resolved below a clock tick (os.times() gave 0 J here in CI)
    assert 0 < reading.joules <= cpu_s * 10.0
