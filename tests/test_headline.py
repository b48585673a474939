"""The PRISM paper's headline on bert-base, from bytes that really crossed a GLOO group."""

from __future__ import annotations

import pytest

from agent.cli.engine_cmds import JobArgs, bench_engine
from engine.segments import Compression

pytestmark = pytest.mark.gloo


def test_bert_base_cr128_cuts_communication_99_2_percent_and_compute_51_24() -> None:
    args = JobArgs("bert-base", ranks=2, comp=Compression(cr=128, keep_first=False), batch=1, seq=256)
    out = bench_engine(args, warmup=0, repeat=1)
    assert out["seq"] == 256
    assert out["comm_reduction"] >= 0.992
    assert out["macs_reduction_vs_local"] == pytest.approx(0.5124, abs=0.002)
    # Measured bytes: full exchange moves every row once per layer per direction.
    assert out["bytes_full"] == 12 * 256 * 768 * 4
