"""Partition plans: which contiguous token positions each rank owns (docs/design.md §3.1).

Blocks follow rank order (rank 0 first) unless a plan says otherwise: a generation's
prefill puts the coordinator (rank 0) on the last block, so under a causal model it receives
every earlier position and can go on decoding alone (docs/design.md §3.7)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import BadRequest


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    """Contiguous blocks of token positions, one per rank, covering ``0..n_tokens-1``.

    ``sizes[r]`` is rank r's block; ``order`` lists the ranks in position order (default
    ``0, 1, ..., P-1``).
    """

    sizes: tuple[int, ...]
    order: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise BadRequest(f"every rank needs at least one token, got sizes {list(self.sizes)}")
        if not self.order:
            object.__setattr__(self, "order", tuple(range(len(self.sizes))))
        elif sorted(self.order) != list(range(len(self.sizes))):
            last = len(self.sizes) - 1
            raise BadRequest(f"a plan's order must list ranks 0..{last} once each, got {list(self.order)}")

    def root_last(self) -> PartitionPlan:
        """Every rank keeps its block size; ranks 1..P-1 take the leading blocks, rank 0 the
        final one."""
        return PartitionPlan(self.sizes, (*range(1, self.ranks), 0))

    @classmethod
    def equal(cls, n_tokens: int, ranks: int) -> PartitionPlan:
        """Near-equal blocks with ``torch.tensor_split`` semantics (larger blocks first)."""
        return cls.weighted(n_tokens, [1.0] * ranks)

    @classmethod
    def weighted(cls, n_tokens: int, weights: Sequence[float]) -> PartitionPlan:
        """Blocks proportional to ``weights`` (e.g. measured device speed), each >= 1 token.

        Uses largest-remainder rounding, ties to the lower rank, so equal weights give
        exactly ``torch.tensor_split`` sizes.
        """
        ranks = len(weights)
        if ranks < 1:
            raise BadRequest("a plan needs at least one rank")
        if any(not math.isfinite(w) or w <= 0 for w in weights):
            raise BadRequest(f"rank weights must be positive numbers, got {list(weights)}")
        if n_tokens < ranks:
            raise BadRequest(f"cannot split {n_tokens} tokens over {ranks} ranks")
        # Every rank first gets one token; the rest is shared by weight.
        spare = n_tokens - ranks
        total = sum(weights)
        shares = [spare * w / total for w in weights]
        sizes = [1 + math.floor(s) for s in shares]
        left = n_tokens - sum(sizes)
        order = sorted(range(ranks), key=lambda r: (-(shares[r] - math.floor(shares[r])), r))
        for r in order[:left]:
            sizes[r] += 1
        return cls(tuple(sizes))

    @property
    def ranks(self) -> int:
        """Number of ranks (devices) in the plan."""
        return len(self.sizes)

    @property
    def n_tokens(self) -> int:
        """Total sequence length N."""
        return sum(self.sizes)

    def start(self, rank: int) -> int:
        """First global position owned by ``rank``."""
        return sum(self.sizes[r] for r in self.order[: self.order.index(rank)])

    def precedes(self, rank: int, other: int) -> bool:
        """Whether ``rank``'s block comes before ``other``'s (under a causal model: ``other``
        attends to ``rank``'s rows)."""
        return self.order.index(rank) < self.order.index(other)

    def later(self, rank: int) -> int:
        """How many ranks' blocks come after ``rank``'s."""
        return self.ranks - 1 - self.order.index(rank)

    @property
    def last_rank(self) -> int:
        """The rank that owns the final positions."""
        return self.order[-1]

    def span(self, rank: int) -> range:
        """Global positions owned by ``rank``."""
        start = self.start(rank)
        return range(start, start + self.sizes[rank])

    def owner(self, position: int) -> int:
        """Rank that owns global ``position``."""
        for rank in self.order:
            if position < self.start(rank) + self.sizes[rank]:
                return rank
        raise BadRequest(f"position {position} is outside a plan of {self.n_tokens} tokens")
