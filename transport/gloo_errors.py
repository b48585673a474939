"""GLOO's errors as :class:`~engine.errors.GroupError` with their :class:`~engine.errors.FailureReason`.

GLOO raises a bare ``RuntimeError`` for everything; only its text tells a wait that passed its
deadline ("Timed out waiting ...") from a broken connection ("Connection closed by peer").
"""

from __future__ import annotations

from engine.errors import FailureReason, GroupError


def formation_error(message: str) -> GroupError:
    """The rendezvous or the GLOO group could not be built."""
    return GroupError(message, reason=FailureReason.FORMATION_FAILED)


def collective_error(what: str, rank: int, exc: BaseException) -> GroupError:
    """Collective ``what`` failed on ``rank``: past its deadline, or broken."""
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    timed_out = "timed out" in first.lower()
    reason = FailureReason.COLLECTIVE_TIMEOUT if timed_out else FailureReason.COLLECTIVE_FAILED
    return GroupError(f"GLOO {what} failed on rank {rank}: {first}", reason=reason)
