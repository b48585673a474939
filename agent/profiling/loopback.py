"""The offline profiler: timed passes of every option over a grid, into a :class:`PerfMap`.

Without peers it runs the ranks as local processes joined by a real GLOO group on loopback
(one torch thread each, as ``bench engine`` does), so one box can profile itself; the link
model then carries the cells to real links. Warm-up passes are not timed. Energy comes from
the box's meter (which covers every rank, all being on this box) or, without a sensor, from
the CPU-time model over every rank's process plus ``idle_w`` per rank while it waits.

The options are local, full exchange and each method (Segment Means, codes) at each CR;
a codes CR too tight for the model (1-bit codes of every row do not fit) is skipped and
said so. Every option runs on the same inputs as the local pass (real text where the model
has a tokenizer), and its fidelity against the local pass goes into its cell.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from agent.base.energy import CpuModelMeter, Meter, find_meter
from agent.profiling.accuracy import Score, exact, score
from agent.profiling.progress import Progress, kind_of
from engine.adapters import Adapter, Task, Tensors
from engine.errors import BadRequest
from engine.inputs import make_inputs
from engine.models import LoadedModel, fingerprint, load
from engine.program import plan_job
from engine.segments import Compression, Method
from engine.sim import run_local
from engine.trace import RunResult
from policy.perfmap import METHODS, Cell, ModelShape, PerfMap, hardware_fingerprint, option_name
from policy.predict import fit_link_efficiency
from transport.localcluster import ClusterConfig, LocalCluster

#: One option of the grid: (mode, method, cr) with mode local, full or prism.
GridOption = tuple[str, str | None, float | None]


@dataclass(frozen=True, slots=True)
class Grid:
    """What to measure: batches x options, ``repeat`` timed passes each after ``warmup``.
    Each method in ``methods`` runs at every CR of ``crs`` (None there: full exchange)."""

    model: str
    ranks: int = 2
    batches: tuple[int, ...] = (1, 2, 4, 8, 16)
    crs: tuple[float | None, ...] = (None, 2.0, 4.0, 8.0, 16.0)  # None: full exchange
    seq: int | None = None
    repeat: int = 6
    warmup: int = 1
    idle_w: float = 0.0
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        for m in self.methods:
            Method.parse(m)  # BadRequest names the known ones
        if len(set(self.methods)) != len(self.methods):
            raise BadRequest(f"methods named twice: {', '.join(self.methods)}")

    @property
    def options(self) -> list[GridOption]:
        """(mode, method, cr) per option: local, full exchange, then each method at each CR."""
        out: list[GridOption] = [("local", None, None)]
        if None in self.crs:
            out.append(("full", None, None))
        out += [("prism", m, cr) for m in self.methods for cr in self.crs if cr is not None]
        return out

    @property
    def cells(self) -> int:
        """Cells measured in all: every option at every batch size."""
        return len(self.batches) * len(self.options)

    @property
    def passes(self) -> int:
        """Timed passes in all."""
        return self.cells * self.repeat


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

    def measure(self, fn: Callable[[], RunResult], ranks: int) -> tuple[Pass, RunResult]:
        """One timed call: its figures and its result."""
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
        return Pass.of(seconds, joules, result), result


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
    *,
    method: str | None = None,
    fidelity: Score | None = None,
) -> Cell:
    """A map cell from timed passes: median and p90, the median pass's breakdown, and the
    option's ``fidelity`` against the local pass."""
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
        method=method if mode == "prism" else None,
        cosine=None if fidelity is None else fidelity.cosine,
        cosine_min=None if fidelity is None else fidelity.cosine_min,
        top1=None if fidelity is None else fidelity.top1,
    )


def energy_label(source: str, idle_w: float) -> str:
    """The map's ``energy_source``: the meter, and the idle power the CPU-time model added."""
    return source if idle_w == 0 or source != "cpu-model" else f"cpu-model+idle {idle_w:g} W"


#: One option's timed pass: its figures, and the result (whose outputs are scored).
Timed = Callable[[], tuple["Pass", RunResult]]


def _rounds(
    options: list[tuple[str, Timed]], grid: Grid, progress: Progress
) -> dict[str, tuple[list[Pass], RunResult]]:
    """Warm every option up, then time them in turns, so a burst of other load on the box lands
    on all of them alike instead of on whichever option was being measured. Per option: its
    timed passes and its last result."""
    for label, fn in options:
        for _ in range(grid.warmup):
            start = time.perf_counter()
            fn()
            progress.step(label, time.perf_counter() - start, timed=False)
    out: dict[str, tuple[list[Pass], RunResult]] = {}
    for _ in range(grid.repeat):
        for label, fn in options:
            measured, result = fn()
            progress.step(label, measured.seconds)
            out[label] = (out.get(label, ([], result))[0] + [measured], result)
    return out


def _runner(
    model: LoadedModel,
    task: Task,
    inputs: Tensors,
    cluster: LocalCluster | None,
    ranks: int,
    cr: float | None,
    method: str | None,
) -> Callable[[], RunResult]:
    """One pass: local when there is no cluster, else split over ``ranks`` GLOO processes.
    Raises BadRequest for an option the model cannot take (a codes CR too tight for it)."""
    if cluster is None:
        return lambda: run_local(model.adapter, task, inputs)
    comp = Compression(cr=cr, method=Method.parse(method or Method.MEANS.value))
    spec = plan_job(model.adapter, model.name, task, inputs, ranks=ranks, comp=comp)
    return lambda: cluster.run(model, spec, inputs)


def model_shape(adapter: Adapter) -> ModelShape:
    """What the policy's share weighing needs of the model: width, FFN expansion, causal."""
    return ModelShape(hidden=adapter.hidden_size, ffn=adapter.ffn_ratio, causal=adapter.causal)


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
    perf.shapes[grid.model] = model_shape(model.adapter)
    with LocalCluster(ClusterConfig(ranks=grid.ranks, threads=1)) as cluster:
        cluster.prepare(model)
        energy = _Energy(meter, cluster.worker_pids, grid.idle_w)
        progress.start = time.monotonic()  # the ETA counts passes, not model loading
        for batch in grid.batches:
            inputs = make_inputs(model, batch, grid.seq, 0)
            seq = model.adapter.shapes(inputs).n_tokens
            options: list[tuple[str, GridOption, Timed]] = []
            for mode, method, cr in grid.options:
                ranks = 1 if mode == "local" else grid.ranks
                label = f"batch {batch} {option_name(method or mode, cr, ranks)}"
                try:
                    run = _runner(model, task, inputs, cluster if ranks > 1 else None, ranks, cr, method)
                except BadRequest as exc:
                    progress.skip(batch, kind_of(mode, method), grid.warmup + grid.repeat, f"{label}: {exc}")
                    continue
                options.append((label, (mode, method, cr), lambda run=run, ranks=ranks: energy.measure(run, ranks)))  # type: ignore[misc]
            passes = _rounds([(label, fn) for label, _, fn in options], grid, progress)
            reference = next(
                result for label, (mode, *_), _ in options if mode == "local" for result in [passes[label][1]]
            )
            for label, (mode, method, cr), _ in options:
                ranks = 1 if mode == "local" else grid.ranks
                runs, result = passes[label]
                fidelity = exact(task) if mode != "prism" else score(task, reference.outputs, result.outputs)
                cell = make_cell(grid.model, batch, seq, mode, cr, ranks, runs, method=method, fidelity=fidelity)
                perf.cells.append(cell)
    perf.link_efficiency = fit_link_efficiency(perf)
    return perf
