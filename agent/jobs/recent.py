"""The last few jobs a node answered, as its health carries them (``prism-agent top`` shows them).

Each answered job becomes a :class:`~transport.health.RecentJob`: the option the decision
picked, the peers, the predicted and measured engine time, the option's fidelity, and
whether it fell back and why. Only the last :data:`KEEP` are kept, and reasons are cut
short, so the retained health stays small (~3 KB for all of them).
"""

from __future__ import annotations

from collections import deque

from transport.health import RecentJob
from transport.schema import Result

#: Jobs kept (and published in health).
KEEP = 8
#: Characters of a reason kept.
WHY_CHARS = 160


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def recent_job(result: Result, time_s: float) -> RecentJob:
    """What health says about one answered job (``time_s``: wall-clock seconds when answered)."""
    decision = result.decision or {}
    why = decision.get("fallback_reason") or decision.get("reason") or ""
    if result.error is not None:
        why = result.error.message
    return RecentJob(
        id=str(result.id or "")[:128],
        time=time_s,
        ok=result.ok,
        error=None if result.error is None else result.error.code,
        requested=None if decision.get("requested") is None else str(decision["requested"]),
        option=None if decision.get("option") is None else str(decision["option"]),
        mode=result.mode,
        peers=list(result.peers),
        predicted_ms=_number(decision.get("predicted_ms")),
        measured_ms=_number(result.latency_ms.get("engine")),
        total_ms=_number(result.latency_ms.get("total")),
        fidelity=_number(decision.get("fidelity")),
        fallback=result.fallback,
        fallback_reason=None if result.fallback_reason is None else result.fallback_reason.value,
        why=str(why)[:WHY_CHARS],
    )


class RecentJobs:
    """The last :data:`KEEP` answered jobs, oldest first (fed by the metrics' ``job_done``)."""

    def __init__(self, keep: int = KEEP) -> None:
        self._jobs: deque[RecentJob] = deque(maxlen=keep)

    def record(self, result: Result, time_s: float) -> None:
        """Keep one answered job (the oldest kept one goes when full)."""
        self._jobs.append(recent_job(result, time_s))

    def items(self) -> list[RecentJob]:
        """The kept jobs, oldest first."""
        return list(self._jobs)
