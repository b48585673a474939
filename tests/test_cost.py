"""The cost model reproduces the PRISM paper's per-device compute savings and prices each rank."""

import pytest

from engine.cost import block_macs_rank, macs_reduction, rank_macs, received_rows
from engine.plan import PartitionPlan
from engine.segments import Compression


def test_bert_base_cr128_saves_51_24_percent() -> None:
    plan = PartitionPlan.equal(256, 2)
    assert macs_reduction(plan, Compression(cr=128, keep_first=False), d=768, f=4) == pytest.approx(0.5124, abs=5e-5)


def test_vit_base_ten_segments_saves_50_11_percent() -> None:
    plan = PartitionPlan.equal(197, 2)
    assert macs_reduction(plan, Compression(cr=9.9, keep_first=False), d=768, f=4) == pytest.approx(0.5011, abs=5e-5)


def test_full_exchange_saves_less_than_prism() -> None:
    plan = PartitionPlan.equal(197, 2)
    full = macs_reduction(plan, Compression(cr=None), d=768, f=4)
    prism = macs_reduction(plan, Compression(cr=8), d=768, f=4)
    assert 0 < full < prism < 0.5 + 0.01


def test_causal_ranks_only_receive_from_earlier_ranks() -> None:
    plan = PartitionPlan.equal(12, 3)
    assert received_rows(plan, Compression(cr=None), causal=True) == [0, 4, 8]
    assert received_rows(plan, Compression(cr=None), causal=False) == [8, 8, 8]


def test_rank_macs_price_what_each_rank_computes() -> None:
    plan = PartitionPlan.weighted(12, [2.0, 1.0])  # sizes 8 and 4
    assert plan.sizes == (8, 4)
    full = rank_macs(plan, Compression(cr=None), d=8, f=4)
    assert full == [block_macs_rank(8, 4, 8, 4), block_macs_rank(4, 8, 8, 4)]  # K/V of every remote row
    codes = rank_macs(plan, Compression(cr=4, method="codes"), d=8, f=4)
    assert codes == [block_macs_rank(8, 4, 8, 4, rotates=True), block_macs_rank(4, 8, 8, 4, rotates=True)]
    means = rank_macs(plan, Compression(cr=4, keep_first=False), d=8, f=4)
    assert means == [block_macs_rank(8, 1, 8, 4), block_macs_rank(4, 2, 8, 4)]  # segment rows only
    causal = rank_macs(plan, Compression(cr=4, method="codes"), d=8, f=4, causal=True)
    assert causal == [block_macs_rank(8, 0, 8, 4, rotates=True), block_macs_rank(4, 8, 8, 4)]  # last rank sends nothing
