"""The versioned wire schema of jobs and results (docs/design.md §5.1, docs/schema/).

Payloads are JSON (so ``mosquitto_pub`` works) or msgpack. Parsing never raises
anything but :class:`WireError`, whose ``code`` travels back in the error result, and
whose ``job_id`` is set whenever the payload had a readable id, so the sender still
gets an answer. Size limits are checked before any decoding work. The documents themselves
are pydantic models: :class:`transport.job.JobDoc` and :class:`transport.result.Result`.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
from pydantic import BaseModel, ValidationError

from engine.errors import PrismError
from transport.job import ID_RE, METHODS, SCHEMA_VERSION, Job, JobDoc, Limits, Mode, Objective, shown
from transport.result import ErrorInfo, Result

__all__ = [
    "METHODS",
    "SCHEMA_VERSION",
    "ErrorInfo",
    "Job",
    "JobDoc",
    "Limits",
    "Mode",
    "Objective",
    "Result",
    "WireError",
    "decode",
    "json_schemas",
    "parse_job",
]

#: Error types a validator raises as they are (transport.job.refuse): the code the sender gets.
_CODES = ("invalid_job", "too_large", "bad_request")


class WireError(PrismError):
    """A payload that cannot become a job; ``job_id`` is set when the id was readable."""

    code = "invalid_job"

    def __init__(self, message: str, *, code: str | None = None, job_id: str | None = None) -> None:
        super().__init__(message, code=code)
        self.job_id = job_id


def _fail(message: str, job_id: str | None, code: str = "invalid_job") -> WireError:
    return WireError(message, code=code, job_id=job_id)


def decode(payload: bytes, limits: Limits) -> dict[str, Any]:
    """JSON or msgpack bytes -> a dict (msgpack when the first byte is not ``{``)."""
    if len(payload) > limits.max_payload_bytes:
        raise _fail(f"payload is {len(payload)} bytes; the limit is {limits.max_payload_bytes}", None, "too_large")
    stripped = payload.lstrip()
    try:
        if stripped.startswith(b"{"):
            data = json.loads(stripped.decode("utf-8"))
        else:
            data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise _fail(
            f"payload is neither a JSON nor a msgpack object ({type(exc).__name__})", None, "bad_payload"
        ) from exc
    except RecursionError as exc:
        raise _fail("payload nests too deeply", None, "bad_payload") from exc
    if not isinstance(data, dict):
        raise _fail(f"payload must be an object, got {type(data).__name__}", None, "bad_payload")
    return data


def parse_job(payload: bytes, limits: Limits) -> Job:
    """Decode and validate one job payload."""
    data = decode(payload, limits)
    raw_id = data.get("id")
    job_id = raw_id if isinstance(raw_id, str) and ID_RE.fullmatch(raw_id) else None
    try:
        doc = JobDoc.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        raise _refusal(exc, data, job_id) from None
    return doc.to_job()


def _refusal(exc: ValidationError, data: dict[str, Any], job_id: str | None) -> WireError:
    """pydantic's first error (fields are checked in their order) as one line naming the field.
    Of that field's errors, a validator's own refusal says most (a union of an image and a list
    of images fails both ways; the list's "too large" is the one to tell)."""
    errors = exc.errors(include_url=False)
    path, description = _described(JobDoc, errors[0]["loc"])
    same = [e for e in errors if _described(JobDoc, e["loc"])[0] == path]
    error = next((e for e in same if e["type"] in _CODES), errors[0])
    if error["type"] in _CODES:
        return _fail(error["msg"], job_id, error["type"])
    if not path:
        return _fail(f"the job is malformed: {error['msg']}", job_id)
    name = ".".join(path)
    if error["type"] == "missing":
        return _fail(f"field '{name}' is required: {description}", job_id)
    value: Any = data
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return _fail(f"field '{name}' must be {description}, got {shown(value)}", job_id)


def _described(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[list[str], str]:
    """The path of the deepest field ``loc`` names, and that field's description."""
    path: list[str] = []
    description = ""
    for key in loc:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            break
        path.append(str(key))
        description = field.description or "valid"
        if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return path, description


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schemas of the wire documents, by file name (docs/schema/): a job as its sender
    writes it, a result as an agent sends it."""
    dialect = {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    return {
        "job.json": {**dialect, **JobDoc.model_json_schema()},
        "result.json": {**dialect, **Result.model_json_schema(mode="serialization")},
    }
