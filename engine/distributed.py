"""The GLOO runner: one process per rank, rows moving through a real process group.

Inputs reach ranks through the group (rank 0 broadcasts what all need and sends each
rank its own slice), every layer exchanges segment rows with one all-to-all, and the
output partials are summed onto rank 0. The math is :class:`engine.program.RankProgram`,
the same as the in-process runner's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import torch

from engine.adapters import Adapter, Tensors
from engine.program import JobSpec, RankProgram, split_inputs
from engine.trace import RankTrace, RunResult


class Comm(Protocol):
    """What the runner needs from a group (see ``transport.gloo.GlooComm``)."""

    rank: int
    size: int
    trace: RankTrace
    device: torch.device

    def exchange(
        self, send: torch.Tensor, receivers: list[int], senders: list[int], recv_shapes: Sequence[tuple[int, ...]]
    ) -> list[torch.Tensor]: ...

    def broadcast_tensors(self, tensors: Tensors | None, root: int = 0) -> Tensors: ...

    def send_tensors(self, tensors: Tensors, dst: int) -> None: ...

    def recv_tensors(self, src: int) -> Tensors: ...

    def reduce_sum(self, tensors: Tensors, root: int = 0) -> Tensors: ...

    def gather_traces(self, trace: RankTrace) -> list[RankTrace]: ...


def run_rank(comm: Comm, adapter: Adapter, spec: JobSpec, inputs: Tensors | None = None) -> RunResult | None:
    """Run this process's rank of ``spec``. Rank 0 passes ``inputs`` and gets the result."""
    trace = RankTrace(rank=comm.rank)
    comm.trace = trace
    comm.device = adapter.device  # received tensors land where the model lives
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        if comm.rank == 0:
            assert inputs is not None, "rank 0 coordinates and must hold the inputs"
            with trace.timing("compute"):
                shared, local = split_inputs(adapter, spec, inputs)
            comm.broadcast_tensors(shared)
            for r in range(1, spec.plan.ranks):
                comm.send_tensors(local[r], r)
            mine = local[0]
        else:
            shared = comm.broadcast_tensors(None)
            mine = comm.recv_tensors(0)

        with trace.timing("compute"):
            prog = RankProgram(adapter, spec, comm.rank, shared, mine)
            h = prog.embed()
        for i in range(adapter.n_layers):
            with trace.timing("compute"):
                x, z = prog.send(i, h)
            remote: list[torch.Tensor] = []
            if prog.exchanges(i):
                shapes = [prog.recv_shape(i, q) for q in prog.senders]
                remote = comm.exchange(z, prog.receivers, prog.senders, shapes)
            with trace.timing("compute"):
                h = prog.finish(i, h, x, remote)
        with trace.timing("compute"):
            parts = prog.partials(h)
        summed = comm.reduce_sum(parts)
        outputs: Tensors = {}
        if comm.rank == 0:
            with trace.timing("compute"):
                outputs = adapter.finalize(spec.task, summed)
                if spec.gather_hidden:
                    outputs["hidden"] = summed["hidden"]
    trace.wall_s = time.perf_counter() - start
    trace.cpu_s = time.process_time() - cpu_start
    traces = comm.gather_traces(trace)
    return RunResult(outputs, traces) if comm.rank == 0 else None
