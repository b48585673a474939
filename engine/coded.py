"""One rank's side of the ``codes`` exchange: closed-loop delta codes of every row.

Per layer i >= 1 a sender codes ``x_i R - x̂_{i-1}`` (its rows, rotated, minus what its
receivers already hold) with :mod:`engine.codec` and keeps the receivers' reconstruction
``x̂_i`` itself, so errors never pile up across layers. Layer 0 is not sent: its
attention input is a function of the inputs, which every rank holds (token ids; for ViT
the whole image), so every rank rebuilds it for every sender and both sides start from
the same exact ``x̂_0``. Receivers keep ``x̂`` in the rotated basis and compute K/V from
it with R^T folded into the weights (:meth:`engine.adapters.Adapter.rotated_kv`).

Rows of a sender's payload are ordered position-major (row j of every sample before row
j + 1), so the one extra bit the leftover bytes buy goes to the leading positions of
every sample alike. Padding rows are sent like real ones (the budget counts them).
"""

from __future__ import annotations

import torch

from engine.adapters import Adapter, Tensors
from engine.codec import Bits, bits_for_budget, decode, encode, layer_budget, rotation
from engine.errors import BadRequest
from engine.plan import PartitionPlan
from engine.segments import Compression

#: Full exchange is priced in fp32 values: the byte budget's reference (a constant every
#: rank agrees on, whatever dtype it computes in).
FULL_BYTES_PER_VALUE = 4


def payload_bits(plan: PartitionPlan, comp: Compression, batch: int, sender: int, d: int, n_layers: int) -> Bits:
    """Code widths of ``sender``'s payload in every coded layer (1..L-1) of a job.

    Raises ``BadRequest`` when the budget cannot carry 1-bit codes of every row.
    """
    assert comp.cr is not None
    rows = batch * plan.sizes[sender]
    full = rows * d * FULL_BYTES_PER_VALUE
    try:
        return bits_for_budget(rows, d, layer_budget(full, comp.cr, n_layers))
    except BadRequest:
        floor = Bits(rows, d, 1, 0).nbytes * (n_layers - 1)
        raise BadRequest(
            f"CR {comp.cr:g} is too tight for method 'codes' on this model: 1-bit codes of every row "
            f"need 1/{full * n_layers / floor:.1f} of full exchange"
        ) from None


def check_budget(plan: PartitionPlan, comp: Compression, batch: int, d: int, n_layers: int) -> None:
    """Raise ``BadRequest`` unless every rank's budget fits (call before any rank runs)."""
    if comp.uses_codes and n_layers > 1:
        for q in range(plan.ranks):
            payload_bits(plan, comp, batch, q, d, n_layers)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, n, D) -> (n * B, D), position-major."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


def _unrows(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`_rows`: (n * B, D) -> (B, n, D)."""
    return rows.view(-1, batch, rows.shape[-1]).transpose(0, 1)


class CodedRows:
    """One rank's encoder (for its receivers) and decoders (one per sender) for one job."""

    def __init__(
        self,
        adapter: Adapter,
        plan: PartitionPlan,
        comp: Compression,
        batch: int,
        rank: int,
        senders: list[int],
        receivers: list[int],
        shared: Tensors,
    ) -> None:
        self.adapter = adapter
        self.batch = batch
        self.rank = rank
        self.senders = senders
        self.receivers = receivers
        d, n_layers = adapter.hidden_size, adapter.n_layers
        self.rot = rotation(d, device=adapter.device)  # (D, D) fp32
        ranks = [*senders, rank] if receivers else senders
        self.bits = {q: payload_bits(plan, comp, batch, q, d, n_layers) for q in ranks} if n_layers > 1 else {}
        self.own: torch.Tensor | None = None  # (B, n, D) fp32: what the receivers hold of my rows
        # Layer 0 of every sender's rows, rebuilt here from the inputs (same call as the sender's).
        self.held = {q: self._rotate(adapter.attn_input(0, adapter.embed(shared, {}, plan.span(q)))) for q in senders}

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.rot

    def payload_bytes(self, sender: int, i: int) -> int:
        """Size of ``sender``'s layer-i payload (0 for layer 0)."""
        return 0 if i == 0 else self.bits[sender].nbytes

    def encode(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """This rank's layer-i payload (uint8) from its attention input x (B, n, D)."""
        empty = torch.empty(0, dtype=torch.uint8, device=x.device)
        if not self.receivers:
            return empty  # causal last rank: nobody reads these rows
        y = self._rotate(x)
        if i == 0:
            self.own = y  # the receivers rebuild it themselves
            return empty
        assert self.own is not None, "layers run in order from 0"
        payload, recon = encode(_rows(y - self.own), self.bits[self.rank])
        self.own = self.own + _unrows(recon, self.batch)
        return payload

    def remote_kv(self, i: int, payloads: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """K and V (B, heads, n_q, d) of every sender's rows at layer i, after applying its payload."""
        keys, values = [], []
        for n, q in enumerate(self.senders):
            if i > 0:
                self.held[q] = self.held[q] + _unrows(decode(payloads[n], self.bits[q]), self.batch)
            k, v = self.adapter.rotated_kv(i, self.held[q])
            keys.append(k)
            values.append(v)
        return keys, values
