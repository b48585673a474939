"""The agent side of ``task: "generate"``: a prompt's checks, its decode, its final result (§3.8).

The job service runs a generate job's prefill as it runs any job — decided by the policy as
a ``next_token`` job of the prompt's length would be, locally or split, with the local
fallback — and the prefill leaves the coordinator every position's K/V (``past_kv``). This
module checks what the job asks before any work (``bad_request``, ``too_large``), decodes
from that cache on the engine thread (one slot, like every other engine work), streams every
token through a :class:`agent.jobs.token_feed.Feed`, and turns the decode into the final
result's output and latency figures.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from agent.base.config import Settings
from agent.base.engine import Engine
from agent.jobs.token_feed import Feed, Sink
from engine.adapters import Tensors
from engine.errors import BadRequest
from engine.generate import Generation, Sampling, cache_bytes, context_of, decode
from engine.models import LoadedModel
from transport.schema import Job, Limits, Result

#: New tokens a job gets when it does not say (at most the node's or model's cap).
DEFAULT_NEW_TOKENS = 32


class TooLarge(BadRequest):
    """What the job asks does not fit the model's context or the node's cache budget."""

    code = "too_large"


@dataclass(frozen=True, slots=True)
class Ask:
    """A generate job's checked request."""

    max_new_tokens: int
    sampling: Sampling
    stop: tuple[int, ...]


def prompt_tensors(job: Job, model: LoadedModel, limits: Limits) -> Tensors:
    """The prompt (1, N) as ids: text through the model's tokenizer (never cut), or the job's ids."""
    if job.images is not None:
        raise BadRequest(f"model '{job.model}' writes text: send inputs.text or inputs.token_ids")
    prompts = job.text if job.text is not None else job.token_ids
    if prompts is None or len(prompts) != 1:
        raise BadRequest(f"generate takes one prompt per job, got {len(prompts or ())}")
    vocab = int(model.adapter.config.vocab_size)
    if job.text is not None:
        if model.tokenizer is None:
            raise BadRequest(f"model '{job.model}' has no tokenizer: send the prompt as inputs.token_ids")
        ids = [int(t) for t in model.tokenizer(job.text[0])["input_ids"]]
        if not ids:
            raise BadRequest("the prompt is empty")
    else:
        ids = list(job.token_ids[0]) if job.token_ids else []
        if any(t >= vocab for t in ids):
            raise BadRequest(f"a token id is outside this model's vocabulary of {vocab}")
    if len(ids) > limits.max_seq:
        raise TooLarge(f"the prompt is {len(ids)} tokens; the limit is {limits.max_seq}")
    ids_t = torch.tensor([ids], dtype=torch.long)
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}


def ask_of(job: Job, model: LoadedModel, cap: int, settings: Settings, prompt: int) -> Ask:
    """What ``job`` asks, checked against the model's context and the node's budget (``cap``:
    the most new tokens a job may ask of this model here)."""
    adapter = model.adapter
    wanted = job.max_new_tokens if job.max_new_tokens is not None else min(DEFAULT_NEW_TOKENS, cap)
    if not 1 <= wanted <= cap:
        raise BadRequest(f"max_new_tokens must be from 1 to {cap} for '{job.model}' on this node, got {wanted}")
    if job.seed is not None and not 0 <= job.seed < 2**63:
        raise BadRequest(f"seed must be from 0 to 2**63 - 1, got {job.seed}")
    sampling = Sampling(job.temperature or 0.0, job.top_k, job.top_p, job.seed)  # BadRequest on bad values
    context = context_of(adapter)
    if prompt + wanted > context:
        raise TooLarge(f"prompt ({prompt} tokens) + max_new_tokens ({wanted}) is over the model's context of {context}")
    need = cache_bytes(adapter, prompt + wanted)
    if need > settings.kv_cache_max_bytes:
        raise TooLarge(
            f"the K/V cache of {prompt + wanted} positions takes {need} bytes; "
            f"this node allows {settings.kv_cache_max_bytes} (kv_cache_max_bytes)"
        )
    vocab = int(adapter.config.vocab_size)
    if job.stop is not None:
        stop = job.stop
        if any(t >= vocab for t in stop):
            raise BadRequest(f"a stop token is outside this model's vocabulary of {vocab}")
    else:
        eos = getattr(adapter.config, "eos_token_id", None)
        stop = (int(eos),) if isinstance(eos, int) and 0 <= eos < vocab else ()
    return Ask(wanted, sampling, stop)


class Writer:
    """Decodes generate jobs on the node's engine (owned by the job service)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._detok: dict[str, Callable[[list[int]], str]] = {}

    def _detokenizer(self, model: LoadedModel) -> Callable[[list[int]], str] | None:
        """A copy of the model's tokenizer for the engine thread alone (the prep thread
        tokenises other jobs' inputs with the original at the same time)."""
        if model.tokenizer is None:
            return None
        if model.name not in self._detok:
            own: Any = copy.deepcopy(model.tokenizer)
            self._detok[model.name] = functools.partial(own.decode, skip_special_tokens=False)
        return self._detok[model.name]

    def feed(self, job: Job, model: LoadedModel, sink: Sink | None) -> Feed:
        """The job's token stream (on this loop)."""
        return Feed(job.id, sink, asyncio.get_running_loop(), self._detokenizer(model))

    async def write(
        self,
        job: Job,
        model: LoadedModel,
        tensors: Tensors,
        past: torch.Tensor,
        ask: Ask,
        deadline: float | None,
        feed: Feed,
    ) -> tuple[Generation, str | None]:
        """Decode from ``past`` on the engine thread: what it made and its text (None
        without a tokenizer). A deadline that passes while the decode waits for the engine
        ends it with nothing made (reason ``deadline``)."""
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        work = functools.partial(
            _written,
            self._detokenizer(model),
            model.adapter,
            tensors["input_ids"],
            max_new_tokens=ask.max_new_tokens,
            sampling=ask.sampling,
            stop_ids=ask.stop,
            past=past,
            on_token=feed.on_token,
            deadline=deadline,
        )
        try:
            async with self.engine.slot(f"job {job.id} decode", timeout_s=left) as slot:
                made, text = await slot.run(work)
        except asyncio.TimeoutError:
            made, text = Generation([], "deadline"), None if model.tokenizer is None else ""
        feed.close()
        return made, text


def _written(detok: Callable[[list[int]], str] | None, *args: Any, **kwargs: Any) -> tuple[Generation, str | None]:
    """The decode and its whole text, both on the engine thread (the only user of ``detok``)."""
    made = decode(*args, **kwargs)
    return made, None if detok is None else detok(made.tokens)


def final(result: Result, made: Generation, text: str | None, feed: Feed, prompt: int, start: float) -> Result:
    """The job's last message: the whole text, why it ended, and the latency figures."""
    latency = dict(result.latency_ms)
    latency["prefill"] = latency.get("engine", 0.0)
    first = feed.first_at if feed.first_at is not None else time.monotonic()
    latency["first_token"] = (first - start) * 1e3  # from the job's arrival
    latency["decode"] = made.decode_s * 1e3
    latency["tokens_per_s"] = made.tokens_per_s
    output = {"text": text, "tokens": made.tokens, "reason": made.reason, "prompt_tokens": prompt}
    return result.model_copy(update={"output": output, "latency_ms": latency, "final": True, "seq": feed.seq})
