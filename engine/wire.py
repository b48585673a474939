"""Compact wire forms of a job's token inputs: what crosses the group, and back.

Token ids travel as int16 when the vocabulary fits (BERT's 30,522) and as int32 otherwise
(GPT-2's 50,257); masks and token types as uint8. Each rank widens them back to int64
(what embeddings and ``gather`` need) before it computes, so the numbers are the same as
with int64 inputs, at a quarter (ids) or an eighth (masks) of the bytes. Images have their
own compact form, uint8 pixels (:mod:`engine.vit`).
"""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]

#: Integer inputs of token models, widened back to int64 on arrival.
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
#: Inputs whose values are small (0/1 masks, segment ids): uint8 on the wire.
SMALL_KEYS = ("attention_mask", "token_type_ids")


def id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest signed integer dtype GLOO carries that holds every id of the vocabulary."""
    return torch.int16 if vocab_size <= 2**15 else torch.int32


def compact_tokens(inputs: Tensors, vocab_size: int) -> Tensors:
    """``inputs`` with token ids, masks and token types in their wire dtypes (others as given).

    A tensor whose values do not fit its wire dtype travels unchanged (ids beyond the
    vocabulary are the embedding's error to report, not the wire's to wrap around).
    """
    out = dict(inputs)
    for key in TOKEN_KEYS:
        t = inputs.get(key)
        if t is None or t.is_floating_point():
            continue
        dtype = torch.uint8 if key in SMALL_KEYS else id_dtype(vocab_size)
        info = torch.iinfo(dtype)
        if t.numel() == 0 or (int(t.min()) >= info.min and int(t.max()) <= info.max):
            out[key] = t.to(dtype)
    return out


def widen_tokens(tensors: Tensors) -> Tensors:
    """Token ids, masks and token types back to int64 (others as given)."""
    out = dict(tensors)
    for key in TOKEN_KEYS:
        t = tensors.get(key)
        if t is not None and not t.is_floating_point() and t.dtype != torch.long:
            out[key] = t.long()
    return out


def nbytes(tensors: Tensors) -> int:
    """Bytes of a dict of tensors as they cross the group."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
