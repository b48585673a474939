"""Partition plans: contiguous, complete, near-equal or weighted."""

import pytest
import torch

from engine.errors import BadRequest
from engine.plan import PartitionPlan


@pytest.mark.parametrize(("n", "p"), [(197, 2), (37, 3), (256, 4), (5, 5), (10, 3), (65, 4)])
def test_equal_plan_matches_tensor_split(n: int, p: int) -> None:
    plan = PartitionPlan.equal(n, p)
    assert list(plan.sizes) == [len(c) for c in torch.arange(n).tensor_split(p)]
    covered = [i for r in range(p) for i in plan.span(r)]
    assert covered == list(range(n))
    assert all(plan.owner(i) == r for r in range(p) for i in plan.span(r))


def test_weighted_plan_follows_device_speed() -> None:
    plan = PartitionPlan.weighted(200, [3.0, 1.0])
    assert plan.sizes == (150, 50)
    uneven = PartitionPlan.weighted(10, [1.0, 1.0, 100.0])
    assert sum(uneven.sizes) == 10
    assert min(uneven.sizes) >= 1


@pytest.mark.parametrize(
    ("n", "weights", "message"),
    [(3, [1.0] * 4, "cannot split 3 tokens over 4 ranks"), (10, [1.0, 0.0], "positive"), (10, [], "at least one")],
)
def test_impossible_plans_say_why(n: int, weights: list[float], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        PartitionPlan.weighted(n, weights)
