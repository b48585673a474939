"""Split prefill, local decode: does the text stay the text? (trained text GPT-2, greedy).

Prompts are the first ``--prompt-len`` tokens of non-overlapping held-out windows of the
licence text (the model of train_gpt2_text.py). Each is generated locally (``transformers``'
own prefill and decode, ``--new`` tokens, greedy), and again from a ``generate`` prefill
split over P simulated ranks with each method (engine/generate.py: rank 0 takes the last
block and decodes from the cache it ends with). Reported per setting: the share of prompts
whose continuation is identical token for token, and where the others first differ.

Example:
    PYTHONPATH=. python -m scripts.fidelity.train_gpt2_text
    PYTHONPATH=. python -m scripts.fidelity.gpt2_generate --out runs/fidelity/gpt2_generate.json
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from engine.adapters import Task
from engine.generate import decode
from engine.models import load_dir
from engine.program import plan_job
from engine.segments import Compression, Method
from engine.sim import run_simulated
from scripts.fidelity.common import configure, markdown_table, meta, parser, save
from scripts.fidelity.data import heldout_windows, text_split

#: (method, CR, ranks) settings measured by default.
SETTINGS = [
    ("full", None, 2),
    ("full", None, 4),
    ("codes", 8.0, 2),
    ("codes", 8.0, 4),
    ("kv", 4.0, 2),
    ("kv", 4.0, 4),
    ("kv", 8.0, 2),
    ("means", 4.0, 2),
    ("means", 9.9, 2),
]


def compression(method: str, cr: float | None) -> Compression:
    if method == "full":
        return Compression(cr=None)
    return Compression(cr=cr, method=Method.parse(method))


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (None: identical)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model-dir", type=Path, default=Path("runs/gpt2-text"), help="the trained text GPT-2")
    p.add_argument("--prompt-len", type=int, default=96, help="prompt tokens")
    p.add_argument("--new", type=int, default=32, help="new tokens per prompt (greedy)")
    p.add_argument("--prompts", type=int, default=100, help="at most this many prompts")
    args = p.parse_args()
    configure(args.seed, args.threads)
    model = load_dir(str(args.model_dir), "gpt2-text")
    adapter = model.adapter
    windows = heldout_windows(text_split(), model.tokenizer, args.prompt_len)[: args.prompts]
    local = [decode(adapter, w.unsqueeze(0), max_new_tokens=args.new).tokens for w in windows]
    rows = []
    for method, cr, ranks in SETTINGS:
        firsts: list[int] = []
        same = 0
        for w, ref in zip(windows, local, strict=True):
            inputs = {"input_ids": w.unsqueeze(0)}
            spec = plan_job(adapter, "gpt2-text", Task.GENERATE, inputs, ranks=ranks, comp=compression(method, cr))
            with torch.inference_mode():
                past = run_simulated(adapter, spec, inputs).outputs["past_kv"]
            got = decode(adapter, inputs["input_ids"], max_new_tokens=args.new, past=past).tokens
            first = first_difference(got, ref)
            if first is None:
                same += 1
            else:
                firsts.append(first)
        row = {
            "method": method,
            "cr": cr,
            "ranks": ranks,
            "prompts": len(windows),
            "identical": same / len(windows),
            "diverged": len(firsts),
            "first_difference_median": statistics.median(firsts) if firsts else None,
            "first_difference_min": min(firsts) if firsts else None,
        }
        rows.append(row)
        print(row, flush=True)
    headers = ["method", "CR", "P", "identical continuations", "diverged", "first difference: median (min)"]
    body = [
        [
            r["method"],
            "-" if r["cr"] is None else f"{r['cr']:g}",
            r["ranks"],
            f"{100 * r['identical']:.0f} % ({r['prompts'] - r['diverged']}/{r['prompts']})",
            r["diverged"],
            "-" if not r["diverged"] else f"{r['first_difference_median']:g} ({r['first_difference_min']})",
        ]
        for r in rows
    ]
    print(markdown_table(headers, body))
    save(rows, args.out, meta(args))


if __name__ == "__main__":
    main()
