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

from agent.cluster.peers import Peer
from agent.node.config import Settings, pick_device
from engine.weights import same_weights
from policy.decide import Decision, PeerLink, Policy, Request, decide
from policy.perfmap import MapError, PerfMap, hardware_fingerprint, load_map, mismatches, save_map
from policy.predict import refine

log = structlog.get_logger("prism.policy")
SAVE_EVERY_S = 60.0


class AutoPolicy:
    """The map, what may be trusted of it, and the online corrections."""

    def __init__(
        self, settings: Settings, fingerprints: Mapping[str, float], perf: PerfMap | None, path: Path | None
    ) -> None:
        self.settings = settings
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
        self.policy = Policy(
            max_cr={self.alias.get(m.name, m.name): m.max_cr for m in settings.models if m.max_cr is not None},
            default_max_cr=settings.max_cr,
            idle_w=settings.idle_watts,
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
        request = dataclasses.replace(request, model=name)
        views = [
            PeerLink(
                p.node,
                links.get(p.node, {}).get("mbps"),
                float(links.get(p.node, {}).get("rtt_ms") or 0.0),
                p.load1,
                p.cpus,
                p.queue,
            )
            for p in peers
        ]
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
