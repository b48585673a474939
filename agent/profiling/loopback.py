"""The offline profiler: timed passes of every option over a grid, into a :class:`PerfMap`.

Without peers it runs the ranks as local processes joined by a real GLOO group on loopback
(one torch thread each, as ``bench engine`` does), so one box can profile itself; the link
model then carries the cells to real links. Warm-up passes are not timed. Energy comes from
the box's meter (which covers every rank, all being on this box) or, without a sensor, from
the CPU-time model over every rank's process plus ``idle_w`` per rank while it waits.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from agent.node.energy import CpuModelMeter, Meter, find_meter
from engine.adapters import Task, Tensors
from engine.inputs import make_inputs
from engine.localcluster import ClusterConfig, LocalCluster
from engine.models import LoadedModel, fingerprint, load
from engine.program import plan_job
from engine.segments import Compression
from engine.sim import run_local
from engine.trace import RunResult
from policy.perfmap import Cell, PerfMap, hardware_fingerprint
from policy.predict import fit_link_efficiency


@dataclass(frozen=True, slots=True)
class Grid:
    """What to measure: batches x options, ``repeat`` timed passes each after ``warmup``."""

    model: str
    ranks: int = 2
    batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    crs: tuple[float | None, ...] = (None, 2.0, 4.0, 8.0, 16.0)  # None: full exchange
    seq: int | None = None
    repeat: int = 6
    warmup: int = 1
    idle_w: float = 0.0

    @property
    def cells(self) -> int:
        """Options measured per batch size: local plus one per CR."""
        return len(self.batches) * (1 + len(self.crs))

    @property
    def passes(self) -> int:
        """Timed passes in all."""
        return self.cells * self.repeat


#: Until a split pass has been timed, one is priced at this many local passes of the same batch.
SPLIT_PRIOR = 1.5


def _kind(label: str) -> str:
    """``local``, ``full`` or ``prism``: passes of one kind cost alike per sample."""
    mode = label.split()[-1]
    return mode.split("@")[0]


@dataclass(slots=True)
class Progress:
    """A progress bar with an ETA on a terminal, a line per tenth elsewhere.

    ``plan`` lists every pass to come, in order, as (batch, kind, timed): warm-ups count for
    the ETA though not in the pass count. The ETA prices each remaining pass at the seconds
    per sample measured so far for its kind (local, full, prism), since a batch of 16 costs
    far more than a batch of 1 and a split pass costs otherwise than a local one; a kind not
    measured yet is priced from the others (split ones at :data:`SPLIT_PRIOR` x local).
    """

    plan: list[tuple[int, str, bool]]
    out: TextIO = field(default_factory=lambda: sys.stderr)
    done: int = 0
    start: float = field(default_factory=time.monotonic)
    _cost: dict[str, list[float]] = field(default_factory=dict)  # kind -> [seconds, samples]
    _shown: int = -1

    @classmethod
    def for_grid(cls, grid: Grid, out: TextIO | None = None, *, interleaved: bool = False) -> Progress:
        """The plan for ``grid``: cell after cell (``profile_peers``), or per batch the warm-ups,
        then the options taking turns pass by pass (:func:`profile_loopback`)."""
        kinds = ["local", *("full" if c is None else "prism" for c in grid.crs)]
        plan: list[tuple[int, str, bool]] = []
        for batch in grid.batches:
            if interleaved:
                plan += [(batch, kind, False) for kind in kinds for _ in range(grid.warmup)]
                plan += [(batch, kind, True) for _ in range(grid.repeat) for kind in kinds]
            else:
                for kind in kinds:
                    plan += [(batch, kind, False)] * grid.warmup + [(batch, kind, True)] * grid.repeat
        return cls(plan, out or sys.stderr)

    @property
    def total(self) -> int:
        """Timed passes in all."""
        return sum(1 for *_, timed in self.plan if timed)

    def eta_s(self) -> float | None:
        """Seconds the remaining passes should take; None before anything was measured."""
        if not self._cost:
            return None
        rate = {kind: s / n for kind, (s, n) in self._cost.items()}
        local = rate.get("local") or min(rate.values()) / SPLIT_PRIOR
        split = [r for k, r in rate.items() if k != "local"]
        default_split = sum(split) / len(split) if split else local * SPLIT_PRIOR
        return sum(
            batch * rate.get(kind, local if kind == "local" else default_split)
            for batch, kind, _ in self.plan[self.done :]
        )

    def step(self, label: str, seconds: float, timed: bool = True) -> None:
        """One pass (``label`` ends with its option) took ``seconds``."""
        batch, kind, _ = self.plan[self.done] if self.done < len(self.plan) else (1, _kind(label), timed)
        self.done += 1
        spent = self._cost.setdefault(kind, [0.0, 0.0])
        spent[0] += seconds
        spent[1] += batch
        if not timed:
            return
        count = sum(1 for *_, t in self.plan[: self.done] if t)
        total = self.total
        elapsed = time.monotonic() - self.start
        eta = self.eta_s()
        left = "-" if eta is None else f"{eta:.0f} s"
        line = f"{count}/{total} passes, {elapsed:.0f} s, about {left} left ({label})"
        if self.out.isatty():
            filled = int(30 * count / total)
            self.out.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {line}   ")
            if count == total:
                self.out.write("\n")
        elif (tenth := 10 * count // total) != self._shown:
            self._shown = tenth
            self.out.write(f"profile: {line}\n")
        self.out.flush()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class _Energy:
    """Joules of one pass over all ranks (see the module docstring)."""

    def __init__(self, meter: Meter, pids: list[int], idle_w: float) -> None:
        self.meter, self.pids, self.idle_w = meter, pids, idle_w

    @property
    def source(self) -> str:
        return self.meter.source

    def measure(self, fn: Callable[[], RunResult], ranks: int) -> Pass:
        """One timed call."""
        others = [_cpu_s(p) for p in self.pids]
        token = self.meter.start()
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        joules = self.meter.stop(token).joules
        if isinstance(self.meter, CpuModelMeter):
            cpu = sum(_cpu_s(p) - b for p, b in zip(self.pids, others, strict=True))
            joules += cpu * self.meter.watts_per_core
            busy = sum(t.compute_s + t.staging_s for t in result.traces) or seconds
            joules += self.idle_w * max(0.0, ranks * seconds - busy)
        return Pass.of(seconds, joules, result)


@dataclass(frozen=True, slots=True)
class Pass:
    """One timed pass: wall seconds, joules over every rank, and rank 0's breakdown."""

    seconds: float
    joules: float
    compute_s: float = 0.0
    comm_s: float = 0.0
    staging_s: float = 0.0
    overhead_s: float = 0.0
    wire_bytes: int = 0
    rounds: int = 0

    @classmethod
    def of(cls, seconds: float, joules: float, result: RunResult) -> Pass:
        """From an engine result (the coordinator's trace)."""
        t = result.traces[0]
        return cls(seconds, joules, t.compute_s, t.comm_s, t.staging_s, t.overhead_s, result.wire_bytes, t.rounds)


def make_cell(
    model: str,
    batch: int,
    seq: int,
    mode: str,
    cr: float | None,
    ranks: int,
    passes: list[Pass],
    mbps: float | None = None,
) -> Cell:
    """A map cell from timed passes: median and p90, and the median pass's breakdown."""
    passes = sorted(passes, key=lambda r: r.seconds)
    secs = [r.seconds for r in passes]
    mid = passes[len(passes) // 2]
    return Cell(
        model=model,
        batch=batch,
        seq=seq,
        mode=mode,
        cr=cr,
        ranks=ranks,
        median_ms=statistics.median(secs) * 1e3,
        p90_ms=secs[min(len(secs) - 1, int(0.9 * len(secs)))] * 1e3,
        samples=len(secs),
        compute_ms=mid.compute_s * 1e3 if mode != "local" else statistics.median(secs) * 1e3,
        comm_ms=mid.comm_s * 1e3,
        staging_ms=mid.staging_s * 1e3,
        overhead_ms=mid.overhead_s * 1e3,
        wire_bytes=mid.wire_bytes,
        rounds=mid.rounds,
        energy_j=statistics.median(r.joules for r in passes) / batch,
        mbps=mbps,
    )


def energy_label(source: str, idle_w: float) -> str:
    """The map's ``energy_source``: the meter, and the idle power the CPU-time model added."""
    return source if idle_w == 0 or source != "cpu-model" else f"cpu-model+idle {idle_w:g} W"


def _rounds(options: list[tuple[str, Callable[[], Pass]]], grid: Grid, progress: Progress) -> dict[str, list[Pass]]:
    """Warm every option up, then time them in turns, so a burst of other load on the box lands
    on all of them alike instead of on whichever option was being measured."""
    for label, fn in options:
        for _ in range(grid.warmup):
            start = time.perf_counter()
            fn()
            progress.step(label, time.perf_counter() - start, timed=False)
    passes: dict[str, list[Pass]] = {label: [] for label, _ in options}
    for _ in range(grid.repeat):
        for label, fn in options:
            measured = fn()
            progress.step(label, measured.seconds)
            passes[label].append(measured)
    return passes


def _runner(
    model: LoadedModel, task: Task, inputs: Tensors, cluster: LocalCluster | None, ranks: int, cr: float | None
) -> Callable[[], RunResult]:
    """One pass: local when there is no cluster, else split over ``ranks`` GLOO processes."""
    if cluster is None:
        return lambda: run_local(model.adapter, task, inputs)
    spec = plan_job(model.adapter, model.name, task, inputs, ranks=ranks, comp=Compression(cr=cr))
    return lambda: cluster.run(model, spec, inputs)


def profile_loopback(grid: Grid, progress: Progress | None = None) -> PerfMap:
    """Measure ``grid`` on this box: local passes here, distributed ones over a GLOO group of
    ``grid.ranks`` local processes on loopback."""
    torch.set_num_threads(1)
    progress = progress or Progress.for_grid(grid, interleaved=True)
    model: LoadedModel = load(grid.model)
    task = model.adapter.default_task()
    meter = find_meter()
    perf = PerfMap(
        hardware=hardware_fingerprint(threads=1),
        models={grid.model: fingerprint(model.adapter)},
        energy_source=energy_label(meter.source, grid.idle_w),
    )
    with LocalCluster(ClusterConfig(ranks=grid.ranks, threads=1)) as cluster:
        cluster.prepare(model)
        energy = _Energy(meter, cluster.worker_pids, grid.idle_w)
        progress.start = time.monotonic()  # the ETA counts passes, not model loading
        for batch in grid.batches:
            inputs = make_inputs(model, batch, grid.seq, 0)
            seq = model.adapter.shapes(inputs).n_tokens
            options = [("local", None), *(("full" if c is None else "prism", c) for c in grid.crs)]
            timed: list[tuple[str, Callable[[], Pass]]] = []
            for mode, cr in options:
                ranks = 1 if mode == "local" else grid.ranks
                run = _runner(model, task, inputs, cluster if ranks > 1 else None, ranks, cr)
                label = f"batch {batch} {mode}" + ("" if cr is None else f"@{cr:g}")
                timed.append((label, lambda run=run, ranks=ranks: energy.measure(run, ranks)))  # type: ignore[misc]
            passes = _rounds(timed, grid, progress)
            for (mode, cr), (label, _) in zip(options, timed, strict=True):
                ranks = 1 if mode == "local" else grid.ranks
                perf.cells.append(make_cell(grid.model, batch, seq, mode, cr, ranks, passes[label]))
    perf.link_efficiency = fit_link_efficiency(perf)
    return perf
