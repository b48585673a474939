"""``decide(request, map, links, loads) -> Decision``: pure, no I/O, no clock (docs/design.md §4).

Every option is predicted from the map: local, full exchange, and each exchange method
(Segment Means, codes) at each profiled CR, over the best 1..k peers. Compute is scaled by
load and speed (a node whose run queue exceeds its cores time-shares them; a peer with
queued jobs makes us wait; a slower peer gets fewer tokens, see policy.shares), and each
option's fidelity is predicted from the profiled one. The objective picks the winner among
the options whose fidelity meets the accuracy floor (local and full exchange are exact),
and the decision says why in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from policy.perfmap import METHODS, PerfMap, option_name
from policy.predict import correction_key, ms_per_token, predict, predict_fidelity
from policy.shares import split

OBJECTIVES = ("latency", "energy")
#: The accuracy floor when neither the job nor the model's settings name one (a cosine).
DEFAULT_MIN_FIDELITY = 0.999
#: A peer's speed relative to this node is held within these factors: a miscalibrated (or
#: untruthful) figure shifts the shares, but never hands one rank nearly every token.
SPEED_RATIO_RANGE = (0.125, 8.0)


@dataclass(frozen=True, slots=True)
class Request:
    """What the job asks for. ``mode`` is auto, local or distributed; ``cr``/``method``/``ranks``
    are the job's overrides (``cr_given`` with ``cr=None`` means full exchange was asked for);
    ``min_fidelity`` is the job's own accuracy floor (a cosine), over the model's;
    ``equal_shares`` keeps every rank's share equal whatever the speeds (e.g. for a job that
    pins its peers, as the profiler's passes do, so cells stay comparable)."""

    model: str
    batch: int
    seq: int
    mode: str = "auto"
    cr: float | None = None
    cr_given: bool = False
    ranks: int | None = None
    objective: str = "latency"
    method: str | None = None
    min_fidelity: float | None = None
    equal_shares: bool = False
    deadline_ms: float | None = None  # time left for the job: the energy objective keeps to it


@dataclass(frozen=True, slots=True)
class PeerLink:
    """A peer that could help: its link (None: not measured yet), its load, and its speed for
    the job's model (``ms_per_token``, what it publishes from its own map; None: unknown)."""

    node: str
    mbps: float | None
    rtt_ms: float = 0.0
    load1: float = 0.0
    cpus: int = 1
    queue: int = 0
    ms_per_token: float | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    """Settings of the choice: the accuracy floor per model (a cosine against the local
    model's output), defaults for unknown links, idle power, the most ranks to use."""

    min_fidelity: dict[str, float] = field(default_factory=dict)
    default_min_fidelity: float = DEFAULT_MIN_FIDELITY
    unknown_mbps: float = 20.0
    idle_w: float = 0.0
    max_ranks: int = 4

    def floor(self, model: str) -> float:
        """The least fidelity ``model``'s jobs accept unless they name their own."""
        return self.min_fidelity.get(model, self.default_min_fidelity)


@dataclass(frozen=True, slots=True)
class Option:
    """One way to run the job and what it is predicted to cost and to be worth."""

    mode: str  # local | full | prism
    cr: float | None
    peers: tuple[str, ...]
    ms: float
    energy_j: float
    mbps: float | None = None  # the link it was predicted for
    method: str | None = None  # means | codes for prism
    fidelity: float | None = None  # predicted cosine vs local (None: not profiled)
    shares: tuple[float, ...] = ()  # tokens per rank, rank order (0: this node)

    @property
    def kind(self) -> str:
        """``local``, ``full``, ``means`` or ``codes``."""
        return (self.method or "means") if self.mode == "prism" else self.mode

    @property
    def name(self) -> str:
        """``local``, ``full``, ``means@CR`` or ``codes@CR``, with ``xP`` for more than 2 ranks."""
        return option_name(self.kind, self.cr, len(self.peers) + 1)


@dataclass(frozen=True, slots=True)
class Decision:
    """The choice, its predicted figures and a short reason. ``predicted_ms`` is None when the
    job forced an option the map cannot predict. ``shares`` are the fraction of tokens per
    rank (rank order, this node first) for ``plan_job(weights=...)``; empty for local."""

    mode: str  # local | distributed (what the service runs)
    cr: float | None
    peers: tuple[str, ...]
    predicted_ms: float | None
    predicted_j: float | None
    reason: str
    option: str
    key: str | None = None
    options: tuple[Option, ...] = ()
    method: str | None = None
    fidelity: float | None = None
    shares: tuple[float, ...] = ()
    min_fidelity: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """What goes into results and logs."""
        ranked = sorted(self.options, key=lambda o: o.ms)
        # the six fastest, and local always (the reference every split is weighed against)
        shown = ranked[:6] + [o for o in ranked[6:] if o.name == "local"][:1]
        return {
            "mode": self.mode,
            "option": self.option,
            "cr": self.cr,
            "method": self.method,
            "peers": list(self.peers),
            "shares": [round(s, 4) for s in self.shares],
            "predicted_ms": None if self.predicted_ms is None else round(self.predicted_ms, 2),
            "predicted_j": None if self.predicted_j is None else round(self.predicted_j, 4),
            "fidelity": None if self.fidelity is None else round(self.fidelity, 5),
            "min_fidelity": self.min_fidelity,
            "reason": self.reason,
            "options": {o.name: round(o.ms, 2) for o in shown},
            "options_fidelity": {o.name: None if o.fidelity is None else round(o.fidelity, 5) for o in shown},
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
    """(kind, cr) options for ``ranks`` devices, narrowed by what the job forced."""
    if req.cr_given and req.cr is None:
        return [("full", None)]
    methods = [req.method] if req.method else list(METHODS)
    if req.cr_given:
        return [(m, req.cr) for m in methods]
    out: list[tuple[str, float | None]] = [] if req.method else [("full", None)]
    for m in methods:
        crs = {c.cr for c in perf.for_model(req.model) if c.kind == m and c.ranks == ranks and c.cr is not None}
        out += [(m, cr) for cr in sorted(crs)]
    return out


def _slowness(peer: PeerLink, own: float | None) -> float:
    """How much longer than this node (unloaded) ``peer`` takes over the same work."""
    low, high = SPEED_RATIO_RANGE
    speed = min(high, max(low, peer.ms_per_token / own)) if own and peer.ms_per_token else 1.0
    return load_factor(peer.load1, peer.cpus, peer.queue) * speed


def _options(req: Request, perf: PerfMap, peers: list[PeerLink], local_factor: float, policy: Policy) -> list[Option]:
    options = []
    local = predict(perf, req.model, req.batch, req.seq, "local", None, 1)
    if local is not None and req.mode != "distributed":
        options.append(Option("local", None, (), local.ms * local_factor, local.energy_j, fidelity=1.0))
    if req.mode == "local" or not peers:
        return options
    own = ms_per_token(perf, req.model)
    # The best peers first: fastest link, then the least slowed by load and speed.
    ranked = sorted(peers, key=lambda p: (-(p.mbps or policy.unknown_mbps), _slowness(p, own)))
    sizes = [req.ranks] if req.ranks else range(2, min(policy.max_ranks, len(peers) + 1) + 1)
    shape = perf.shape(req.model)
    for ranks in sizes:
        if ranks - 1 > len(ranked):
            continue
        chosen = ranked[: ranks - 1]
        mbps = min(p.mbps or policy.unknown_mbps for p in chosen)
        rtt = max(p.rtt_ms for p in chosen)
        slowness = [local_factor, *(_slowness(p, own) for p in chosen)]
        weigh = not req.equal_shares and own is not None and all(p.ms_per_token is not None for p in chosen)
        for kind, cr in _candidates(req, perf, policy, ranks):
            est = predict(
                perf, req.model, req.batch, req.seq, kind, cr, ranks, mbps=mbps, rtt_ms=rtt, idle_w=policy.idle_w
            )
            if est is None:
                continue
            how = split(est.compute_ms, req.seq, slowness, kind, cr, shape, weigh=weigh)
            options.append(
                Option(
                    "full" if kind == "full" else "prism",
                    cr,
                    tuple(p.node for p in chosen),
                    est.ms + how.extra_ms,
                    est.energy_j,
                    mbps,
                    None if kind == "full" else kind,
                    predict_fidelity(perf, req.model, req.batch, req.seq, kind, cr, ranks),
                    how.shares,
                )
            )
    return options


def _why_not(o: Option, floor: float) -> str:
    """Why ``o`` was passed over for accuracy."""
    if o.fidelity is None:
        return f"{o.name} ({fmt_ms(o.ms)}) has no profiled fidelity: re-profile the map to use it"
    return f"{o.name} ({fmt_ms(o.ms)}) has fidelity {o.fidelity:.5f}, below the floor {floor:g}"


def decide(
    req: Request,
    perf: PerfMap,
    peers: list[PeerLink],
    local_load: float = 0.0,
    cpus: int = 1,
    policy: Policy | None = None,
) -> Decision | None:
    """The best option for ``req`` whose fidelity meets the floor; None when the map knows
    nothing of this model/option set.

    A job that insists on splitting (mode distributed) and narrowed the choice (its CR or
    method) so far that no option meets the floor gets the most faithful one left, and the
    reason says so."""
    policy = policy or Policy()
    floor = req.min_fidelity if req.min_fidelity is not None else policy.floor(req.model)
    options = _options(req, perf, peers, load_factor(local_load, cpus), policy)
    if not options:
        return None
    eligible = [o for o in options if o.fidelity is not None and o.fidelity >= floor]
    note = ""
    if not eligible:
        if req.mode != "distributed":
            return None
        best_fid = max(o.fidelity if o.fidelity is not None else -1.0 for o in options)
        eligible = [o for o in options if (o.fidelity if o.fidelity is not None else -1.0) == best_fid]
        note = f"; no option meets the accuracy floor {floor:g}: the most faithful one allowed"
    if req.deadline_ms is not None and req.objective == "energy":
        in_time = [o for o in eligible if o.ms <= req.deadline_ms]
        if in_time and len(in_time) < len(eligible):
            eligible = in_time  # the most frugal of the options that make the deadline
            note += f"; kept to the {fmt_ms(req.deadline_ms)} left of the deadline"
    # On a tie the higher CR wins: fewer bytes on the wire leave more room when the link dips.
    if req.objective == "energy":
        best = min(eligible, key=lambda o: (o.energy_j, o.ms, -(o.cr or 0.0), -(o.fidelity or 0.0)))
    else:
        best = min(eligible, key=lambda o: (o.ms, o.energy_j, -(o.cr or 0.0), -(o.fidelity or 0.0)))
    runner_up = min((o for o in eligible if o is not best), key=lambda o: o.ms, default=None)
    kept = {id(o) for o in eligible}
    passed_over = min((o for o in options if id(o) not in kept and o.ms < best.ms), key=lambda o: o.ms, default=None)
    link = ""
    if best.peers:
        mbps = [p.mbps for p in peers if p.node in best.peers]
        known = [m for m in mbps if m is not None]
        rate = f"{min(known):.0f}" if known and min(known) >= 10 else f"{min(known or [0]):.1f}"
        link = f" over {len(best.peers)} peer(s) at {rate} Mbit/s" if known else " (link not measured yet)"
    reason = f"{req.mode}/{req.objective}: {best.name}{link} predicted {fmt_ms(best.ms)}"
    if best.mode == "prism":
        reason += ", fidelity " + ("unknown" if best.fidelity is None else f"{best.fidelity:.5f}")
    if len(set(best.shares)) > 1:
        reason += ", shares " + "/".join(f"{s:.2f}" for s in best.shares)
    if runner_up is not None:
        reason += f" vs {runner_up.name} {fmt_ms(runner_up.ms)}"
    reason += note
    if passed_over is not None:
        reason += "; " + _why_not(passed_over, floor)
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
        key=correction_key(req.model, best.kind, ranks, best.mbps),
        options=tuple(options),
        method=best.method,
        fidelity=best.fidelity,
        shares=best.shares,
        min_fidelity=floor,
    )
