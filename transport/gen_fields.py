"""The wire fields of a ``generate`` job (GPT-2 writes text; docs/design.md §3.8), as the
field types of :class:`transport.job.JobDoc`.

Types are checked on the wire, as for every other field (a wrong type is ``invalid_job``);
ranges that only the sampler or the model can judge (temperature, top_k, top_p, the model's
context and the node's caps) are ``bad_request`` / ``too_large`` from the job service. A
generation field on a job of another task is ``invalid_job``: it would be silently ignored.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

#: Fields only a ``generate`` job takes.
GENERATE_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
#: Stop tokens a job may name at most.
MAX_STOP_IDS = 64

TokenId = Annotated[int, Field(ge=0)]

MaxNewTokens = Annotated[
    int | None,
    Field(description="an integer: how many tokens to write, 1 to the node's max_new_tokens (default 32)"),
]
Temperature = Annotated[float | None, Field(description="a finite number: 0 (greedy, the default) to 100")]
TopK = Annotated[int | None, Field(description="an integer: sample from the k likeliest tokens (>= 1)")]
TopP = Annotated[
    float | None, Field(description="a finite number in (0, 1]: sample from the smallest set holding this much mass")
]
Seed = Annotated[int | None, Field(description="an integer from 0 to 2^63 - 1: the same seed writes the same text")]
Stop = Annotated[
    TokenId | Annotated[list[TokenId], Field(max_length=MAX_STOP_IDS)] | None,
    Field(
        description=f"a token id or a list of at most {MAX_STOP_IDS} token ids (integers >= 0) that end the text "
        "(default: the model's end of text; [] none)"
    ),
]
