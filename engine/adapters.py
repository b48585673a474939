"""Model adapters: the row-local pieces of ViT, BERT and GPT-2 blocks, on `transformers` weights.

An adapter never copies a model file: it calls the model's own submodules (embeddings,
Q/K/V and output projections, LayerNorms, MLPs, heads) on the rows a rank owns, and
leaves attention to :mod:`engine.attention`. ``reference`` runs the plain `transformers`
forward, the exact path every PRISM run is checked against.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch

from engine.codec import rotation
from engine.errors import BadRequest
from engine.kernels import linear, uses_onednn
from engine.wire import compact_tokens

Tensors = dict[str, torch.Tensor]


class Task(enum.Enum):
    """What a job asks of a model."""

    CLASSIFY = "classify"  # ViT / BERT: class logits from the first token
    FEATURES = "features"  # ViT: final first-token (CLS) features
    EMBED = "embed"  # BERT: mean-pooled sentence embedding over real tokens
    NEXT_TOKEN = "next_token"  # GPT-2: next-token logits after the last real token
    LOGLIK = "loglik"  # GPT-2: summed log-likelihood and token count per sample
    GENERATE = "generate"  # GPT-2: a prompt's prefill: next-token logits and every layer's K/V (``past_kv``)


@dataclass(frozen=True, slots=True)
class Shapes:
    """Batch size and token count of a job."""

    batch: int
    n_tokens: int


class Adapter:
    """Row-local operations of one model family; subclasses fill them in."""

    family = ""
    causal = False
    tasks: tuple[Task, ...] = ()

    def __init__(self, model: Any, backbone: Any, layers: Any) -> None:
        # `transformers` submodules are untyped; Any keeps attribute access honest to read.
        self.model: Any = model.eval()
        self.backbone: Any = backbone
        self.layers: Any = layers
        self.config: Any = backbone.config
        first = next(model.parameters())
        self.dtype = first.dtype
        self.device = first.device
        self._rotated_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._kv_bias: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.onednn = uses_onednn(model)  # the model's own linears run oneDNN (engine/kernels.py)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear`` with the kernel the model's own ``nn.Linear`` layers use."""
        return linear(x, weight, bias, onednn=self.onednn)

    # -- shapes and inputs ------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of Transformer blocks."""
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        """Model width D."""
        return int(self.config.hidden_size)

    @property
    def ffn_ratio(self) -> float:
        """The FFN's expansion, its inner width over D (GPT-2's ``n_inner``, else 4 as GPT-2 builds it)."""
        inner = getattr(self.config, "intermediate_size", None) or getattr(self.config, "n_inner", None)
        return float(inner or 4 * self.hidden_size) / self.hidden_size

    def default_task(self) -> Task:
        """What a job without a ``task`` asks of this model."""
        return self.tasks[0]

    def check_task(self, task: Task) -> None:
        """Raise ``BadRequest`` unless this model can do ``task``."""
        if task not in self.tasks:
            names = ", ".join(t.value for t in self.tasks)
            raise BadRequest(f"a {self.family} model does not do '{task.value}' (it does: {names})")

    def shapes(self, inputs: Tensors) -> Shapes:
        """Batch size and token count of ``inputs``."""
        ids = inputs["input_ids"]
        return Shapes(int(ids.shape[0]), int(ids.shape[1]))

    def token_mask(self, shared: Tensors, shapes: Shapes) -> torch.Tensor:
        """(B, N) bool: which positions hold real (non-padding) tokens."""
        mask = shared.get("attention_mask")
        if mask is None:
            return torch.ones(shapes.batch, shapes.n_tokens, dtype=torch.bool, device=self.device)
        return mask.bool()

    def split_inputs(
        self, inputs: Tensors, spans: list[range], *, every_row: bool = False
    ) -> tuple[Tensors, list[Tensors]]:
        """(what every rank gets, what each rank gets) — token inputs are small, so shared,
        in their compact wire dtypes (:func:`engine.wire.compact_tokens`; ranks widen them back).

        ``every_row``: every rank must be able to embed every row (the ``codes`` method
        rebuilds layer 0 of the other ranks' rows instead of receiving it).
        """
        return compact_tokens(inputs, int(self.config.vocab_size)), [{} for _ in spans]

    # -- the block, row-local ---------------------------------------------------------
    def embed(self, shared: Tensors, local: Tensors, span: range) -> torch.Tensor:
        """Embeddings of the rows in ``span`` -> (B, n, D)."""
        raise NotImplementedError

    def attn_input(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """What enters layer i's Q/K/V projections (this is what gets averaged)."""
        raise NotImplementedError

    def project(self, i: int, x_q: torch.Tensor, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q from ``x_q`` (B, n, D), K/V from ``x_kv`` (B, K, D); each (B, heads, rows, d)."""
        raise NotImplementedError

    def scaling(self, i: int) -> float:
        """Logit scale of layer i."""
        raise NotImplementedError

    def kv_map(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's K and V projections as one affine map ``[K | V] = x @ W + b``: W (D, 2D), b (2D)."""
        raise NotImplementedError

    def head_dim(self, i: int) -> int:
        """Width of one attention head of layer i."""
        raise NotImplementedError

    def rotated_kv(self, i: int, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (B, heads, m, d) of rows given rotated, ``y = x @ R`` (B, m, D).

        R is :func:`engine.codec.rotation`; its inverse is folded into layer i's K/V
        weights (``R^T W``) once per layer and cached, so rotated rows cost what plain
        rows cost.
        """
        w, b = self._folded_kv(i)  # (2D, D), (2D)
        kv = self.linear(y.to(w.dtype), w, b)  # (B, m, 2D)
        k, v = kv.chunk(2, dim=-1)
        d = self.head_dim(i)
        return heads(k, d), heads(v, d)

    def kv_bias(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's K and V biases as (D,) fp32 each (zeros where the model has none).

        Kept per layer: :meth:`kv_map` builds the whole (D, 2D) weight (1.3 ms a layer for
        vit-base), which a ``kv`` job, needing only the biases, paid per layer and job.
        """
        cached = self._kv_bias.get(i)
        if cached is None:
            _, b = self.kv_map(i)  # (2D,)
            kb, vb = b.detach().float().chunk(2)
            cached = self._kv_bias[i] = (kb.contiguous(), vb.contiguous())
        return cached

    def _folded_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Weights are frozen for inference and an adapter never changes device or dtype
        # (engine.models.to_device builds a new one), so layer i is folded once.
        cached = self._rotated_kv.get(i)
        if cached is None:
            w, b = self.kv_map(i)
            with torch.no_grad():
                rot = rotation(w.shape[0]).to(device=w.device, dtype=torch.float64)
                folded = (rot.T @ w.detach().double()).to(w.dtype)  # (D, 2D)
                cached = (folded.T.contiguous(), b.detach().clone())
            self._rotated_kv[i] = cached
        return cached

    def finish(self, i: int, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Output projection, residuals, norms and MLP of layer i; ctx (B, heads, n, d)."""
        raise NotImplementedError

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The norm after the last block (identity for BERT)."""
        return h

    # -- outputs ----------------------------------------------------------------------
    def partials(self, task: Task, h: torch.Tensor, shared: Tensors, span: range, shapes: Shapes) -> Tensors:
        """This rank's sum-reducible share of the output, from final hidden rows h (B, n, D)."""
        raise NotImplementedError

    def finalize(self, task: Task, summed: Tensors) -> Tensors:
        """The job's output from the partials summed over ranks."""
        raise NotImplementedError

    def reference(self, task: Task, inputs: Tensors) -> Tensors:
        """The plain `transformers` backbone forward and the model's own head: the exact answer.

        One forward pass (it is also the local baseline in benchmarks); ``hidden`` is the
        final hidden state, after the last norm.
        """
        raise NotImplementedError


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, n, h*d) -> (B, h, n, d)."""
    b, n, width = x.shape
    return x.view(b, n, width // head_dim, head_dim).transpose(1, 2)


def kv_affine(key: Any, value: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``nn.Linear`` (K and V) as one map ``x @ W + b``: W (D_in, 2 D_out), b (2 D_out)."""
    w = torch.cat([key.weight.T, value.weight.T], dim=1)
    biases = [lin.bias if lin.bias is not None else key.weight.new_zeros(lin.weight.shape[0]) for lin in (key, value)]
    return w, torch.cat(biases)


def merge_heads(ctx: torch.Tensor) -> torch.Tensor:
    """(B, h, n, d) -> (B, n, h*d)."""
    b, h, n, d = ctx.shape
    return ctx.transpose(1, 2).reshape(b, n, h * d)


def place_rows(h: torch.Tensor, span: range, shapes: Shapes) -> torch.Tensor:
    """This rank's rows written into a zero (B, N, D) tensor (summed over ranks = gather)."""
    full = h.new_zeros(shapes.batch, shapes.n_tokens, h.shape[-1])
    full[:, span.start : span.stop] = h
    return full


def first_row(h: torch.Tensor, span: range) -> torch.Tensor:
    """Row of global position 0 if this rank holds it, else zeros; (B, D)."""
    if span.start == 0:
        return h[:, 0]
    return h.new_zeros(h.shape[0], h.shape[-1])


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: hidden (B, N, D), mask (B, N) -> (B, D)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
