"""scripts/gpu_check.py: its dry run is the CUDA check's own code, on the CPU with tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.mark.gloo
def test_the_dry_run_runs_every_step_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert [steps[s]["status"] for s in ("env", "exact", "gloo", "bench")] == ["ok"] * 4
    for row in steps["exact"]["rows"]:
        assert row["logits_diff"] <= 1e-4
        assert row["overlap_bit_exact"]
    assert all(r["bytes_match"] and r["overlap_bit_exact"] for r in steps["gloo"]["rows"])
    bench = steps["bench"]["rows"]
    assert {(r["model"], r["batch"], r["overlap"]) for r in bench} >= {("tiny-vit", 2, True), ("tiny-bert", 1, False)}
    assert all(r["staging_ms"] == 0.0 for r in bench)  # the CPU path stages nothing
    assert "### bench" in done.stdout
    assert "| tiny-vit | 2 | cr=9.9 | True | 2 |" in done.stdout


def test_a_step_past_its_timeout_is_reported_and_fails_the_check(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--steps", "env", "--timeout-s", "0.01", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert json.loads(out.read_text())["steps"]["env"]["status"] == "timeout"
    assert "env: timeout" in done.stdout
