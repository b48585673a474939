"""scripts/bench_split.py end to end on two namespace hosts, with a tiny model (root, else skipped)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.gloo]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_split.py"


def test_every_option_runs_on_a_shaped_and_an_unshaped_link(tmp_path: Path) -> None:
    require_netns()
    out = tmp_path / "tiny"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny-vit", "--runs", "2", "--rates", "50,0", "--batches", "2"]
    cmd += ["--pin", "--modes", "full,means,means-fp16,codes", "--weights", "2,1", "--bound-cell", "50,2"]
    cmd += ["--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    options = {r["option"] for r in rows}
    assert options == {
        "local",
        *(f"{m} {o}" for m in ("full", "means@9.9", "means-fp16@9.9", "codes@9.9") for o in ("on", "off", "on w=2,1")),
    }
    assert len(rows) == 2 * 2 * len(options)  # 2 links x 2 rounds
    split = [r for r in rows if r["option"] != "local"]
    assert all(len(r["traces"]) == 2 and r["bound_ms"] > 0 for r in split)
    shaped = [r for r in split if r["mbps"] == 50]
    assert all(r["link_ms"] > 0 for r in shaped)  # bytes / bandwidth is part of the bound there
    weighted = next(r for r in split if r["option"].endswith("w=2,1"))
    assert weighted["traces"][0]["exchange_bytes_sent"] != weighted["traces"][1]["exchange_bytes_sent"]
    sent = {r["option"]: r["traces"][0]["exchange_bytes_sent"] for r in split}
    assert sent["means-fp16@9.9 on"] * 2 == sent["means@9.9 on"]  # fp16 rows: half the bytes
    table = out.with_suffix(".md").read_text()
    assert "| 50 | 2 |" in table
    assert "| unshaped | 2 |" in table
    assert "wall / bound" in table
