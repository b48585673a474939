"""Run ``prism-agent bench engine`` over a grid and print a markdown table.

    python scripts/bench_engine.py --model vit-base --ranks 2 --cr 9.9 --batches 1,8,16 --out runs/bench/vit.jsonl
    python scripts/bench_engine.py --model vit-base --ranks 2 --cr 9.9 --batches 8 --wire-dtype fp16 --no-overlap

Each grid point is a separate CLI process (fresh GLOO group), one torch thread per rank.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run_point(args: argparse.Namespace, batch: int) -> dict[str, object]:
    cmd = [
        sys.executable,
        "-m",
        "agent",
        "bench",
        "engine",
        "--model",
        args.model,
        "--ranks",
        str(args.ranks),
        "--cr",
        args.cr,
        "--batch",
        str(batch),
        "--repeat",
        str(args.repeat),
        "--json",
    ]
    if args.seq:
        cmd += ["--seq", str(args.seq)]
    if args.no_keep_first:
        cmd.append("--no-keep-first")
    if args.wire_dtype:
        cmd += ["--wire-dtype", args.wire_dtype]
    if args.no_overlap:
        cmd.append("--no-overlap")
    if args.chunks:
        cmd += ["--chunks", str(args.chunks)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--cr", default="8")
    p.add_argument("--batches", default="1,8,16")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-keep-first", action="store_true")
    p.add_argument("--wire-dtype", choices=["fp16", "bf16", "fp32"], default=None)
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--chunks", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = p.parse_args()
    rows = []
    print(
        "| model | P | CR | wire | overlap (chunks) | batch | N | local ms | full ms | PRISM ms | local/PRISM "
        "| local/full | comm. reduction |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        r = run_point(args, batch)
        rows.append(r)
        print(
            f"| {r['model']} | {r['ranks']} | {r['cr']} | {r['wire_dtype']} | "
            f"{'on' if r['overlap'] else 'off'} ({r['chunks']}) | {r['batch']} | {r['seq']} | {r['local_ms']:.0f} | "
            f"{r['full_ms']:.0f} | {r['distributed_ms']:.0f} | {r['speedup_vs_local']:.2f}x | "
            f"{r['local_ms'] / r['full_ms']:.2f}x | {100 * r['comm_reduction']:.2f} % |",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
