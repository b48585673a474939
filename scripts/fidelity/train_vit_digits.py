"""Train a small ViT on scikit-learn's digits and save it for the fidelity runs.

The 8x8 digits are upsampled to 32x32 (one channel) and cut into 4x4 patches, so the
model sees 64 patches + CLS = 65 tokens. Training uses a fixed stratified 80/20 split
(scripts/fidelity/data.py), random small shifts/scales as augmentation, AdamW with a
cosine schedule, and is seeded. The model is saved with ``save_pretrained`` (loadable by
``engine.models.load_dir``).

Example:
    PYTHONPATH=. python -m scripts.fidelity.train_vit_digits --out runs/vit-digits/train.json
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import ViTConfig, ViTForImageClassification

from scripts.fidelity.common import configure, meta, parser, save, summary_table
from scripts.fidelity.data import DIGITS_IMAGE, ImageSplit, digits_split
from scripts.fidelity.training import fit


def build_model(hidden: int, layers: int, heads: int) -> ViTForImageClassification:
    """A ViT for 1x32x32 images, 4x4 patches, 10 classes."""
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        image_size=DIGITS_IMAGE,
        patch_size=4,
        num_channels=1,
        id2label={i: str(i) for i in range(10)},
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def augment(x: torch.Tensor, gen: torch.Generator, shift: float = 0.15, scale: float = 0.1) -> torch.Tensor:
    """Random per-image translation (fraction of half-width) and zoom; background stays -1."""
    b = x.shape[0]
    zoom = 1.0 + (torch.rand(b, generator=gen) * 2 - 1) * scale
    move = (torch.rand(b, 2, generator=gen) * 2 - 1) * shift
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = zoom
    theta[:, 1, 1] = zoom
    theta[:, :, 2] = move
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1.0, grid, padding_mode="zeros", align_corners=False) - 1.0


def accuracy(model: ViTForImageClassification, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on images ``x`` with labels ``y``."""
    with torch.no_grad():
        pred = torch.cat([model(pixel_values=x[i : i + 256]).logits.argmax(-1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


def train(data: ImageSplit, model: ViTForImageClassification, steps: int, batch: int, lr: float, seed: int) -> float:
    """Train in place; returns the seconds it took."""
    gen = torch.Generator().manual_seed(seed)

    def loss_at(step: int) -> torch.Tensor:
        idx = torch.randint(len(data.train_x), (batch,), generator=gen)
        logits = model(pixel_values=augment(data.train_x[idx], gen)).logits
        return F.cross_entropy(logits, data.train_y[idx], label_smoothing=0.05)

    return fit(
        model,
        loss_at,
        steps=steps,
        lr=lr,
        warmup=steps // 20,
        log_every=max(1, steps // 5),
        evaluate=lambda: f"test acc {accuracy(model, data.test_x, data.test_y):.4f}",
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--save-dir", type=Path, default=Path("runs/vit-digits"), help="where to save the model")
    p.add_argument("--hidden", type=int, default=96, help="model width")
    p.add_argument("--layers", type=int, default=4, help="Transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--steps", type=int, default=700, help="training steps")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    args = p.parse_args()
    configure(args.seed, args.threads)

    data = digits_split()
    model = build_model(args.hidden, args.layers, args.heads)
    seconds = train(data, model, args.steps, args.batch, args.lr, args.seed)
    result = {
        "train_images": len(data.train_x),
        "test_images": len(data.test_x),
        "train_acc": accuracy(model, data.train_x, data.train_y),
        "test_acc": accuracy(model, data.test_x, data.test_y),
        "params": sum(t.numel() for t in model.parameters()),
        "train_s": round(seconds, 1),
    }
    model.save_pretrained(args.save_dir)
    print(summary_table(result))
    save([result], args.out, meta(args))


if __name__ == "__main__":
    main()
