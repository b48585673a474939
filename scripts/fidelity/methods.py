"""Segment Means vs codes vs kv at equal measured bytes: MiniLM, the digits ViT, the text GPT-2.

For each target fraction f of full exchange's bytes (default 1/4, 1/8, 1/16, 1/32) and
each rank count P, three runs of the same data:

* ``codes`` at CR = 1/f (every row, closed-loop delta codes, layer 0 rebuilt);
* ``kv`` at CR = 1/f (the K and V of every row, coded; layer 0 rebuilt), where two rows
  per token fit in 1-bit codes (not at 1/32);
* ``means`` (Segment Means) at the CR whose measured exchange bytes are the largest not
  above f of full exchange's (found from the plan, then checked against the run). Where
  even one segment per rank sends more, the row says ``not reachable`` and shows the
  smallest bytes Segment Means can send.

Both report the bytes they actually moved as a fraction of full exchange's for the same
data (padding rows included: codes send them, Segment Means average them out). The
metrics are those of the per-model scripts (minilm.py, vit_digits.py, gpt2_text.py),
whose measuring code this reuses. The digits ViT and the text GPT-2 must be trained
first (train_vit_digits.py, train_gpt2_text.py).

Example:
    PYTHONPATH=. python -m scripts.fidelity.methods minilm --out runs/fidelity/methods_minilm.json
    PYTHONPATH=. python -m scripts.fidelity.methods vit --out runs/fidelity/methods_vit.json
    PYTHONPATH=. python -m scripts.fidelity.methods gpt2 --out runs/fidelity/methods_gpt2.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from engine.adapters import Task, Tensors
from engine.models import LoadedModel, load, load_dir
from engine.plan import PartitionPlan
from scripts.fidelity import gpt2_text, minilm, vit_digits
from scripts.fidelity.common import (
    Row,
    add_bytes_fraction,
    batch_slices,
    configure,
    equal_bytes_settings,
    float_list,
    int_list,
    markdown_table,
    meta,
    parser,
    planned_total,
    save,
    stopwatch,
    str_list,
)
from scripts.fidelity.data import digits_split, heldout_windows, text_split

Cell = Callable[[Row], str]
#: The methods side by side, in this order.
METHODS = ("means", "codes", "kv")


def fraction_cell(row: Row) -> str:
    """``0.124 (CR 9.5)``; ``not reachable`` marked."""
    mark = " **not reachable**" if row["variant"] == "not reachable" else ""
    return f"{row['bytes_fraction']:.3f} (CR {row['CR']}){mark}"


def side_by_side(rows: list[Row], group: str | None, cells: dict[str, Cell]) -> str:
    """One line per (group, P, target): bytes and each metric for means, then for codes."""
    lines = []
    groups = [None] if group is None else list(dict.fromkeys(r[group] for r in rows))
    for g in groups:
        mine = [r for r in rows if group is None or r[group] == g]
        for p in dict.fromkeys(r["P"] for r in mine):
            for target in dict.fromkeys(r["target"] for r in mine if "target" in r):
                pair = {r["method"]: r for r in mine if r["P"] == p and r.get("target") == target}
                line: list[object] = [] if group is None else [g]
                line += [p, target]
                for method in METHODS:
                    r = pair.get(method)
                    if r is None:  # kv: too tight for two rows per token
                        line += ["too tight", *("" for _ in cells)]
                        continue
                    line += [fraction_cell(r), *(cell(r) for cell in cells.values())]
                lines.append(line)
    heads = [*([] if group is None else [group]), "P", "target"]
    for method in METHODS:
        heads += [f"{method} bytes"] + [f"{method} {name}" for name in cells]
    return markdown_table(heads, lines)


def check_planned(rows: list[Row], planned: dict[tuple[object, ...], int], keys: tuple[str, ...]) -> None:
    """Every run moved exactly the bytes its CR was chosen for."""
    for r in rows:
        want = planned.get(tuple(r[k] for k in keys))
        if want is not None and want != r["exchange_bytes"]:
            raise RuntimeError(f"{r}: measured {r['exchange_bytes']} bytes, planned {want}")


# -- MiniLM -------------------------------------------------------------------------------
def run_minilm(args: argparse.Namespace) -> list[Row]:
    """Embedding cosine and nearest-neighbour agreement on sentences and passages."""
    model = load("minilm")
    assert model.tokenizer is not None
    rows: list[Row] = []
    for name in args.datasets:
        data = minilm.load_dataset(name, model.tokenizer, args)
        settings = equal_bytes_settings(model, Task.EMBED, data.batches, args.ranks, args.fractions)
        planned = {
            (name, s.ranks, s.comp.method.value, s.cr): planned_total(model, Task.EMBED, data.batches, s.ranks, s.comp)
            for s in settings
        }
        label = f"{name}: {data.n_samples} samples, {data.mean_tokens:.1f} tokens each, {len(settings)} settings"
        with stopwatch(label):
            got = minilm.measure(model, data, settings)
        check_planned(got, planned, ("data", "P", "method", "CR"))
        rows += got
    add_bytes_fraction(rows, ["data"])
    cells: dict[str, Cell] = {
        "cos mean (min)": minilm.cosine_cell,
        "NN %": lambda r: f"{100 * r['nn_agree']:.1f}",
    }
    print("\n### MiniLM: Segment Means vs codes vs kv at equal bytes (fraction of full exchange, measured)\n")
    print(side_by_side(rows, "data", cells))
    return rows


# -- digits ViT ---------------------------------------------------------------------------
def whole_image_bytes(model: LoadedModel, images: torch.Tensor, ranks: int) -> int:
    """Input bytes codes and kv add on ViT: ranks 1..P-1 receive the whole image (to rebuild layer 0)
    instead of only their own patches' pixels, as the inputs travel today (fp32)."""
    plan = PartitionPlan.equal(model.adapter.shapes({"pixel_values": images}).n_tokens, ranks)
    per_image = images[0].numel() * images.element_size()
    per_patch = per_image // (plan.n_tokens - 1)
    return len(images) * sum(per_image - plan.sizes[r] * per_patch for r in range(1, ranks))


def run_vit(args: argparse.Namespace) -> list[Row]:
    """Top-1 accuracy on the 360 held-out digits."""
    model = load_dir(str(args.vit_dir), "vit-digits")
    data = digits_split()
    batches: list[Tensors] = [{"pixel_values": data.test_x}]
    settings = equal_bytes_settings(model, Task.CLASSIFY, batches, args.ranks, args.fractions)
    planned = {
        (s.ranks, s.comp.method.value, s.cr): planned_total(model, Task.CLASSIFY, batches, s.ranks, s.comp)
        for s in settings
    }
    with stopwatch(f"digits: {len(data.test_y)} images, {len(settings)} settings"):
        rows = vit_digits.measure(model, data.test_x, data.test_y, settings)
    check_planned(rows, planned, ("P", "method", "CR"))
    add_bytes_fraction(rows, [])
    full = {r["P"]: r["exchange_bytes"] for r in rows if r["CR"] == "full"}
    for r in rows:
        if r["method"] in ("codes", "kv") and r["CR"] != "full":
            r["image_bytes_fraction"] = whole_image_bytes(model, data.test_x, r["P"]) / full[r["P"]]
    cells: dict[str, Cell] = {
        "top-1 % (pts)": vit_digits.acc_cell,
        "agree %": lambda r: f"{100 * r['agree']:.2f}",
        "+ image": lambda r: f"+{r['image_bytes_fraction']:.3f}" if "image_bytes_fraction" in r else "-",
    }
    print(f"\n### Digits ViT: top-1 % (points vs local {100 * rows[0]['local_acc']:.2f}) at equal bytes\n")
    print(side_by_side(rows, None, cells))
    return rows


# -- text GPT-2 ---------------------------------------------------------------------------
def run_gpt2(args: argparse.Namespace) -> list[Row]:
    """Perplexity and next-token top-1 agreement on held-out windows."""
    model = load_dir(str(args.gpt2_dir), "gpt2-text")
    if model.tokenizer is None or len(model.tokenizer) == 0:
        raise SystemExit(f"{args.gpt2_dir} has no tokenizer: run scripts.fidelity.train_gpt2_text first")
    split = text_split()
    rows: list[Row] = []
    for length in args.windows:
        windows = heldout_windows(split, model.tokenizer, length)
        batches: list[Tensors] = [
            {"input_ids": windows[s], "attention_mask": torch.ones_like(windows[s])}
            for s in batch_slices(len(windows), args.batch)
        ]
        settings = equal_bytes_settings(model, Task.LOGLIK, batches, args.ranks, args.fractions)
        name = f"{length} tok"
        planned = {
            (name, s.ranks, s.comp.method.value, s.cr): planned_total(model, Task.LOGLIK, batches, s.ranks, s.comp)
            for s in settings
        }
        with stopwatch(f"{name}: {len(windows)} windows, {len(settings)} settings"):
            got = gpt2_text.measure(model, name, windows, settings, args.batch)
        check_planned(got, planned, ("data", "P", "method", "CR"))
        rows += got
    add_bytes_fraction(rows, ["data"])
    cells: dict[str, Cell] = {
        "ppl (change)": gpt2_text.ppl_cell,
        "top-1 agree % all / ranks>0": lambda r: f"{100 * r['agree']:.1f} / {100 * r['agree_later_ranks']:.1f}",
    }
    local = ", ".join(f"{r['data']} {r['local_ppl']:.3f}" for r in rows if r["CR"] == "full" and r["P"] == rows[0]["P"])
    print(f"\n### Text GPT-2: perplexity (local: {local}) and top-1 agreement at equal bytes\n")
    print(side_by_side(rows, "data", cells))
    return rows


EXPERIMENTS = {"minilm": run_minilm, "vit": run_vit, "gpt2": run_gpt2}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("experiment", choices=list(EXPERIMENTS), help="which model and data")
    p.add_argument("--fractions", type=float_list, default=[1 / 4, 1 / 8, 1 / 16, 1 / 32], help="byte targets")
    p.add_argument("--ranks", type=int_list, default=[2, 4], help="rank counts P")
    p.add_argument("--datasets", type=str_list, default=list(minilm.DATASETS), help="MiniLM data sets")
    p.add_argument("--sentences", type=int, default=400, help="MiniLM: number of sentences")
    p.add_argument("--passages", type=int, default=64, help="MiniLM: passages per length")
    p.add_argument("--order", choices=["length", "corpus"], default="length", help="MiniLM: how samples are batched")
    p.add_argument("--windows", type=int_list, default=[128, 256], help="GPT-2: window lengths in tokens")
    p.add_argument("--batch", type=int, default=32, help="samples (MiniLM) or windows (GPT-2) per batch")
    p.add_argument("--vit-dir", type=Path, default=Path("runs/vit-digits"), help="saved by train_vit_digits.py")
    p.add_argument("--gpt2-dir", type=Path, default=Path("runs/gpt2-text"), help="saved by train_gpt2_text.py")
    args = p.parse_args()
    configure(args.seed, args.threads)
    rows = EXPERIMENTS[args.experiment](args)
    save(rows, args.out, meta(args))


if __name__ == "__main__":
    main()
