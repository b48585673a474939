"""The engine-level commands: ``fidelity``, ``bench engine`` and ``demo``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.adapters import Task, Tensors
from engine.cost import macs_reduction
from engine.fidelity import compare, job_fidelity
from engine.inputs import make_inputs
from engine.models import LoadedModel, load
from engine.program import JobSpec, plan_job
from engine.segments import Compression
from engine.sim import run_local, run_simulated
from engine.trace import RunResult
from transport.localcluster import ClusterConfig, LocalCluster


@dataclass(frozen=True, slots=True)
class JobArgs:
    """What the engine commands share: model, ranks, compression, input size."""

    model: str
    ranks: int
    comp: Compression
    batch: int
    seq: int | None
    task: str | None = None
    seed: int = 0
    overlap: bool = True
    chunks: int | None = None


def prepare(args: JobArgs) -> tuple[LoadedModel, Task, Tensors, JobSpec]:
    """Load the model, build inputs and the job spec."""
    model = load(args.model)
    task = Task(args.task) if args.task else model.adapter.default_task()
    inputs = make_inputs(model, args.batch, args.seq, args.seed)
    spec = plan_job(
        model.adapter,
        model.name,
        task,
        inputs,
        ranks=args.ranks,
        comp=args.comp,
        overlap=args.overlap,
        chunks=args.chunks,
    )
    return model, task, inputs, spec


def _how(spec: JobSpec) -> dict[str, Any]:
    """How a job ran: overlap, chunks and the dtype segment rows crossed in."""
    return {"overlap": spec.overlap, "chunks": spec.chunks, "wire_dtype": spec.comp.wire_dtype or "model"}


def fidelity(args: JobArgs, runner: str) -> dict[str, Any]:
    """PRISM vs the plain local model on the same inputs."""
    model, task, inputs, spec = prepare(args)
    ref = run_local(model.adapter, task, inputs)
    if runner == "gloo":
        with LocalCluster(ClusterConfig(ranks=args.ranks, threads=torch.get_num_threads())) as cluster:
            got = cluster.run(model, spec, inputs)
    else:
        got = run_simulated(model.adapter, spec, inputs)
    return {
        "model": model.name,
        "task": task.value,
        "ranks": args.ranks,
        "cr": "full" if args.comp.cr is None else args.comp.cr,
        "batch": spec.batch,
        "seq": spec.plan.n_tokens,
        "runner": runner,
        **_how(spec),
        **job_fidelity(model.adapter, spec, ref.outputs, got),
    }


def _timed(fn: Callable[[], RunResult], warmup: int, repeat: int) -> tuple[float, RunResult]:
    """Median wall ms over ``repeat`` runs after ``warmup``, and the median run."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - start, result))
    runs.sort(key=lambda r: r[0])
    median_s, result = runs[len(runs) // 2]
    return median_s * 1e3, result


def _breakdown(result: RunResult) -> dict[str, float]:
    t = result.traces[0]
    return {
        "compute_ms": t.compute_s * 1e3,
        "comm_ms": t.comm_s * 1e3,
        "staging_ms": t.staging_s * 1e3,
        "overhead_ms": t.overhead_s * 1e3,
        "overlap_ms": t.overlap_s * 1e3,
        "hidden_rounds": t.hidden_rounds,
    }


def bench_engine(args: JobArgs, warmup: int, repeat: int) -> dict[str, Any]:
    """Local vs full exchange vs PRISM over a real GLOO group on loopback, one thread each."""
    torch.set_num_threads(1)
    model, task, inputs, spec = prepare(args)
    full_comp = Compression(cr=None, wire_dtype=args.comp.wire_dtype)
    full_spec = plan_job(
        model.adapter,
        model.name,
        task,
        inputs,
        ranks=args.ranks,
        comp=full_comp,
        overlap=spec.overlap,
        chunks=spec.chunks,
    )
    local_ms, _ = _timed(lambda: run_local(model.adapter, task, inputs), warmup, repeat)
    with LocalCluster(ClusterConfig(ranks=args.ranks, threads=1)) as cluster:
        cluster.prepare(model)
        full_ms, full = _timed(lambda: cluster.run(model, full_spec, inputs), warmup, repeat)
        dist_ms, prism = _timed(lambda: cluster.run(model, spec, inputs), warmup, repeat)
    d, f = model.adapter.hidden_size, model.adapter.ffn_ratio
    return {
        "model": model.name,
        "task": task.value,
        "ranks": args.ranks,
        "cr": "full" if args.comp.cr is None else args.comp.cr,
        "keep_first": args.comp.keep_first,
        **_how(spec),
        "batch": spec.batch,
        "seq": spec.plan.n_tokens,
        "method": args.comp.method.value,
        "bytes_full": full.exchange_bytes,
        "bytes_prism": prism.exchange_bytes,
        "bytes_ratio": prism.exchange_bytes / full.exchange_bytes if full.exchange_bytes else None,
        "comm_reduction": 1.0 - prism.exchange_bytes / full.exchange_bytes,
        "macs_reduction_vs_local": macs_reduction(spec.plan, args.comp, d, f, model.adapter.causal),
        "local_ms": local_ms,
        "full_ms": full_ms,
        "distributed_ms": dist_ms,
        "speedup_vs_local": local_ms / dist_ms,
        "prism_breakdown": _breakdown(prism),
        "full_breakdown": _breakdown(full),
        "repeat": repeat,
    }


def demo(model_name: str, batch: int, crs: list[float]) -> list[dict[str, Any]]:
    """One model run locally and split over two real GLOO processes, mode by mode."""
    torch.set_num_threads(1)
    model = load(model_name)
    task = model.adapter.default_task()
    inputs = make_inputs(model, batch)
    ref_ms, ref = _timed(lambda: run_local(model.adapter, task, inputs), 1, 3)
    same = compare(task, ref.outputs, ref.outputs)
    rows: list[dict[str, Any]] = [
        {
            "mode": "local",
            "cr": None,
            "ms": ref_ms,
            "exchange_bytes": 0,
            "mean_cosine": 1.0,
            "top1_agreement": same.top1_agreement,
        }
    ]
    with LocalCluster(ClusterConfig(ranks=2, threads=1)) as cluster:
        for cr in [None, *crs]:
            spec = plan_job(model.adapter, model.name, task, inputs, ranks=2, comp=Compression(cr=cr))
            ms, got = _timed(lambda spec=spec: cluster.run(model, spec, inputs), 1, 3)  # type: ignore[misc]
            fid = compare(task, ref.outputs, got.outputs)
            rows.append(
                {
                    "mode": "full" if cr is None else "prism",
                    "cr": cr,
                    "ms": ms,
                    "exchange_bytes": got.exchange_bytes,
                    "mean_cosine": fid.mean_cosine,
                    "top1_agreement": fid.top1_agreement,
                }
            )
    for row in rows:
        ranks = 1 if row["mode"] == "local" else 2
        row.update({"model": model.name, "task": task.value, "batch": batch, "ranks": ranks})
    return rows
