"""Per-block multiply-accumulate counts, local vs a PRISM rank (docs/design.md §3.6).

Single device: (4 + 2f)·N·D² + 2·N²·D. PRISM rank p with n_p local rows and R_p
received rows: (2 + 2f)·n_p·D² + 2·(n_p + R_p)·D² + 2·n_p·(n_p + R_p)·D, where f is
the FFN expansion (intermediate size / D).

Segment Means receive R_p = sum of the other ranks' segments. Method ``codes`` sends
every row, so receivers compute K/V for all of them as in full exchange (R^T is folded
into W_k/W_v, so rotated rows cost nothing extra there); a rank with receivers also
rotates its own rows, n_p·D² per block. Quantising and packing are O(n·D) and left out;
so is rebuilding layer 0, which happens once per job, not per block: a receiver rotates
every sender's layer-0 rows (R_p·D²) and, for ViT, embeds their patches (about as much
again), some 2·R_p·D²/L per block, about 1 % of a block at L = 12.

Method ``kv`` sends every row's K and V, so receivers project no remote row: a rank
computes K/V for its own rows only, 2·n_p·D², and attends over every row: its block costs
what a Segment Means rank's does, plus the attention over the rows Segment Means averages
(research/kvcodes.md). Coding and decoding are O(n·D) and left out.

:func:`rank_macs` is what the policy weighs shares with: each rank's block MACs for any
plan, equal or weighted, so the rank that sets the pace can be found.
"""

from __future__ import annotations

import torch

from engine.coded import payload_bits
from engine.plan import PartitionPlan
from engine.segments import WIRE_DTYPES, Compression, layout


def block_macs_local(n: int, d: int, f: float) -> float:
    """MACs of one block over all N tokens on one device."""
    return (4 + 2 * f) * n * d * d + 2 * n * n * d


def block_macs_rank(
    n_p: int, received: int, d: int, f: float, *, rotates: bool = False, projects_received: bool = True
) -> float:
    """MACs of one block on a PRISM rank: Q/out/MLP on local rows, K/V on unique rows,
    plus the rotation of its own rows when it sends codes (``rotates``). Under method ``kv``
    (``projects_received`` False) the received rows come as K/V: no projection for them."""
    keys = n_p + received
    projected = keys if projects_received else n_p
    rotation = n_p * d * d if rotates else 0
    return (2 + 2 * f) * n_p * d * d + 2 * projected * d * d + 2 * n_p * keys * d + rotation


def received_rows(plan: PartitionPlan, comp: Compression, causal: bool) -> list[int]:
    """Rows each rank receives per sample per layer (no padding)."""
    mask = torch.ones(1, plan.n_tokens, dtype=torch.bool)
    sent = [layout(plan, q, mask, comp).n_segments for q in range(plan.ranks)]
    ranks = range(plan.ranks)
    return [sum(sent[q] for q in ranks if q != p and (plan.precedes(q, p) or not causal)) for p in ranks]


def rank_macs(plan: PartitionPlan, comp: Compression, d: int, f: float, causal: bool = False) -> list[float]:
    """Block MACs of every rank of ``plan`` (rank order), codes' rotation included where a
    rank has receivers (under a causal plan the last rank has none); ``kv`` ranks project
    no received row."""
    rows = received_rows(plan, comp, causal)
    last = plan.last_rank
    return [
        block_macs_rank(
            plan.sizes[p],
            rows[p],
            d,
            f,
            rotates=comp.uses_codes and not (causal and p == last),
            projects_received=not comp.uses_kv,
        )
        for p in range(plan.ranks)
    ]


def macs_reduction(plan: PartitionPlan, comp: Compression, d: int, f: float, causal: bool = False) -> float:
    """Per-device compute saved vs one device, averaged over ranks (the papers' figure)."""
    local = block_macs_local(plan.n_tokens, d, f)
    per_rank = rank_macs(plan, comp, d, f, causal)
    return 1.0 - sum(per_rank) / len(per_rank) / local


def _receivers(plan: PartitionPlan, sender: int, causal: bool) -> int:
    return plan.later(sender) if causal else plan.ranks - 1


def full_exchange_bytes(plan: PartitionPlan, batch: int, d: int, n_layers: int, causal: bool, elem_bytes: int) -> int:
    """Bytes full exchange moves over the group for a job, all ranks and layers together
    (every rank sends its B·n_p rows of D values to each of its receivers, every layer)."""
    total = 0
    for q in range(plan.ranks):
        total += batch * plan.sizes[q] * d * elem_bytes * _receivers(plan, q, causal)
    return total * n_layers


def exchange_bytes(
    plan: PartitionPlan, comp: Compression, mask: torch.Tensor, d: int, n_layers: int, causal: bool, elem_bytes: int
) -> int:
    """Exchange bytes a run of the job will measure (``RunResult.exchange_bytes``), from the
    plan alone: segment rows in the model's dtype (``elem_bytes``) or the wire dtype the
    compression names, or the payloads of ``codes`` and ``kv``. ``mask`` (B, N) marks real tokens (it
    matters for ``keep_last``)."""
    if comp.wire_dtype is not None:
        elem_bytes = WIRE_DTYPES[comp.wire_dtype].itemsize
    total = 0
    for q in range(plan.ranks):
        receivers = _receivers(plan, q, causal)
        if comp.coded:
            if n_layers > 1:
                bits = payload_bits(plan, comp, int(mask.shape[0]), q, d, n_layers)
                total += bits.nbytes * (n_layers - 1) * receivers
        else:
            rows = layout(plan, q, mask, comp).n_segments
            total += int(mask.shape[0]) * rows * d * elem_bytes * receivers * n_layers
    return total
