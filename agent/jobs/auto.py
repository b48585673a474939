"""Auto mode on a node: its performance map, the per-job choice, and learning from results.

The map is loaded once at start. One from other hardware is used with a warning (and says
so in every decision); a model profiled with other weights is not used at all: its jobs get
the interim rule and a reason that says why. Observed latencies correct the map (EWMA per
option); the corrected map is written back atomically now and then, and at stop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from agent.base.config import Settings, pick_device
from agent.cluster.peers import Peer
from engine.weights import same_weights
from policy.decide import Decision, PeerLink, Policy, Request, decide
from policy.perfmap import MapError, PerfMap, hardware_fingerprint, load_map, mismatches, save_map
from policy.predict import ms_per_token, refine
from transport.schema import Job, Mode

log = structlog.get_logger("prism.policy")
SAVE_EVERY_S = 60.0


class AutoPolicy:
    """The map, what may be trusted of it, and the online corrections."""

    def __init__(
        self, settings: Settings, fingerprints: Mapping[str, float], perf: PerfMap | None, path: Path | None
    ) -> None:
        self.settings = settings
        self.fingerprints = dict(fingerprints)
        self.perf = perf
        self.path = path
        self.dirty = False
        self._saved_s = time.monotonic()
        self.foreign_hardware: list[str] = []
        self.untrusted: dict[str, str] = {}
        self.alias: dict[str, str] = {}  # served name -> the map's name for the same weights
        if perf is not None:
            here = hardware_fingerprint(settings.threads, pick_device(settings.device))
            self.foreign_hardware = mismatches(perf, here, {})
            for problem in self.foreign_hardware:
                log.warning("map_other_hardware", problem=problem, hint="re-run prism-agent profile on this node")
            sources = {m.name: m.source for m in settings.models}
            for name, fp in fingerprints.items():
                same = [m for m, theirs in perf.models.items() if same_weights(fp, theirs)]
                if same:
                    self.alias[name] = next((m for m in same if m in (name, sources.get(name))), same[0])
                elif name in perf.models or sources.get(name) in perf.models:
                    self.untrusted[name] = f"model '{name}' was profiled with other weights (interim rule)"
                    log.warning("map_untrusted", model=name, hint="re-run prism-agent profile for this model")
        floors = {self.alias.get(m.name, m.name): m.min_fidelity for m in settings.models if m.min_fidelity}
        self.policy = Policy(
            min_fidelity=floors, default_min_fidelity=settings.min_fidelity, idle_w=settings.idle_watts
        )

    @classmethod
    def load(cls, settings: Settings, fingerprints: Mapping[str, float]) -> AutoPolicy:
        """Read ``settings.map_file`` (none, missing or malformed: auto uses the interim rule)."""
        if not settings.map_file:
            return cls(settings, fingerprints, None, None)
        path = Path(settings.map_file)
        try:
            perf = load_map(path)
        except MapError as exc:
            log.warning("map_unusable", error=str(exc), hint="auto mode uses the interim rule; run prism-agent profile")
            return cls(settings, fingerprints, None, path)
        log.info("map_loaded", file=str(path), cells=len(perf.cells), models=sorted(perf.models))
        return cls(settings, fingerprints, perf, path)

    def why_not(self, model: str) -> str:
        """Why there is no map-based decision for ``model``."""
        if self.perf is None:
            return "no performance map (interim rule)"
        return self.untrusted.get(model) or f"the performance map has no cells for '{model}' (interim rule)"

    @property
    def corrections(self) -> dict[str, float]:
        """The map's online corrections (option key -> observed / predicted); empty without a map."""
        return dict(self.perf.corrections) if self.perf is not None else {}

    def map_name(self, model: str) -> str | None:
        """The map's name for a served model (matched by weights), or None."""
        return self.alias.get(model)

    def speeds(self) -> dict[str, float]:
        """This node's local milliseconds per token for each served model its map knows (health's
        ``speed``: coordinators weight their shares by it)."""
        if self.perf is None:
            return {}
        out = {}
        for name, alias in self.alias.items():
            ms = ms_per_token(self.perf, alias)
            if ms is not None and ms > 0:
                out[name] = ms
        return out

    def _peer_speed(self, peer: Peer, model: str) -> float | None:
        """``peer``'s published speed for the served model ``model`` (its own name for the same weights)."""
        mine = self.fingerprints.get(model)
        if mine is None:
            return None
        for name, theirs in peer.models.items():
            if same_weights(mine, theirs) and name in peer.speed:
                return peer.speed[name]
        return None

    def decide(
        self,
        request: Request,
        peers: list[Peer],
        links: Mapping[str, dict[str, Any]],
        load1: float,
        cpus: int,
    ) -> Decision | None:
        """The map's choice, or None when the map cannot speak for this model."""
        name = self.alias.get(request.model)
        if self.perf is None or name is None:
            return None
        views = [
            PeerLink(
                p.node,
                links.get(p.node, {}).get("mbps"),
                float(links.get(p.node, {}).get("rtt_ms") or 0.0),
                p.load1,
                p.cpus,
                max(0, p.queue - p.queue_for.get(self.settings.node_id, 0)),  # my own ranks are no rivals
                self._peer_speed(p, request.model),
            )
            for p in peers
        ]
        request = dataclasses.replace(request, model=name)
        got = decide(request, self.perf, views, load1, cpus, self.policy)
        if got is None:
            return None
        source = f"performance map {self.path.name}" if self.path is not None else "performance map"
        if self.foreign_hardware:
            source += ", measured on other hardware"
        return dataclasses.replace(got, reason=f"{got.reason} ({source})")

    def observe(self, decision: Decision, observed_ms: float) -> None:
        """Fold a job's engine time into its option's correction."""
        if self.perf is None or decision.key is None or decision.predicted_ms is None:
            return
        before = self.perf.corrections.get(decision.key, 1.0)
        after = refine(self.perf, decision.key, decision.predicted_ms, observed_ms)
        self.dirty = self.dirty or after != before

    def save_if_due(self, force: bool = False) -> None:
        """Write the corrected map back (atomically) at most every minute, or now when forced."""
        if not self.dirty or self.perf is None or self.path is None:
            return
        if not force and time.monotonic() - self._saved_s < SAVE_EVERY_S:
            return
        try:
            save_map(self.perf, self.path)
        except OSError as exc:
            log.warning("map_save_failed", file=str(self.path), error=str(exc))
            return
        self.dirty = False
        self._saved_s = time.monotonic()
        log.info("map_saved", file=str(self.path), corrections=len(self.perf.corrections))


#: Interim rule for ``auto`` when there is no usable performance map: distribute from this
#: batch size up when a peer is available (the Jetson paper's crossover was batch 8), with
#: low-bit codes of every row at 1/8 of full exchange's bytes: near the local answer (a
#: mean cosine of 0.9998 on MiniLM, docs/fidelity.md), where Segment Means lose 0.04-0.08.
AUTO_MIN_BATCH = 8
#: ... or from this many tokens a sample, whatever the batch: one long prompt is work enough to
#: split (GPT-2's 992-token prefill: 1.57x exact, 1.65x under codes@8; docs/benchmarks.md §11).
AUTO_MIN_TOKENS = 512
DEFAULT_CR = 8.0
DEFAULT_METHOD = "codes"


def choose(job: Job, batch: int, peers: int, tokens: int = 0) -> tuple[str, str]:
    """(mode, reason) for a job of ``batch`` samples of ``tokens`` tokens: pure, table-tested."""
    if job.mode is Mode.LOCAL:
        return "local", "requested local"
    if job.ranks == 1:
        return "local", "requested 1 rank"
    if peers == 0:
        return "local", "no peer serves this model with the same weights"
    if job.mode is Mode.DISTRIBUTED:
        return "distributed", "requested distributed"
    if batch >= AUTO_MIN_BATCH:
        return "distributed", f"auto: batch {batch} >= {AUTO_MIN_BATCH} and {peers} peer(s) available"
    if tokens >= AUTO_MIN_TOKENS:
        return "distributed", f"auto: {tokens} tokens >= {AUTO_MIN_TOKENS} and {peers} peer(s) available"
    return "local", f"auto: batch {batch} < {AUTO_MIN_BATCH}, {tokens} tokens < {AUTO_MIN_TOKENS}"


def interim(job: Job, batch: int, peers: list[Peer], why: str, tokens: int = 0) -> Decision:
    """The decision without a usable map (see ``AUTO_MIN_BATCH``): pure, table-tested."""
    mode, reason = choose(job, batch, len(peers), tokens)
    cr = (job.cr if job.cr_given else DEFAULT_CR) if mode == "distributed" else None
    # A CR without a method keeps its old meaning (Segment Means); no CR at all gets the default.
    method = (job.method or ("means" if job.cr_given else DEFAULT_METHOD)) if cr is not None else None
    chosen = tuple(p.node for p in peers[: max(1, (job.ranks or 2) - 1)]) if mode == "distributed" else ()
    option = "local" if mode == "local" else ("full" if cr is None else f"{method}@{cr:g}")
    why_all = f"{reason}; {why}" if why else reason
    return Decision(mode, cr, chosen, None, None, why_all, option, method=method)
