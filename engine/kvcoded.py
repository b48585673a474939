"""One rank's side of the ``kv`` exchange: low-bit codes of the K and V of its own rows.

A rank computes K and V of its own rows for its own attention anyway; under ``kv`` it codes
those and sends them, so receivers decode and attend, projecting nothing (research/kvcodes.md:
at 1/4 of full-exchange bytes MiniLM keeps cosine 0.9997 at P = 2, at Segment Means' compute).

Per layer i >= 1 a sender takes K and V of its rows without the projection bias (every
receiver knows it), rotates each head by the shared seeded orthogonal d x d matrix
(:func:`engine.codec.rotation` of the head width; it spreads a head's outlier channels over
the head, so a row looks Gaussian to the quantiser), and codes the rows with
:mod:`engine.codec`: one fp16 scale per row (the one of RMS x {0.85, 1, 1.2} with the least
squared error: heads differ in spread, so a row is not quite Gaussian), b bits from the byte
budget, leftover bits to the leading rows. A receiver decodes, undoes the rotation per head (h·d² per row against the
2·D² a projection costs: 1/12 of it for ViT-B; never a dense D x D inverse) and adds the
bias. No delta coding: K/V of a layer are new values, not a small change of the last one's.

Layer 0 is not sent: its attention input is a function of the inputs every rank holds, so
each receiver rebuilds every sender's layer-0 K/V exactly (once per job).

Payload rows of one sender and chunk: its V rows, then its K rows, each position-major (row j
of every sample before row j + 1), so a payload is ``2n`` "positions" of a batch and
:func:`engine.coded.chunk_bits` cuts chunks as it does for ``codes``. V leads: where the
budget buys one more bit for some rows, V gets it first (the study's best split at 1/4).
"""

from __future__ import annotations

import torch

from engine.codec import decode, payload_of, rotation
from engine.coded import Coder, CoderArgs, batch_major, position_major


class CodedKV(Coder):
    """One rank's encoder (for its receivers) and decoders (one per sender) for one job."""

    def __init__(self, job: CoderArgs) -> None:
        super().__init__(job)
        adapter = job.adapter
        self.head = adapter.head_dim(0)
        rot = rotation(self.head, device=adapter.device)  # (d, d) fp32: a head row y = x @ R
        self.rot, self.rot_t = rot.contiguous(), rot.T.contiguous()
        self._bias: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Layer 0 of every sender's rows, K and V rebuilt here from the inputs (the sender's own call).
        self.held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for q in self.senders:
            x0 = adapter.attn_input(0, adapter.embed(job.shared, {}, job.plan.span(q)))
            _, k0, v0 = adapter.project(0, x0[:, :0], x0)
            self.held[q] = (k0, v0)

    def bias(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's K and V biases as (heads, d) fp32 (zeros where the model has none)."""
        cached = self._bias.get(i)
        if cached is None:
            _, b = self.adapter.kv_map(i)  # (2D,)
            kb, vb = b.detach().float().view(2, -1, self.head).unbind(0)
            cached = self._bias[i] = (kb.contiguous(), vb.contiguous())
        return cached

    def encode(self, i: int, k: torch.Tensor, v: torch.Tensor, c: int = 0) -> torch.Tensor:
        """This rank's layer-i payload (uint8) from the K and V (b, heads, n, d) of chunk c's rows."""
        if not self.receivers or i == 0:
            return torch.empty(0, dtype=torch.uint8, device=k.device)  # nobody reads it, or rebuilt
        kb, vb = self.bias(i)
        parts = [self._rotate(t.transpose(1, 2).float() - b) for t, b in ((v, vb), (k, kb))]  # (b, n, D) each
        rows = position_major(torch.cat(parts, dim=1))  # (2n * b, D): V positions, then K positions
        return payload_of(rows, self.bits[self.rank][c], fit=True)

    def remote_kv(
        self, i: int, payloads: list[torch.Tensor], c: int = 0
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """K and V (b, heads, n_q, d) of every sender's rows of chunk c at layer i."""
        s = self.chunks[c]
        keys, values = [], []
        for n, q in enumerate(self.senders):
            if i == 0:
                k0, v0 = self.held[q]
                keys.append(k0[s])
                values.append(v0[s])
                continue
            batch = s.stop - s.start
            rows = batch_major(decode(payloads[n], self.bits[q][c]), batch)  # (b, 2n, D)
            v_rows, k_rows = rows.chunk(2, dim=1)
            kb, vb = self.bias(i)
            keys.append(self._unrotate(k_rows, kb))
            values.append(self._unrotate(v_rows, vb))
        return keys, values

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, heads, d) -> every head rotated, merged: (b, n, D) fp32."""
        b, n, h, d = x.shape
        return self.adapter.linear(x.reshape(-1, d), self.rot_t, None).view(b, n, h * d)

    def _unrotate(self, rows: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Decoded rows (b, n, D) -> K or V (b, heads, n, d) in the model's dtype."""
        b, n, _ = rows.shape
        h, d = bias.shape
        flat = rows.reshape(-1, d)
        x = self.adapter.linear(flat, self.rot, None).view(b, n, h, d) + bias
        return x.to(self.adapter.dtype).transpose(1, 2)
