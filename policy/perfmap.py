"""The performance map (DESIGN.md §4): what each way of running a job cost, as measured.

One :class:`Cell` per (model, batch, seq, mode, CR, ranks, link bandwidth): latency median
and p90, the compute / communication / staging / overhead breakdown, the bytes on the busiest
uplink, the number of collectives, and energy per sample. The file is versioned JSON and
names the hardware and the model weights it was measured on; :func:`load_map` says when
either differs from the loader's, so a map is never trusted silently.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.errors import PrismError
from engine.weights import same_weights

MAP_VERSION = 1
MODES = ("local", "full", "prism")


class MapError(PrismError):
    """A map file is missing, malformed or of another version."""

    code = "map_error"


@dataclass(slots=True)
class Cell:
    """One measured configuration. ``mbps`` is the link it was measured over (None: loopback,
    never the bottleneck); ``wire_bytes`` and ``rounds`` let the link model move it to others."""

    model: str
    batch: int
    seq: int
    mode: str
    cr: float | None
    ranks: int
    median_ms: float
    p90_ms: float
    samples: int
    compute_ms: float = 0.0
    comm_ms: float = 0.0
    staging_ms: float = 0.0
    overhead_ms: float = 0.0
    wire_bytes: int = 0
    rounds: int = 0
    energy_j: float = 0.0
    mbps: float | None = None

    @property
    def option(self) -> str:
        """``local``, ``full`` or ``prism@CR`` (with ranks when > 2)."""
        name = self.mode if self.mode != "prism" else f"prism@{self.cr:g}"
        return name if self.ranks <= 2 or self.mode == "local" else f"{name}x{self.ranks}"


@dataclass(slots=True)
class PerfMap:
    """Cells plus where they were measured and the online corrections learned since."""

    hardware: dict[str, Any]
    models: dict[str, float]
    energy_source: str
    cells: list[Cell] = field(default_factory=list)
    #: (option key -> observed/predicted latency, EWMA), learned while serving.
    corrections: dict[str, float] = field(default_factory=dict)
    #: Link model fitted from cells measured at several bandwidths (see policy.predict).
    link_efficiency: float = 1.0
    version: int = MAP_VERSION

    def for_model(self, model: str) -> list[Cell]:
        """This model's cells."""
        return [c for c in self.cells if c.model == model]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = asdict(self)
        out["cells"] = [asdict(c) for c in self.cells]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> PerfMap:
        """Inverse of :meth:`to_dict`; raises :class:`MapError` on anything unexpected."""
        if not isinstance(data, dict):
            raise MapError("a performance map is a JSON object")
        if data.get("version") != MAP_VERSION:
            raise MapError(f"performance map version {data.get('version')!r}; this agent reads {MAP_VERSION}")
        names = {f.name for f in fields(Cell)}
        try:
            cells = [Cell(**{k: v for k, v in c.items() if k in names}) for c in data["cells"]]
            seen = set()
            for c in cells:
                if c.mode not in MODES or c.batch < 1 or c.ranks < 1 or not c.median_ms > 0:
                    raise MapError(f"bad cell: {c}")
                key = (c.model, c.batch, c.seq, c.mode, c.cr, c.ranks, c.mbps)
                if key in seen:
                    raise MapError(f"the map measures {c.model} batch {c.batch} {c.option} twice")
                seen.add(key)
            return cls(
                hardware=dict(data["hardware"]),
                models={str(k): float(v) for k, v in data["models"].items()},
                energy_source=str(data["energy_source"]),
                cells=cells,
                corrections={str(k): float(v) for k, v in data.get("corrections", {}).items()},
                link_efficiency=float(data.get("link_efficiency", 1.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MapError(f"malformed performance map: {exc}") from None


def hardware_fingerprint(threads: int, device: str = "cpu") -> dict[str, Any]:
    """What makes timings comparable: CPU (or GPU) model, cores, torch threads, torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "threads": threads,
        "device": device,
        "gpu": gpu,
        "torch": torch.__version__.split("+")[0],
    }


def save_map(perf: PerfMap, path: Path) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(perf.to_dict(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_map(path: Path) -> PerfMap:
    """Read a map file; raises :class:`MapError` with a one-line reason."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise MapError(f"cannot read performance map {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise MapError(f"performance map {path} is not JSON: {exc}") from None
    return PerfMap.from_dict(data)


def mismatches(perf: PerfMap, hardware: dict[str, Any], models: dict[str, float]) -> list[str]:
    """Why this map may not describe this node: other hardware, other weights. Empty: trusted."""
    out = [
        f"measured with {key}={perf.hardware.get(key)!r}, this node has {hardware.get(key)!r}"
        for key in ("cpu", "cores", "threads", "device", "gpu")
        if perf.hardware.get(key) != hardware.get(key)
    ]
    for name, fp in models.items():
        theirs = perf.models.get(name)
        if theirs is not None and not same_weights(fp, theirs):
            out.append(f"model '{name}' was profiled with other weights")
    return out
