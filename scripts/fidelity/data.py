"""Data for the trained fidelity models: scikit-learn digits and the licence text.

Both the training and the evaluation scripts take their splits from here, so the test
set a model is scored on is exactly the one it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from engine.corpus import license_text

# -- digits -------------------------------------------------------------------------------
DIGITS_IMAGE = 32  # 8x8 digits upsampled to 32x32: 64 patches of 4x4 plus CLS
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True, slots=True)
class ImageSplit:
    """Train and test images (N, 1, H, W) in [-1, 1] with labels (N,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def upsample_digits(flat: torch.Tensor, size: int = DIGITS_IMAGE) -> torch.Tensor:
    """sklearn digits rows (N, 64) with values 0..16 -> images (N, 1, size, size) in [-1, 1]."""
    images = flat.view(-1, 1, 8, 8) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images * 2.0 - 1.0


def digits_split(size: int = DIGITS_IMAGE) -> ImageSplit:
    """The fixed, stratified 80/20 split of ``sklearn.datasets.load_digits`` (1797 images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data,
        data.target,
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=data.target,
    )
    return ImageSplit(
        upsample_digits(torch.tensor(x_tr, dtype=torch.float32), size),
        torch.tensor(y_tr, dtype=torch.long),
        upsample_digits(torch.tensor(x_te, dtype=torch.float32), size),
        torch.tensor(y_te, dtype=torch.long),
    )


# -- licence text -------------------------------------------------------------------------
TEXT_BLOCK = 4096  # the text is cut into blocks of this many characters...
HOLDOUT_EVERY = 5  # ...and every 5th block (index % 5 == 4) is held out


@dataclass(frozen=True, slots=True)
class TextSplit:
    """Training runs (contiguous text between held-out blocks) and held-out blocks."""

    train: list[str]
    heldout: list[str]


def text_split(block: int = TEXT_BLOCK, every: int = HOLDOUT_EVERY) -> TextSplit:
    """``license_text()`` cut into ``block``-character blocks, every ``every``-th held out."""
    text = license_text()
    blocks = [text[i : i + block] for i in range(0, len(text), block)]
    train: list[str] = []
    heldout: list[str] = []
    run = ""
    for i, chunk in enumerate(blocks):
        if i % every == every - 1:
            heldout.append(chunk)
            train.append(run)
            run = ""
        else:
            run += chunk
    train.append(run)
    return TextSplit([r for r in train if r], heldout)


def heldout_windows(split: TextSplit, tokenizer: Any, length: int) -> torch.Tensor:
    """Non-overlapping ``length``-token windows of each held-out block, (W, length) long.

    Windows never cross a block boundary (held-out blocks are not contiguous text).
    """
    rows = []
    for chunk in split.heldout:
        ids = tokenizer(chunk)["input_ids"]
        rows += [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    return torch.tensor(rows, dtype=torch.long)
