"""Weighted shares: how many tokens each rank gets, and what that does to the compute time.

Ranks synchronise every layer, so the slowest one sets the pace. Each rank has a
*slowness*: how much longer than this node (unloaded, as its map was measured) it takes
over the same work, from its speed figure (ms per token, policy.predict.ms_per_token) and
its load. Giving each rank tokens in proportion to its speed (1 / slowness) lets a slow
peer finish with the others instead of holding them up.

The work of a rank under a plan is its block MACs (engine.cost.rank_macs): its own rows'
projections and MLP, K/V of the rows it receives, attention over both. That is not
proportional to its share: under full exchange and codes every rank computes K/V of every
remote row, and a causal rank receives only from earlier ranks. So the compute time of a
split is predicted as

    compute = unit * max_p slowness_p * work_p(plan)

with ``unit`` from the map (rank 0's measured compute over its work at equal shares), and
the split's latency moves by the difference from the map's own case (equal shares, every
rank at slowness 1). The link model is left as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from engine.cost import rank_macs
from engine.plan import PartitionPlan
from engine.segments import Compression, Method
from policy.perfmap import METHODS, ModelShape


@dataclass(frozen=True, slots=True)
class Split:
    """The shares chosen for one option and what they change.

    ``shares`` are fractions of the tokens per rank in rank order (rank 0 is this node),
    what ``plan_job(weights=...)`` takes; ``extra_ms`` is the compute time added over the
    map's prediction (negative when weighing saves time); ``weighted`` is False for an
    equal split."""

    shares: tuple[float, ...]
    extra_ms: float
    weighted: bool


@lru_cache(maxsize=4096)
def _work(sizes: tuple[int, ...], kind: str, cr: float | None, shape: ModelShape) -> tuple[float, ...]:
    """Per-rank block MACs of a plan for one option (cached: decide asks for the same often)."""
    method = Method(kind) if kind in METHODS else Method.MEANS
    comp = Compression(cr=None if kind == "full" else cr, method=method)
    return tuple(rank_macs(PartitionPlan(sizes), comp, shape.hidden, shape.ffn, shape.causal))


def equal_shares(ranks: int) -> tuple[float, ...]:
    """Every rank the same share."""
    return tuple(1.0 / ranks for _ in range(ranks))


def split(
    compute_ms: float,
    n_tokens: int,
    slowness: Sequence[float],
    kind: str,
    cr: float | None,
    shape: ModelShape,
    *,
    weigh: bool,
) -> Split:
    """The better of the equal split and, when ``weigh``, shares in proportion to speed.

    ``compute_ms`` is the map's compute time of the option (rank 0's, equal shares, every
    rank as fast as this node, unloaded); ``slowness`` has one entry per rank (>= some
    positive number; 1 is this node unloaded)."""
    ranks = len(slowness)
    if ranks < 2 or n_tokens < ranks or any(not math.isfinite(s) or s <= 0 for s in slowness):
        return Split(equal_shares(max(1, ranks)), 0.0, False)
    equal = PartitionPlan.equal(n_tokens, ranks)
    work = _work(equal.sizes, kind, cr, shape)
    unit = compute_ms / work[0] if work[0] > 0 else 0.0
    base = max(work)  # the map's own pace: equal shares, slowness 1 everywhere

    def pace(plan: PartitionPlan) -> float:
        return max(s * w for s, w in zip(slowness, _work(plan.sizes, kind, cr, shape), strict=True))

    best = Split(equal_shares(ranks), unit * (pace(equal) - base), False)
    if weigh:
        speeds = [1.0 / s for s in slowness]
        weighted = PartitionPlan.weighted(n_tokens, speeds)
        extra = unit * (pace(weighted) - base)
        if weighted.sizes != equal.sizes and extra < best.extra_ms:
            total = sum(speeds)
            best = Split(tuple(v / total for v in speeds), extra, True)
    return best
