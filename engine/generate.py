"""GPT-2 writes text: a prompt's prefill (local or split), then a local decode (docs/design.md §3.7).

A split prefill is a ``generate`` job (:class:`engine.adapters.Task`): under a causal model
the rank on the last block receives every earlier rank's rows, so it ends the prefill
holding every layer's keys and values of every position (its own exact, the others' as the
method delivered them: exact under full exchange, decoded under ``codes`` and ``kv``, a
segment mean once per position it stands for under ``means``). :func:`plan_job` puts the
coordinator there. The decode then runs on that node alone with `transformers`' own cache
and generation code, seeded with that cache: no link is on the per-token path.

The last prompt position is computed again by the decode's first step (its K/V are dropped
from the cache) so that ``generate`` starts from a prompt and a cache, as it expects; that
step is one token's work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.adapters import Adapter
from engine.errors import BadRequest

#: Why a generation ended: it made ``max_new_tokens``, met a stop token, or ran out of time.
REASONS = ("length", "stop", "deadline")


@dataclass(frozen=True, slots=True)
class Sampling:
    """How each next token is picked: greedy at ``temperature`` 0, else sampled from the
    softmax at that temperature, cut to the ``top_k`` most likely and to the smallest set
    holding ``top_p`` of the mass. The same ``seed`` gives the same text."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise BadRequest(f"temperature must be 0..100 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise BadRequest(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise BadRequest(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class Generation:
    """What a decode made: the new tokens, why it stopped and how long it took."""

    tokens: list[int] = field(default_factory=list)
    reason: str = "length"
    first_token_s: float = 0.0  # from the decode's start to its first token
    decode_s: float = 0.0  # the whole decode

    @property
    def tokens_per_s(self) -> float:
        """Tokens after the first, per second of decode after the first token."""
        later = self.decode_s - self.first_token_s
        return (len(self.tokens) - 1) / later if len(self.tokens) > 1 and later > 0 else 0.0


def context_of(adapter: Adapter) -> int:
    """The most positions the model takes (prompt and new tokens together)."""
    return int(adapter.config.n_positions)


def cache_bytes(adapter: Adapter, positions: int) -> int:
    """Bytes of the K/V cache for ``positions`` positions of one sequence."""
    elem = torch.empty(0, dtype=adapter.dtype).element_size()
    return 2 * adapter.n_layers * positions * adapter.hidden_size * elem


def cache_from(past: torch.Tensor, config: Any) -> Any:
    """A `transformers` cache holding ``past`` (L, 2, 1, heads, N, d) less its last position
    (the decode's first step computes it again from the prompt's last token)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i in range(past.shape[0]):
        cache.update(past[i, 0], past[i, 1], i)
    cache.crop(-1)
    return cache


class _Tokens:
    """A `transformers` streamer: hands every new token to ``on_token`` as it is made (the
    first ``put`` is the prompt)."""

    def __init__(self, on_token: Callable[[int], None] | None, clock: Callable[[], float]) -> None:
        self.on_token = on_token
        self.clock = clock
        self.prompt_seen = False
        self.first_at: float | None = None
        self.count = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.first_at is None:
                self.first_at = self.clock()
            self.count += 1
            if self.on_token is not None:
                self.on_token(int(token))

    def end(self) -> None:
        pass


class _Deadline:
    """A `transformers` stopping criterion: stop once ``deadline`` (time.monotonic) passes."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.hit = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.hit = time.monotonic() >= self.deadline
        return torch.full((input_ids.shape[0],), self.hit, dtype=torch.bool, device=input_ids.device)


def decode(
    adapter: Adapter,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: tuple[int, ...] = (),
    past: torch.Tensor | None = None,
    on_token: Callable[[int], None] | None = None,
    deadline: float | None = None,
) -> Generation:
    """Up to ``max_new_tokens`` tokens after the prompt ``input_ids`` (1, N), on this node.

    ``past``: a split prefill's keys and values (``outputs["past_kv"]`` of a ``generate``
    job); without it the model runs its own prefill here. ``on_token`` gets each token as it
    is made (on this thread). ``deadline`` (``time.monotonic``) ends the decode early with
    reason ``deadline``; ``stop_ids`` end it with reason ``stop`` (the stop token is kept).
    """
    import transformers

    generation_config: Any = transformers.GenerationConfig

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise BadRequest(f"generate takes one prompt, got input_ids of shape {list(input_ids.shape)}")
    if max_new_tokens < 1:
        raise BadRequest(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    model: Any = adapter.model
    picks: dict[str, Any] = {"do_sample": False}
    if not sampling.greedy:
        picks = {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k or 0}
        picks["top_p"] = 1.0 if sampling.top_p is None else sampling.top_p
    config = generation_config(
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids) or None,
        pad_token_id=stop_ids[0] if stop_ids else 0,
        **picks,
    )
    ids = input_ids.to(adapter.device)
    start = time.perf_counter()
    tokens = _Tokens(on_token, time.perf_counter)
    stops = transformers.StoppingCriteriaList()
    timer = _Deadline(deadline) if deadline is not None else None
    if timer is not None:
        stops.append(timer)
    kwargs: dict[str, Any] = {}
    if past is not None:
        kwargs["cache"] = cache_from(past.to(adapter.device), model.config)
    devices = [adapter.device] if adapter.device.type == "cuda" else []
    with torch.inference_mode(), torch.random.fork_rng(devices=devices):
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out = model.generate(ids, generation_config=config, streamer=tokens, stopping_criteria=stops, **kwargs)
    made = out[0, ids.shape[1] :].tolist()
    end = time.perf_counter()
    reason = "length"
    if made and made[-1] in stop_ids:
        reason = "stop"
    elif timer is not None and timer.hit and len(made) < max_new_tokens:
        reason = "deadline"
    first = (tokens.first_at - start) if tokens.first_at is not None else end - start
    return Generation([int(t) for t in made], reason, first, end - start)
