"""Train a small GPT-2 and its BPE tokenizer on the machine's licence texts; save both.

Data: ``engine.corpus.license_text()`` (about 237 KB of English) cut into 4096-character
blocks with every 5th block held out (scripts/fidelity/data.py). Tokenizer: byte-level
BPE with a 1024-token vocabulary, trained on the training blocks only with the
``tokenizers`` package, saved next to the model (so ``engine.models.load_dir`` returns
it). Model: ``GPT2LMHeadModel`` (width 128, 4 layers, 4 heads, 256 positions) trained
on random 256-token windows that never cross a held-out block. Seeded.

Example:
    PYTHONPATH=. python -m scripts.fidelity.train_gpt2_text --out runs/gpt2-text/train.json
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from scripts.fidelity.common import configure, meta, parser, save, summary_table
from scripts.fidelity.data import TextSplit, heldout_windows, text_split
from scripts.fidelity.training import fit

CONTEXT = 256
EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts``."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS],
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS
    )


def build_model(vocab: int, width: int, layers: int, heads: int, eos_id: int) -> GPT2LMHeadModel:
    """A small GPT-2 with a 256-token context."""
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=CONTEXT,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    return GPT2LMHeadModel(config)


class WindowSampler:
    """Random ``length``-token windows of the training runs, never crossing a run's end."""

    def __init__(self, runs: list[list[int]], length: int, seed: int) -> None:
        self.length = length
        self.data = torch.tensor([t for run in runs for t in run], dtype=torch.long)
        starts, offset = [], 0
        for run in runs:
            starts.append(torch.arange(offset, offset + max(0, len(run) - length)))
            offset += len(run)
        self.starts = torch.cat(starts)
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, size: int) -> torch.Tensor:
        """(size, length) long."""
        pick = self.starts[torch.randint(len(self.starts), (size,), generator=self.gen)]
        return self.data[pick.unsqueeze(1) + torch.arange(self.length)]


def heldout_loss(model: GPT2LMHeadModel, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) over the held-out windows."""
    with torch.no_grad():
        parts = torch.split(windows, 32)
        losses = [float(model(input_ids=w, labels=w).loss) * len(w) for w in parts]
    return sum(losses) / len(windows)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--save-dir", type=Path, default=Path("runs/gpt2-text"), help="where to save model and tokenizer")
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    p.add_argument("--width", type=int, default=128, help="model width n_embd")
    p.add_argument("--layers", type=int, default=4, help="Transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--steps", type=int, default=400, help="training steps")
    p.add_argument("--batch", type=int, default=16, help="windows per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    args = p.parse_args()
    configure(args.seed, args.threads)

    split: TextSplit = text_split()
    tokenizer = train_tokenizer(split.train, args.vocab)
    runs = [tokenizer(run)["input_ids"] for run in split.train]
    sampler = WindowSampler(runs, CONTEXT, args.seed)
    windows = heldout_windows(split, tokenizer, CONTEXT)
    model = build_model(len(tokenizer), args.width, args.layers, args.heads, tokenizer.eos_token_id)

    def loss_at(step: int) -> torch.Tensor:
        ids = sampler.batch(args.batch)
        return model(input_ids=ids, labels=ids).loss

    seconds = fit(
        model,
        loss_at,
        steps=args.steps,
        lr=args.lr,
        warmup=args.steps // 20,
        weight_decay=0.1,
        log_every=max(1, args.steps // 8),
        evaluate=lambda: f"held-out ppl {math.exp(heldout_loss(model, windows)):.2f}",
    )
    loss = heldout_loss(model, windows)
    n_chars = sum(len(h) for h in split.heldout)
    n_tokens = sum(len(tokenizer(h)["input_ids"]) for h in split.heldout)
    result = {
        "train_tokens": len(sampler.data),
        "heldout_windows": len(windows),
        "chars_per_token": n_chars / n_tokens,
        "heldout_ppl": math.exp(loss),
        "params": sum(t.numel() for t in model.parameters()),
        "train_s": round(seconds, 1),
    }
    model.save_pretrained(args.save_dir)
    tokenizer.save_pretrained(args.save_dir)
    print(summary_table(result))
    save([result], args.out, meta(args))


if __name__ == "__main__":
    main()
