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

A job whose batch runs in chunks of samples (to overlap exchanges with compute) sends one
payload per chunk, cut from the whole batch's payload so that every row keeps the width
it has there (:func:`chunk_bits`): the codes, scales and reconstructions are the same as
unchunked, bit for bit, and so is the number of bytes when D is a multiple of 8.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    Under ``kv`` a payload holds two coded rows per token (its V rows, then its K rows).
    """
    assert comp.cr is not None
    rows = batch * plan.sizes[sender]
    full = rows * d * FULL_BYTES_PER_VALUE
    coded = rows * (2 if comp.uses_kv else 1)
    try:
        return bits_for_budget(coded, d, layer_budget(full, comp.cr, n_layers))
    except BadRequest:
        floor = Bits(coded, d, 1, 0).nbytes * (n_layers - 1)
        raise BadRequest(
            f"CR {comp.cr:g} is too tight for method '{comp.method.value}' on this model: 1-bit codes of every row "
            f"need 1/{full * n_layers / floor:.1f} of full exchange"
        ) from None


def chunk_bits(bits: Bits, batch: int, chunk: slice) -> Bits:
    """The widths of the rows of the samples in ``chunk``, as the whole batch's ``bits`` has them.

    The whole payload's rows are position-major (row j * batch + s), and its first k rows
    are one bit wider: all of positions j < k // batch, and samples s < k % batch of
    position k // batch. In a chunk's own position-major order those rows come first too.
    """
    n = bits.rows // batch  # positions
    start, stop = chunk.indices(batch)[:2]
    size = stop - start
    full, rest = divmod(bits.k, batch)
    k = size * full + min(max(rest - start, 0), size)
    return Bits(size * n, bits.d, bits.b, k)


def check_budget(plan: PartitionPlan, comp: Compression, batch: int, d: int, n_layers: int) -> None:
    """Raise ``BadRequest`` unless every rank's budget fits (call before any rank runs)."""
    if comp.coded and n_layers > 1:
        for q in range(plan.ranks):
            payload_bits(plan, comp, batch, q, d, n_layers)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, n, D) -> (n * B, D), position-major."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


def _unrows(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`_rows`: (n * B, D) -> (B, n, D)."""
    return rows.view(-1, batch, rows.shape[-1]).transpose(0, 1)


@dataclass(frozen=True, slots=True)
class CoderArgs:
    """What one rank's coder needs of its job: who sends to it, who it sends to, the chunks."""

    adapter: Adapter
    plan: PartitionPlan
    comp: Compression
    batch: int
    rank: int
    senders: list[int]
    receivers: list[int]
    shared: Tensors  # the inputs every rank holds (layer 0 is rebuilt from them)
    chunks: list[slice]


class Coder:
    """What every coded method shares: the payload widths of every sender and chunk."""

    def __init__(self, job: CoderArgs) -> None:
        self.adapter = adapter = job.adapter
        self.batch = job.batch
        self.rank = job.rank
        self.senders = job.senders
        self.receivers = job.receivers
        self.chunks = job.chunks
        d, n_layers = adapter.hidden_size, adapter.n_layers
        ranks = [*job.senders, job.rank] if job.receivers else job.senders
        whole = {q: payload_bits(job.plan, job.comp, job.batch, q, d, n_layers) for q in ranks} if n_layers > 1 else {}
        self.bits = {q: [chunk_bits(b, job.batch, c) for c in self.chunks] for q, b in whole.items()}

    def payload_bytes(self, sender: int, i: int, c: int = 0) -> int:
        """Size of ``sender``'s layer-i payload for chunk c (0 for layer 0)."""
        return 0 if i == 0 else self.bits[sender][c].nbytes


class CodedRows(Coder):
    """One rank's encoder (for its receivers) and decoders (one per sender) for one job."""

    def __init__(self, job: CoderArgs) -> None:
        super().__init__(job)
        adapter, plan, d = job.adapter, job.plan, job.adapter.hidden_size
        self.rot_t = rotation(d, device=adapter.device).T.contiguous()  # (D, D) fp32, R^T: y = x R
        # (B, n, D) fp32: what the receivers hold of my rows; chunk c's samples are written
        # at layer 0 and updated in place, one chunk at a time.
        self.own = torch.zeros(job.batch, plan.sizes[job.rank], d, device=adapter.device)
        # Layer 0 of every sender's rows, rebuilt here from the inputs (same call as the sender's).
        self.held = {
            q: self._rotate(adapter.attn_input(0, adapter.embed(job.shared, {}, plan.span(q)))) for q in self.senders
        }

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter.linear(x.float(), self.rot_t, None)

    def encode(self, i: int, x: torch.Tensor, c: int = 0) -> torch.Tensor:
        """This rank's layer-i payload (uint8) from chunk c's attention input x (b, n, D)."""
        empty = torch.empty(0, dtype=torch.uint8, device=x.device)
        if not self.receivers:
            return empty  # causal last rank: nobody reads these rows
        y = self._rotate(x)
        s = self.chunks[c]
        if i == 0:
            self.own[s] = y  # the receivers rebuild it themselves
            return empty
        own = self.own[s]
        payload, recon = encode(_rows(y - own), self.bits[self.rank][c])
        self.own[s] = own + _unrows(recon, y.shape[0])
        return payload

    def remote_kv(
        self, i: int, payloads: list[torch.Tensor], c: int = 0
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """K and V (b, heads, n_q, d) of every sender's rows of chunk c at layer i, after
        applying its payload."""
        keys, values = [], []
        s = self.chunks[c]
        for n, q in enumerate(self.senders):
            held = self.held[q][s]
            if i > 0:
                held = held + _unrows(decode(payloads[n], self.bits[q][c]), held.shape[0])
                self.held[q][s] = held
            k, v = self.adapter.rotated_kv(i, held)
            keys.append(k)
            values.append(v)
        return keys, values
