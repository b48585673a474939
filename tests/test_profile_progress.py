"""The profiler's ETA: priced by batch size and by kind of pass, warm-ups included."""

from __future__ import annotations

import io

import pytest

from agent.profiling.loopback import Grid
from agent.profiling.progress import Progress


def _cost_s(batch: int, kind: str) -> float:
    """A box where a pass costs 10 ms a sample locally and twice that split (plus 5 ms of overhead)."""
    return batch * (0.01 if kind == "local" else 0.02) + 0.005


def test_the_eta_after_the_small_batches_foresees_the_large_ones() -> None:
    grid = Grid("m", batches=(1, 2, 4, 8, 16), crs=(None, 4.0), repeat=3, warmup=1)
    progress = Progress.for_grid(grid, io.StringIO())
    assert progress.total == grid.passes
    assert len(progress.plan) == grid.cells * (grid.repeat + grid.warmup)
    truth = sum(_cost_s(batch, kind) for batch, kind, _ in progress.plan)
    spent = 0.0
    for batch, kind, timed in progress.plan[: 2 * 3 * (grid.repeat + grid.warmup)]:  # batches 1 and 2 done
        progress.step(f"batch {batch} {kind}", _cost_s(batch, kind), timed)
        spent += _cost_s(batch, kind)
    eta = progress.eta_s()
    assert eta is not None
    assert eta == pytest.approx(truth - spent, rel=0.25)
    naive = spent / progress.done * (len(progress.plan) - progress.done)  # what a per-pass average says
    assert naive < 0.4 * (truth - spent)


def test_the_loopback_plan_has_the_options_take_turns() -> None:
    grid = Grid("m", batches=(2,), crs=(4.0,), repeat=2, warmup=1, methods=("means", "codes"))
    plan = Progress.for_grid(grid, io.StringIO(), interleaved=True).plan
    assert plan == [
        (2, "local", False),
        (2, "means", False),
        (2, "codes", False),
        *[(2, "local", True), (2, "means", True), (2, "codes", True)] * 2,
    ]


def test_a_skipped_option_leaves_the_plan_and_the_count() -> None:
    grid = Grid("m", batches=(2,), crs=(64.0,), repeat=2, warmup=1, methods=("means", "codes"))
    progress = Progress.for_grid(grid, io.StringIO(), interleaved=True)
    progress.skip(2, "codes", grid.warmup + grid.repeat, "codes@64: too tight")
    assert [kind for _, kind, _ in progress.plan] == ["local", "means", "local", "means", "local", "means"]
    assert progress.total == 4


def test_split_passes_not_yet_timed_are_priced_above_local_ones() -> None:
    progress = Progress([(4, "local", True), (4, "local", True), (4, "means", True)], io.StringIO())
    assert progress.eta_s() is None  # nothing measured: no guess
    progress.step("batch 4 local", 0.1)
    eta = progress.eta_s()
    assert eta is not None
    assert eta > 0.1 + 0.1  # one more local pass, and a split one priced above it


def test_lines_count_timed_passes_only() -> None:
    out = io.StringIO()
    progress = Progress([(1, "local", False), (1, "local", True)], out)
    progress.step("batch 1 local", 0.01, timed=False)
    assert out.getvalue() == ""
    progress.step("batch 1 local", 0.01)
    assert out.getvalue().startswith("profile: 1/1 passes")
