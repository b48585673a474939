"""The versioned wire schema of jobs and results (docs/design.md §5.1).

Payloads are JSON (so ``mosquitto_pub`` works) or msgpack. Parsing never raises
anything but :class:`WireError`, whose ``code`` travels back in the error result, and
whose ``job_id`` is set whenever the payload had a readable id, so the sender still
gets an answer. Size limits are checked before any decoding work.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack

from engine.errors import FailureReason, PrismError
from transport.gen_fields import FieldError, parse_generation

SCHEMA_VERSION = 1
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # safe inside an MQTT topic level


class WireError(PrismError):
    """A payload that cannot become a job; ``job_id`` is set when the id was readable."""

    code = "invalid_job"

    def __init__(self, message: str, *, code: str | None = None, job_id: str | None = None) -> None:
        super().__init__(message, code=code)
        self.job_id = job_id


class Mode(enum.Enum):
    """Where a job runs."""

    AUTO = "auto"
    LOCAL = "local"
    DISTRIBUTED = "distributed"


class Objective(enum.Enum):
    """What ``auto`` minimises."""

    LATENCY = "latency"
    ENERGY = "energy"


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard limits, enforced before decoding or running anything."""

    max_payload_bytes: int = 4 * 1024 * 1024
    max_batch: int = 64
    max_seq: int = 1024
    max_text_chars: int = 20_000
    max_image_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Job:
    """A validated job. Exactly one of ``text``, ``images`` or ``token_ids`` is set."""

    id: str
    model: str
    task: str | None = None
    text: tuple[str, ...] | None = None
    images: tuple[bytes, ...] | None = None
    token_ids: tuple[tuple[int, ...], ...] | None = None
    mode: Mode = Mode.AUTO
    cr: float | None = None
    cr_given: bool = False
    ranks: int | None = None
    peers: tuple[str, ...] | None = None  # split over exactly these nodes (then ranks = peers + 1)
    objective: Objective | None = None  # None: the node's setting
    deadline_ms: float | None = None
    method: str | None = None  # "means" | "codes" | "kv": how a split compresses (None: auto's choice)
    min_fidelity: float | None = None  # the job's accuracy floor for auto (a cosine vs local)
    # task "generate" only (transport/gen_fields.py): None is the agent's default
    max_new_tokens: int | None = None
    temperature: float | None = None  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[int, ...] | None = None  # stop token ids (None: the model's end of text, if it has one)

    @property
    def batch(self) -> int:
        """Number of samples."""
        for inputs in (self.text, self.images, self.token_ids):
            if inputs is not None:
                return len(inputs)
        return 0


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


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], job_id: str | None, default: Any = None) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _fail(f"field '{key}' has the wrong type (bool)", job_id)
    if not isinstance(value, kind):
        raise _fail(f"field '{key}' has the wrong type ({type(value).__name__})", job_id)
    return value


def _text(value: Any, limits: Limits, job_id: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(t, str) for t in items):
        raise _fail("inputs.text must be a string or a non-empty list of strings", job_id)
    if any(len(t) > limits.max_text_chars for t in items):
        raise _fail(f"a text is longer than {limits.max_text_chars} characters", job_id, "too_large")
    for t in items:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800") decodes from JSON but is not text
            raise _fail("inputs.text holds a lone surrogate: not valid Unicode text", job_id, "bad_request") from None
    return tuple(items)


def _images(value: Any, limits: Limits, job_id: str) -> tuple[bytes, ...]:
    import base64
    import binascii

    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            if len(item) > limits.max_image_bytes * 4 // 3 + 4:
                raise _fail(f"an image is larger than {limits.max_image_bytes} bytes", job_id, "too_large")
            try:
                item = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise _fail("inputs.image must be base64 (JSON) or bytes (msgpack)", job_id) from exc
        if not isinstance(item, bytes) or not item:
            raise _fail("inputs.image must be base64 (JSON) or bytes (msgpack)", job_id)
        if len(item) > limits.max_image_bytes:
            raise _fail(f"an image is larger than {limits.max_image_bytes} bytes", job_id, "too_large")
        out.append(item)
    if not out:
        raise _fail("inputs.image is empty", job_id)
    return tuple(out)


def _token_ids(value: Any, limits: Limits, job_id: str) -> tuple[tuple[int, ...], ...]:
    rows = value if value and isinstance(value, list) and isinstance(value[0], list) else [value]
    if not all(isinstance(r, list) and r and all(type(t) is int and t >= 0 for t in r) for r in rows):
        raise _fail("inputs.token_ids must be a non-empty list (or list of lists) of non-negative integers", job_id)
    if any(len(r) > limits.max_seq for r in rows):
        raise _fail(f"a token sequence is longer than {limits.max_seq}", job_id, "too_large")
    return tuple(tuple(r) for r in rows)


def parse_job(payload: bytes, limits: Limits) -> Job:
    """Decode and validate one job payload."""
    data = decode(payload, limits)
    raw_id = data.get("id")
    job_id = raw_id if isinstance(raw_id, str) and _ID.match(raw_id) else None
    version = data.get("v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise _fail(f"schema version {version!r} is not supported (this agent speaks {SCHEMA_VERSION})", job_id)
    if job_id is None:
        raise _fail("field 'id' must be 1-128 characters of letters, digits and . _ : -", None)
    model = _get(data, "model", str, job_id)
    if not model:
        raise _fail("field 'model' is required", job_id)
    inputs = _get(data, "inputs", dict, job_id)
    if not inputs:
        raise _fail("field 'inputs' is required: one of text, image or token_ids", job_id)
    kinds = [k for k in ("text", "image", "token_ids") if k in inputs]
    if len(kinds) != 1 or len(inputs) != 1:
        raise _fail("inputs must hold exactly one of: text, image, token_ids", job_id)
    text = _text(inputs["text"], limits, job_id) if "text" in inputs else None
    images = _images(inputs["image"], limits, job_id) if "image" in inputs else None
    token_ids = _token_ids(inputs["token_ids"], limits, job_id) if "token_ids" in inputs else None
    batch = len(text or images or token_ids or ())
    if batch > limits.max_batch:
        raise _fail(f"batch of {batch} exceeds the limit of {limits.max_batch}", job_id, "too_large")
    peers = _peers(data.get("peers"), data.get("ranks"), job_id)
    task = _get(data, "task", str, job_id)
    try:
        generation = parse_generation(data, task)
    except FieldError as exc:
        raise _fail(str(exc), job_id) from None
    return Job(
        id=job_id,
        model=model,
        task=task,
        text=text,
        images=images,
        token_ids=token_ids,
        mode=_enum(Mode, data.get("mode"), "mode", job_id, Mode.AUTO),
        cr=_cr(data.get("cr"), job_id),
        cr_given="cr" in data and data["cr"] is not None,
        ranks=_ranks(data.get("ranks"), job_id) if peers is None else len(peers) + 1,
        peers=peers,
        objective=_enum(Objective, data.get("objective"), "objective", job_id, None),
        deadline_ms=_deadline(data.get("deadline_ms"), job_id),
        method=_method(data.get("method"), job_id),
        min_fidelity=_fidelity(data.get("min_fidelity"), job_id),
        **generation,
    )


def _enum(kind: type[enum.Enum], value: Any, name: str, job_id: str, default: Any) -> Any:
    if value is None:
        return default
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(str(m.value) for m in kind)
        raise _fail(f"field '{name}' must be one of {allowed}, got {_shown(value)}", job_id) from None


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (bools, strings, huge integers, inf and nan are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and abs(value) > 10**15:  # float() of a 400-digit integer raises
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _cr(value: Any, job_id: str) -> float | None:
    if value is None or value == "full":
        return None
    number = _number(value)
    if number is None or number < 1:
        raise _fail(f"field 'cr' must be a number >= 1 or 'full', got {_shown(value)}", job_id)
    if number > 1_000_000:
        raise _fail(f"field 'cr' must be at most 1000000, got {_shown(value)}", job_id)
    return number


def _ranks(value: Any, job_id: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= 64:
        raise _fail(f"field 'ranks' must be an integer from 1 to 64, got {_shown(value)}", job_id)
    return int(value)


def _peers(value: Any, ranks: Any, job_id: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= 63:
        raise _fail(f"field 'peers' must be a list of 1 to 63 node ids, got {str(value)[:80]!r}", job_id)
    if not all(isinstance(n, str) and _ID.match(n) for n in value) or len(set(value)) != len(value):
        raise _fail("field 'peers' must hold distinct node ids (letters, digits and . _ : -)", job_id)
    if ranks is not None and ranks != len(value) + 1:
        raise _fail(f"field 'ranks' is {ranks} but 'peers' names {len(value)} node(s): ranks is peers + 1", job_id)
    return tuple(value)


def _deadline(value: Any, job_id: str) -> float | None:
    if value is None:
        return None
    number = _number(value)
    if number is None or number <= 0 or number > 86_400_000:
        raise _fail(
            f"field 'deadline_ms' must be a positive number of milliseconds (at most a day), got {_shown(value)}",
            job_id,
        )
    return number


METHODS = ("means", "codes", "kv")


def _method(value: Any, job_id: str) -> str | None:
    if value is None:
        return None
    if value not in METHODS:
        raise _fail(f"field 'method' must be one of {', '.join(METHODS)}, got {_shown(value)}", job_id)
    return str(value)


def _fidelity(value: Any, job_id: str) -> float | None:
    if value is None:
        return None
    number = _number(value)
    if number is None or not 0 <= number <= 1:
        raise _fail(f"field 'min_fidelity' must be a number from 0 to 1 (a cosine), got {_shown(value)}", job_id)
    return number


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a job failed: a stable code and one readable line."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Result:
    """What a job gets back (the ``results/{id}`` or response-topic payload)."""

    id: str | None
    ok: bool
    error: ErrorInfo | None = None
    output: dict[str, Any] | None = None
    mode: str | None = None
    cr: float | None = None
    method: str | None = None
    peers: tuple[str, ...] = ()
    latency_ms: dict[str, float] = field(default_factory=dict)
    decision: dict[str, Any] | None = None
    fallback: bool = False
    fallback_reason: FailureReason | None = None  # why a split ran locally (decision.fallback_reason: in words)
    node: str | None = None
    energy: dict[str, Any] | None = None
    final: bool | None = None  # a generate job's last message (after its partials); None on other jobs
    seq: int | None = None  # with final: how many partials came before it (seq 0..seq-1)

    @classmethod
    def failure(cls, job_id: str | None, code: str, message: str, node: str | None = None) -> Result:
        """An error result."""
        return cls(id=job_id, ok=False, error=ErrorInfo(code, message), node=node)

    def to_dict(self) -> dict[str, Any]:
        """The wire form (JSON-compatible)."""
        return {
            "v": SCHEMA_VERSION,
            "id": self.id,
            "ok": self.ok,
            "error": None if self.error is None else {"code": self.error.code, "message": self.error.message},
            "output": self.output,
            "mode": self.mode,
            "cr": "full" if self.mode == "distributed" and self.cr is None else self.cr,
            "method": self.method,
            "peers": list(self.peers),
            "latency_ms": self.latency_ms,
            "decision": self.decision,
            "fallback": self.fallback,
            "fallback_reason": None if self.fallback_reason is None else self.fallback_reason.value,
            "node": self.node,
            "energy": self.energy,
            **({} if self.final is None else {"final": self.final, "seq": self.seq}),
        }

    def encode(self, as_msgpack: bool = False) -> bytes:
        """Serialised in the requester's format."""
        data = self.to_dict()
        if as_msgpack:
            return bytes(msgpack.packb(data, use_bin_type=True))
        return json.dumps(data, separators=(",", ":")).encode()
