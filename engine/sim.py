"""In-process runners: the plain local model, and P simulated ranks in lockstep."""

from __future__ import annotations

import time

import torch

from engine.adapters import Adapter, Task, Tensors
from engine.program import JobSpec, RankProgram, split_inputs
from engine.trace import RankTrace, RunResult


def run_local(adapter: Adapter, task: Task, inputs: Tensors) -> RunResult:
    """The plain `transformers` model on one device: the reference answer."""
    adapter.check_task(task)
    trace = RankTrace()
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode(), trace.timing("compute"):
        outputs = adapter.reference(task, inputs)
    trace.wall_s = time.perf_counter() - start
    trace.cpu_s = time.process_time() - cpu_start
    return RunResult(outputs, [trace])


def sum_partials(parts: list[Tensors]) -> Tensors:
    """Element-wise sum of every rank's partials (what a reduce to rank 0 yields)."""
    return {key: torch.stack([p[key] for p in parts]).sum(dim=0) for key in parts[0]}


def run_simulated(adapter: Adapter, spec: JobSpec, inputs: Tensors) -> RunResult:
    """All ranks of ``spec`` in this process, exchanging rows by reference.

    Bytes are those the GLOO runner would send; times are per simulated rank.
    """
    ranks = spec.plan.ranks
    traces = [RankTrace(rank=r) for r in range(ranks)]
    start = time.perf_counter()
    with torch.inference_mode():
        shared, local = split_inputs(adapter, spec, inputs)
        progs = [RankProgram(adapter, spec, r, shared, local[r]) for r in range(ranks)]
        hs = []
        for prog, trace in zip(progs, traces, strict=True):
            with trace.timing("compute"):
                hs.append(prog.embed())
        for i in range(adapter.n_layers):
            sent = []
            for prog, h, trace in zip(progs, hs, traces, strict=True):
                with trace.timing("compute"):
                    sent.append(prog.send(i, h))
            for prog, trace in zip(progs, traces, strict=True):
                z = sent[prog.rank][1]
                trace.exchange_bytes_sent += z.numel() * z.element_size() * len(prog.receivers)
                for q in prog.senders:
                    zq = sent[q][1]
                    trace.exchange_bytes_recv += zq.numel() * zq.element_size()
            for r, prog in enumerate(progs):
                with traces[r].timing("compute"):
                    hs[r] = prog.finish(i, hs[r], sent[r][0], [sent[q][1] for q in prog.senders])
        parts = []
        for prog, h, trace in zip(progs, hs, traces, strict=True):
            with trace.timing("compute"):
                parts.append(prog.partials(h))
        summed = sum_partials(parts)
        outputs = adapter.finalize(spec.task, summed)
        if spec.gather_hidden:
            outputs["hidden"] = summed["hidden"]
    wall = time.perf_counter() - start
    for trace in traces:
        trace.wall_s = wall
    return RunResult(outputs, traces)
