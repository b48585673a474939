"""A tiny real loopback profile: both methods timed and scored against the local pass.

tiny-bert (D = 64, 2 layers), one batch, one timed pass per option: enough to see every
cell measured, fidelity in every distributed cell, and a codes CR too tight skipped."""

from __future__ import annotations

import io

import pytest

from agent.profiling.loopback import Grid, profile_loopback
from agent.profiling.progress import Progress
from policy.decide import PeerLink, Policy, Request, decide
from policy.perfmap import ModelShape, PerfMap

pytestmark = pytest.mark.gloo


@pytest.fixture(scope="module")
def profiled() -> tuple[PerfMap, str]:
    grid = Grid("tiny-bert", batches=(2,), crs=(None, 4.0, 64.0), seq=32, repeat=1, warmup=0)
    log = io.StringIO()
    perf = profile_loopback(grid, Progress.for_grid(grid, log, interleaved=True))
    return perf, log.getvalue()


def test_every_option_is_measured_and_scored(profiled: tuple[PerfMap, str]) -> None:
    perf, log = profiled
    cells = {c.option: c for c in perf.cells}
    # 1-bit codes of every row need 1/51 of full exchange on tiny-bert: codes@64 (and kv@64,
    # two rows a token) cannot run.
    assert set(cells) == {"local", "full", "means@4", "means@64", "codes@4", "kv@4"}
    assert "skipped batch 2 codes@64: CR 64 is too tight for method 'codes'" in log
    assert "skipped batch 2 kv@64: CR 64 is too tight for method 'kv'" in log
    for name in ("local", "full"):
        assert cells[name].fidelity == 1.0
        assert (cells[name].cosine, cells[name].top1) == (1.0, 1.0)  # exact; tiny-bert classifies: logits
    for name in ("means@4", "means@64", "codes@4", "kv@4"):
        c = cells[name]
        assert c.cosine is not None, name
        assert c.cosine_min is not None, name
        assert c.top1 is not None, name
        assert 0.0 < c.cosine_min <= c.cosine <= 1.0, name
        assert 0.0 <= c.top1 <= 1.0, name
        assert c.wire_bytes > 0, name
    assert cells["codes@4"].method == "codes"
    assert cells["kv@4"].method == "kv"
    assert cells["means@4"].method == "means"
    assert cells["codes@4"].cosine > 0.999  # every row in 8-bit codes
    # (How much Segment Means lose is not asserted: a random tiny-bert's logits hardly depend
    # on its input. docs/fidelity.md has the real models' figures.)
    assert perf.shapes["tiny-bert"] == ModelShape(hidden=64, ffn=2.0, causal=False)


def test_the_measured_fidelity_bounds_the_choice(profiled: tuple[PerfMap, str]) -> None:
    perf, _ = profiled
    means64 = next(c for c in perf.cells if c.option == "means@64")
    assert means64.cosine is not None
    for floor in (0.0, means64.cosine, 0.999, 1.0):
        got = decide(
            Request("tiny-bert", 2, 32), perf, [PeerLink("p", 1000.0)], policy=Policy(default_min_fidelity=floor)
        )
        assert got is not None
        assert got.fidelity is not None
        assert got.fidelity >= floor, got.reason
