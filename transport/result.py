"""A job's result on the wire, typed (docs/design.md §5.1; its JSON Schema is docs/schema/result.json).

Its dump (:meth:`Result.to_dict`) is the wire form: ``"v"`` first, ``cr`` ``"full"`` for a distributed run that
exchanged every row, ``fallback_reason`` as its code, and ``final``/``seq`` only on a generate
job's last message. A client reads a result back with ``Result.model_validate(data)``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
)

from engine.errors import FailureReason
from transport.job import SCHEMA_VERSION

_GENERATE_ONLY = {"final", "seq"}
#: A fallback's reason on the wire: its code (the schema lists them).
_REASON_CODES: Any = Literal[tuple(reason.value for reason in FailureReason)]


class _Doc(BaseModel):
    # Fields a newer agent adds are ignored by an older reader.
    model_config = ConfigDict(frozen=True, extra="ignore")


class ErrorInfo(_Doc):
    """Why a job failed: a stable code and one readable line."""

    code: str = Field(description="bad_payload, invalid_job, too_large, unknown_model, bad_request, ...")
    message: str = Field(description="one readable line")


class Result(_Doc):
    """What a job gets back (the ``results/{id}`` or response-topic payload)."""

    model_config = ConfigDict(title="Result")

    v: Literal[1] = Field(default=SCHEMA_VERSION, description="the schema version")
    id: str | None = Field(description="the job's id (null: the job had no readable one)")
    ok: bool
    error: ErrorInfo | None = Field(default=None, description="why the job failed (null when ok)")
    output: dict[str, Any] | None = Field(default=None, description="what the task computed, by task")
    mode: str | None = Field(default=None, description="what ran: local or distributed")
    cr: float | None = Field(default=None, description="the compression ratio of a split ('full': every row exchanged)")
    method: str | None = Field(default=None, description="how a split compressed: means, codes or kv")
    peers: tuple[str, ...] = Field(default=(), description="the nodes the job was split with")
    latency_ms: dict[str, float] = Field(default_factory=dict, description="where the time went")
    decision: dict[str, Any] | None = Field(default=None, description="what was decided and why")
    fallback: bool = Field(default=False, description="a split that ran locally instead")
    fallback_reason: FailureReason | None = Field(default=None, description="why a split ran locally (a code)")
    node: str | None = Field(default=None, description="the node that answered")
    energy: dict[str, Any] | None = Field(default=None, description="the energy the job took on this node")
    final: bool | None = Field(default=None, description="a generate job's last message (only on generate jobs)")
    seq: int | None = Field(default=None, description="with final: how many partials came before it")

    @classmethod
    def failure(cls, job_id: str | None, code: str, message: str, node: str | None = None) -> Result:
        """An error result."""
        return cls(id=job_id, ok=False, error=ErrorInfo(code=code, message=message), node=node)

    @field_validator("cr", mode="before")
    @classmethod
    def _full_is_none(cls, value: Any) -> Any:
        return None if value == "full" else value

    @field_serializer("cr")
    def _full(self, cr: float | None) -> float | Literal["full"] | None:
        # A split without compression exchanged every row: the sender asked "full" or auto chose it.
        return "full" if self.mode == "distributed" and cr is None else cr

    @field_serializer("peers")
    def _peer_list(self, peers: tuple[str, ...]) -> list[str]:
        return list(peers)

    @field_serializer("fallback_reason", return_type=_REASON_CODES | None)
    def _reason_code(self, reason: FailureReason | None) -> str | None:
        return None if reason is None else reason.value

    def to_dict(self) -> dict[str, Any]:
        """The wire form (JSON-compatible): ``final`` and ``seq`` only on a generate job's last message."""
        return self.model_dump(exclude=None if self.final is not None else _GENERATE_ONLY)

    def encode(self, as_msgpack: bool = False) -> bytes:
        """Serialised in the requester's format."""
        data = self.to_dict()
        if as_msgpack:
            return bytes(msgpack.packb(data, use_bin_type=True))
        return json.dumps(data, separators=(",", ":")).encode()
