"""Partition plans: which contiguous token positions each rank owns (docs/design.md §3.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.errors import BadRequest


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    """Contiguous blocks of token positions, one per rank, covering ``0..n_tokens-1``."""

    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise BadRequest(f"every rank needs at least one token, got sizes {list(self.sizes)}")

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
        return sum(self.sizes[:rank])

    def span(self, rank: int) -> range:
        """Global positions owned by ``rank``."""
        start = self.start(rank)
        return range(start, start + self.sizes[rank])

    def owner(self, position: int) -> int:
        """Rank that owns global ``position``."""
        for rank in range(self.ranks):
            if position < self.start(rank) + self.sizes[rank]:
                return rank
        raise BadRequest(f"position {position} is outside a plan of {self.n_tokens} tokens")
