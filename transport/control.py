"""Group control messages between agents (``nodes/{node}/control``), typed.

A coordinator forms a GLOO group with ``form`` (the rendezvous itself travels as ``store``
messages, see :mod:`transport.rendezvous`), takes its members' engines in a fixed order with
``reserve``/``grant`` (so two coordinators never wait on each other; a member whose engine is
busy with its own jobs answers ``busy`` at once instead), starts a run with
``run`` and gives engines back with ``release``; ``failed`` tells the coordinator a rank gave
up, ``teardown`` drops the group. While a peer forms a group or holds its engine it says
``beat`` to the coordinator every half second (agent/cluster/beats.py). Every message names
its group (``gid``) and, past formation, the run (``run``), so peers handle each group's
messages on their own.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from transport.schema import WireError

MAX_CONTROL_BYTES = 64 * 1024
_GID = r"^[0-9a-f]{8,32}$"
_NODE = r"^[A-Za-z0-9._:-]{1,128}$"


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    gid: str = Field(pattern=_GID)


class Form(_Msg):
    """Join group ``gid``: ``members`` in rank order, the coordinator first."""

    op: Literal["form"] = "form"
    members: list[Annotated[str, Field(pattern=_NODE)]] = Field(min_length=2, max_length=64)
    timeout_s: float = Field(gt=0, le=600)


class StoreSet(_Msg):
    """One rendezvous key of group ``gid`` (GLOO's address of one rank), base64."""

    op: Literal["store"] = "store"
    key: str = Field(min_length=1, max_length=256)
    value: str = Field(max_length=16 * 1024)


class Reserve(_Msg):
    """Hold your engine for run ``run`` of the group and say ``grant`` when you do."""

    op: Literal["reserve"] = "reserve"
    run: int = Field(ge=0)


class Grant(_Msg):
    """A member's engine is held for run ``run``."""

    op: Literal["grant"] = "grant"
    run: int = Field(ge=0)


class Busy(_Msg):
    """A member's own jobs hold or wait for its engine (``queue`` pieces of work in all): said at
    once instead of ``grant``, and the member keeps no reservation for run ``run``. Older agents
    never say it (they queue behind their jobs, and ``grant`` late)."""

    op: Literal["busy"] = "busy"
    run: int = Field(ge=0)
    queue: int = Field(ge=1, le=1_000_000)


class Run(_Msg):
    """Run your rank of ``spec`` now (the engine was granted for ``run``)."""

    op: Literal["run"] = "run"
    run: int = Field(ge=0)
    spec: dict[str, Any]
    collective_s: float = Field(gt=0, le=600)  # floor of every collective's deadline


class Release(_Msg):
    """Run ``run`` will not happen: give the engine back."""

    op: Literal["release"] = "release"
    run: int = Field(ge=0)


class Failed(_Msg):
    """A member's rank of run ``run`` failed (it dropped the group)."""

    op: Literal["failed"] = "failed"
    run: int = Field(ge=0)
    error: str = Field(max_length=500)


class Beat(_Msg):
    """A peer forming group ``gid`` or holding its engine for it is still there."""

    op: Literal["beat"] = "beat"


class Teardown(_Msg):
    """Forget group ``gid``."""

    op: Literal["teardown"] = "teardown"


Control = Annotated[
    Form | StoreSet | Reserve | Grant | Busy | Run | Release | Failed | Beat | Teardown, Field(discriminator="op")
]
_ADAPTER: TypeAdapter[Control] = TypeAdapter(Control)


def parse_control(body: str) -> Control:
    """One control message from its JSON body; anything malformed is a WireError."""
    if len(body) > MAX_CONTROL_BYTES:
        raise WireError(f"control message of {len(body)} bytes is over the limit of {MAX_CONTROL_BYTES}")
    try:
        return _ADAPTER.validate_json(body)
    except (ValidationError, ValueError, RecursionError) as exc:
        raise WireError(f"malformed control message: {str(exc).splitlines()[0][:160]}") from None


def dump_control(msg: Control) -> str:
    """The JSON body of a control message."""
    return msg.model_dump_json()
