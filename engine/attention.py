"""Count-weighted attention over unique rows, with the partition-aware causal mask.

Rank p attends from its own rows to ``U_p = [S_p ; Z_q for senders q]`` where every
remote row stands for ``c`` tokens. Adding ``log c`` to that row's logit is exactly
attention over the sequence with each remote token replaced by its segment mean, but
K/V are computed for ``n_p + sum(L_q)`` rows instead of N (docs/design.md §3.4-3.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


def neg_inf(dtype: torch.dtype) -> float:
    """The masking value transformers uses (finite, so fully masked rows stay finite)."""
    return float(torch.finfo(dtype).min)


def key_bias(
    local_mask: torch.Tensor,
    remote_counts: list[torch.Tensor],
    *,
    count_bias: bool,
    causal: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive logit bias over the unique rows ``[local ; remote...]``.

    ``local_mask`` (B, n) marks real local tokens; ``remote_counts`` holds (B, L_q) per
    sender. Returns (B, 1, n, K) when ``causal`` (local rows see local rows at or before
    them, and every remote segment: only earlier ranks send in causal mode) else
    (B, 1, 1, K), with K = n + sum(L_q).
    """
    masked = neg_inf(dtype)
    local = torch.where(local_mask, 0.0, masked).to(dtype)  # (B, n)
    parts = [local]
    for counts in remote_counts:
        real = counts > 0
        bias = torch.log(counts.clamp(min=1.0)) if count_bias else torch.zeros_like(counts)
        parts.append(torch.where(real, bias, masked).to(dtype))
    keys = torch.cat(parts, dim=1)  # (B, K)
    if not causal:
        return keys[:, None, None, :]
    n = local_mask.shape[1]
    n_remote = keys.shape[1] - n
    allowed = torch.ones(n, n, dtype=torch.bool).tril()  # (n, n) query i sees local j <= i
    allowed = torch.cat([allowed, torch.ones(n, n_remote, dtype=torch.bool)], dim=1)
    bias = keys[:, None, :].expand(-1, n, -1)  # (B, n, K)
    bias = torch.where(allowed, bias, torch.tensor(masked, dtype=dtype))
    return bias[:, None, :, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling + bias) v.

    q (B, h, n, d), k/v (B, h, K, d), bias broadcastable to (B, h, n, K) -> (B, h, n, d).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scaling)
