"""GPT-2 adapter (pre-LN decoder, partition-aware causal attention)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from engine.adapters import Adapter, Shapes, Task, Tensors, heads, merge_heads
from engine.segments import last_real_positions


class GPT2Adapter(Adapter):
    """Next-token logits, sequence log-likelihood and a generation's prefill. Right padding only."""

    family = "gpt2"
    causal = True
    tasks = (Task.NEXT_TOKEN, Task.LOGLIK, Task.GENERATE)

    def __init__(self, model: Any) -> None:
        backbone: Any = model.transformer if hasattr(model, "transformer") else model
        super().__init__(model, backbone, backbone.h)
        self.lm_head: Any = model.lm_head

    @property
    def hidden_size(self) -> int:
        return int(self.config.n_embd)

    def embed(self, shared: Tensors, local: Tensors, span: range) -> torch.Tensor:
        ids = shared["input_ids"][:, span.start : span.stop]
        positions = torch.arange(span.start, span.stop, device=ids.device).unsqueeze(0)
        out: torch.Tensor = self.backbone.wte(ids) + self.backbone.wpe(positions)
        return out

    def attn_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.layers[i].ln_1(h)

    def project(self, i: int, x_q: torch.Tensor, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        att = self.layers[i].attn
        d, width = att.head_dim, att.split_size
        w, b = att.c_attn.weight, att.c_attn.bias  # Conv1D: y = x @ w + b, w (D, 3D)
        q = x_q @ w[:, :width] + b[:width]
        kv = x_kv @ w[:, width:] + b[width:]
        k, v = kv.split(width, dim=-1)
        return heads(q, d), heads(k, d), heads(v, d)

    def scaling(self, i: int) -> float:
        return float(self.layers[i].attn.scaling)

    def kv_map(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        att = self.layers[i].attn
        width = att.split_size
        return att.c_attn.weight[:, width:], att.c_attn.bias[width:]  # Conv1D: already x @ w + b

    def head_dim(self, i: int) -> int:
        return int(self.layers[i].attn.head_dim)

    def finish(self, i: int, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        h = h + layer.attn.c_proj(merge_heads(ctx))
        out: torch.Tensor = h + layer.mlp(layer.ln_2(h))
        return out

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.backbone.ln_f(h)
        return out

    def partials(self, task: Task, h: torch.Tensor, shared: Tensors, span: range, shapes: Shapes) -> Tensors:
        mask = self.token_mask(shared, shapes).to(h.device)
        if task in (Task.NEXT_TOKEN, Task.GENERATE):
            last = last_real_positions(mask) - span.start  # (B,)
            mine = (last >= 0) & (last < h.shape[1])
            rows = h[torch.arange(h.shape[0], device=h.device), last.clamp(0, h.shape[1] - 1)]
            return {"last": torch.where(mine.unsqueeze(-1), rows, torch.zeros_like(rows))}
        # Position i predicts token i + 1; the last local row predicts the next rank's first.
        ids = shared["input_ids"]
        stop = min(span.stop, shapes.n_tokens - 1)
        n = stop - span.start
        if n <= 0:
            zero = h.new_zeros(shapes.batch, dtype=torch.float32)
            return {"loglik": zero, "count": zero.clone()}
        logp = F.log_softmax(self.lm_head(h[:, :n]).float(), dim=-1)
        targets = ids[:, span.start + 1 : stop + 1]
        valid = (mask[:, span.start + 1 : stop + 1] & mask[:, span.start : stop]).to(logp.dtype)
        picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * valid
        return {"loglik": picked.sum(dim=1), "count": valid.sum(dim=1)}  # fp32 whatever the model dtype

    def finalize(self, task: Task, summed: Tensors) -> Tensors:
        if task in (Task.NEXT_TOKEN, Task.GENERATE):
            return {"logits": self.lm_head(summed["last"])}
        return {"loglik": summed["loglik"], "count": summed["count"]}

    def reference(self, task: Task, inputs: Tensors) -> Tensors:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        out = self.backbone(input_ids=ids, attention_mask=mask, use_cache=task is Task.GENERATE)
        hidden = out.last_hidden_state  # after ln_f
        if task in (Task.NEXT_TOKEN, Task.GENERATE):  # the head on the rows asked for only, as PRISM does
            last = last_real_positions(mask.bool())
            rows = hidden[torch.arange(ids.shape[0], device=ids.device), last]
            got = {"logits": self.lm_head(rows), "hidden": hidden}
            if task is Task.GENERATE:
                cache = out.get("cache")  # transformers 5.x; earlier: past_key_values
                cache = out.past_key_values if cache is None else cache
                got["past_kv"] = torch.stack([torch.stack([kv.keys, kv.values]) for kv in cache.layers])
            return got
        logp = F.log_softmax(self.lm_head(hidden[:, :-1]).float(), dim=-1)
        valid = (mask[:, 1:] * mask[:, :-1]).to(logp.dtype)
        picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * valid
        return {"loglik": picked.sum(dim=1), "count": valid.sum(dim=1), "hidden": hidden}
