"""ViT adapter (pre-LN; `transformers` 5 ``ViTModel`` with ``.layers``).

Images arrive either normalised (floating point) or as raw uint8 pixels, 0..255, a quarter
of the bytes on the wire. Raw pixels are normalised on the rank that embeds them, as
``(p / 255 - mean) / std`` per channel, with the model's own image-processor mean and std
when its config carries them (``image_mean``/``image_std``, copied from a model directory's
``preprocessor_config.json`` by :func:`engine.models.load_dir`), else ViT's defaults 0.5 /
0.5 — the same arithmetic the daemon uses for float images, so both give the same numbers.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.adapters import Adapter, Shapes, Task, Tensors, first_row, heads, kv_affine, merge_heads
from engine.errors import BadRequest, ModelError

#: ViTImageProcessor's defaults (IMAGENET_STANDARD_MEAN / _STD).
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5


class ViTAdapter(Adapter):
    """Image classification and CLS features. Token 0 is CLS, tokens 1.. are patches."""

    family = "vit"
    tasks = (Task.CLASSIFY, Task.FEATURES)

    def __init__(self, model: Any) -> None:
        backbone: Any = model.vit if hasattr(model, "vit") else model
        super().__init__(model, backbone, backbone.layers)
        self.classifier: Any = getattr(model, "classifier", None)
        emb = backbone.embeddings
        self.patch = int(emb.patch_size if isinstance(emb.patch_size, int) else emb.patch_size[0])
        size = emb.image_size
        self.image_hw = (int(size[0]), int(size[1])) if not isinstance(size, int) else (size, size)
        self.channels = int(self.config.num_channels)
        if self.image_hw[0] % self.patch or self.image_hw[1] % self.patch:
            raise ModelError(f"ViT image size {self.image_hw} is not a whole number of {self.patch}-pixel patches")
        self.image_mean = self._per_channel("image_mean", DEFAULT_MEAN)
        self.image_std = self._per_channel("image_std", DEFAULT_STD)

    def _per_channel(self, key: str, default: float) -> torch.Tensor:
        """(C, 1, 1) fp32: the config's value for ``key`` (one per channel, or one for all)."""
        value = getattr(self.config, key, None)
        values = [default] * self.channels if value is None else [float(v) for v in torch.tensor(value).flatten()]
        if len(values) == 1:
            values *= self.channels
        if len(values) != self.channels or (key == "image_std" and min(values) <= 0):
            raise ModelError(f"config {key} {value!r} does not fit {self.channels} channels")
        return torch.tensor(values, dtype=torch.float32, device=self.device).view(-1, 1, 1)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Model-ready pixels: raw uint8 ``(p / 255 - mean) / std``; floats as given. Any shape
        ending in (C, H, W) or (C, p, p); the result is in the model's dtype."""
        if pixels.dtype == torch.uint8:
            x = pixels.to(self.device, torch.float32) / 255.0
            return ((x - self.image_mean) / self.image_std).to(self.dtype)
        return pixels.to(self.dtype)

    def default_task(self) -> Task:
        """Classification when the model has a head, else CLS features."""
        return Task.CLASSIFY if self.classifier is not None else Task.FEATURES

    def check_task(self, task: Task) -> None:
        super().check_task(task)
        if task is Task.CLASSIFY and self.classifier is None:
            raise BadRequest("this ViT has no classification head (use task 'features')")

    def shapes(self, inputs: Tensors) -> Shapes:
        pixels = inputs["pixel_values"]
        if pixels.dtype != torch.uint8 and not pixels.is_floating_point():
            raise BadRequest(f"pixel_values must be uint8 (raw, 0..255) or floating point, got {pixels.dtype}")
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.channels, *self.image_hw):
            want = (self.channels, *self.image_hw)
            raise BadRequest(f"pixel_values must be (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(pixels.shape)}")
        n_patches = (self.image_hw[0] // self.patch) * (self.image_hw[1] // self.patch)
        return Shapes(int(pixels.shape[0]), n_patches + 1)

    def _patches(self, px: torch.Tensor, span: range) -> torch.Tensor:
        """The pixels of the patches in ``span``: (B, m, C, p, p), patches in row-major order.

        Only the rows of patches the span touches are rearranged (a rank's share of the image,
        not all of it: every rank of a ``codes`` or ``kv`` job cuts every rank's patches).
        """
        b, c, _, wid = px.shape
        p = self.patch
        across = wid // p
        first, stop = max(span.start, 1) - 1, max(span.stop - 1, 0)  # token t >= 1 is patch t - 1
        if stop <= first:
            return px.new_empty(b, 0, c, p, p)
        top, bottom = first // across, (stop - 1) // across + 1  # the rows of patches it touches
        rows = px[:, :, top * p : bottom * p].view(b, c, bottom - top, p, across, p)
        patches = rows.permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c, p, p)  # (B, those rows' patches, C, p, p)
        start = first - top * across
        return patches[:, start : start + stop - first].contiguous()

    def split_inputs(
        self, inputs: Tensors, spans: list[range], *, every_row: bool = False
    ) -> tuple[Tensors, list[Tensors]]:
        """Each rank gets only the pixels of its own patches, or (``every_row``) the whole image;
        raw uint8 pixels travel as they are and are normalised where they are embedded."""
        px = inputs["pixel_values"]
        if every_row:
            return {"pixel_values": px}, [{} for _ in spans]
        return {}, [{"patches": self._patches(px, span)} for span in spans]

    def embed(self, shared: Tensors, local: Tensors, span: range) -> torch.Tensor:
        emb = self.backbone.embeddings
        patches = local["patches"] if "patches" in local else self._patches(shared["pixel_values"], span)
        patches = self.normalise(patches)
        b = patches.shape[0]  # (B, m, C, p, p)
        # The patch convolution as the matrix product it is: one conv call per 16x16 patch
        # (what a rank's scattered patches would need) costs ~4x the same GEMM.
        conv = emb.patch_embeddings.projection
        rows = self.linear(patches.flatten(2), conv.weight.flatten(1), conv.bias)  # (B, m, D)
        if span.start == 0:
            rows = torch.cat([emb.cls_token.expand(b, -1, -1), rows], dim=1)
        return rows + emb.position_embeddings[:, span.start : span.stop]

    def attn_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.layers[i].layernorm_before(h)

    def project(self, i: int, x_q: torch.Tensor, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        att = self.layers[i].attention
        d = att.head_dim
        return heads(att.q_proj(x_q), d), heads(att.k_proj(x_kv), d), heads(att.v_proj(x_kv), d)

    def scaling(self, i: int) -> float:
        return float(self.layers[i].attention.scaling)

    def kv_map(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        att = self.layers[i].attention
        return kv_affine(att.k_proj, att.v_proj)

    def head_dim(self, i: int) -> int:
        return int(self.layers[i].attention.head_dim)

    def finish(self, i: int, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        h = h + layer.attention.o_proj(merge_heads(ctx))
        return h + layer.mlp(layer.layernorm_after(h))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.backbone.layernorm(h)

    def partials(self, task: Task, h: torch.Tensor, shared: Tensors, span: range, shapes: Shapes) -> Tensors:
        # Only CLS's row travels; the head runs once, on the coordinator.
        return {"cls": first_row(h, span)}

    def finalize(self, task: Task, summed: Tensors) -> Tensors:
        if task is Task.CLASSIFY:
            assert self.classifier is not None
            return {"logits": self.classifier(summed["cls"])}
        return {"features": summed["cls"]}

    def reference(self, task: Task, inputs: Tensors) -> Tensors:
        hidden = self.backbone(pixel_values=self.normalise(inputs["pixel_values"])).last_hidden_state
        return {**self.finalize(task, {"cls": hidden[:, 0]}), "hidden": hidden}
