"""MiniLM (real all-MiniLM-L6-v2 weights): sentence-embedding fidelity of PRISM vs local.

For every data set, every rank count P and every compression rate CR, the mean-pooled
embeddings PRISM computes on P simulated ranks are compared with the plain
`transformers` model by cosine similarity (mean and worst case over the samples).
Ablations switch keep_first (CLS sent exactly), count_bias (log-count logit bias) and
keep_last ([SEP] sent exactly) at a few CRs.

Data: real English from /usr/share/common-licenses (engine.corpus): single sentences,
and passages truncated to 128 and 256 tokens. By default samples are batched in order
of token length and padded to the longest in their batch, so that (as in a
single-sample job) every sample's tokens are spread over all ranks; ``--order corpus``
batches them as they come, where short samples padded to a long neighbour sit mostly
on rank 0 (which makes the numbers look better than they are).

Besides cosine, it reports what the drift does to retrieval over the same samples:
nearest-neighbour agreement (each sample's most similar other sample is the same with
PRISM embeddings as with local ones) and the mean absolute error of the pairwise
cosine similarities.

Example:
    PYTHONPATH=. python -m scripts.fidelity.minilm --out runs/fidelity/minilm.json
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from engine.adapters import Task, Tensors
from engine.corpus import english_sentences, passages
from engine.models import LoadedModel, load
from engine.segments import Compression
from engine.sim import run_local
from scripts.fidelity.common import (
    VARIANTS,
    Row,
    Setting,
    ablation_rows,
    ablations,
    add_byte_ratio,
    column,
    configure,
    float_list,
    int_list,
    meta,
    parser,
    pivot,
    ratio_cell,
    save,
    select,
    simulate,
    stopwatch,
    str_list,
    sweep,
)

DATASETS = ("sentences", "passages-128", "passages-256")


@dataclass(frozen=True, slots=True)
class Dataset:
    """Tokenized samples of one data set, already cut into padded batches."""

    name: str
    batches: list[Tensors]

    @property
    def n_samples(self) -> int:
        """Number of samples over all batches."""
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def mean_tokens(self) -> float:
        """Mean real tokens per sample ([CLS] and [SEP] included)."""
        return sum(float(b["attention_mask"].sum()) for b in self.batches) / self.n_samples


def tokenize(tokenizer: Any, texts: list[str], max_length: int, batch: int, by_length: bool) -> list[Tensors]:
    """Batches of ``texts`` (length-sorted or in corpus order), truncated and padded per batch."""
    ordered = texts
    if by_length:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
        ordered = [texts[i] for i in sorted(range(len(texts)), key=lambda i: lengths[i])]
    return [
        dict(
            tokenizer(
                ordered[i : i + batch],
                padding="longest",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        for i in range(0, len(ordered), batch)
    ]


def load_dataset(name: str, tokenizer: Any, args: argparse.Namespace) -> Dataset:
    """``sentences`` or ``passages-<tokens>`` (passages long enough to be truncated)."""
    by_length = args.order == "length"
    if name == "sentences":
        return Dataset(name, tokenize(tokenizer, english_sentences(args.sentences), 512, args.batch, by_length))
    tokens = int(name.removeprefix("passages-"))
    words = tokens  # licence English runs ~1.3 tokens per word: this always overflows
    return Dataset(name, tokenize(tokenizer, passages(args.passages, words), tokens, args.batch, by_length))


def embeddings(model: LoadedModel, data: Dataset, setting: Setting | None) -> tuple[torch.Tensor, int]:
    """Embeddings of every sample (N, D) and the exchange bytes; ``None`` = local model."""
    out, moved = [], 0
    for inputs in data.batches:
        if setting is None:
            out.append(run_local(model.adapter, Task.EMBED, inputs).outputs["embedding"])
            continue
        result = simulate(model, Task.EMBED, inputs, setting)
        out.append(result.outputs["embedding"])
        moved += result.exchange_bytes
    return torch.cat(out), moved


def similarities(emb: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the samples, (N, N)."""
    unit = F.normalize(emb, dim=-1)
    return unit @ unit.T


def nearest_neighbours(sim: torch.Tensor) -> torch.Tensor:
    """Index of each sample's most similar other sample, (N,)."""
    return sim.clone().fill_diagonal_(float("-inf")).argmax(dim=-1)


def pair_error(sim: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean absolute difference of the off-diagonal pairwise similarities."""
    off = ~torch.eye(len(sim), dtype=torch.bool)
    return float((sim - ref)[off].abs().mean())


def measure(model: LoadedModel, data: Dataset, settings: list[Setting]) -> list[Row]:
    """One row per setting: cosine (mean, min) of PRISM vs local, nearest-neighbour agreement."""
    reference, _ = embeddings(model, data, None)
    ref_sim = similarities(reference)
    ref_nn = nearest_neighbours(ref_sim)
    rows = []
    for setting in settings:
        got, moved = embeddings(model, data, setting)
        cos = F.cosine_similarity(got, reference, dim=-1)
        sim = similarities(got)
        rows.append(
            {
                "data": data.name,
                **setting.key(),
                "cos_mean": float(cos.mean()),
                "cos_min": float(cos.min()),
                "pair_sim_mae": pair_error(sim, ref_sim),
                "nn_agree": float((nearest_neighbours(sim) == ref_nn).float().mean()),
                "exchange_bytes": moved,
            }
        )
    return rows


def cosine_cell(row: Row) -> str:
    """``mean (min)`` cosine."""
    return f"{row['cos_mean']:.4f} ({row['cos_min']:.3f})"


def report(rows: list[Row]) -> None:
    """Print the main table, the byte-saving table and the ablation table."""
    main_rows = select(rows, variant="default")
    print("\n### Cosine similarity PRISM vs local: mean (min)\n")
    print(pivot(main_rows, ["CR"], column, cosine_cell))
    print("\n### Retrieval: nearest-neighbour agreement % / mean abs. error of pairwise cosine similarities\n")
    print(pivot(main_rows, ["CR"], column, lambda r: f"{100 * r['nn_agree']:.1f} / {r['pair_sim_mae']:.4f}"))
    print("\n### Exchange bytes saved: full exchange / PRISM\n")
    print(pivot(main_rows, ["CR"], column, ratio_cell))
    ablated = ablation_rows(rows, ["data"])
    if ablated:
        print("\n### Ablations: cosine mean (min)\n")
        print(pivot(ablated, ["data", "P", "CR"], lambda r: r["variant"], cosine_cell))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--datasets", type=str_list, default=list(DATASETS), help="comma list of " + ", ".join(DATASETS))
    p.add_argument("--crs", type=float_list, default=[2, 4, 8, 16, 32, 64], help="compression rates")
    p.add_argument("--ranks", type=int_list, default=[2, 4], help="rank counts P")
    p.add_argument(
        "--ablate-on",
        type=str_list,
        default=["sentences", "passages-128"],
        help="data sets for ablations ('' for none)",
    )
    p.add_argument("--ablate-crs", type=float_list, default=[4, 16], help="CRs for ablations")
    p.add_argument("--variants", type=str_list, default=list(VARIANTS), help="ablation variants")
    p.add_argument("--sentences", type=int, default=400, help="number of sentences")
    p.add_argument("--passages", type=int, default=64, help="passages per length")
    p.add_argument("--batch", type=int, default=32, help="samples per batch")
    p.add_argument("--order", choices=["length", "corpus"], default="length", help="how samples are batched")
    args = p.parse_args()
    configure(args.seed, args.threads)

    model = load("minilm")
    assert model.tokenizer is not None
    base = Compression()
    rows: list[Row] = []
    for name in args.datasets:
        data = load_dataset(name, model.tokenizer, args)
        settings = sweep(args.crs, args.ranks, base)
        if name in args.ablate_on:
            settings += ablations(args.ablate_crs, args.ranks, args.variants, base)
        label = f"{name}: {data.n_samples} samples, {data.mean_tokens:.1f} tokens each, {len(settings)} settings"
        with stopwatch(label):
            rows += measure(model, data, settings)
    add_byte_ratio(rows, ["data"])
    report(rows)
    save(rows, args.out, meta(args))


if __name__ == "__main__":
    main()
