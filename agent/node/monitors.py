"""Load and link monitors (DESIGN.md §6): what a node reports about itself and its links.

Readers take a filesystem root so tests can point them at fake /proc and /sys trees.
Link estimates are smoothed (EWMA) and carry their age.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Jetson integrated-GPU load files (0..1000), newest layout first.
JETSON_GPU_LOAD = ("sys/devices/platform/gpu.0/load", "sys/devices/gpu.0/load", "sys/devices/17000000.gpu/load")


def read_load(root: Path = Path("/")) -> dict[str, Any]:
    """CPU load averages, memory available, and Jetson GPU load when the sysfs file exists."""
    out: dict[str, Any] = {"cpus": os.cpu_count()}
    try:
        fields = (root / "proc/loadavg").read_text().split()
        out["load1"], out["load5"] = float(fields[0]), float(fields[1])
    except (OSError, ValueError, IndexError):
        out["load1"] = out["load5"] = None
    try:
        info = dict(line.split(":", 1) for line in (root / "proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0])
        available = int(info["MemAvailable"].split()[0])
        out["mem_total_mb"] = total // 1024
        out["mem_available_mb"] = available // 1024
    except (OSError, ValueError, KeyError):
        out["mem_total_mb"] = out["mem_available_mb"] = None
    try:  # Jetson power mode, as nvpmodel records it ("pmode:0001 fmode:...")
        status = (root / "var/lib/nvpmodel/status").read_text()
        out["power_mode"] = status.split()[0].split(":", 1)[1].lstrip("0") or "0"
    except (OSError, IndexError):
        pass
    for rel in JETSON_GPU_LOAD:
        try:
            out["gpu_load"] = int((root / rel).read_text().strip()) / 1000.0
            break
        except (OSError, ValueError):
            continue
    return out


@dataclass(slots=True)
class LinkEstimate:
    """Smoothed RTT and bandwidth to one peer, with when they were last measured."""

    rtt_ms: float | None = None
    mbps: float | None = None
    measured_s: float | None = None
    samples: int = 0
    source: str = ""
    gloo_mbps: float | None = None


@dataclass(slots=True)
class LinkTable:
    """Per-peer link estimates, EWMA-smoothed (``alpha`` weights the newest sample)."""

    alpha: float = 0.3
    links: dict[str, LinkEstimate] = field(default_factory=dict)

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe(
        self, peer: str, now_s: float, *, rtt_ms: float | None = None, mbps: float | None = None, source: str
    ) -> None:
        """Fold in one measurement (an active probe, or bytes/time of a GLOO exchange)."""
        link = self.links.setdefault(peer, LinkEstimate())
        if rtt_ms is not None:
            link.rtt_ms = self._ewma(link.rtt_ms, rtt_ms)
        if mbps is not None:
            # A step change (a WiFi rate switch, a reshaped link) replaces the estimate at once.
            stepped = link.mbps is not None and not 0.5 <= mbps / max(link.mbps, 1e-9) <= 2.0
            link.mbps = mbps if stepped else self._ewma(link.mbps, mbps)
        link.measured_s = now_s
        link.samples += 1
        link.source = source

    def observe_gloo(self, peer: str, now_s: float, mbps: float) -> None:
        """Bytes over time of a GLOO job: a lower bound on the link, kept apart from the probes'."""
        link = self.links.setdefault(peer, LinkEstimate())
        link.gloo_mbps = self._ewma(link.gloo_mbps, mbps)

    def report(self, now_s: float) -> dict[str, dict[str, Any]]:
        """JSON view for health: per peer, RTT, bandwidth and age in seconds."""
        return {
            peer: {
                "rtt_ms": None if link.rtt_ms is None else round(link.rtt_ms, 3),
                "mbps": None if link.mbps is None else round(link.mbps, 1),
                "age_s": None if link.measured_s is None else round(now_s - link.measured_s, 1),
                "gloo_mbps": None if link.gloo_mbps is None else round(link.gloo_mbps, 1),
                "samples": link.samples,
                "source": link.source,
            }
            for peer, link in sorted(self.links.items())
        }
