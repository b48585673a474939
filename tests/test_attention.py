"""Count-biased attention over unique rows equals attention over the repeated sequence."""

import torch
import torch.nn.functional as F  # noqa: N812

from engine.attention import attend, key_bias


def test_log_count_bias_equals_repeating_each_segment_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    b, h, d, n_local = 2, 3, 8, 5
    counts = torch.tensor([[4.0, 2.0, 3.0], [1.0, 5.0, 0.0]])  # one empty segment in sample 1
    q = torch.randn(b, h, n_local, d, generator=gen)
    k = torch.randn(b, h, n_local + 3, d, generator=gen)
    v = torch.randn(b, h, n_local + 3, d, generator=gen)
    bias = key_bias(
        torch.ones(b, n_local, dtype=torch.bool), [counts], count_bias=True, causal=False, dtype=torch.float32
    )
    got = attend(q, k, v, bias, d**-0.5)
    for s in range(b):
        # The sequence a full exchange would see: each remote mean repeated `count` times.
        reps = torch.cat([torch.ones(n_local), counts[s]]).long()
        k_rep = torch.repeat_interleave(k[s], reps, dim=1)
        v_rep = torch.repeat_interleave(v[s], reps, dim=1)
        want = F.scaled_dot_product_attention(q[s], k_rep, v_rep, scale=d**-0.5)
        assert torch.allclose(got[s], want, atol=1e-6)


def test_without_bias_every_segment_weighs_as_one_token() -> None:
    counts = torch.tensor([[9.0]])
    on = key_bias(torch.ones(1, 2, dtype=torch.bool), [counts], count_bias=True, causal=False, dtype=torch.float32)
    off = key_bias(torch.ones(1, 2, dtype=torch.bool), [counts], count_bias=False, causal=False, dtype=torch.float32)
    assert on[0, 0, 0, 2].item() == torch.log(torch.tensor(9.0)).item()
    assert off[0, 0, 0, 2].item() == 0.0


def test_partition_aware_causal_mask() -> None:
    local = torch.tensor([[True, True, False]])  # last local token is padding
    bias = key_bias(local, [torch.tensor([[2.0, 0.0]])], count_bias=True, causal=True, dtype=torch.float32)
    allowed = bias[0, 0] > -1e30  # (n, n + L)
    assert allowed.tolist() == [
        [True, False, False, True, False],  # a query sees local rows at or before it,
        [True, True, False, True, False],  # every real segment of earlier ranks,
        [True, True, False, True, False],  # and never padding or empty segments
    ]
