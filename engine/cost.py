"""Per-block multiply-accumulate counts, local vs a PRISM rank (DESIGN.md §3.8).

Single device: (4 + 2f)·N·D² + 2·N²·D. PRISM rank p with n_p local rows and R_p
received rows: (2 + 2f)·n_p·D² + 2·(n_p + R_p)·D² + 2·n_p·(n_p + R_p)·D, where f is
the FFN expansion (intermediate size / D).
"""

from __future__ import annotations

import torch

from engine.plan import PartitionPlan
from engine.segments import Compression, layout


def block_macs_local(n: int, d: int, f: float) -> float:
    """MACs of one block over all N tokens on one device."""
    return (4 + 2 * f) * n * d * d + 2 * n * n * d


def block_macs_rank(n_p: int, received: int, d: int, f: float) -> float:
    """MACs of one block on a PRISM rank: Q/out/MLP on local rows, K/V on unique rows."""
    keys = n_p + received
    return (2 + 2 * f) * n_p * d * d + 2 * keys * d * d + 2 * n_p * keys * d


def received_rows(plan: PartitionPlan, comp: Compression, causal: bool) -> list[int]:
    """Rows each rank receives per sample per layer (no padding)."""
    mask = torch.ones(1, plan.n_tokens, dtype=torch.bool)
    sent = [layout(plan, q, mask, comp).n_segments for q in range(plan.ranks)]
    return [sum(sent[q] for q in range(plan.ranks) if q != p and (q < p or not causal)) for p in range(plan.ranks)]


def macs_reduction(plan: PartitionPlan, comp: Compression, d: int, f: float, causal: bool = False) -> float:
    """Per-device compute saved vs one device, averaged over ranks (the papers' figure)."""
    local = block_macs_local(plan.n_tokens, d, f)
    rows = received_rows(plan, comp, causal)
    per_rank = [block_macs_rank(plan.sizes[p], rows[p], d, f) for p in range(plan.ranks)]
    return 1.0 - sum(per_rank) / len(per_rank) / local
