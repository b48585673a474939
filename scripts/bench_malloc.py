"""The agent's glibc settings against a local job: per-sample ms of vit-base batch 8, one
process per setting (mallopt must come before the model loads), settings interleaved.

    python scripts/bench_malloc.py --rounds 3 --runs 3

Settings (``--settings``, default all but ``fixed128k``): glibc's defaults; a fixed 128 KiB
mmap threshold with two arenas (what the agent set before 2026-12-05); two arenas (what it set
until 2026-12-05's second change); two arenas and ``malloc_trim(0)`` before every job; two
arenas with fixed mmap and trim thresholds (``keep``: freed pages stay in the process until
the agent's timed trim, what agent/base/memory.py sets now), and that with a trim before every
job (the worst case of the agent's trims, which come at most every 5 s).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("default", "fixed128k", "arenas2", "arenas2trim", "keep", "keeptrim")
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8


def one(setting: str, runs: int, model_name: str) -> list[float]:
    """In this process: apply ``setting``, load the model, time ``runs`` jobs (ms per sample)."""
    libc = ctypes.CDLL(None)
    sys.path.insert(0, str(REPO))
    if setting in ("keep", "keeptrim"):
        from agent.base.memory import tame_malloc

        assert tame_malloc()
    elif setting != "default":
        libc.mallopt(M_ARENA_MAX, 2)
    if setting == "fixed128k":
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    import torch

    from engine.adapters import Task
    from engine.inputs import make_inputs
    from engine.models import load
    from engine.sim import run_local

    torch.set_num_threads(1)
    model = load(model_name)
    inputs = make_inputs(model, batch=8)
    run_local(model.adapter, Task.CLASSIFY, inputs)  # warm-up
    out = []
    for _ in range(runs):
        if setting in ("arenas2trim", "keeptrim"):
            libc.malloc_trim(0)
        start = time.perf_counter()
        run_local(model.adapter, Task.CLASSIFY, inputs)
        out.append((time.perf_counter() - start) * 1e3 / 8)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=3, help="timed jobs per process")
    p.add_argument("--model", default="vit-base")
    p.add_argument("--settings", default=",".join(s for s in SETTINGS if s != "fixed128k"))
    p.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    settings = tuple(args.settings.split(","))
    if not set(settings) <= set(SETTINGS):
        p.error(f"--settings: each one of {', '.join(SETTINGS)}")
    if args.one:
        print(json.dumps(one(args.one, args.runs, args.model)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    got: dict[str, list[float]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for setting in settings if r % 2 == 0 else settings[::-1]:
            cmd = [sys.executable, __file__, "--one", setting, "--runs", str(args.runs), "--model", args.model]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            got[setting] += json.loads(done.stdout.strip().splitlines()[-1])
    for setting, ms in got.items():
        spread = f"{min(ms):.1f}-{max(ms):.1f}"
        print(f"{setting:12s} median {statistics.median(ms):6.1f} ms per sample, {spread}, n={len(ms)}")


if __name__ == "__main__":
    main()
