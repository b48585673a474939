"""The rank-local PRISM program: what one rank computes, step by step.

Both runners execute exactly this code; they differ only in how segment rows move
between ranks (a loop in one process, or a GLOO all-to-all), so they give the same
numbers for the same plan (DESIGN.md §3.7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.adapters import Adapter, Shapes, Task, Tensors, place_rows
from engine.attention import attend, key_bias
from engine.coded import CodedRows, check_budget
from engine.errors import BadRequest
from engine.plan import PartitionPlan
from engine.segments import Compression, Method, SegmentLayout, layout


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything every rank must agree on to run one job (travels as control data)."""

    model: str
    task: Task
    plan: PartitionPlan
    comp: Compression
    batch: int
    gather_hidden: bool = False

    @property
    def shapes(self) -> Shapes:
        """Batch and token count of the job."""
        return Shapes(self.batch, self.plan.n_tokens)

    @property
    def every_row_inputs(self) -> bool:
        """Every rank needs the inputs of every row (``codes`` rebuilds layer 0 from them)."""
        return self.comp.uses_codes


def split_inputs(adapter: Adapter, spec: JobSpec, inputs: Tensors) -> tuple[Tensors, list[Tensors]]:
    """(what every rank gets, what each rank gets) of ``inputs`` for ``spec``."""
    spans = [spec.plan.span(r) for r in range(spec.plan.ranks)]
    return adapter.split_inputs(inputs, spans, every_row=spec.every_row_inputs)


class RankProgram:
    """One rank's share of a job: embed its rows, then per layer send / finish.

    What travels per layer is :meth:`send`'s second value: segment means (B, L, D) in the
    model's dtype, or under method ``codes`` a uint8 payload of coded rows
    (:mod:`engine.coded`; none at layer 0). Every rank knows every payload's shape.
    """

    def __init__(self, adapter: Adapter, spec: JobSpec, rank: int, shared: Tensors, local: Tensors) -> None:
        self.adapter = adapter
        self.spec = spec
        self.rank = rank
        self.span = spec.plan.span(rank)
        self.shared = shared
        self.local = local
        # Layouts and biases are small and built once per job on the CPU, then moved.
        mask = adapter.token_mask(shared, spec.shapes).cpu()  # (B, N) bool
        device = adapter.device
        self.layouts: list[SegmentLayout] = [
            layout(spec.plan, q, mask, spec.comp).to(device) for q in range(spec.plan.ranks)
        ]
        others = [q for q in range(spec.plan.ranks) if q != rank]
        # Causal models only need rows from earlier ranks (DESIGN.md §3.5).
        self.senders = [q for q in others if q < rank] if adapter.causal else others
        self.receivers = [q for q in others if q > rank] if adapter.causal else others
        self.bias = key_bias(
            mask[:, self.span.start : self.span.stop],
            [self.layouts[q].counts for q in self.senders],
            count_bias=spec.comp.count_bias,
            causal=adapter.causal,
            dtype=adapter.dtype,
        ).to(device)
        self.coded: CodedRows | None = None
        if spec.comp.uses_codes:
            self.coded = CodedRows(
                adapter, spec.plan, spec.comp, spec.batch, rank, self.senders, self.receivers, shared
            )

    @property
    def my_layout(self) -> SegmentLayout:
        """Segments this rank sends."""
        return self.layouts[self.rank]

    def rows_from(self, sender: int) -> int:
        """Rows per sample this rank receives from ``sender``."""
        return self.layouts[sender].n_segments

    def exchanges(self, i: int) -> bool:
        """Whether layer i moves anything between ranks (``codes`` rebuilds layer 0 instead)."""
        return self.coded is None or i > 0

    def recv_shape(self, i: int, sender: int) -> tuple[int, ...]:
        """Shape of what this rank receives from ``sender`` at layer i."""
        if self.coded is not None:
            return (self.coded.payload_bytes(sender, i),)
        return (self.spec.batch, self.rows_from(sender), self.adapter.hidden_size)

    def embed(self) -> torch.Tensor:
        """Embeddings of this rank's rows, (B, n, D)."""
        return self.adapter.embed(self.shared, self.local, self.span)

    def send(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's attention input x (B, n, D) and what to send of it (see the class)."""
        x = self.adapter.attn_input(i, h)
        if self.coded is not None:
            return x, self.coded.encode(i, x)
        return x, self.my_layout.means(x)

    def finish(self, i: int, h: torch.Tensor, x: torch.Tensor, remote: list[torch.Tensor]) -> torch.Tensor:
        """Layer i given what was received from ``self.senders`` (in that order)."""
        if self.coded is not None:
            q, k, v = self.adapter.project(i, x, x)  # local rows
            keys, values = self.coded.remote_kv(i, remote)  # (B, h, n_q, d) per sender
            k, v = torch.cat([k, *keys], dim=2), torch.cat([v, *values], dim=2)
        else:
            unique = torch.cat([x, *remote], dim=1) if remote else x  # (B, n + sum L_q, D)
            q, k, v = self.adapter.project(i, x, unique)
        ctx = attend(q, k, v, self.bias, self.adapter.scaling(i))  # (B, h, n, d)
        return self.adapter.finish(i, h, ctx)

    def partials(self, h: torch.Tensor) -> Tensors:
        """This rank's sum-reducible share of the output."""
        h = self.adapter.final_norm(h)
        out = self.adapter.partials(self.spec.task, h, self.shared, self.span, self.spec.shapes)
        if self.spec.gather_hidden:
            out["hidden"] = place_rows(h, self.span, self.spec.shapes)
        return out


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
) -> JobSpec:
    """Check a job against the model and build the spec every rank will run."""
    adapter.check_task(task)
    shapes = adapter.shapes(inputs)
    plan = PartitionPlan.weighted(shapes.n_tokens, weights) if weights else PartitionPlan.equal(shapes.n_tokens, ranks)
    if plan.ranks != ranks:
        raise BadRequest(f"{len(weights or [])} rank weights given for {ranks} ranks")
    check_budget(plan, comp, shapes.batch, adapter.hidden_size, adapter.n_layers)
    return JobSpec(model, task, plan, comp, shapes.batch, gather_hidden)


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """JSON-friendly form of a spec (it travels as control data between agents)."""
    comp = spec.comp
    return {
        "model": spec.model,
        "task": spec.task.value,
        "sizes": list(spec.plan.sizes),
        "cr": comp.cr,
        "keep_first": comp.keep_first,
        "keep_last": comp.keep_last,
        "count_bias": comp.count_bias,
        "method": comp.method.value,
        "batch": spec.batch,
        "gather_hidden": spec.gather_hidden,
    }


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    """Inverse of :func:`spec_to_dict`; malformed data is a BadRequest."""
    try:
        comp = Compression(
            cr=None if data["cr"] is None else float(data["cr"]),
            keep_first=bool(data["keep_first"]),
            keep_last=bool(data["keep_last"]),
            count_bias=bool(data["count_bias"]),
            method=Method.parse(str(data.get("method", Method.MEANS.value))),
        )
        sizes = tuple(int(s) for s in data["sizes"])
        return JobSpec(
            str(data["model"]),
            Task(data["task"]),
            PartitionPlan(sizes),
            comp,
            int(data["batch"]),
            bool(data.get("gather_hidden", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"malformed job spec: {exc}") from exc
