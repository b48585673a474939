"""ViT on digits (trained by train_vit_digits.py): top-1 accuracy of PRISM vs CR.

Runs the saved model on the 360 held-out digits (65 tokens: CLS + 64 patches) on P
simulated ranks for every CR, and reports top-1 accuracy, its change from the local
model in points, and top-1 agreement with the local model. Ablations switch keep_first
(CLS sent exactly) and count_bias (log-count logit bias). One test image is 0.28 points.

Example:
    PYTHONPATH=. python -m scripts.fidelity.train_vit_digits
    PYTHONPATH=. python -m scripts.fidelity.vit_digits --out runs/fidelity/vit_digits.json
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.adapters import Task
from engine.models import LoadedModel, load_dir
from engine.segments import Compression
from engine.sim import run_local
from scripts.fidelity.common import (
    Row,
    Setting,
    ablation_rows,
    ablations,
    add_byte_ratio,
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
from scripts.fidelity.data import digits_split

#: The paper's ViT-base / CIFAR-10 top-1 losses (points) at these CRs, for comparison.
PAPER_DROP = {"3.3": 0.95, "9.9": 2.4}


def predictions(model: LoadedModel, images: torch.Tensor, setting: Setting | None) -> tuple[torch.Tensor, int]:
    """Top-1 class per image and the exchange bytes; ``None`` = local model."""
    inputs = {"pixel_values": images}
    if setting is None:
        return run_local(model.adapter, Task.CLASSIFY, inputs).outputs["logits"].argmax(-1), 0
    result = simulate(model, Task.CLASSIFY, inputs, setting)
    return result.outputs["logits"].argmax(-1), result.exchange_bytes


def measure(model: LoadedModel, images: torch.Tensor, labels: torch.Tensor, settings: list[Setting]) -> list[Row]:
    """One row per setting: accuracy, change vs local (points), agreement with local."""
    local, _ = predictions(model, images, None)
    local_acc = float((local == labels).float().mean())
    rows = []
    for setting in settings:
        pred, moved = predictions(model, images, setting)
        acc = float((pred == labels).float().mean())
        rows.append(
            {
                **setting.key(),
                "acc": acc,
                "local_acc": local_acc,
                "delta_points": 100 * (acc - local_acc),
                "agree": float((pred == local).float().mean()),
                "exchange_bytes": moved,
            }
        )
    return rows


def cell(rows: list[Row]) -> str:
    """Accuracy change of the single row in ``rows``, or ``-`` when it was not run."""
    return f"{rows[0]['delta_points']:+.2f}" if rows else "-"


def acc_cell(row: Row) -> str:
    """``98.61 (-0.28)``: accuracy and change vs local, in percent / points."""
    return f"{100 * row['acc']:.2f} ({row['delta_points']:+.2f})"


def report(rows: list[Row]) -> None:
    """Print accuracy, agreement, bytes and ablation tables."""
    main_rows = select(rows, variant="default")
    print(f"\n### Top-1 test accuracy % (points vs local {100 * rows[0]['local_acc']:.2f})\n")
    print(pivot(main_rows, ["CR"], lambda r: f"P={r['P']}", acc_cell))
    print("\n### Top-1 agreement with the local model %\n")
    print(pivot(main_rows, ["CR"], lambda r: f"P={r['P']}", lambda r: f"{100 * r['agree']:.2f}"))
    print("\n### Exchange bytes saved: full exchange / PRISM\n")
    print(pivot(main_rows, ["CR"], lambda r: f"P={r['P']}", ratio_cell))
    print("\n### Against the paper (ViT-base, CIFAR-10): accuracy change in points\n")
    ranks = sorted({r["P"] for r in main_rows})
    body = [
        [cr, f"{-drop:+.2f}", *(cell(select(main_rows, CR=cr, P=p)) for p in ranks)] for cr, drop in PAPER_DROP.items()
    ]
    print(markdown_table(["CR", "paper", *(f"ours P={p}" for p in ranks)], body))
    ablated = ablation_rows(rows, [])
    if ablated:
        print("\n### Ablations: accuracy % (points vs local) / agreement %\n")
        print(
            pivot(
                ablated,
                ["P", "CR"],
                lambda r: r["variant"],
                lambda r: f"{acc_cell(r)} / {100 * r['agree']:.1f}",
            )
        )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model-dir", type=Path, default=Path("runs/vit-digits"), help="saved by train_vit_digits.py")
    p.add_argument("--crs", type=float_list, default=[2, 3.3, 4.95, 8, 9.9, 16, 32], help="compression rates")
    p.add_argument("--ranks", type=int_list, default=[2, 4], help="rank counts P")
    p.add_argument("--ablate-crs", type=float_list, default=[3.3, 9.9, 32], help="CRs for ablations")
    p.add_argument("--variants", type=str_list, default=["no keep_first", "no count_bias"], help="ablation variants")
    args = p.parse_args()
    configure(args.seed, args.threads)

    model = load_dir(str(args.model_dir), "vit-digits")
    data = digits_split()
    base = Compression()
    settings = sweep(args.crs, args.ranks, base) + ablations(args.ablate_crs, args.ranks, args.variants, base)
    rows = measure(model, data.test_x, data.test_y, settings)
    add_byte_ratio(rows, [])
    report(rows)
    save(rows, args.out, meta(args))


if __name__ == "__main__":
    main()
