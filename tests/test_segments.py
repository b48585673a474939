"""Segment Means: layout, padding exclusion, exact CLS / last token."""

import math

import pytest
import torch

from engine.errors import BadRequest
from engine.plan import PartitionPlan
from engine.segments import Compression, layout


def test_means_of_contiguous_near_equal_segments() -> None:
    plan = PartitionPlan.equal(10, 1)
    mask = torch.ones(1, 10, dtype=torch.bool)
    lay = layout(plan, 0, mask, Compression(cr=4, keep_first=False))
    assert lay.n_segments == math.ceil(10 / 4)
    assert lay.counts.tolist() == [[4.0, 3.0, 3.0]]
    x = torch.arange(10.0).view(1, 10, 1)
    assert lay.means(x).flatten().tolist() == pytest.approx([1.5, 5.0, 8.0])


def test_padding_is_left_out_of_means_and_counts() -> None:
    plan = PartitionPlan.equal(8, 2)  # rank 1 holds positions 4..7
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    lay = layout(plan, 1, mask, Compression(cr=2, keep_first=False))
    assert lay.counts.tolist() == [[2.0, 0.0], [0.0, 0.0]]
    x = torch.tensor([10.0, 20.0, 999.0, 999.0]).view(1, 4, 1).expand(2, 4, 1)
    means = lay.means(x)
    assert means[0, 0, 0] == pytest.approx(15.0)
    assert torch.isfinite(means).all()


def test_first_token_is_sent_exactly_by_default() -> None:
    plan = PartitionPlan.equal(9, 1)
    mask = torch.ones(1, 9, dtype=torch.bool)
    lay = layout(plan, 0, mask, Compression(cr=4))
    assert lay.counts.tolist() == [[1.0, 4.0, 4.0]]
    x = torch.arange(9.0).view(1, 9, 1)
    assert lay.means(x)[0, 0, 0] == 0.0  # CLS row itself, not averaged


def test_last_real_token_kept_exact_per_sample() -> None:
    plan = PartitionPlan.equal(8, 2)
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2], dtype=torch.bool)
    lay = layout(plan, 1, mask, Compression(cr=8, keep_first=False, keep_last=True))
    assert lay.counts.tolist() == [[3.0, 1.0], [1.0, 1.0]]
    x = torch.arange(4.0).view(1, 4, 1).expand(2, 4, 1)
    assert lay.means(x)[:, 1, 0].tolist() == [3.0, 1.0]  # the last real token of each sample


def test_full_exchange_sends_every_row() -> None:
    plan = PartitionPlan.equal(6, 2)
    mask = torch.ones(2, 6, dtype=torch.bool)
    lay = layout(plan, 0, mask, Compression(cr=None))
    x = torch.randn(2, 3, 5)
    assert torch.equal(lay.means(x), x)


@pytest.mark.parametrize("cr", [0.5, float("nan"), float("inf")])
def test_compression_rate_must_be_at_least_one(cr: float) -> None:
    with pytest.raises(BadRequest):
        Compression(cr=cr)
