"""What a run reports: outputs plus, per rank, bytes moved and where the time went."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, field, fields
from typing import Any

import torch

from engine.adapters import Tensors


@dataclass(slots=True)
class RankTrace:
    """One rank's bytes and seconds for one job.

    ``exchange_*`` counts the per-layer hidden-state traffic (what PRISM compresses);
    ``io_*`` counts inputs scattered and outputs reduced (the same in every mode).
    ``rounds`` counts collectives (each costs at least one link latency);
    ``overhead_s`` is wall time not spent computing, communicating or staging.

    Under overlap ``comm_s`` is only the time this rank spent blocked on the group
    (launching collectives and waiting for them), never time it computed while an
    exchange was in flight; that time is ``overlap_s`` (wall time with at least one
    exchange in flight, less the time spent in the group meanwhile: an upper bound on the
    communication hidden, as an exchange may finish before its wait). ``hidden_rounds``
    counts exchanges already complete when this rank came to wait for them.
    """

    rank: int = 0
    exchange_bytes_sent: int = 0
    exchange_bytes_recv: int = 0
    io_bytes_sent: int = 0
    io_bytes_recv: int = 0
    rounds: int = 0
    compute_s: float = 0.0
    comm_s: float = 0.0
    staging_s: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this rank's process CPU time during the job (for energy models)
    overlap_s: float = 0.0
    hidden_rounds: int = 0

    @property
    def overhead_s(self) -> float:
        """Wall time not accounted to compute, communication or staging."""
        return max(0.0, self.wall_s - self.compute_s - self.comm_s - self.staging_s)

    @property
    def link_s(self) -> float:
        """An upper bound on the time this rank's traffic was on the wire: blocked in the
        group, or computing with an exchange in flight (bytes / link_s bounds the link's rate
        from below, with or without overlap; bytes / comm_s does not under overlap)."""
        return self.comm_s + self.overlap_s

    @contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Add the block's duration to ``{what}_s``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            name = f"{what}_s"
            setattr(self, name, getattr(self, name) + time.perf_counter() - start)

    def to_tensor(self) -> torch.Tensor:
        """Packed as float64, to gather traces over the group."""
        return torch.tensor([float(v) for v in astuple(self)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> RankTrace:
        """Inverse of :meth:`to_tensor`."""
        items: dict[str, Any] = {}
        for f, v in zip(fields(cls), values.tolist(), strict=True):
            items[f.name] = int(v) if f.type in ("int", int) else float(v)
        return cls(**items)

    def as_dict(self) -> dict[str, float]:
        """JSON-friendly view, overhead included."""
        out: dict[str, float] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["overhead_s"] = self.overhead_s
        return out


@contextmanager
def computing(trace: RankTrace, device: torch.device) -> Iterator[None]:
    """Book the block as compute; on CUDA wait for its kernels first (else their time would
    land on whatever synchronizes next, such as a staging copy)."""
    with trace.timing("compute"):
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)


@dataclass(slots=True)
class RunResult:
    """Outputs of a job (on the coordinator) and every rank's trace."""

    outputs: Tensors
    traces: list[RankTrace] = field(default_factory=list)

    @property
    def exchange_bytes(self) -> int:
        """Hidden-state bytes that crossed the group, all ranks together."""
        return sum(t.exchange_bytes_sent for t in self.traces)

    @property
    def wire_bytes(self) -> int:
        """Bytes on the busiest uplink, in sequence: the largest per-layer exchange sender
        (ranks send at once) plus every rank's inputs/outputs (one sender at a time)."""
        if not self.traces:
            return 0
        return max(t.exchange_bytes_sent for t in self.traces) + sum(t.io_bytes_sent for t in self.traces)

    @property
    def wall_s(self) -> float:
        """Coordinator's wall time."""
        return self.traces[0].wall_s if self.traces else 0.0
