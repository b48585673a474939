"""From a wire job to model tensors, and from model outputs back to JSON-friendly output."""

from __future__ import annotations

import io
import re
import zlib
from typing import Any

import torch

from engine.adapters import Task, Tensors
from engine.errors import BadRequest
from engine.models import LoadedModel
from transport.schema import Job, Limits

_WORD = re.compile(r"\w+|[^\w\s]")
MAX_IMAGE_PIXELS = 4096 * 4096  # checked from the header, before any pixel is decoded


def hashed_ids(text: str, vocab: int, with_cls_sep: bool) -> list[int]:
    """A stand-in tokenizer for models built from a config (they ship none): words hashed into the vocab.

    Deterministic across processes; ids 0-4 are left for padding and specials.
    """
    ids = [5 + zlib.crc32(w.lower().encode()) % (vocab - 5) for w in _WORD.findall(text)] or [5]
    return [1, *ids, 2] if with_cls_sep else ids


def _pad(rows: list[list[int]], limit: int) -> Tensors:
    if any(len(r) > limit for r in rows):
        raise BadRequest(f"an input is {max(len(r) for r in rows)} tokens; this model takes at most {limit}")
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _image(data: bytes, model: LoadedModel) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    adapter: Any = model.adapter
    h, w = adapter.image_hw
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise BadRequest(f"image is {img.width}x{img.height} pixels; the limit is {MAX_IMAGE_PIXELS} pixels")
            img.draft("RGB", (w, h))
            rgb = img.convert("RGB" if adapter.channels == 3 else "L").resize((w, h))
            raw = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise BadRequest(f"image could not be decoded ({type(exc).__name__})") from exc
    # Raw pixels (C, H, W) uint8: a quarter of fp32's bytes on the wire; each rank normalises them.
    return raw.view(h, w, adapter.channels).permute(2, 0, 1).contiguous()


def to_tensors(job: Job, model: LoadedModel, limits: Limits) -> Tensors:
    """Model inputs for ``job``; mismatches (text for ViT, ids out of vocab) are BadRequest."""
    adapter = model.adapter
    family = adapter.family
    if family == "vit":
        if job.images is None:
            raise BadRequest(f"model '{job.model}' is a ViT: send inputs.image")
        return {"pixel_values": torch.stack([_image(b, model) for b in job.images])}
    if job.images is not None:
        raise BadRequest(f"model '{job.model}' takes text or token_ids, not images")
    config = adapter.config
    limit = min(limits.max_seq, int(getattr(config, "max_position_embeddings", 0) or config.n_positions))
    vocab = int(config.vocab_size)
    if job.token_ids is not None:
        rows = [list(r) for r in job.token_ids]
        if any(t >= vocab for r in rows for t in r):
            raise BadRequest(f"a token id is outside this model's vocabulary of {vocab}")
        return _pad(rows, limit)
    assert job.text is not None
    if model.tokenizer is not None:
        enc = model.tokenizer(list(job.text), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    return _pad([hashed_ids(t, vocab, family == "bert") for t in job.text], limit)


def to_output(task: Task, outputs: Tensors, top_k: int = 5) -> dict[str, Any]:
    """JSON-friendly output: small tensors as lists, LM logits as their top-k."""
    if task is Task.GENERATE:  # the service writes a generation's output (agent/jobs/generate.py)
        return {}
    if task is Task.NEXT_TOKEN:
        values, ids = outputs["logits"].float().topk(min(top_k, outputs["logits"].shape[-1]), dim=-1)
        return {"top_ids": ids.tolist(), "top_logits": values.tolist()}
    if task is Task.LOGLIK:
        loglik, count = outputs["loglik"].float(), outputs["count"].float()
        ppl = torch.exp(-loglik / count.clamp(min=1))
        return {"loglik": loglik.tolist(), "tokens": count.long().tolist(), "perplexity": ppl.tolist()}
    if task is Task.CLASSIFY:
        logits = outputs["logits"].float()
        return {"label": logits.argmax(-1).tolist(), "logits": logits.tolist()}
    key = "embedding" if task is Task.EMBED else "features"
    return {key: outputs[key].float().tolist()}
