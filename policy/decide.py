"""``decide(request, map, links, loads) -> Decision``: pure, no I/O, no clock (DESIGN.md §4).

Every option is predicted from the map: local, full exchange and PRISM at each profiled CR
up to the model's accuracy floor, over the best 1..k peers. Compute is scaled by load
(a node whose run queue exceeds its cores time-shares them; a peer with queued jobs makes
us wait), the objective picks the winner, and the decision says why in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policy.perfmap import PerfMap
from policy.predict import Estimate, correction_key, predict

OBJECTIVES = ("latency", "energy")


@dataclass(frozen=True, slots=True)
class Request:
    """What the job asks for. ``mode`` is auto, local or distributed; ``cr``/``ranks`` are the
    job's overrides (``cr_given`` with ``cr=None`` means full exchange was asked for)."""

    model: str
    batch: int
    seq: int
    mode: str = "auto"
    cr: float | None = None
    cr_given: bool = False
    ranks: int | None = None
    objective: str = "latency"


@dataclass(frozen=True, slots=True)
class PeerLink:
    """A peer that could help: its link (None: not measured yet) and its load."""

    node: str
    mbps: float | None
    rtt_ms: float = 0.0
    load1: float = 0.0
    cpus: int = 1
    queue: int = 0


@dataclass(frozen=True, slots=True)
class Policy:
    """Settings of the choice: accuracy floor per model, defaults for unknown links, idle power."""

    max_cr: dict[str, float] = field(default_factory=dict)
    default_max_cr: float = 10.0
    unknown_mbps: float = 20.0
    idle_w: float = 0.0
    max_ranks: int = 4

    def cr_ceiling(self, model: str) -> float:
        """The largest CR allowed for ``model`` (its accuracy floor)."""
        return self.max_cr.get(model, self.default_max_cr)


@dataclass(frozen=True, slots=True)
class Option:
    """One way to run the job and what it is predicted to cost."""

    mode: str  # local | full | prism
    cr: float | None
    peers: tuple[str, ...]
    ms: float
    energy_j: float
    mbps: float | None = None  # the link it was predicted for

    @property
    def name(self) -> str:
        """``local``, ``full`` or ``prism@CR``, with ``xP`` for more than 2 ranks."""
        base = self.mode if self.mode != "prism" else f"prism@{self.cr:g}"
        return base if len(self.peers) <= 1 else f"{base}x{len(self.peers) + 1}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The choice, its predicted figures and a short reason. ``predicted_ms`` is None when the
    job forced an option the map cannot predict."""

    mode: str  # local | distributed (what the service runs)
    cr: float | None
    peers: tuple[str, ...]
    predicted_ms: float | None
    predicted_j: float | None
    reason: str
    option: str
    key: str | None = None
    options: tuple[Option, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """What goes into results and logs."""
        return {
            "mode": self.mode,
            "option": self.option,
            "cr": self.cr,
            "peers": list(self.peers),
            "predicted_ms": None if self.predicted_ms is None else round(self.predicted_ms, 2),
            "predicted_j": None if self.predicted_j is None else round(self.predicted_j, 4),
            "reason": self.reason,
            "options": {o.name: round(o.ms, 2) for o in sorted(self.options, key=lambda o: o.ms)[:6]},
        }


def fmt_ms(ms: float) -> str:
    """Milliseconds as a person reads them: ``0.44 ms``, ``3.2 ms``, ``41 ms`` (never ``0 ms``)."""
    if ms < 1:
        return f"{ms:.2f} ms"
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def load_factor(load1: float, cpus: int, queue: int = 0) -> float:
    """How much slower compute runs: time-sharing past the cores, plus jobs queued ahead."""
    return max(1.0, load1 / max(1, cpus)) * (1 + max(0, queue))


def _candidates(req: Request, perf: PerfMap, policy: Policy, ranks: int) -> list[tuple[str, float | None]]:
    """(mode, cr) options for ``ranks`` devices: full exchange and every profiled CR in bounds."""
    if req.cr_given:
        return [("full", None)] if req.cr is None else [("prism", req.cr)]
    crs = {c.cr for c in perf.for_model(req.model) if c.mode == "prism" and c.ranks == ranks and c.cr is not None}
    ceiling = policy.cr_ceiling(req.model)
    return [("full", None), *(("prism", cr) for cr in sorted(crs) if cr <= ceiling)]


def _options(req: Request, perf: PerfMap, peers: list[PeerLink], local_factor: float, policy: Policy) -> list[Option]:
    options = []
    local = predict(perf, req.model, req.batch, req.seq, "local", None, 1)
    if local is not None and req.mode != "distributed":
        options.append(Option("local", None, (), local.ms * local_factor, local.energy_j))
    if req.mode == "local" or not peers:
        return options
    # The best peers first: fastest link, then least loaded.
    ranked = sorted(peers, key=lambda p: (-(p.mbps or policy.unknown_mbps), load_factor(p.load1, p.cpus, p.queue)))
    sizes = [req.ranks] if req.ranks else range(2, min(policy.max_ranks, len(peers) + 1) + 1)
    for ranks in sizes:
        if ranks - 1 > len(ranked):
            continue
        chosen = ranked[: ranks - 1]
        mbps = min(p.mbps or policy.unknown_mbps for p in chosen)
        rtt = max(p.rtt_ms for p in chosen)
        factor = max([local_factor, *(load_factor(p.load1, p.cpus, p.queue) for p in chosen)])
        for mode, cr in _candidates(req, perf, policy, ranks):
            est = predict(
                perf, req.model, req.batch, req.seq, mode, cr, ranks, mbps=mbps, rtt_ms=rtt, idle_w=policy.idle_w
            )
            if est is not None:
                peers_used = tuple(p.node for p in chosen)
                options.append(Option(mode, cr, peers_used, _loaded(est, factor), est.energy_j, mbps))
    return options


def _loaded(est: Estimate, factor: float) -> float:
    return est.ms + est.compute_ms * (factor - 1)


def decide(
    req: Request,
    perf: PerfMap,
    peers: list[PeerLink],
    local_load: float = 0.0,
    cpus: int = 1,
    policy: Policy | None = None,
) -> Decision | None:
    """The best option for ``req``; None when the map knows nothing of this model/option set."""
    policy = policy or Policy()
    options = _options(req, perf, peers, load_factor(local_load, cpus), policy)
    if not options:
        return None
    # On a tie the higher CR wins: fewer bytes on the wire leave more room when the link dips.
    if req.objective == "energy":
        best = min(options, key=lambda o: (o.energy_j, o.ms, -(o.cr or 0.0)))
    else:
        best = min(options, key=lambda o: (o.ms, o.energy_j, -(o.cr or 0.0)))
    runner_up = min((o for o in options if o is not best), key=lambda o: o.ms, default=None)
    link = ""
    if best.peers:
        mbps = [p.mbps for p in peers if p.node in best.peers]
        known = [m for m in mbps if m is not None]
        rate = f"{min(known):.0f}" if known and min(known) >= 10 else f"{min(known or [0]):.1f}"
        link = f" over {len(best.peers)} peer(s) at {rate} Mbit/s" if known else " (link not measured yet)"
    reason = f"{req.mode}/{req.objective}: {best.name}{link} predicted {fmt_ms(best.ms)}"
    if runner_up is not None:
        reason += f" vs {runner_up.name} {fmt_ms(runner_up.ms)}"
    if not peers and req.mode != "local":
        reason += "; no peer serves this model with the same weights"
    ranks = len(best.peers) + 1
    return Decision(
        mode="local" if best.mode == "local" else "distributed",
        cr=best.cr,
        peers=best.peers,
        predicted_ms=best.ms,
        predicted_j=best.energy_j,
        reason=reason,
        option=best.name,
        key=correction_key(req.model, best.mode, ranks, best.mbps),
        options=tuple(options),
    )
