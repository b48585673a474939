"""The small error hierarchy shared by every layer of prism-agent."""

from __future__ import annotations

import enum


class PrismError(Exception):
    """Base of every error prism-agent raises on purpose.

    ``code`` is a stable, machine-readable name (it travels in MQTT error results);
    the message is one readable line.
    """

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The one-line human message."""
        return str(self)


class BadRequest(PrismError):
    """The caller asked for something that cannot be done (bad model, CR, shape...)."""

    code = "bad_request"


class ModelError(PrismError):
    """A model could not be found, loaded or recognised."""

    code = "model_error"


class FailureReason(str, enum.Enum):
    """Why a group failed or a split job ran locally instead, typed: a fallback's result carries it
    as ``fallback_reason`` and ``prism_fallbacks_total`` counts it as its ``reason`` label."""

    NO_PEER = "no_peer"  # distributed was asked for; no peer serves the model (same weights, engine)
    ONE_RANK = "one_rank"  # distributed was asked for with ranks 1
    CANNOT_SPLIT = "cannot_split"  # no plan over the ranks (too few tokens for them, ...)
    PEER_OFFLINE = "peer_offline"  # a member went offline (its Last Will, or it left discovery)
    PEER_SILENT = "peer_silent"  # a member stopped saying beat while the coordinator waited on it
    PEER_FAILED = "peer_failed"  # a member reported that its rank failed (``failed``)
    PEER_BUSY = "peer_busy"  # a member's engine was busy with its own jobs: it said so at once (``busy``)
    GRANT_TIMEOUT = "grant_timeout"  # a member did not free its engine in time (or say it was busy)
    ENGINE_BUSY = "engine_busy"  # this node's own engine was not free in time
    FORMATION_FAILED = "formation_failed"  # the rendezvous or the GLOO group could not be built
    COLLECTIVE_TIMEOUT = "collective_timeout"  # a collective passed its deadline (a frozen peer, a cut link)
    COLLECTIVE_FAILED = "collective_failed"  # a collective broke (a connection closed or reset)
    SEALED_REJECTED = "sealed_rejected"  # a sealed message failed authentication
    WEIGHTS_DIFFER = "weights_differ"  # a rank loaded other weights (transport/localcluster.py)
    CONTROL_FAILED = "control_failed"  # a control message could not be sent (no broker)
    DESCRIPTORS = "descriptors"  # every group was dropped to free file descriptors
    NODE_STOPPING = "node_stopping"  # the node is stopping
    CANCELLED = "cancelled"  # the job was cancelled
    TORN_DOWN = "torn_down"  # a peer's group: the coordinator tore it down
    RELEASED = "released"  # a peer's group: the coordinator released the engine mid-run
    NO_RUN = "no_run"  # a peer's group: the engine was held and no run came
    MODEL_NOT_SERVED = "model_not_served"  # a peer's group: a run for a model the peer does not serve
    IDLE = "idle"  # a group unused for ``group_idle_s`` (never a job's fallback)
    INTERNAL = "internal"  # anything else: a bug (the log has its traceback)


class GroupError(PrismError):
    """A distributed group failed: a peer died, a collective timed out, ranks disagree.

    ``reason`` says why, typed; every raise names one (tests/test_failure_reasons.py checks).
    """

    code = "group_error"

    def __init__(self, message: str, *, reason: FailureReason, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.reason = reason
