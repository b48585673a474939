"""The rank-local PRISM program: what one rank computes, step by step.

Both runners execute exactly this code, in the same order (:mod:`engine.schedule`); they
differ only in how segment rows move between ranks (a loop in one process, or a GLOO
all-to-all), so they give the same numbers for the same plan (docs/design.md §3.5).

A job's batch runs in ``chunks`` of samples; under ``overlap`` chunk c's exchange is in
flight while this rank computes other chunks. A chunk's math depends on its own samples
only (row-local ops, per-sample attention and layouts; ``codes`` keeps every row's width,
:func:`engine.coded.chunk_bits`), so with the same chunks a run with overlap gives the
same outputs as one without, bit for bit. Cutting a batch into chunks is like running
smaller batches: the BLAS may pick other kernels for fewer rows, which can move the last
bit of some outputs (not seen for D = 768 on MKL; seen at 1e-7 for D = 64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.adapters import Adapter, Shapes, Task, Tensors, place_rows
from engine.attention import attend, key_bias
from engine.coded import CodedRows, CoderArgs, check_budget
from engine.errors import BadRequest
from engine.kvcoded import CodedKV
from engine.plan import PartitionPlan
from engine.segments import Compression, Method, SegmentLayout, layout
from engine.wire import widen_tokens

#: Most chunks a batch is cut into by default under overlap: each exchange then hides
#: behind three quarters of a layer's compute, and chunks of >= 2 samples keep GEMMs large.
MAX_CHUNKS = 4
#: Where a job's link time is under this share of its compute there is little to hide, and
#: every chunk costs its own codec calls, GLOO messages and smaller GEMMs: such a job runs in
#: ``FAST_LINK_CHUNKS`` (:func:`chunks_for`). vit-base batch 8 at P = 2 (docs/benchmarks.md
#: §10): two chunks saved 3-6 % unshaped (link share ~0.03), tied at 100 Mbit/s for codes@8
#: and means (0.14-0.23), and lost kv@4 10 % there (0.53).
FAST_LINK_SHARE = 0.25
FAST_LINK_CHUNKS = 2

#: What :meth:`RankProgram.prepare` computes before the remote rows arrive: Q, K, V of the
#: local rows, each (B, heads, n, d).
Prepared = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything every rank must agree on to run one job (travels as control data).

    The batch runs in ``chunks`` pieces of samples; ``overlap``: their exchanges run
    asynchronously, hidden behind the other chunks' compute (see :mod:`engine.schedule`).
    """

    model: str
    task: Task
    plan: PartitionPlan
    comp: Compression
    batch: int
    gather_hidden: bool = False
    overlap: bool = False
    chunks: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.chunks <= max(1, self.batch):
            raise BadRequest(f"chunks must be 1..{self.batch} (the batch), got {self.chunks}")

    @property
    def shapes(self) -> Shapes:
        """Batch and token count of the job."""
        return Shapes(self.batch, self.plan.n_tokens)

    @property
    def chunk_slices(self) -> list[slice]:
        """Samples of each chunk: near-equal, larger chunks first (``torch.tensor_split``)."""
        base, extra = divmod(self.batch, self.chunks)
        out, start = [], 0
        for c in range(self.chunks):
            size = base + (1 if c < extra else 0)
            out.append(slice(start, start + size))
            start += size
        return out

    @property
    def every_row_inputs(self) -> bool:
        """Every rank needs the inputs of every row (``codes`` and ``kv`` rebuild layer 0 from them)."""
        return self.comp.coded


def split_inputs(adapter: Adapter, spec: JobSpec, inputs: Tensors) -> tuple[Tensors, list[Tensors]]:
    """(what every rank gets, what each rank gets) of ``inputs`` for ``spec``."""
    spans = [spec.plan.span(r) for r in range(spec.plan.ranks)]
    return adapter.split_inputs(inputs, spans, every_row=spec.every_row_inputs)


class RankProgram:
    """One rank's share of a job: embed its rows, then per layer and chunk send / prepare /
    finish (chunk c is the samples ``spec.chunk_slices[c]``; h, x are that chunk's rows).

    What travels per layer is :meth:`send`'s second value: segment means (b, L, D) in the
    wire dtype (``Compression.wire``), or under method ``codes`` a uint8 payload of coded
    rows (:mod:`engine.coded`; none at layer 0), or under ``kv`` one of the coded K and V of
    this rank's rows (:mod:`engine.kvcoded`; none at layer 0). Every rank knows every
    payload's shape.
    """

    def __init__(self, adapter: Adapter, spec: JobSpec, rank: int, shared: Tensors, local: Tensors) -> None:
        self.adapter = adapter
        self.spec = spec
        self.rank = rank
        self.span = spec.plan.span(rank)
        device = adapter.device
        # Inputs arrive in their wire forms, maybe on the CPU: ids back to int64, all on the device.
        self.shared = {k: v.to(device) for k, v in widen_tokens(shared).items()}
        self.local = {k: v.to(device) for k, v in widen_tokens(local).items()}
        shared = self.shared
        self.chunks = spec.chunk_slices
        self.wire = spec.comp.wire(adapter.dtype)
        # Layouts and biases are small and built once per job on the CPU, then moved.
        mask = adapter.token_mask(shared, spec.shapes).cpu()  # (B, N) bool
        self.layouts: list[SegmentLayout] = [
            layout(spec.plan, q, mask, spec.comp).to(device) for q in range(spec.plan.ranks)
        ]
        others = [q for q in range(spec.plan.ranks) if q != rank]
        # Causal models only need rows from earlier ranks (docs/design.md §3.5).
        plan = spec.plan
        others = sorted(others, key=plan.order.index)  # in position order
        self.senders = [q for q in others if plan.precedes(q, rank)] if adapter.causal else others
        self.receivers = [q for q in others if plan.precedes(rank, q)] if adapter.causal else others
        self.bias = key_bias(
            mask[:, self.span.start : self.span.stop],
            [self.layouts[q].counts for q in self.senders],
            count_bias=spec.comp.count_bias,
            causal=adapter.causal,
            dtype=adapter.dtype,
        ).to(device)
        self._mine = [self.my_layout.samples(s) for s in self.chunks]
        self._bias = [self.bias[s] for s in self.chunks]
        self.coded: CodedRows | None = None
        self.kv: CodedKV | None = None
        # Under ``kv`` :meth:`send` computes the local rows' Q/K/V (it codes K and V), kept
        # here per chunk for :meth:`prepare`.
        self._prepared: list[Prepared | None] = [None] * len(self.chunks)
        job = CoderArgs(
            adapter, spec.plan, spec.comp, spec.batch, rank, self.senders, self.receivers, shared, self.chunks
        )
        if spec.comp.uses_codes:
            self.coded = CodedRows(job)
        elif spec.comp.uses_kv:
            self.kv = CodedKV(job)
        # A generation's prefill: the rank on the last block keeps every layer's K/V of every
        # position (its own exact, the senders' as received) for the decode (§3.7).
        keeps = spec.task is Task.GENERATE and rank == plan.last_rank
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if keeps else None
        self._repeats: torch.Tensor | None = None
        if keeps and self.senders:  # how many positions each received row stands for (segment means: many)
            repeats = torch.cat([self.layouts[q].counts for q in self.senders], dim=1)[0].round().long()
            self._repeats = None if bool((repeats == 1).all()) else repeats.to(device)

    @property
    def my_layout(self) -> SegmentLayout:
        """Segments this rank sends."""
        return self.layouts[self.rank]

    def rows_from(self, sender: int) -> int:
        """Rows per sample this rank receives from ``sender``."""
        return self.layouts[sender].n_segments

    def exchanges(self, i: int) -> bool:
        """Whether layer i moves anything between ranks (``codes`` and ``kv`` rebuild layer 0 instead)."""
        return (self.coded is None and self.kv is None) or i > 0

    def recv_shape(self, i: int, sender: int, c: int = 0) -> tuple[int, ...]:
        """Shape of what this rank receives from ``sender`` at layer i for chunk c."""
        coder = self.coded or self.kv
        if coder is not None:
            return (coder.payload_bytes(sender, i, c),)
        s = self.chunks[c]
        return (s.stop - s.start, self.rows_from(sender), self.adapter.hidden_size)

    def embed(self) -> torch.Tensor:
        """Embeddings of this rank's rows, (B, n, D) (the whole batch: chunks are views of it)."""
        return self.adapter.embed(self.shared, self.local, self.span)

    def send(self, i: int, h: torch.Tensor, c: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's attention input x (b, n, D) of chunk c and what to send of it (see the class)."""
        x = self.adapter.attn_input(i, h)
        if self.coded is not None:
            return x, self.coded.encode(i, x, c)
        if self.kv is not None:
            _, k, v = self._prepared[c] = self.adapter.project(i, x, x)
            return x, self.kv.encode(i, k, v, c)
        return x, self._mine[c].means(x).to(self.wire)

    def prepare(self, i: int, x: torch.Tensor, c: int = 0) -> Prepared:
        """Q, K and V of the local rows of layer i (chunk c): what needs nothing from other
        ranks (under ``kv`` computed by :meth:`send` already)."""
        prepared, self._prepared[c] = self._prepared[c], None
        return prepared if prepared is not None else self.adapter.project(i, x, x)

    def finish(
        self,
        i: int,
        h: torch.Tensor,
        x: torch.Tensor,
        remote: list[torch.Tensor],
        c: int = 0,
        prepared: Prepared | None = None,
    ) -> torch.Tensor:
        """Layer i of chunk c given what was received from ``self.senders`` (in that order)
        and, when it ran already, :meth:`prepare`'s result."""
        q, k, v = prepared if prepared is not None else self.prepare(i, x, c)
        if self.kv is not None:  # decoded into one buffer with the local rows: no concatenation
            k, v = self.kv.keys_values(i, k, v, remote, c)
            if self.cache is not None:
                self._keep(k.shape[2] - sum(self.kv.rows_of.values()), k, v)
            return self.adapter.finish(i, h, attend(q, k, v, self._bias[c], self.adapter.scaling(i)))
        if self.coded is not None:
            keys, values = self.coded.remote_kv(i, remote, c)  # (b, h, n_q, d) per sender
        elif remote:
            rows = torch.cat([r.to(self.adapter.dtype) for r in remote], dim=1)  # (b, sum L_q, D)
            _, k_remote, v_remote = self.adapter.project(i, rows[:, :0], rows)
            keys, values = [k_remote], [v_remote]
        else:
            keys, values = [], []
        n = k.shape[2]
        k, v = torch.cat([k, *keys], dim=2), torch.cat([v, *values], dim=2)  # keys: [local ; senders]
        if self.cache is not None:
            self._keep(n, k, v)
        ctx = attend(q, k, v, self._bias[c], self.adapter.scaling(i))  # (b, h, n, d)
        return self.adapter.finish(i, h, ctx)

    def _keep(self, n: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a layer's keys and values (the attended ones: ``n`` local rows, then the senders')
        for the decode, in position order: the senders' rows (a received segment mean once per
        position it stands for, which is how it weighs in attention under the count bias: a key
        repeated m times is one key with bias log m), then the local rows, the prompt's last."""
        assert self.cache is not None
        kept = []
        for t in (k, v):
            remote = t[:, :, n:]
            if self._repeats is not None:
                remote = remote.repeat_interleave(self._repeats, dim=2)
            kept.append(torch.cat([remote, t[:, :, :n]], dim=2))
        self.cache.append((kept[0], kept[1]))

    def past_kv(self) -> torch.Tensor | None:
        """Every layer's kept keys and values, (L, 2, 1, heads, N, d), or None on a rank that
        keeps none. The last position is the prompt's last token (the decode computes it again);
        within a segment mean's positions the order does not matter (all of them are visible)."""
        if not self.cache:
            return None
        return torch.stack([torch.stack(kv) for kv in self.cache])

    def partials(self, h: torch.Tensor) -> Tensors:
        """This rank's sum-reducible share of the output, from the whole batch's final rows."""
        h = self.adapter.final_norm(h)
        out = self.adapter.partials(self.spec.task, h, self.shared, self.span, self.spec.shapes)
        if self.spec.gather_hidden:
            out["hidden"] = place_rows(h, self.span, self.spec.shapes)
        return out


def chunks_for(batch: int, link_ms: float | None, compute_ms: float | None) -> int:
    """Chunks for a job run with overlap: ``min(batch, MAX_CHUNKS)``, or at most
    ``FAST_LINK_CHUNKS`` where the link time one rank's sends take (``link_ms``) is under
    ``FAST_LINK_SHARE`` of the job's compute (``compute_ms``); unknown figures keep the default."""
    chunks = min(batch, MAX_CHUNKS)
    if link_ms is None or compute_ms is None or compute_ms <= 0 or link_ms >= FAST_LINK_SHARE * compute_ms:
        return chunks
    return min(chunks, FAST_LINK_CHUNKS)


def plan_job(
    adapter: Adapter,
    model: str,
    task: Task,
    inputs: Tensors,
    *,
    ranks: int,
    comp: Compression,
    weights: list[float] | None = None,
    gather_hidden: bool = False,
    overlap: bool = True,
    chunks: int | None = None,
) -> JobSpec:
    """Check a job against the model and build the spec every rank will run.

    ``overlap`` (default on) runs exchanges asynchronously, the batch in ``chunks`` pieces
    (default ``min(batch, MAX_CHUNKS)`` with overlap, 1 without; at batch 1 only the local
    rows' Q/K/V overlap the exchange).
    """
    adapter.check_task(task)
    shapes = adapter.shapes(inputs)
    plan = PartitionPlan.weighted(shapes.n_tokens, weights) if weights else PartitionPlan.equal(shapes.n_tokens, ranks)
    if plan.ranks != ranks:
        raise BadRequest(f"{len(weights or [])} rank weights given for {ranks} ranks")
    if task is Task.GENERATE:  # rank 0 (the coordinator) takes the last block and keeps the cache
        if shapes.batch != 1:
            raise BadRequest(f"generate takes one prompt per job, got {shapes.batch}")
        plan = plan.root_last()
    check_budget(plan, comp, shapes.batch, adapter.hidden_size, adapter.n_layers)
    if chunks is None:
        chunks = min(shapes.batch, MAX_CHUNKS) if overlap else 1
    return JobSpec(model, task, plan, comp, shapes.batch, gather_hidden, overlap, chunks)


#: Version of what ranks exchange about a job: the spec's fields, the step order and the trace.
#: Nodes split jobs only with peers of the same version (it travels in their health).
ENGINE_VERSION = 4  # 3: method kv; 4: task generate, plans with an order


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """JSON-friendly form of a spec (it travels as control data between agents)."""
    comp = spec.comp
    return {
        "model": spec.model,
        "task": spec.task.value,
        "sizes": list(spec.plan.sizes),
        "order": list(spec.plan.order),
        "cr": comp.cr,
        "keep_first": comp.keep_first,
        "keep_last": comp.keep_last,
        "count_bias": comp.count_bias,
        "method": comp.method.value,
        "wire_dtype": comp.wire_dtype,
        "batch": spec.batch,
        "gather_hidden": spec.gather_hidden,
        "overlap": spec.overlap,
        "chunks": spec.chunks,
    }


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    """Inverse of :func:`spec_to_dict`; malformed data is a BadRequest. Fields added later
    default to what a spec without them meant (means, model dtype, no overlap)."""
    try:
        wire = data.get("wire_dtype")
        comp = Compression(
            cr=None if data["cr"] is None else float(data["cr"]),
            keep_first=bool(data["keep_first"]),
            keep_last=bool(data["keep_last"]),
            count_bias=bool(data["count_bias"]),
            method=Method.parse(str(data.get("method", Method.MEANS.value))),
            wire_dtype=None if wire is None else str(wire),
        )
        sizes = tuple(int(s) for s in data["sizes"])
        return JobSpec(
            str(data["model"]),
            Task(data["task"]),
            PartitionPlan(sizes, tuple(int(r) for r in data.get("order", ()))),
            comp,
            int(data["batch"]),
            bool(data.get("gather_hidden", False)),
            bool(data.get("overlap", False)),
            int(data.get("chunks", 1)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"malformed job spec: {exc}") from exc
