"""Inputs for demos, fidelity checks and benchmarks: real text where a tokenizer exists."""

from __future__ import annotations

import torch

from engine.adapters import Tensors
from engine.corpus import english_sentences, passages
from engine.errors import BadRequest
from engine.models import LoadedModel


def default_seq(model: LoadedModel) -> int:
    """A sequence length to use when none is given."""
    return 128 if model.adapter.family == "bert" else 64


def random_image(model: LoadedModel, batch: int, seed: int = 0, raw: bool = False) -> Tensors:
    """Random pixels of the model's image size: normalised floats, or (``raw``) uint8
    0..255, the form images cross the group in (the adapter normalises them)."""
    adapter = model.adapter
    h, w = adapter.image_hw  # type: ignore[attr-defined]
    shape = (batch, adapter.config.num_channels, h, w)
    gen = torch.Generator().manual_seed(seed)
    if raw:
        return {"pixel_values": torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)}
    return {"pixel_values": torch.randn(*shape, generator=gen)}


def tokens(model: LoadedModel, batch: int, seq: int | None, seed: int = 0) -> Tensors:
    """Token inputs: real English through the model's tokenizer, else random ids.

    With a tokenizer and no ``seq``: ``batch`` real sentences padded to the longest;
    with ``seq``: passages cut to exactly ``seq`` tokens.
    """
    config = model.adapter.config
    limit = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 1024))
    if seq is not None and not 1 <= seq <= limit:
        raise BadRequest(f"sequence length must be 1..{limit} for this model, got {seq}")
    tok = model.tokenizer
    if tok is not None and seq is not None and seq < 4:
        raise BadRequest(f"--seq {seq} is too short for real text (special tokens need room); use >= 4")
    if tok is not None:
        if seq is None:
            texts = english_sentences(batch)
            enc = tok(texts, padding=True, return_tensors="pt")
        else:
            texts = passages(batch, words=seq)
            enc = tok(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
        if len(texts) < batch:
            raise BadRequest(f"only {len(texts)} texts available, asked for a batch of {batch}")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    n = seq or default_seq(model)
    gen = torch.Generator().manual_seed(seed)
    vocab = int(config.vocab_size)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, n), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def make_inputs(
    model: LoadedModel, batch: int, seq: int | None = None, seed: int = 0, raw_pixels: bool = False
) -> Tensors:
    """Inputs of the right kind for ``model`` (images as uint8 with ``raw_pixels``)."""
    if batch < 1:
        raise BadRequest(f"batch must be >= 1, got {batch}")
    if model.adapter.family == "vit":
        if seq is not None:
            raise BadRequest("--seq does not apply to ViT (its token count is set by the image size)")
        return random_image(model, batch, seed, raw_pixels)
    return tokens(model, batch, seq, seed)
