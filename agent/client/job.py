"""A job as the client sends it: the JSON document for ``prism-agent submit``'s options
(docs/schema/job.json describes it)."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path
from typing import Any

from engine.errors import BadRequest


def build_job(
    model: str,
    *,
    text: list[str] | None = None,
    images: list[Path] | None = None,
    token_ids: list[list[int]] | None = None,
    mode: str = "auto",
    cr: float | str | None = None,
    task: str | None = None,
    job_id: str | None = None,
    method: str | None = None,
    ranks: int | None = None,
    peers: list[str] | None = None,
    min_fidelity: float | None = None,
    objective: str | None = None,
    deadline_ms: float | None = None,
    generation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON job for the given inputs (exactly one kind); options left at None are not sent.
    ``generation``: a generate job's fields (``max_new_tokens``, ``temperature``, ...)."""
    given = [x for x in (text, images, token_ids) if x]
    if len(given) != 1:
        raise BadRequest("give exactly one of --text, --image or --token-ids")
    inputs: dict[str, Any]
    if text:
        inputs = {"text": text}
    elif images:
        try:
            inputs = {"image": [base64.b64encode(p.read_bytes()).decode() for p in images]}
        except OSError as exc:
            raise BadRequest(f"cannot read image: {exc.filename}: {exc.strerror}") from None
    else:
        inputs = {"token_ids": token_ids}
    job: dict[str, Any] = {
        "v": 1,
        "id": job_id or uuid.uuid4().hex[:12],
        "model": model,
        "inputs": inputs,
        "mode": mode,
    }
    if cr is not None:
        job["cr"] = cr if cr == "full" else float(cr)
    options = {
        "task": task,
        "method": method,
        "ranks": ranks,
        "peers": peers,
        "min_fidelity": min_fidelity,
        "objective": objective,
        "deadline_ms": deadline_ms,
        **(generation or {}),
    }
    job.update({k: v for k, v in options.items() if v is not None})
    return job
