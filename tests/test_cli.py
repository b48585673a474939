"""The command line: JSON contracts, and one-line errors for bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main

BAD_ARGS = [
    (["fidelity", "--model", "no-such-model", "--ranks", "2", "--cr", "4"], "unknown model 'no-such-model'"),
    (["fidelity", "--model", "/no/such/dir", "--ranks", "2", "--cr", "4"], "does not exist"),
    (["fidelity", "--model", "tiny-bert", "--ranks", "2", "--cr", "0.5"], "--cr must be a number >= 1"),
    (["fidelity", "--model", "tiny-bert", "--ranks", "2", "--cr", "lots"], "--cr must be a number >= 1"),
    (["fidelity", "--model", "tiny-bert", "--ranks", "9", "--cr", "2", "--seq", "5"], "cannot split 5 tokens"),
    (["fidelity", "--model", "tiny-bert", "--ranks", "1", "--cr", "2"], "--ranks must be >= 2"),
    (["fidelity", "--model", "tiny-vit", "--ranks", "2", "--cr", "2", "--seq", "9"], "does not apply to ViT"),
    (["fidelity", "--model", "tiny-gpt2", "--ranks", "2", "--cr", "2", "--task", "embed"], "does not do 'embed'"),
    (["bench", "engine", "--model", "tiny-bert", "--ranks", "2", "--cr", "2"], "--batch"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGS)
def test_bad_arguments_give_one_line_and_nonzero_exit(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse usage errors
        status = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert status not in (0, None)
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_console_script_reports_errors_without_traceback() -> None:
    exe = Path(sys.executable).parent / "prism-agent"  # the venv's script, whether or not it is on PATH
    assert exe.exists(), "prism-agent console script is not installed (pip install -e .)"
    proc = subprocess.run(
        [exe, "fidelity", "--model", "nope", "--ranks", "2", "--cr", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("prism-agent: error: unknown model 'nope'")
    assert "Traceback" not in proc.stderr


def test_fidelity_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fidelity", "--model", "tiny-gpt2", "--ranks", "3", "--cr", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_abs_diff"] <= 1e-4
    assert out["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert out["top1_agreement"] == 1.0


@pytest.mark.gloo
def test_fidelity_over_gloo_processes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fidelity", "--model", "tiny-bert", "--ranks", "2", "--cr", "full", "--runner", "gloo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["runner"] == "gloo"
    assert out["max_abs_diff"] <= 1e-4
    assert out["top1_agreement"] == 1.0


@pytest.mark.gloo
def test_bench_engine_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "bench",
        "engine",
        "--model",
        "tiny-vit",
        "--ranks",
        "2",
        "--cr",
        "8",
        "--batch",
        "2",
        "--repeat",
        "2",
        "--json",
    ]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("bytes_full", "bytes_prism", "comm_reduction", "macs_reduction_vs_local", "local_ms", "distributed_ms"):
        assert key in out
    assert out["bytes_prism"] < out["bytes_full"]
    assert out["comm_reduction"] == pytest.approx(1 - out["bytes_prism"] / out["bytes_full"])
    assert out["local_ms"] > 0
    assert out["distributed_ms"] > 0
