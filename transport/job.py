"""A job on the wire, typed (docs/design.md §5.1; its JSON Schema is docs/schema/job.json).

:class:`JobDoc` is the document as a sender writes it, validated by pydantic: strict types (no
bool for a number, no string for an integer) and every range on its field. The node's own
:class:`Limits` (batch, sequence, text and image sizes) are runtime values: they come in the
validation context, ``JobDoc.model_validate(data, context={"limits": limits})`` (without one,
the defaults). :class:`Job` is what the agent runs: the inputs decoded and flattened.

A validator refuses with :func:`refuse`, whose error type is the code the sender gets back
(``invalid_job``, ``too_large``, ``bad_request``); transport/schema.py turns a pydantic error
into one readable line.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from transport import gen_fields
from transport.gen_fields import GENERATE_FIELDS

SCHEMA_VERSION: Final = 1
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"  # safe inside an MQTT topic level
ID_RE = re.compile(ID_PATTERN)
Method = Literal["means", "codes", "kv"]
METHODS: tuple[Method, ...] = ("means", "codes", "kv")


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


def refuse(code: str, message: str) -> PydanticCustomError:
    """A validation error that reaches the sender as ``code`` with ``message`` as it is."""
    return PydanticCustomError(code, message)


def shown(value: Any) -> str:
    """``value`` for an error line: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _limits(info: ValidationInfo) -> Limits:
    limits = info.context.get("limits") if isinstance(info.context, dict) else None
    return limits if isinstance(limits, Limits) else Limits()


def _image(value: Any, info: ValidationInfo) -> Any:
    """base64 text (JSON) decoded, bytes (msgpack) as they are; the size is checked on the text
    before decoding it, so a huge image costs no decoding work."""
    limit = _limits(info).max_image_bytes
    if isinstance(value, str):
        if len(value) > limit * 4 // 3 + 4:
            raise refuse("too_large", f"an image is larger than {limit} bytes")
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise refuse("invalid_job", "inputs.image must be base64 (JSON) or bytes (msgpack)") from None
    if isinstance(value, bytes) and len(value) > limit:
        raise refuse("too_large", f"an image is larger than {limit} bytes")
    return value


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)


#: One image: base64 in JSON, bytes in msgpack (PNG, JPEG, ...); the JSON Schema says the JSON form.
Image = Annotated[
    bytes,
    Field(min_length=1),
    BeforeValidator(_image),
    WithJsonSchema({"type": "string", "contentEncoding": "base64", "minLength": 1}),
]
TokenRow = Annotated[list[gen_fields.TokenId], Field(min_length=1)]
NodeId = Annotated[str, Field(pattern=ID_PATTERN)]


def _distinct(ids: list[str]) -> list[str]:
    if len(set(ids)) != len(ids):
        raise refuse("invalid_job", "field 'peers' must hold distinct node ids (letters, digits and . _ : -)")
    return ids


class Inputs(_Wire):
    """What a job computes on: exactly one of ``text``, ``image`` or ``token_ids``."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    text: str | Annotated[list[str], Field(min_length=1)] | None = Field(
        default=None, description="a string or a non-empty list of strings"
    )
    image: Image | Annotated[list[Image], Field(min_length=1)] | None = Field(
        default=None, description="an image or a non-empty list of images: base64 in JSON, bytes in msgpack"
    )
    token_ids: TokenRow | Annotated[list[TokenRow], Field(min_length=1)] | None = Field(
        default=None, description="a non-empty list (or list of lists) of non-negative integers"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data: Any) -> Any:
        # Before the values: two kinds (or none) is the sender's first mistake, whatever they hold.
        if isinstance(data, dict) and (len(data) != 1 or next(iter(data)) not in cls.model_fields):
            raise refuse("invalid_job", "inputs must hold exactly one of: text, image, token_ids")
        return data

    @field_validator("text")
    @classmethod
    def _texts_fit(cls, value: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        limit = _limits(info).max_text_chars
        texts = [value] if isinstance(value, str) else value or []
        if any(len(t) > limit for t in texts):
            raise refuse("too_large", f"a text is longer than {limit} characters")
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800") decodes from JSON but is not text
                raise refuse("bad_request", "inputs.text holds a lone surrogate: not valid Unicode text") from None
        return value

    @field_validator("token_ids")
    @classmethod
    def _rows_fit(cls, value: Any, info: ValidationInfo) -> Any:
        limit = _limits(info).max_seq
        rows = value if value and isinstance(value[0], list) else [value or []]
        if any(len(row) > limit for row in rows):
            raise refuse("too_large", f"a token sequence is longer than {limit}")
        return value

    @model_validator(mode="after")
    def _batch_fits(self, info: ValidationInfo) -> Inputs:
        limit = _limits(info).max_batch
        batch = len(self.texts() or self.images() or self.rows() or ())
        if batch == 0:  # the one kind given was null
            raise refuse("invalid_job", "inputs must hold exactly one of: text, image, token_ids")
        if batch > limit:
            raise refuse("too_large", f"batch of {batch} exceeds the limit of {limit}")
        return self

    def texts(self) -> tuple[str, ...] | None:
        """The texts, one a sample."""
        return (self.text,) if isinstance(self.text, str) else None if self.text is None else tuple(self.text)

    def images(self) -> tuple[bytes, ...] | None:
        """The decoded images, one a sample."""
        return (self.image,) if isinstance(self.image, bytes) else None if self.image is None else tuple(self.image)

    def rows(self) -> tuple[tuple[int, ...], ...] | None:
        """The token id rows, one a sample."""
        ids: list[Any] | None = self.token_ids
        if not ids:
            return None
        return tuple(tuple(row) for row in ids) if isinstance(ids[0], list) else (tuple(ids),)


class JobDoc(_Wire):
    """A job as its sender writes it. Fields it does not know are ignored (a newer client's job
    still runs here), and a field given as null is as if it were absent."""

    model_config = ConfigDict(extra="ignore", title="Job")

    v: Literal[1] = Field(default=SCHEMA_VERSION, description="1, the schema version this agent speaks")
    id: str = Field(pattern=ID_PATTERN, description="1-128 characters of letters, digits and . _ : -")
    model: str = Field(min_length=1, description="a model name as the agents serve it")
    task: str | None = Field(
        default=None,
        description="a task name: classify, features, embed, next_token, loglik or generate "
        "(default: what the model has a head for)",
    )
    inputs: Inputs = Field(description="exactly one of text, image or token_ids")
    mode: Mode = Field(default=Mode.AUTO, strict=False, description="one of auto, local, distributed")
    cr: Annotated[float, Field(ge=1, le=1_000_000)] | Literal["full"] | None = Field(
        default=None, description="a number from 1 to 1000000 or 'full'"
    )
    method: Method | None = Field(default=None, description="one of means, codes, kv (how a split compresses)")
    ranks: int | None = Field(default=None, ge=1, le=64, description="an integer from 1 to 64")
    peers: Annotated[list[NodeId], Field(min_length=1, max_length=63), AfterValidator(_distinct)] | None = Field(
        default=None,
        description="a list of 1 to 63 distinct node ids (letters, digits and . _ : -): split over exactly "
        "those nodes, ranks is then peers + 1",
        json_schema_extra={"uniqueItems": True},
    )
    objective: Objective | None = Field(
        default=None, strict=False, description="one of latency, energy (default: the node's)"
    )
    deadline_ms: float | None = Field(
        default=None, gt=0, le=86_400_000, description="a positive number of milliseconds (at most a day)"
    )
    min_fidelity: float | None = Field(
        default=None, ge=0, le=1, description="a number from 0 to 1: the job's accuracy floor (a cosine against local)"
    )
    max_new_tokens: gen_fields.MaxNewTokens = None
    temperature: gen_fields.Temperature = None
    top_k: gen_fields.TopK = None
    top_p: gen_fields.TopP = None
    seed: gen_fields.Seed = None
    stop: gen_fields.Stop = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _consistent(self) -> JobDoc:
        given = [k for k in GENERATE_FIELDS if getattr(self, k) is not None]
        if given and self.task != "generate":  # it would be silently ignored
            raise refuse(
                "invalid_job",
                f"field(s) {', '.join(given)} are for task 'generate' (this job's task is {shown(self.task)})",
            )
        if self.peers is not None and self.ranks is not None and self.ranks != len(self.peers) + 1:
            raise refuse(
                "invalid_job",
                f"field 'ranks' is {self.ranks} but 'peers' names {len(self.peers)} node(s): ranks is peers + 1",
            )
        return self

    def to_job(self) -> Job:
        """The job the agent runs: the inputs flattened, ``peers`` setting ``ranks``, ``"full"`` as no CR."""
        peers = None if self.peers is None else tuple(self.peers)
        return Job(
            **{name: getattr(self, name) for name in _AS_IS},
            text=self.inputs.texts(),
            images=self.inputs.images(),
            token_ids=self.inputs.rows(),
            cr=None if self.cr == "full" else self.cr,
            cr_given=self.cr is not None,
            ranks=self.ranks if peers is None else len(peers) + 1,
            peers=peers,
            stop=(self.stop,) if isinstance(self.stop, int) else None if self.stop is None else tuple(self.stop),
        )


#: The fields a Job takes from its document as they are.
_AS_IS = ("id", "model", "task", "mode", "objective", "deadline_ms", "method", "min_fidelity", "max_new_tokens",
          "temperature", "top_k", "top_p", "seed")  # fmt: skip
