"""One rank's side of the ``kv`` exchange: low-bit codes of the K and V of its own rows.

A rank computes K and V of its own rows for its own attention anyway; under ``kv`` it codes
those and sends them, so receivers decode and attend, projecting nothing (research/kvcodes.md:
at 1/4 of full-exchange bytes MiniLM keeps cosine 0.9996 at P = 2, at Segment Means' compute).

Per layer i >= 1 a sender takes K and V of its rows without the projection bias (every
receiver knows it) and codes the rows with :mod:`engine.codec`: one fp16 scale per row (its
RMS), b bits from the byte budget, leftover bits to the leading rows. A receiver decodes and
adds the bias, straight into the keys and values it attends over. No delta coding: K/V of a
layer are new values, not a small change of the last one's. Tried on MiniLM's real weights
and not kept (sentences, CR 4, mean cosine at P = 2 / 4; docs/fidelity.md §4): a per-head
random rotation (0.99960 / 0.99910 with a per-row scale fit, against 0.99966 / 0.99924 without
the rotation: it cost every sent and received row a GEMM and gained nothing), and the sender
choosing each row's scale among RMS x {0.85, 1, 1.2} by squared error (0.99966 / 0.99924,
against 0.99958 / 0.99908 with the RMS alone: 2.5 ms per layer and chunk of two vit-base
images, about 12 % of a rank's compute, for 0.0001-0.0002).

Layer 0 is not sent: its attention input is a function of the inputs every rank holds, so
each receiver rebuilds every sender's layer-0 K/V exactly (once per job).

Payload rows of one sender and chunk: its V rows, then its K rows, each position-major (row j
of every sample before row j + 1), so a payload is ``2n`` "positions" of a batch and
:func:`engine.coded.chunk_bits` cuts chunks as it does for ``codes``. V leads: where the
budget buys one more bit for some rows, V gets it first.
"""

from __future__ import annotations

import torch

from engine.codec import decode, payload_of
from engine.coded import Coder, CoderArgs


class CodedKV(Coder):
    """One rank's encoder (for its receivers) and decoders (one per sender) for one job."""

    def __init__(self, job: CoderArgs) -> None:
        super().__init__(job)
        adapter = job.adapter
        self.rows_of = {q: job.plan.sizes[q] for q in job.senders}
        # Layer 0 of every sender's rows, K and V rebuilt here from the inputs (the sender's own call).
        self.held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for q in self.senders:
            x0 = adapter.attn_input(0, adapter.embed(job.shared, {}, job.plan.span(q)))
            _, k0, v0 = adapter.project(0, x0[:, :0], x0)
            self.held[q] = (k0, v0)

    def encode(self, i: int, k: torch.Tensor, v: torch.Tensor, c: int = 0) -> torch.Tensor:
        """This rank's layer-i payload (uint8) from the K and V (b, heads, n, d) of chunk c's rows."""
        if not self.receivers or i == 0:
            return torch.empty(0, dtype=torch.uint8, device=k.device)  # nobody reads it, or rebuilt
        b, h, n, d = k.shape
        kb, vb = self.adapter.kv_bias(i)
        rows = torch.empty(2 * n, b, h * d, device=k.device)  # position-major: V positions, then K positions
        for t, bias, part in ((v, vb, rows[:n]), (k, kb, rows[n:])):
            # (b, h, n, d) is a view of the projection's (b, n, D) output: back to it, positions first
            torch.sub(t.transpose(1, 2).reshape(b, n, h * d).transpose(0, 1), bias, out=part)
        return payload_of(rows.view(2 * n * b, h * d), self.bits[self.rank][c])

    def keys_values(
        self, i: int, k: torch.Tensor, v: torch.Tensor, payloads: list[torch.Tensor], c: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (b, heads, n + sum n_q, d) this rank attends over at layer i: its own rows'
        ``k``, ``v`` (b, heads, n, d), then every sender's, decoded (one buffer, no concatenation)."""
        s = self.chunks[c]
        b, h, n, d = k.shape
        total = n + sum(self.rows_of.values())
        keys = k.new_empty(b, h, total, d)
        values = v.new_empty(b, h, total, d)
        keys[:, :, :n], values[:, :, :n] = k, v
        start = n
        kb, vb = self.adapter.kv_bias(i)
        for j, q in enumerate(self.senders):
            m = self.rows_of[q]
            if i == 0:
                k0, v0 = self.held[q]
                keys[:, :, start : start + m], values[:, :, start : start + m] = k0[s], v0[s]
            else:
                rows = decode(payloads[j], self.bits[q][c]).view(2, m, b, h, d)  # V then K, position-major
                for part, bias, out in ((rows[1], kb, keys), (rows[0], vb, values)):
                    # (m, b, h, d) -> (b, h, m, d), the bias added on the way in
                    torch.add(part.permute(1, 2, 0, 3), bias.view(h, 1, d), out=out[:, :, start : start + m])
            start += m
        return keys, values
