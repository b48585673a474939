"""Load monitors (docs/design.md §6): what a node reports about its CPU, memory and GPU.

Readers take a filesystem root so tests can point them at fake /proc and /sys trees.
"""

from __future__ import annotations

import os
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
