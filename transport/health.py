"""The retained health document of a node (``nodes/{node}/health``), typed.

Built by the node every ``health_interval_s`` and read by its peers (admission, load and
links for the policy), by ``prism-agent peers`` and by the profiler. Who the node is, where
it listens and which weights it serves are repeated under ``admission``, signed, and only
those signed fields are trusted by peers when a cluster secret is set.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from transport.schema import WireError

MAX_HEALTH_BYTES = 256 * 1024


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


class Load(_Doc):
    """CPU, memory, GPU and the engine queue of a node."""

    cpus: int = Field(default=1, ge=1)
    load1: float | None = None
    load5: float | None = None
    mem_total_mb: int | None = None
    mem_available_mb: int | None = None
    gpu_load: float | None = None
    power_mode: str | None = None
    queue: int = Field(default=0, ge=0)
    # Of the queue: ranks held or awaited for each coordinator's runs (a coordinator does not
    # count its own as a rival when it prices its next split).
    queue_for: dict[Annotated[str, Field(max_length=128)], Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, max_length=64
    )


class LinkView(_Doc):
    """One peer's link as the node measured it."""

    rtt_ms: float | None = None
    mbps: float | None = None
    age_s: float | None = None
    gloo_mbps: float | None = None
    samples: int = 0
    source: str = ""
    # How far probes stray from the estimate (EWMA of |sample - estimate|, as TCP's RTTVAR).
    mbps_err: float | None = None


#: Recent jobs a reader keeps of a health document (a node sends fewer, agent/jobs/recent.py);
#: more are dropped, not refused, so a newer node that sends more still admits to older peers.
MAX_RECENT = 32


class RecentJob(_Doc):
    """One job this node answered lately: what was decided, and how it went."""

    id: str = ""
    time: float = 0.0  # wall-clock seconds when it was answered
    ok: bool = True
    error: str | None = None  # the error code of a failed job
    requested: str | None = None  # the mode asked for
    option: str | None = None  # what the decision picked (local, full, means@8, codes@8, ...)
    mode: str | None = None  # what ran: local or distributed
    peers: list[str] = Field(default_factory=list)
    predicted_ms: float | None = None  # the map's prediction of the engine time (None: the interim rule)
    measured_ms: float | None = None  # the engine time it took
    total_ms: float | None = None  # from intake to answer
    fidelity: float | None = None  # the option's profiled cosine against local
    fallback: bool = False  # a split that ran locally instead
    fallback_reason: str | None = None  # its code (the result's fallback_reason: peer_offline, peer_busy, ...)
    why: str = ""  # the fallback's reason in words, else the decision's


class ClockView(_Doc):
    """How this node's clock compares with its peers' (agent/cluster/skew.py), from their signed
    messages: seconds each peer's clock is ahead of this node's (behind: negative)."""

    max_skew_s: float | None = None  # the difference accepted either way (None: an open cluster)
    ahead_s: dict[Annotated[str, Field(max_length=128)], float] = Field(default_factory=dict, max_length=256)
    refused: dict[Annotated[str, Field(max_length=128)], float] = Field(default_factory=dict, max_length=256)


class Health(_Doc):
    """What a node says about itself (see the module docstring)."""

    node: str
    time: float
    version: str = ""
    engine: int = 0  # engine.program.ENGINE_VERSION: splits only between equal versions
    boot: str = ""
    load: Load = Field(default_factory=Load)
    energy_source: str = ""
    jobs: dict[str, int] = Field(default_factory=dict)
    models: list[str] = Field(default_factory=list)
    fingerprints: dict[str, float] = Field(default_factory=dict)
    families: dict[str, str] = Field(default_factory=dict)
    hardware: dict[str, Any] = Field(default_factory=dict)
    address: str = ""
    peers: list[str] = Field(default_factory=list)
    links: dict[str, LinkView] = Field(default_factory=dict)
    probe_port: int = Field(default=0, ge=0, le=65535)
    loops: dict[str, int] = Field(default_factory=dict)  # background loop -> restarts after a crash
    speed: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)  # model -> ms per token
    admission: dict[str, str] = Field(default_factory=dict)
    recent: list[RecentJob] = Field(default_factory=list)  # newest last
    clock: ClockView = Field(default_factory=ClockView)

    @field_validator("recent", mode="before")
    @classmethod
    def _last_few(cls, value: Any) -> Any:
        return value[-MAX_RECENT:] if isinstance(value, list) else value

    def encode(self) -> bytes:
        """JSON bytes for the retained topic."""
        return self.model_dump_json(exclude_none=False).encode()


def parse_health(payload: bytes) -> Health:
    """A health document from the wire; anything malformed is a WireError (never another exception)."""
    if len(payload) > MAX_HEALTH_BYTES:
        raise WireError(f"health of {len(payload)} bytes is over the limit of {MAX_HEALTH_BYTES}")
    try:
        return Health.model_validate_json(payload)
    except (ValidationError, ValueError, RecursionError) as exc:
        raise WireError(f"malformed health: {str(exc).splitlines()[0][:160]}") from None


def parse_status(payload: bytes) -> tuple[str, dict[str, str] | None]:
    """A ``nodes/{node}/status`` payload: (``online``/``offline``/``unknown``, its signed fields
    when it has some; a cluster with a secret signs its status, an open one says plain words)."""
    if payload in (b"online", b"offline"):
        return payload.decode(), None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return "unknown", None
    if not isinstance(data, dict) or data.get("status") not in ("online", "offline"):
        return "unknown", None
    return str(data["status"]), {str(k): str(v) for k, v in data.items()}
