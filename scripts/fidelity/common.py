"""Helpers shared by the fidelity scripts: setup, settings grids, runs, tables, output.

Every script builds a list of :class:`Setting` (ranks x compression x ablation
variant), runs each through the in-process simulated runner (the same math as the
GLOO runner) and prints one markdown table per result, optionally writing all rows to
``--out`` as JSON or CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.adapters import Task, Tensors
from engine.errors import BadRequest
from engine.fidelity import full_bytes, planned_bytes
from engine.models import LoadedModel
from engine.program import plan_job
from engine.segments import Compression, Method
from engine.sim import run_simulated
from engine.trace import RunResult

Row = dict[str, Any]

#: Ablation variants: name -> fields of ``Compression`` that differ from the base.
VARIANTS: dict[str, dict[str, bool]] = {
    "default": {},
    "no keep_first": {"keep_first": False},
    "no count_bias": {"count_bias": False},
    "keep_last": {"keep_last": True},
}


# -- setup and arguments ------------------------------------------------------------------
def configure(seed: int, threads: int = 1) -> None:
    """Seed every RNG, pin the thread count, and keep `transformers` off the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout and shows every option's default."""


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every fidelity script takes."""
    parts = (doc or "").strip().split("\n\n", 1)
    p = argparse.ArgumentParser(
        description=parts[0],
        epilog=parts[1] if len(parts) > 1 else None,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--out", type=Path, help="write all result rows here (.json or .csv)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p


def float_list(text: str) -> list[float]:
    """``"2,4,8"`` -> ``[2.0, 4.0, 8.0]`` (argparse type)."""
    return [float(x) for x in text.split(",") if x.strip()]


def int_list(text: str) -> list[int]:
    """``"2,4"`` -> ``[2, 4]`` (argparse type)."""
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (argparse type)."""
    return [x.strip() for x in text.split(",") if x.strip()]


# -- settings -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Setting:
    """One point of a sweep: how many ranks, how they compress, and the variant's name.

    ``target`` names the byte budget a setting was chosen for (equal-bytes comparisons).
    """

    ranks: int
    comp: Compression
    variant: str = "default"
    target: str = ""

    @property
    def cr(self) -> str:
        """``full`` or the CR as written (``9.9``)."""
        return "full" if self.comp.cr is None else f"{self.comp.cr:g}"

    def key(self) -> Row:
        """The columns that identify this setting in a result row."""
        key: Row = {"P": self.ranks, "CR": self.cr, "variant": self.variant, "method": self.comp.method.value}
        if self.target:
            key["target"] = self.target
        return key


def sweep(crs: Sequence[float], ranks: Sequence[int], base: Compression) -> list[Setting]:
    """Full exchange then every CR, for every rank count, with the base compression."""
    out: list[Setting] = []
    for p in ranks:
        out.append(Setting(p, replace(base, cr=None)))
        out.extend(Setting(p, replace(base, cr=cr)) for cr in crs)
    return out


def ablations(crs: Sequence[float], ranks: Sequence[int], variants: Sequence[str], base: Compression) -> list[Setting]:
    """Each non-default variant of ``VARIANTS`` at every (P, CR)."""
    return [
        Setting(p, replace(base, cr=cr, **VARIANTS[v]), v)
        for v in variants
        if v != "default"
        for p in ranks
        for cr in crs
    ]


# -- running ------------------------------------------------------------------------------
def simulate(
    model: LoadedModel,
    task: Task,
    inputs: Tensors,
    setting: Setting,
    gather_hidden: bool = False,
) -> RunResult:
    """Run ``inputs`` on ``setting.ranks`` simulated ranks with ``setting.comp``."""
    spec = plan_job(
        model.adapter,
        model.name,
        task,
        inputs,
        ranks=setting.ranks,
        comp=setting.comp,
        gather_hidden=gather_hidden,
    )
    return run_simulated(model.adapter, spec, inputs)


def planned_total(model: LoadedModel, task: Task, batches: Sequence[Tensors], ranks: int, comp: Compression) -> int:
    """Exchange bytes a run of every batch at (``ranks``, ``comp``) will measure."""
    total = 0
    for inputs in batches:
        spec = plan_job(model.adapter, model.name, task, inputs, ranks=ranks, comp=comp)
        total += planned_bytes(model.adapter, spec, inputs)
    return total


def full_total(model: LoadedModel, task: Task, batches: Sequence[Tensors], ranks: int) -> int:
    """Exchange bytes of full exchange over every batch."""
    total = 0
    for inputs in batches:
        spec = plan_job(model.adapter, model.name, task, inputs, ranks=ranks, comp=Compression())
        total += full_bytes(model.adapter, spec)
    return total


def means_cr_for_bytes(
    model: LoadedModel, task: Task, batches: Sequence[Tensors], ranks: int, target: int, base: Compression
) -> tuple[float, bool]:
    """The Segment Means CR whose bytes over ``batches`` are the largest not above ``target``.

    Bytes only fall as CR grows, so this is the smallest such CR (bisection, then rounded
    up to 3 significant digits). Returns ``(cr, reached)``; when even one segment per
    rank sends more than ``target``, the largest useful CR and ``False``.
    """

    def fits(cr: float) -> bool:
        return planned_total(model, task, batches, ranks, replace(base, cr=cr, method=Method.MEANS)) <= target

    n_tokens = max(model.adapter.shapes(b).n_tokens for b in batches)
    hi = float(n_tokens)  # one segment per rank (plus exact rows): nothing sends less
    if not fits(hi):
        return hi, False
    lo = 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    digits = 2 - int(np.floor(np.log10(hi)))
    nice = float(np.ceil(hi * 10**digits) / 10**digits)
    return (nice if fits(nice) else hi), True


def equal_bytes_settings(
    model: LoadedModel,
    task: Task,
    batches: Sequence[Tensors],
    ranks: Sequence[int],
    fractions: Sequence[float],
) -> list[Setting]:
    """Full exchange, then per P and byte fraction f: codes and kv at CR 1/f (kv where its
    two rows per token fit in 1-bit codes) and Segment Means at the CR whose measured bytes
    are closest to (not above) f of full exchange's."""
    out: list[Setting] = []
    for p in ranks:
        out.append(Setting(p, Compression()))
        full = full_total(model, task, batches, p)
        for f in fractions:
            label = fraction_label(f)
            cr, reached = means_cr_for_bytes(model, task, batches, p, int(f * full), Compression())
            variant = "default" if reached else "not reachable"
            out.append(Setting(p, Compression(cr=cr), variant, label))
            out.append(Setting(p, Compression(cr=1 / f, method=Method.CODES), "default", label))
            kv = Compression(cr=1 / f, method=Method.KV)
            try:
                for inputs in batches:
                    plan_job(model.adapter, model.name, task, inputs, ranks=p, comp=kv)
            except BadRequest:
                continue  # too tight for two coded rows per token
            out.append(Setting(p, kv, "default", label))
    return out


def fraction_label(f: float) -> str:
    """``0.125`` -> ``1/8``."""
    return f"1/{1 / f:g}"


def add_bytes_fraction(rows: list[Row], group: Sequence[str]) -> None:
    """Set ``bytes_fraction`` = the row's measured bytes / full exchange's, within ``group``
    (columns besides ``P`` that select comparable rows)."""
    full = {tuple(r[k] for k in ("P", *group)): r["exchange_bytes"] for r in rows if r["CR"] == "full"}
    for r in rows:
        ref = full.get(tuple(r[k] for k in ("P", *group)))
        if ref:
            r["bytes_fraction"] = r["exchange_bytes"] / ref


def batch_slices(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@contextmanager
def stopwatch(label: str) -> Iterator[None]:
    """Print how long the block took (to stderr-free stdout, as a markdown comment)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        print(f"<!-- {label}: {time.perf_counter() - start:.1f} s -->", flush=True)


def add_byte_ratio(rows: list[Row], group: Sequence[str]) -> None:
    """Set ``bytes_ratio`` = full-exchange bytes / bytes of the row, within ``group``.

    ``group`` names the columns (besides ``P``) that select comparable rows, e.g. the
    data set. Rows without a full-exchange partner are left without a ratio.
    """
    full = {
        tuple(r[k] for k in ("P", *group)): r["exchange_bytes"]
        for r in rows
        if r["CR"] == "full" and r["variant"] == "default"
    }
    for r in rows:
        ref = full.get(tuple(r[k] for k in ("P", *group)))
        if ref and r["exchange_bytes"]:
            r["bytes_ratio"] = ref / r["exchange_bytes"]


# -- tables and output --------------------------------------------------------------------
def markdown_table(headers: Sequence[str], body: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table (cells are ``str()``-ed)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def pivot(
    rows: Sequence[Row],
    index: Sequence[str],
    column: Callable[[Row], str],
    cell: Callable[[Row], str],
) -> str:
    """A markdown table with one line per distinct ``index`` columns and one column per ``column(row)``.

    Lines and columns keep the order in which they first appear; missing cells are ``-``.
    """
    lines: dict[tuple[object, ...], dict[str, str]] = {}
    columns: dict[str, None] = {}
    for r in rows:
        col = column(r)
        columns[col] = None
        lines.setdefault(tuple(r[k] for k in index), {})[col] = cell(r)
    body = [[*key, *(cells.get(c, "-") for c in columns)] for key, cells in lines.items()]
    return markdown_table([*index, *columns], body)


def ablation_rows(rows: Sequence[Row], group: Sequence[str]) -> list[Row]:
    """Rows (default included) at every (``group``..., P, CR) where an ablation variant ran."""
    keys = ("P", "CR", *group)
    ablated = {tuple(r[k] for k in keys) for r in rows if r["variant"] != "default"}
    return [r for r in rows if tuple(r[k] for k in keys) in ablated]


def ratio_cell(row: Row) -> str:
    """``bytes_ratio`` as ``12.3x`` (``-`` when unknown)."""
    ratio = row.get("bytes_ratio")
    return "-" if ratio is None else f"{ratio:.1f}x"


def column(row: Row) -> str:
    """Table column of a row: data set (or window) and rank count."""
    return f"{row['data']} P={row['P']}"


def select(rows: Iterable[Row], **where: object) -> list[Row]:
    """The rows whose columns equal every ``where`` item."""
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def save(rows: Sequence[Row], path: Path | None, meta: Row | None = None) -> None:
    """Write ``rows`` to ``path``: JSON (with ``meta``) or CSV, by the file's suffix."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    else:
        payload = {"meta": meta or {}, "rows": list(rows)}
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"<!-- wrote {len(rows)} rows to {path} -->")


def summary_table(result: Row) -> str:
    """One-line markdown table of a result dict (floats to 4 decimals)."""
    cells = [f"{v:.4f}" if isinstance(v, float) else v for v in result.values()]
    return markdown_table(list(result), [cells])


def meta(args: argparse.Namespace) -> Row:
    """The JSON ``meta`` block: the script's arguments and the environment."""
    return {"args": {k: str(v) for k, v in vars(args).items()}, **environment()}


def environment() -> Row:
    """What the numbers were measured on."""
    import platform

    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "runner": "engine.sim.run_simulated (in-process ranks)",
    }
