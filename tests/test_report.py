"""``map show --plot``: the outline follows where splitting wins, the axes what was profiled."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy.decide import Policy
from policy.perfmap import Cell, PerfMap
from policy.report import axes, boundary, measured, plot, split_batches, winners


def perf_map(local_ms: dict[int, float], split_ms: dict[int, float], wire_per_sample: int = 10_000) -> PerfMap:
    """A map of model ``m``: local and means@4 (2 ranks, loopback, exact enough to pass the
    default floor) at the given batches."""
    cells = [Cell("m", b, 64, "local", None, 1, ms, ms, 3, compute_ms=ms) for b, ms in local_ms.items()]
    cells += [
        Cell(
            "m", b, 64, "prism", 4.0, 2, ms, ms, 3, compute_ms=ms, wire_bytes=wire_per_sample * b, rounds=4,
            method="means", cosine=0.9999,
        )
        for b, ms in split_ms.items()
    ]  # fmt: skip
    return PerfMap(hardware={}, models={"m": 0.5}, energy_source="cpu-model", cells=cells)


def test_the_axes_are_the_profiled_batches() -> None:
    perf = perf_map({3: 30.0, 6: 60.0, 12: 120.0}, {3: 20.0, 6: 40.0, 12: 80.0})
    batches, bandwidths = axes(perf, "m")
    assert batches == (3, 6, 12)
    assert bandwidths[0] <= 5
    assert bandwidths[-1] >= 1000


def test_the_outline_follows_a_split_that_wins_only_at_small_batches() -> None:
    # The split is cheap for small batches and gets worse than local for large ones (say, memory).
    perf = perf_map({1: 10.0, 4: 40.0, 16: 160.0}, {1: 5.0, 4: 30.0, 16: 400.0}, wire_per_sample=100)
    batches, bandwidths = axes(perf, "m")
    grid = winners(perf, "m", 64, Policy(), batches, bandwidths)
    fast = bandwidths[-1]
    assert split_batches(grid)[fast] == [1, 4]  # not "from some batch on"
    edges = boundary(grid, batches, bandwidths)
    # At the fastest link the edge lies between batch 4 (split) and batch 16 (local): x = 1.5.
    top = len(bandwidths) - 1
    assert ((1.5, top - 0.5), (1.5, top + 0.5)) in edges
    assert not any(x0 == x1 == -0.5 or x0 == x1 == len(batches) - 0.5 for (x0, _), (x1, _) in edges)  # no frame


def test_no_outline_when_one_side_wins_everywhere(tmp_path: Path) -> None:
    perf = perf_map({1: 1.0, 8: 8.0}, {1: 50.0, 8: 400.0})
    batches, bandwidths = axes(perf, "m")
    grid = winners(perf, "m", 64, Policy(), batches, bandwidths)
    assert all(d.mode == "local" for d in grid.values())
    assert boundary(grid, batches, bandwidths) == []
    pytest.importorskip("matplotlib")
    out = tmp_path / "map.png"
    plot(perf, "m", 64, Policy(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profiled_cells_are_told_apart_from_predicted_ones() -> None:
    perf = perf_map({1: 10.0, 8: 80.0}, {1: 5.0, 8: 40.0})
    perf.cells.append(
        Cell(
            "m", 8, 64, "prism", 4.0, 2, 60.0, 60.0, 3, compute_ms=40.0, wire_bytes=80_000, mbps=50.0,
            method="means", cosine=0.9999,
        )
    )  # fmt: skip
    grid = winners(perf, "m", 64, Policy(), (1, 4, 8), (1.0, 50.0))
    kinds = {key: (d.mode, measured(perf, "m", d, *key)) for key, d in grid.items()}
    assert kinds[(8, 50.0)] == ("distributed", True)  # profiled over a 50 Mbit/s link
    assert kinds[(4, 50.0)] == ("distributed", False)  # batch 4 was never profiled: interpolated
    assert kinds[(1, 1.0)] == ("local", True)  # local does not depend on the link
    assert kinds[(4, 1.0)] == ("local", False)
