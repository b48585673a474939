"""In-process runners: the plain local model, and P simulated ranks in lockstep."""

from __future__ import annotations

import time

import torch

from engine.adapters import Adapter, Task, Tensors
from engine.program import JobSpec, RankProgram, split_inputs
from engine.schedule import steps
from engine.trace import RankTrace, RunResult, computing


def run_local(adapter: Adapter, task: Task, inputs: Tensors) -> RunResult:
    """The plain `transformers` model on one device: the reference answer."""
    adapter.check_task(task)
    trace = RankTrace()
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode(), computing(trace, adapter.device):
        outputs = adapter.reference(task, inputs)
    trace.wall_s = time.perf_counter() - start
    trace.cpu_s = time.process_time() - cpu_start
    return RunResult(outputs, [trace])


def sum_partials(parts: list[Tensors]) -> Tensors:
    """Element-wise sum of every rank's partials (what a reduce to rank 0 yields)."""
    return {key: torch.stack([p[key] for p in parts]).sum(dim=0) for key in parts[0]}


def run_simulated(adapter: Adapter, spec: JobSpec, inputs: Tensors) -> RunResult:
    """All ranks of ``spec`` in this process, exchanging rows by reference.

    Every rank runs the GLOO runner's steps in the same order (:func:`engine.schedule.steps`,
    each step on every rank before the next), so the numbers are the same. Bytes are
    those the GLOO runner would send; times are per simulated rank.
    """
    ranks = spec.plan.ranks
    traces = [RankTrace(rank=r) for r in range(ranks)]
    start = time.perf_counter()
    with torch.inference_mode():
        shared, local = split_inputs(adapter, spec, inputs)
        progs = [RankProgram(adapter, spec, r, shared, local[r]) for r in range(ranks)]
        hs: list[list[torch.Tensor]] = []  # [rank][chunk] (b, n, D)
        for prog, trace in zip(progs, traces, strict=True):
            with computing(trace, adapter.device):
                whole = prog.embed()
            hs.append([whole[s] for s in prog.chunks])
        # [rank][chunk]: the chunk's attention input and payload from its latest send
        sent: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = [[None] * spec.chunks for _ in progs]
        for step in steps(adapter.n_layers, spec.chunks, spec.overlap):
            i, c = step.layer, step.chunk
            if step.send:
                for prog, trace in zip(progs, traces, strict=True):
                    with computing(trace, adapter.device):
                        sent[prog.rank][c] = prog.send(i, hs[prog.rank][c], c)
                if progs[0].exchanges(i):
                    _count_bytes(progs, traces, [sent[r][c] for r in range(ranks)])
                continue
            for prog, trace in zip(progs, traces, strict=True):
                x, _ = _got(sent[prog.rank][c])
                remote = [_got(sent[q][c])[1] for q in prog.senders] if prog.exchanges(i) else []
                with computing(trace, adapter.device):
                    hs[prog.rank][c] = prog.finish(i, hs[prog.rank][c], x, remote, c)
        parts = []
        for prog, trace in zip(progs, traces, strict=True):
            with computing(trace, adapter.device):
                chunks = hs[prog.rank]
                parts.append(prog.partials(torch.cat(chunks) if len(chunks) > 1 else chunks[0]))
        summed = sum_partials(parts)
        outputs = adapter.finalize(spec.task, summed)
        if spec.gather_hidden:
            outputs["hidden"] = summed["hidden"]
        past = progs[spec.plan.last_rank].past_kv()
        if past is not None:
            outputs["past_kv"] = past
    wall = time.perf_counter() - start
    for trace in traces:
        trace.wall_s = wall
    return RunResult(outputs, traces)


def _got(item: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    assert item is not None, "a chunk's layer finishes after its send"
    return item


def _count_bytes(
    progs: list[RankProgram], traces: list[RankTrace], sent: list[tuple[torch.Tensor, torch.Tensor] | None]
) -> None:
    """Book one exchange's bytes as the GLOO all-to-all would: each payload once per receiver."""
    for prog, trace in zip(progs, traces, strict=True):
        z = _got(sent[prog.rank])[1]
        trace.exchange_bytes_sent += z.numel() * z.element_size() * len(prog.receivers)
        for q in prog.senders:
            zq = _got(sent[q])[1]
            trace.exchange_bytes_recv += zq.numel() * zq.element_size()
