"""BERT adapter (post-LN encoder; also all-MiniLM-L6-v2, a 6-layer BERT)."""

from __future__ import annotations

from typing import Any

import torch

from engine.adapters import (
    Adapter,
    Shapes,
    Task,
    Tensors,
    first_row,
    heads,
    kv_affine,
    masked_mean,
    merge_heads,
)
from engine.errors import BadRequest, ModelError


class BertAdapter(Adapter):
    """Sequence classification (pooler + classifier on CLS) and mean-pooled embeddings."""

    family = "bert"
    tasks = (Task.CLASSIFY, Task.EMBED)

    def __init__(self, model: Any) -> None:
        backbone: Any = model.bert if hasattr(model, "bert") else model
        super().__init__(model, backbone, backbone.encoder.layer)
        self.classifier: Any = getattr(model, "classifier", None)
        if getattr(self.config, "is_decoder", False) or getattr(self.config, "add_cross_attention", False):
            raise ModelError("BERT decoder / cross-attention configs are not supported (encoders only)")

    def default_task(self) -> Task:
        """Classification when the model has a head, else mean-pooled embeddings."""
        return Task.CLASSIFY if self.classifier is not None else Task.EMBED

    def check_task(self, task: Task) -> None:
        super().check_task(task)
        if task is Task.CLASSIFY and (self.classifier is None or self.backbone.pooler is None):
            raise BadRequest("this BERT has no classification head (use task 'embed')")

    def embed(self, shared: Tensors, local: Tensors, span: range) -> torch.Tensor:
        ids = shared["input_ids"][:, span.start : span.stop]
        types = shared.get("token_type_ids")
        types = torch.zeros_like(ids) if types is None else types[:, span.start : span.stop]
        positions = torch.arange(span.start, span.stop, device=ids.device).unsqueeze(0)
        out: torch.Tensor = self.backbone.embeddings(input_ids=ids, token_type_ids=types, position_ids=positions)
        return out

    def attn_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return h  # post-LN: the layer input itself enters Q/K/V

    def project(self, i: int, x_q: torch.Tensor, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        att = self.layers[i].attention.self
        d = att.attention_head_size
        return heads(att.query(x_q), d), heads(att.key(x_kv), d), heads(att.value(x_kv), d)

    def scaling(self, i: int) -> float:
        return float(self.layers[i].attention.self.scaling)

    def kv_map(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        att = self.layers[i].attention.self
        return kv_affine(att.key, att.value)

    def head_dim(self, i: int) -> int:
        return int(self.layers[i].attention.self.attention_head_size)

    def finish(self, i: int, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        a = layer.attention.output(merge_heads(ctx), h)  # dense + residual + LayerNorm
        out: torch.Tensor = layer.output(layer.intermediate(a), a)
        return out

    def partials(self, task: Task, h: torch.Tensor, shared: Tensors, span: range, shapes: Shapes) -> Tensors:
        if task is Task.CLASSIFY:
            return {"cls": first_row(h, span)}
        mask = self.token_mask(shared, shapes)[:, span.start : span.stop].to(h.device)
        m = mask.to(h.dtype).unsqueeze(-1)
        return {"sum": (h * m).sum(dim=1), "count": m.sum(dim=1)}

    def finalize(self, task: Task, summed: Tensors) -> Tensors:
        if task is Task.CLASSIFY:
            assert self.classifier is not None
            return {"logits": self.classifier(self.backbone.pooler(summed["cls"].unsqueeze(1)))}
        return {"embedding": summed["sum"] / summed["count"].clamp(min=1.0)}

    def reference(self, task: Task, inputs: Tensors) -> Tensors:
        kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = self.backbone(**kwargs)
        hidden = out.last_hidden_state
        if task is Task.CLASSIFY:
            return {"logits": self.classifier(out.pooler_output), "hidden": hidden}
        mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
        return {"embedding": masked_mean(hidden, mask), "hidden": hidden}
