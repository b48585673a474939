"""The performance map (docs/design.md §4): what each way of running a job cost, as measured.

One :class:`Cell` per (model, batch, seq, mode, method, CR, ranks, link bandwidth): latency
median and p90, the compute / communication / staging / overhead breakdown, the bytes on the
busiest uplink, the number of collectives, energy per sample, and how close the option's
output came to the local model's (fidelity). The file is versioned JSON and names the
hardware and the model weights it was measured on; :func:`load_map` says when either differs
from the loader's, so a map is never trusted silently.

Version 2 added the exchange method and fidelity of each cell and the models' shapes.
Version 1 files still load: their compressed cells are Segment Means (``means``) and carry
no fidelity, which the policy never assumes meets an accuracy floor.
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
from engine.segments import Method
from engine.weights import same_weights

MAP_VERSION = 2
#: Versions this agent reads (older ones are upgraded on load and written back as the current).
READABLE_VERSIONS = (1, 2)
MODES = ("local", "full", "prism")
#: What a compressed ("prism") cell sent: engine.segments.Method values.
METHODS = tuple(m.value for m in Method)
#: Every way to run a job, as the policy names them: local, full exchange, or a method at a CR.
KINDS = ("local", "full", *METHODS)


def option_name(kind: str, cr: float | None, ranks: int) -> str:
    """``local``, ``full`` or ``means@8`` / ``codes@8``, with ``xP`` for more than 2 ranks."""
    name = kind if kind in ("local", "full") else f"{kind}@{cr:g}"
    return name if ranks <= 2 or kind == "local" else f"{name}x{ranks}"


class MapError(PrismError):
    """A map file is missing, malformed or of another version."""

    code = "map_error"


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the compute model needs of a model to weigh shares (engine.cost): hidden size,
    FFN expansion and whether attention is causal. Maps without one get these defaults."""

    hidden: int = 768
    ffn: float = 4.0
    causal: bool = False


@dataclass(slots=True)
class Cell:
    """One measured configuration. ``mbps`` is the link it was measured over (None: loopback,
    never the bottleneck); ``wire_bytes`` and ``rounds`` let the link model move it to others.

    ``method`` is ``means`` or ``codes`` for compressed (``prism``) cells, None otherwise.
    ``cosine`` / ``cosine_min`` are the mean and least per-sample cosine of the main output
    against the local model's on the same inputs, ``top1`` the argmax agreement (models
    with logits); None where not measured."""

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
    method: str | None = None
    cosine: float | None = None
    cosine_min: float | None = None
    top1: float | None = None

    @property
    def kind(self) -> str:
        """``local``, ``full``, ``means`` or ``codes``."""
        return (self.method or Method.MEANS.value) if self.mode == "prism" else self.mode

    @property
    def option(self) -> str:
        """``local``, ``full``, ``means@CR`` or ``codes@CR`` (with ranks when > 2)."""
        return option_name(self.kind, self.cr, self.ranks)

    @property
    def fidelity(self) -> float | None:
        """The cosine the policy holds against its floor: 1.0 for local and full exchange
        (exact), the measured mean cosine otherwise (None: never measured)."""
        return 1.0 if self.mode in ("local", "full") else self.cosine


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
    #: Per model, what weighing shares needs to know of it (absent: ModelShape defaults).
    shapes: dict[str, ModelShape] = field(default_factory=dict)
    version: int = MAP_VERSION

    def for_model(self, model: str) -> list[Cell]:
        """This model's cells."""
        return [c for c in self.cells if c.model == model]

    def shape(self, model: str) -> ModelShape:
        """``model``'s shape, or the defaults when the map does not know it."""
        return self.shapes.get(model, ModelShape())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (always the current version)."""
        out = asdict(self)
        out["cells"] = [asdict(c) for c in self.cells]
        out["version"] = MAP_VERSION
        return out

    @classmethod
    def from_dict(cls, data: Any) -> PerfMap:
        """Inverse of :meth:`to_dict`, reading older versions too (see the module docstring);
        raises :class:`MapError` on anything unexpected."""
        if not isinstance(data, dict):
            raise MapError("a performance map is a JSON object")
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            known = ", ".join(str(v) for v in READABLE_VERSIONS)
            raise MapError(f"performance map version {version!r}; this agent reads versions {known}")
        names = {f.name for f in fields(Cell)}
        try:
            cells = [Cell(**{k: v for k, v in c.items() if k in names}) for c in data["cells"]]
            corrections = {str(k): float(v) for k, v in data.get("corrections", {}).items()}
            if version == 1:  # before methods: every compressed cell and correction was Segment Means
                for c in cells:
                    c.method = Method.MEANS.value if c.mode == "prism" else None
                corrections = {k.replace("/prism/", "/means/"): v for k, v in corrections.items()}
            seen = set()
            for c in cells:
                _check_cell(c)
                key = (c.model, c.batch, c.seq, c.mode, c.method, c.cr, c.ranks, c.mbps)
                if key in seen:
                    raise MapError(f"the map measures {c.model} batch {c.batch} {c.option} twice")
                seen.add(key)
            return cls(
                hardware=dict(data["hardware"]),
                models={str(k): float(v) for k, v in data["models"].items()},
                energy_source=str(data["energy_source"]),
                cells=cells,
                corrections=corrections,
                link_efficiency=float(data.get("link_efficiency", 1.0)),
                shapes={str(k): ModelShape(**v) for k, v in data.get("shapes", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MapError(f"malformed performance map: {exc}") from None


def _check_cell(c: Cell) -> None:
    """Raise :class:`MapError` for a cell no profiler writes."""
    compressed = c.mode == "prism"
    ok = c.mode in MODES and c.batch >= 1 and c.ranks >= 1 and c.median_ms > 0
    ok = ok and ((c.method in METHODS and c.cr is not None) if compressed else c.method is None)
    ok = ok and all(v is None or -1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in (c.cosine, c.cosine_min, c.top1))
    if not ok:
        raise MapError(f"bad cell: {c}")


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
