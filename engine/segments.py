"""Segment Means: what a rank sends instead of its full attention input (docs/design.md §3.3).

(The other exchange method, ``codes``, sends every row in few bits: engine/codec.py and
engine/coded.py. Here it only picks the method and, as its layout, full exchange's.)

A rank's positions are cut into contiguous, near-equal segments of about ``cr`` tokens
and only each segment's mean row travels, with its count of real tokens. Padding is
left out of means and counts; a segment without real tokens has count 0 and is masked
out by the receiver. Chosen positions (the global first token, each sample's last real
token) can be kept exact as count-1 segments of their own.

Every rank can compute every rank's layout from the plan and the global token mask,
so counts never need to travel.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from engine.errors import BadRequest
from engine.plan import PartitionPlan

#: Dtypes segment rows may take on the wire (``Compression.wire_dtype``).
WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Method(str, enum.Enum):
    """What ranks send when they compress: segment means, or every row in few bits."""

    MEANS = "means"  # Segment Means: ceil(n / CR) mean rows per rank (docs/design.md §3.3)
    CODES = "codes"  # every row, rotated, b-bit codes in 1/CR of the bytes (research/codec.md)
    KV = "kv"  # every row's K and V, rotated per head, b-bit codes in 1/CR of the bytes (research/kvcodes.md)

    @classmethod
    def parse(cls, value: str | Method) -> Method:
        """``"means"`` / ``"codes"`` / ``"kv"`` (or a Method) -> Method; anything else is a BadRequest."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise BadRequest(f"unknown exchange method {value!r} (known: {names})") from None


@dataclass(frozen=True, slots=True)
class Compression:
    """How ranks compress what they exchange.

    ``cr`` is the compression rate; ``None`` means full exchange (exact rows, the
    "Voltage" baseline) whatever the method. ``method`` says what a CR means:

    * ``means`` (default): CR is tokens per segment. ``keep_first`` sends global
      position 0 (CLS) exactly; ``keep_last`` sends each sample's last real token
      exactly ([SEP] in BERT). ``count_bias`` adds ``log(count)`` to a segment's
      attention logit so it weighs as the tokens it stands for (switch off only for
      ablation).
    * ``codes``: CR is a byte budget, each rank sends at most 1/CR of its full-exchange
      bytes (over the layers); every row travels in few bits. ``keep_first``,
      ``keep_last`` and ``count_bias`` do not apply.
    * ``kv``: the same byte budget, but a rank sends the K and V it computed for its own
      rows (two coded rows per token) and receivers project nothing (engine/kvcoded.py).

    ``wire_dtype`` (``fp16``, ``bf16`` or ``fp32``; ``None``: the model's dtype) is what
    segment rows (means, or full exchange's rows) are cast to on the wire; receivers cast
    them back and compute in the model's dtype. It does not apply to ``codes`` (already
    bytes). A string ``method`` is accepted and parsed (``Compression(cr=8, method="codes")``).
    """

    cr: float | None = None
    keep_first: bool = True
    keep_last: bool = False
    count_bias: bool = True
    method: Method = Method.MEANS
    wire_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.cr is not None and (not math.isfinite(self.cr) or self.cr < 1):
            raise BadRequest(f"compression rate must be a number >= 1 (or 'full'), got {self.cr}")
        if not isinstance(self.method, Method):
            object.__setattr__(self, "method", Method.parse(self.method))
        if self.wire_dtype is not None:
            if self.wire_dtype not in WIRE_DTYPES:
                names = ", ".join(WIRE_DTYPES)
                raise BadRequest(f"unknown wire dtype {self.wire_dtype!r} (known: {names})")
            if self.coded:
                raise BadRequest(
                    f"a wire dtype does not apply to method '{self.method.value}' (its payload is already bytes)"
                )

    def wire(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype segment rows travel in for a model computing in ``model_dtype``."""
        return model_dtype if self.wire_dtype is None else WIRE_DTYPES[self.wire_dtype]

    @property
    def is_full(self) -> bool:
        """True for exact full-tensor exchange."""
        return self.cr is None

    @property
    def uses_codes(self) -> bool:
        """True when ranks send coded hidden rows (method ``codes`` at some CR)."""
        return self.method is Method.CODES and self.cr is not None

    @property
    def uses_kv(self) -> bool:
        """True when ranks send coded K/V rows (method ``kv`` at some CR)."""
        return self.method is Method.KV and self.cr is not None

    @property
    def coded(self) -> bool:
        """True when every row travels as low-bit codes (``codes`` or ``kv`` at some CR):
        the payload is bytes within a budget and layer 0 is rebuilt from the inputs."""
        return self.uses_codes or self.uses_kv

    def label(self) -> str:
        """Short human name: ``full``, ``cr=8`` (Segment Means) or ``codes cr=8``."""
        name = "full"
        if self.cr is not None:
            name = f"{self.method.value} cr={self.cr:g}" if self.coded else f"cr={self.cr:g}"
        return name if self.wire_dtype is None else f"{name} {self.wire_dtype}"


@dataclass(frozen=True, slots=True)
class SegmentLayout:
    """One rank's segments for one batch.

    ``assign`` (B, L, n) holds 1 where local row j belongs to segment l (padding rows
    belong to none); ``counts`` (B, L) is the number of real tokens per segment.
    """

    assign: torch.Tensor | None  # (B, L, n); None for full exchange (identity)
    counts: torch.Tensor  # (B, L) float

    def to(self, device: torch.device) -> SegmentLayout:
        """The same layout on ``device``."""
        assign = None if self.assign is None else self.assign.to(device)
        return SegmentLayout(assign=assign, counts=self.counts.to(device))

    def samples(self, chunk: slice) -> SegmentLayout:
        """The layout of the samples in ``chunk`` (a slice of the batch)."""
        assign = None if self.assign is None else self.assign[chunk]
        return SegmentLayout(assign=assign, counts=self.counts[chunk])

    @property
    def n_segments(self) -> int:
        """L, the number of rows this rank sends per sample."""
        return int(self.counts.shape[1])

    def means(self, x: torch.Tensor) -> torch.Tensor:
        """Segment means of ``x`` (B, n, D) -> (B, L, D); empty segments are zero rows."""
        if self.assign is None:
            return x
        sums = torch.bmm(self.assign.to(x.dtype), x)  # (B, L, D)
        return sums / self.counts.clamp(min=1.0).to(x.dtype).unsqueeze(-1)


def _regular_segments(n_positions: int, cr: float) -> list[int]:
    """Sizes of near-equal contiguous segments of at most about ``cr`` positions."""
    if n_positions == 0:
        return []
    n_segments = max(1, math.ceil(n_positions / cr - 1e-9))
    base, extra = divmod(n_positions, n_segments)
    return [base + 1] * extra + [base] * (n_segments - extra)


def last_real_positions(mask: torch.Tensor) -> torch.Tensor:
    """Global index of each sample's last real token, (B,) long."""
    n = mask.shape[1]
    idx = torch.arange(n, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.full_like(idx, -1)).max(dim=1).values


def layout(plan: PartitionPlan, rank: int, mask: torch.Tensor, comp: Compression) -> SegmentLayout:
    """Segments rank ``rank`` sends for a batch whose real tokens are ``mask`` (B, N) bool.

    Full exchange, ``codes`` and ``kv`` send every row: their layout is the identity.
    """
    span = plan.span(rank)
    local_mask = mask[:, span.start : span.stop]  # (B, n)
    if comp.cr is None or comp.coded:
        return SegmentLayout(assign=None, counts=local_mask.to(torch.float32))

    batch, n = local_mask.shape
    # seg_id[b, j]: segment of local row j in sample b, -1 for rows in no segment.
    seg_id = torch.full((batch, n), -1, dtype=torch.long)
    regular = torch.ones(n, dtype=torch.bool)
    next_id = 0
    if comp.keep_first and span.start == 0:
        seg_id[:, 0] = 0
        regular[0] = False
        next_id = 1
    reg_pos = torch.nonzero(regular).flatten()
    offset = 0
    for size in _regular_segments(len(reg_pos), comp.cr):
        seg_id[:, reg_pos[offset : offset + size]] = next_id
        next_id += 1
        offset += size
    if comp.keep_last:
        last = last_real_positions(mask) - span.start  # (B,) local index
        holders = (last >= 0) & (last < n)
        if bool(holders.any()):
            rows = torch.nonzero(holders).flatten()
            seg_id[rows, last[rows]] = next_id
            next_id += 1
    seg_id = torch.where(local_mask, seg_id, torch.full_like(seg_id, -1))
    ids = torch.arange(next_id).view(1, next_id, 1)
    assign = (seg_id.unsqueeze(1) == ids).to(torch.float32)  # (B, L, n)
    return SegmentLayout(assign=assign, counts=assign.sum(dim=-1))
