"""scripts/bench_split.py end to end on namespace hosts, with a tiny model (root, else skipped)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.netns import require_netns

pytestmark = [pytest.mark.netns, pytest.mark.gloo]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_split.py"


def bench(out: Path, *flags: str) -> list[dict[str, Any]]:
    """Run the script with tiny-vit, two timed rounds, batch 2; every row of its jsonl."""
    require_netns()
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny-vit", "--runs", "2", "--batches", "2", *flags]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]


def test_every_option_runs_on_a_shaped_and_an_unshaped_link(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    flags = ["--rates", "50,0", "--pin", "--modes", "full,means,means-fp16,codes", "--weights", "2,1"]
    rows = bench(out, *flags, "--bound-cell", "50,2")
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


def test_three_capped_hosts_against_local_at_the_same_cap(tmp_path: Path) -> None:
    out = tmp_path / "p3"
    flags = ["--hosts", "3", "--cap", "0.5", "--rates", "0", "--modes", "means,kv", "--overlap-only", "--chunks", "1,2"]
    rows = bench(out, *flags)
    assert {r["option"] for r in rows} == {"local", "means@9.9 on c1", "means@9.9 on c2", "kv@4 on c1", "kv@4 on c2"}
    assert len(rows) == 2 * 5
    assert all(r["chunks"] == int(r["option"][-1]) for r in rows if r["option"] != "local")  # a variant per count
    for row in rows:  # every rank, rank 0 and so local included, in a cgroup of its own at half a CPU
        assert (row["hosts"], row["cap"], row["malloc"]) == (3, 0.5, "agent")
        assert [c["rank"] for c in row["cgroups"]] == [0, 1, 2]
        assert len({c["cgroup"] for c in row["cgroups"]}) == 3
        assert all((c["quota_us"], c["period_us"]) == (5000, 10000) for c in row["cgroups"])
    split = [r for r in rows if r["option"] != "local"]
    assert all(len(r["traces"]) == 3 and 0 < r["macs_ratio"] < 1 for r in split)
    kv = [r for r in split if r["option"].startswith("kv@4")]
    assert all(t["exchange_bytes_sent"] > 0 for r in kv for t in r["traces"])
    table = out.with_suffix(".md").read_text()
    assert "P = 3, every rank capped at 0.5 CPU, unshaped, batch 2" in table
    assert "predicted x |" in table
    assert all(f"| {name} |" in table for name in ("local", "means@9.9 on c1", "kv@4 on c1", "kv@4 on c2"))
