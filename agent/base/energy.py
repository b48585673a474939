"""Energy meters: Jetson INA3221 rails, Intel/AMD RAPL, else a CPU-time model that says so.

A meter is started before a job and read after it; the reading carries its source
(``ina3221``, ``rapl`` or ``cpu-model``) so nobody mistakes a model for a measurement.
Readers take a filesystem root so tests use fake sysfs trees.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class EnergyReading:
    """Joules spent between start and stop, and how that was known."""

    joules: float
    seconds: float
    source: str


class RaplMeter:
    """Cumulative package energy counters under /sys/class/powercap (wraparound handled)."""

    source = "rapl"

    def __init__(self, zones: list[Path]) -> None:
        self.zones = zones

    @classmethod
    def find(cls, root: Path) -> RaplMeter | None:
        base = root / "sys/class/powercap"
        zones = sorted(p for p in base.glob("intel-rapl:[0-9]*") if ":" not in p.name.split("intel-rapl:", 1)[1])
        zones = [z for z in zones if (z / "energy_uj").is_file()]
        return cls(zones) if zones else None

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def start(self) -> Any:
        return (time.monotonic(), self._read())

    def stop(self, token: Any) -> EnergyReading:
        t0, before = token
        after = self._read()
        total = 0
        for zone, a, b in zip(self.zones, before, after, strict=True):
            delta = b - a
            if delta < 0:  # the counter wrapped
                delta += int((zone / "max_energy_range_uj").read_text())
            total += delta
        return EnergyReading(total / 1e6, time.monotonic() - t0, self.source)


class Ina3221Meter:
    """Jetson INA3221 power monitors (hwmon): samples rail power while a job runs.

    The input rail (``VDD_IN``, or the first rail when there is none) is the board's power.
    """

    source = "ina3221"

    def __init__(self, volt: Path, curr: Path, period_s: float = 0.02) -> None:
        self.volt, self.curr, self.period_s = volt, curr, period_s

    @classmethod
    def find(cls, root: Path) -> Ina3221Meter | None:
        rails: list[tuple[str, Path, Path]] = []
        for hwmon in sorted(root.glob("sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*")) + sorted(
            root.glob("sys/class/hwmon/hwmon*")
        ):
            name = (hwmon / "name").read_text().strip() if (hwmon / "name").is_file() else ""
            if "ina3221" not in name and "ina3221" not in str(hwmon):
                continue
            for label in sorted(hwmon.glob("in*_label")):
                n = label.name[2:].split("_")[0]
                volt, curr = hwmon / f"in{n}_input", hwmon / f"curr{n}_input"
                if volt.is_file() and curr.is_file():
                    rails.append((label.read_text().strip(), volt, curr))
        if not rails:
            return None
        chosen = next((r for r in rails if r[0].upper() in ("VDD_IN", "VIN", "VDD_IN_SYS")), rails[0])
        return cls(chosen[1], chosen[2])

    def watts(self) -> float:
        """Instantaneous rail power (mV x mA)."""
        return int(self.volt.read_text()) * int(self.curr.read_text()) / 1e6

    def start(self) -> Any:
        samples: list[float] = [self.watts()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(self.period_s):
                samples.append(self.watts())

        thread = threading.Thread(target=sample, name="ina3221-sampler", daemon=True)
        thread.start()
        return (time.monotonic(), samples, done, thread)

    def stop(self, token: Any) -> EnergyReading:
        t0, samples, done, thread = token
        done.set()
        thread.join()
        samples.append(self.watts())
        seconds = time.monotonic() - t0
        return EnergyReading(sum(samples) / len(samples) * seconds, seconds, self.source)


class CpuModelMeter:
    """No sensor: energy = CPU seconds of this process x watts per busy core (a model)."""

    source = "cpu-model"

    def __init__(self, watts_per_core: float = 4.0) -> None:
        self.watts_per_core = watts_per_core

    def start(self) -> Any:
        # process_time() reads CLOCK_PROCESS_CPUTIME_ID (ns); os.times() counts 10 ms ticks,
        # which gave a job shorter than a tick zero joules.
        return (time.monotonic(), time.process_time())

    def stop(self, token: Any) -> EnergyReading:
        t0, cpu0 = token
        cpu_s = time.process_time() - cpu0
        return EnergyReading(cpu_s * self.watts_per_core, time.monotonic() - t0, self.source)


Meter = Ina3221Meter | RaplMeter | CpuModelMeter


def find_meter(root: Path = Path("/"), watts_per_core: float = 4.0) -> Meter:
    """The best meter this box has: INA3221, then RAPL, then the CPU-time model."""
    return Ina3221Meter.find(root) or RaplMeter.find(root) or CpuModelMeter(watts_per_core)
