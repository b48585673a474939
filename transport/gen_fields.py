"""The wire fields of a ``generate`` job (GPT-2 writes text; docs/design.md §3.8).

Types are checked here, as for every other field (a wrong type is ``invalid_job``); ranges
that only the sampler or the model can judge (temperature, top_k, top_p, the model's
context and the node's caps) are ``bad_request`` / ``too_large`` from the job service. A
generation field on a job of another task is ``invalid_job``: it would be silently ignored.
"""

from __future__ import annotations

import math
from typing import Any

from engine.errors import PrismError

#: Fields only a ``generate`` job takes.
GENERATE_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
#: Stop tokens a job may name at most.
MAX_STOP_IDS = 64


class FieldError(PrismError):
    """A generation field with the wrong type (the schema turns it into ``invalid_job``)."""

    code = "invalid_job"


def _int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise FieldError(f"field '{key}' must be an integer, got {str(value)[:40]!r}")
    return int(value)


def _float(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise FieldError(f"field '{key}' must be a finite number, got {str(value)[:40]!r}")
    return float(value)


def parse_generation(data: dict[str, Any], task: str | None) -> dict[str, Any]:
    """The generation fields of a decoded job (absent: None), as :class:`transport.schema.Job` keyword arguments."""
    given = [k for k in GENERATE_FIELDS if data.get(k) is not None]
    if given and task != "generate":
        raise FieldError(f"field(s) {', '.join(given)} are for task 'generate' (this job's task is {task!r})")
    stop = data.get("stop")
    if stop is not None:
        stop = [stop] if type(stop) is int else stop
        if not isinstance(stop, list) or not all(type(t) is int and t >= 0 for t in stop):
            raise FieldError("field 'stop' must be a token id or a list of token ids (integers >= 0)")
        if len(stop) > MAX_STOP_IDS:
            raise FieldError(f"field 'stop' names {len(stop)} tokens; at most {MAX_STOP_IDS}")
        stop = tuple(stop)
    return {
        "max_new_tokens": _int(data, "max_new_tokens"),
        "temperature": _float(data, "temperature"),
        "top_k": _int(data, "top_k"),
        "top_p": _float(data, "top_p"),
        "seed": _int(data, "seed"),
        "stop": stop,
    }
