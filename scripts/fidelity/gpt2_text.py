"""Small GPT-2 on licence text (trained by train_gpt2_text.py): held-out perplexity vs CR.

Non-overlapping 128- and 256-token windows of the held-out text (BPE tokens, the
tokenizer saved with the model) run on P simulated ranks with task ``loglik``;
perplexity is ``exp(-sum loglik / sum count)`` over all windows. The final hidden rows
are gathered too, to compare every position's next-token distribution with the local
model's: top-1 agreement (over all positions and over the positions of ranks > 0) and
KL(local || PRISM), and perplexity on the positions of ranks > 0. Rank 0 sees only its
own past and so is always exact; the approximation lives on the later ranks.

Ablations: count_bias off, keep_first off (token 0, the attention sink, as a mean) and
keep_last on (a no-op here: in a causal model the last token's rank sends to nobody).

Example:
    PYTHONPATH=. python -m scripts.fidelity.train_gpt2_text
    PYTHONPATH=. python -m scripts.fidelity.gpt2_text --out runs/fidelity/gpt2_text.json
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from engine.adapters import Task, Tensors
from engine.models import LoadedModel, load_dir
from engine.plan import PartitionPlan
from engine.segments import Compression
from engine.sim import run_local
from scripts.fidelity.common import (
    VARIANTS,
    Row,
    Setting,
    ablation_rows,
    ablations,
    add_byte_ratio,
    batch_slices,
    column,
    configure,
    float_list,
    int_list,
    markdown_table,
    meta,
    parser,
    pivot,
    ratio_cell,
    save,
    select,
    simulate,
    str_list,
    sweep,
)
from scripts.fidelity.data import heldout_windows, text_split

#: Context-length buckets (tokens seen) for the local model's perplexity-by-position table.
CONTEXT_BUCKETS = (1, 4, 16, 32, 64, 128, 256)

#: Relative tolerance between the engine's loglik and the one recomputed from hidden rows.
CHECK_RTOL = 1e-4


@dataclass(frozen=True, slots=True)
class Scores:
    """What one run yields over all windows."""

    loglik: float  # summed log-probability of every predicted token (engine's loglik task)
    count: int  # predicted tokens
    logp: torch.Tensor  # (W, N-1, V) next-token log-probabilities at every predicting position
    exchange_bytes: int

    @property
    def ppl(self) -> float:
        """Perplexity per token."""
        return math.exp(-self.loglik / self.count)


def score(model: LoadedModel, windows: torch.Tensor, setting: Setting | None, batch: int) -> Scores:
    """Run ``windows`` (W, N) locally (``None``) or as PRISM; check loglik against hidden rows."""
    loglik, count, moved, logps = 0.0, 0, 0, []
    for part in batch_slices(len(windows), batch):
        ids = windows[part]
        inputs: Tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if setting is None:
            result = run_local(model.adapter, Task.LOGLIK, inputs)
        else:
            result = simulate(model, Task.LOGLIK, inputs, setting, gather_hidden=True)
            moved += result.exchange_bytes
        out = result.outputs
        with torch.inference_mode():
            logp = F.log_softmax(model.adapter.model.lm_head(out["hidden"][:, :-1]).float(), dim=-1)
        recomputed = float(target_logp(logp, ids).sum())
        if not math.isclose(recomputed, float(out["loglik"].sum()), rel_tol=CHECK_RTOL):
            raise RuntimeError(f"loglik {float(out['loglik'].sum())} != {recomputed} from hidden rows")
        loglik += float(out["loglik"].sum())
        count += int(out["count"].sum())
        logps.append(logp)
    return Scores(loglik, count, torch.cat(logps), moved)


def target_logp(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each actual next token: logp (W, N-1, V), ids (W, N) -> (W, N-1)."""
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def later_positions(n_tokens: int, ranks: int) -> slice:
    """Predicting positions owned by ranks > 0 (rank 0's are exact)."""
    return slice(PartitionPlan.equal(n_tokens, ranks).start(1), n_tokens - 1)


def measure(model: LoadedModel, name: str, windows: torch.Tensor, settings: list[Setting], batch: int) -> list[Row]:
    """One row per setting: perplexity (all, ranks > 0), top-1 agreement and KL vs local."""
    local = score(model, windows, None, batch)
    local_target = target_logp(local.logp, windows)
    rows = []
    for setting in settings:
        got = score(model, windows, setting, batch)
        later = later_positions(windows.shape[1], setting.ranks)
        same = got.logp.argmax(-1) == local.logp.argmax(-1)
        kl = (local.logp.exp() * (local.logp - got.logp)).sum(-1)  # (W, N-1) KL(local || PRISM)
        rows.append(
            {
                "data": name,
                **setting.key(),
                "ppl": got.ppl,
                "local_ppl": local.ppl,
                "ppl_change_pct": 100 * (got.ppl / local.ppl - 1),
                "ppl_later": math.exp(-float(target_logp(got.logp, windows)[:, later].mean())),
                "local_ppl_later": math.exp(-float(local_target[:, later].mean())),
                "agree": float(same.float().mean()),
                "agree_later_ranks": float(same[:, later].float().mean()),
                "kl_later": float(kl[:, later].mean()),
                "exchange_bytes": got.exchange_bytes,
            }
        )
    return rows


def ppl_by_context(model: LoadedModel, windows: torch.Tensor, batch: int) -> dict[str, float]:
    """The local model's perplexity by how many tokens of context a prediction had.

    Shows how far back the model actually looks, i.e. how much a compressed distant
    past can matter at all.
    """
    target = target_logp(score(model, windows, None, batch).logp, windows)  # (W, N-1)
    out = {}
    for lo, hi in itertools.pairwise(CONTEXT_BUCKETS):
        part = target[:, lo - 1 : hi - 1]  # position i has seen i + 1 tokens
        if part.numel():
            out[f"{lo}-{min(hi - 1, windows.shape[1] - 1)}"] = math.exp(-float(part.mean()))
    return out


def ppl_cell(row: Row) -> str:
    """``3.412 (+1.2%)``: perplexity and change vs local."""
    return f"{row['ppl']:.3f} ({row['ppl_change_pct']:+.1f}%)"


def agree_cell(row: Row) -> str:
    """Top-1 agreement (all positions / positions of ranks > 0, percent) and KL on ranks > 0."""
    return f"{100 * row['agree']:.1f} / {100 * row['agree_later_ranks']:.1f} / {max(row['kl_later'], 0.0):.4f}"


def later_cell(row: Row) -> str:
    """Perplexity on the positions of ranks > 0 and its change vs local there."""
    return f"{row['ppl_later']:.3f} ({100 * (row['ppl_later'] / row['local_ppl_later'] - 1):+.1f}%)"


def report(rows: list[Row]) -> None:
    """Print perplexity, agreement, bytes and ablation tables."""
    main_rows = select(rows, variant="default")
    local = ", ".join(f"{r['data']} {r['local_ppl']:.3f}" for r in select(rows, CR="full", P=rows[0]["P"]))
    print(f"\n### Held-out perplexity per token (change vs local; local: {local})\n")
    print(pivot(main_rows, ["CR"], column, ppl_cell))
    print("\n### Perplexity on the positions of ranks > 0 only (change vs local there)\n")
    print(pivot(main_rows, ["CR"], column, later_cell))
    print("\n### Next-token top-1 agreement with local %: all / ranks > 0; mean KL(local||PRISM) on ranks > 0\n")
    print(pivot(main_rows, ["CR"], column, agree_cell))
    print("\n### Exchange bytes saved: full exchange / PRISM\n")
    print(pivot(main_rows, ["CR"], column, ratio_cell))
    ablated = ablation_rows(rows, ["data"])
    if ablated:
        print("\n### Ablations: perplexity (change vs local)\n")
        print(pivot(ablated, ["data", "P", "CR"], lambda r: r["variant"], ppl_cell))
        print("\n### Ablations: top-1 agreement % all / ranks > 0 / KL on ranks > 0\n")
        print(pivot(ablated, ["data", "P", "CR"], lambda r: r["variant"], agree_cell))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model-dir", type=Path, default=Path("runs/gpt2-text"), help="saved by train_gpt2_text.py")
    p.add_argument("--windows", type=int_list, default=[128, 256], help="window lengths in tokens")
    p.add_argument("--crs", type=float_list, default=[2, 4, 8, 16, 32, 64], help="compression rates")
    p.add_argument("--ranks", type=int_list, default=[2, 4], help="rank counts P")
    p.add_argument("--ablate-crs", type=float_list, default=[4, 16], help="CRs for ablations")
    p.add_argument("--variants", type=str_list, default=list(VARIANTS)[1:], help="ablation variants")
    p.add_argument("--batch", type=int, default=32, help="windows per batch")
    args = p.parse_args()
    configure(args.seed, args.threads)

    model = load_dir(str(args.model_dir), "gpt2-text")
    if model.tokenizer is None or len(model.tokenizer) == 0:
        raise SystemExit(f"{args.model_dir} has no tokenizer: run scripts.fidelity.train_gpt2_text first")
    split = text_split()
    base = Compression()
    settings = sweep(args.crs, args.ranks, base) + ablations(args.ablate_crs, args.ranks, args.variants, base)
    rows: list[Row] = []
    for length in args.windows:
        windows = heldout_windows(split, model.tokenizer, length)
        rows += measure(model, f"{length} tok", windows, settings, args.batch)
    add_byte_ratio(rows, ["data"])
    context = ppl_by_context(model, windows, args.batch)
    print(f"\n### Local model: perplexity by tokens of context ({windows.shape[1]}-token windows)\n")
    print(markdown_table(["context", *context], [["ppl", *(f"{v:.2f}" for v in context.values())]]))
    report(rows)
    save(rows, args.out, {**meta(args), "local_ppl_by_context": context})


if __name__ == "__main__":
    main()
