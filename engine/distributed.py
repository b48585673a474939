"""The GLOO runner: one process per rank, rows moving through a real process group.

Inputs reach ranks through the group (rank 0 broadcasts what all need and sends each
rank its own slice), every layer exchanges segment rows with one all-to-all per chunk,
and the output partials are summed onto rank 0. The math is
:class:`engine.program.RankProgram` and the order :func:`engine.schedule.steps`, the same
as the in-process runner's. Under overlap the all-to-alls are asynchronous: launched
after a chunk's send, waited for only before that chunk's finish.

On a CUDA device each compute block ends with a synchronize, so kernels are booked as
compute, not as the staging copy that would otherwise wait for them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from engine.adapters import Adapter, Tensors
from engine.program import JobSpec, Prepared, RankProgram, split_inputs
from engine.schedule import steps
from engine.trace import RankTrace, RunResult, computing


class Comm(Protocol):
    """What the runner needs from a group (see ``transport.gloo.GlooComm``)."""

    rank: int
    size: int
    trace: RankTrace
    device: torch.device

    def exchange(
        self, send: torch.Tensor, receivers: list[int], senders: list[int], recv_shapes: Sequence[tuple[int, ...]]
    ) -> list[torch.Tensor]: ...

    def start_exchange(
        self, send: torch.Tensor, receivers: list[int], senders: list[int], recv_shapes: Sequence[tuple[int, ...]]
    ) -> Any: ...

    def finish_exchange(self, pending: Any) -> list[torch.Tensor]: ...

    def broadcast_tensors(self, tensors: Tensors | None, root: int = 0) -> Tensors: ...

    def send_tensors(self, tensors: Tensors, dst: int) -> None: ...

    def recv_tensors(self, src: int) -> Tensors: ...

    def reduce_sum(self, tensors: Tensors, root: int = 0) -> Tensors: ...

    def gather_traces(self, trace: RankTrace) -> list[RankTrace]: ...


def _layers(comm: Comm, prog: RankProgram, trace: RankTrace, whole: torch.Tensor) -> torch.Tensor:
    """Every layer of every chunk in schedule order, from the embeddings ``whole`` (B, n, D)
    to the final rows (B, n, D)."""
    device, overlap = prog.adapter.device, prog.spec.overlap
    hs = [whole[s] for s in prog.chunks]  # (b, n, D) per chunk
    xs = [whole] * len(hs)  # each chunk's attention input, set by its send
    pending: list[Any] = [None] * len(hs)  # per chunk: an exchange in flight, or (no overlap) its rows
    for step in steps(prog.adapter.n_layers, len(hs), overlap):
        i, c = step.layer, step.chunk
        if step.send:
            with computing(trace, device):
                xs[c], z = prog.send(i, hs[c], c)
            if prog.exchanges(i):
                shapes = [prog.recv_shape(i, q, c) for q in prog.senders]
                if overlap:
                    pending[c] = comm.start_exchange(z, prog.receivers, prog.senders, shapes)
                else:
                    pending[c] = comm.exchange(z, prog.receivers, prog.senders, shapes)
            continue
        prepared: Prepared | None = None
        if overlap:  # the local rows' Q/K/V while the remote rows are still on their way
            with computing(trace, device):
                prepared = prog.prepare(i, xs[c], c)
        remote: list[torch.Tensor] = []
        if prog.exchanges(i):
            remote = comm.finish_exchange(pending[c]) if overlap else pending[c]
        pending[c] = None
        with computing(trace, device):
            hs[c] = prog.finish(i, hs[c], xs[c], remote, c, prepared)
    return torch.cat(hs) if len(hs) > 1 else hs[0]


def run_rank(comm: Comm, adapter: Adapter, spec: JobSpec, inputs: Tensors | None = None) -> RunResult | None:
    """Run this process's rank of ``spec``. Rank 0 passes ``inputs`` and gets the result."""
    trace = RankTrace(rank=comm.rank)
    comm.trace = trace
    comm.device = device = adapter.device  # received tensors land where the model lives
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        if comm.rank == 0:
            assert inputs is not None, "rank 0 coordinates and must hold the inputs"
            with computing(trace, device):
                shared, local = split_inputs(adapter, spec, inputs)
            comm.broadcast_tensors(shared)
            for r in range(1, spec.plan.ranks):
                comm.send_tensors(local[r], r)
            mine = local[0]
        else:
            shared = comm.broadcast_tensors(None)
            mine = comm.recv_tensors(0)

        with computing(trace, device):
            prog = RankProgram(adapter, spec, comm.rank, shared, mine)
            whole = prog.embed()
        h = _layers(comm, prog, trace, whole)
        with computing(trace, device):
            parts = prog.partials(h)
        summed = comm.reduce_sum(parts)
        outputs: Tensors = {}
        if comm.rank == 0:
            with computing(trace, device):
                outputs = adapter.finalize(spec.task, summed)
                if spec.gather_hidden:
                    outputs["hidden"] = summed["hidden"]
                past = prog.past_kv()  # a generation's prefill: rank 0 holds the last block
                if past is not None:
                    outputs["past_kv"] = past
    trace.wall_s = time.perf_counter() - start
    trace.cpu_s = time.process_time() - cpu_start
    traces = comm.gather_traces(trace)
    return RunResult(outputs, traces) if comm.rank == 0 else None
