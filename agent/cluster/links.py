"""Links to peers: smoothed estimates from active probes and GLOO transfers, and the probe loop.

Estimates are EWMA-smoothed and carry their age; a step change (a WiFi rate switch, a
reshaped link) replaces the estimate at once. The probe loop times a transfer to every
alive peer every ``probe_interval_s``, sized to the link (one too small to read it is
followed at once by one sized to what it read); an address that is not a prism
probe server (or does not answer) is left alone for ``probe_backoff_s`` (a minute). A peer
this node is running a split with is not probed, and a probe that a run overlapped is thrown
away: it would read only what the run's exchanges left of the link (a quarter of a 20 Mbit/s
link, measured), and the policy would price the next split on that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.cluster.peers import Peer, PeerTable
from agent.cluster.probes import SlowLink, probe, probe_bytes
from engine.trace import RankTrace

log = structlog.get_logger("prism.links")
#: How long an address whose probe failed is left alone.
PROBE_BACKOFF_S = 60.0
#: While the engine works, a link is probed only once its estimate is this many rounds old.
STALE_ROUNDS = 5
#: A probe whose payload was under this share of what its own reading calls for timed mostly
#: TCP's slow start: the link is probed again at once, with the payload its reading asks for
#: (at most ``RESIZES`` times a round). A first probe of 256 KiB read a veth link that carries
#: 2-3 Gbit/s at 307 Mbit/s, and the policy priced splits on that until the next round (30 s).
UNDERSIZED = 0.25
RESIZES = 2


@dataclass(slots=True)
class LinkEstimate:
    """Smoothed RTT and bandwidth to one peer, with when they were last measured."""

    rtt_ms: float | None = None
    mbps: float | None = None
    measured_s: float | None = None
    samples: int = 0
    source: str = ""
    gloo_mbps: float | None = None
    mbps_err: float | None = None  # EWMA of |sample - estimate| (Mbit/s), as TCP's RTTVAR


@dataclass(slots=True)
class LinkTable:
    """Per-peer link estimates, EWMA-smoothed (``alpha`` weights the newest sample);
    ``probe_backoff_s``: how long the probe loop leaves an address whose probe failed."""

    alpha: float = 0.3
    probe_backoff_s: float = PROBE_BACKOFF_S
    links: dict[str, LinkEstimate] = field(default_factory=dict)

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def observe(
        self, peer: str, now_s: float, *, rtt_ms: float | None = None, mbps: float | None = None, source: str
    ) -> None:
        """Fold in one measurement (an active probe, or bytes/time of a GLOO exchange)."""
        link = self.links.setdefault(peer, LinkEstimate())
        if rtt_ms is not None:
            link.rtt_ms = self._ewma(link.rtt_ms, rtt_ms)
        if mbps is not None:
            # A step change (a WiFi rate switch, a reshaped link) replaces the estimate at once.
            stepped = link.mbps is not None and not 0.5 <= mbps / max(link.mbps, 1e-9) <= 2.0
            # The error is how far a sample lands from the estimate it is about to move (a first
            # sample or a step has no history to stray from: 0 until the next sample says).
            miss = 0.0 if link.mbps is None or stepped else abs(mbps - link.mbps)
            link.mbps_err = miss if link.mbps_err is None or stepped else self._ewma(link.mbps_err, miss)
            link.mbps = mbps if stepped else self._ewma(link.mbps, mbps)
        link.measured_s = now_s
        link.samples += 1
        link.source = source

    def observe_gloo(self, peer: str, now_s: float, mbps: float) -> None:
        """Bytes over time of a GLOO job: a lower bound on the link, kept apart from the probes'."""
        link = self.links.setdefault(peer, LinkEstimate())
        link.gloo_mbps = self._ewma(link.gloo_mbps, mbps)

    def observe_run(self, peers: list[str], mine: RankTrace, now_s: float) -> None:
        """What crossed a GLOO run with ``peers`` (``mine``: this rank's trace) feeds each one's link."""
        if mine.link_s > 0 and mine.exchange_bytes_recv > 0:
            # Bytes over exchange time: a lower bound (it waits for the slower rank), kept beside the probes'.
            mbps = (mine.exchange_bytes_recv + mine.exchange_bytes_sent) * 8 / mine.link_s / 1e6
            for peer in peers:
                self.observe_gloo(peer, now_s, mbps)

    def report(self, now_s: float) -> dict[str, dict[str, Any]]:
        """JSON view for health: per peer, RTT, bandwidth (and its error) and age in seconds."""
        return {
            peer: {
                "rtt_ms": None if link.rtt_ms is None else round(link.rtt_ms, 3),
                "mbps": None if link.mbps is None else round(link.mbps, 1),
                "age_s": None if link.measured_s is None else round(now_s - link.measured_s, 1),
                "gloo_mbps": None if link.gloo_mbps is None else round(link.gloo_mbps, 1),
                "mbps_err": None if link.mbps_err is None else round(link.mbps_err, 1),
                "samples": link.samples,
                "source": link.source,
            }
            for peer, link in sorted(self.links.items())
        }


#: Whether a run with a node is on now, and how many this node has begun with it so far.
RunsWith = Callable[[str], tuple[bool, int]]


async def probe_loop(
    peers: PeerTable,
    links: LinkTable,
    interval_s: float,
    runs: RunsWith = lambda node: (False, 0),
    busy: Callable[[], bool] = lambda: False,
) -> None:
    """Forever: probe every alive peer (see the module docstring); an address whose probe failed
    is left alone for ``links.probe_backoff_s``. ``runs(node)``: whether a
    run with ``node`` is on now, and how many this node has begun with it so far. ``busy()``:
    whether this node's engine is working; then a peer whose estimate is younger than
    :data:`STALE_ROUNDS` rounds is left for later (a probe's bulk transfer costs the job CPU)."""
    failed: dict[tuple[str, int], float] = {}
    backoff_s = links.probe_backoff_s
    while True:
        now = time.monotonic()
        for peer in peers.alive(now):
            target = (peer.address, peer.probe_port)
            on, begun = runs(peer.node)
            if not peer.probe_port or on or now - failed.get(target, -backoff_s) < backoff_s:
                continue
            estimate = links.links.get(peer.node)
            measured = None if estimate is None else estimate.measured_s
            if measured is not None and busy() and now - measured < STALE_ROUNDS * interval_s:
                continue
            size = probe_bytes(estimate.mbps if estimate else None)
            for _ in range(1 + RESIZES):
                size = await _measure(peer, target, size, links, runs, begun, failed)
                if not size or busy():  # read well enough, or the engine took work meanwhile
                    break
        await asyncio.sleep(interval_s)


async def _measure(
    peer: Peer,
    target: tuple[str, int],
    size: int,
    links: LinkTable,
    runs: RunsWith,
    begun: int,
    failed: dict[tuple[str, int], float],
) -> int:
    """Probe ``peer`` at ``target`` with ``size`` bytes and fold in what it read; the payload
    to probe with again at once when this one was too small to read the link, else 0."""
    try:
        rtt_ms, mbps = await probe(*target, payload_bytes=size)
    except SlowLink as slow:  # a prism agent on a link that got slower: size down, no backoff
        if runs(peer.node) == (False, begun):
            links.observe(peer.node, time.monotonic(), mbps=slow.mbps, source="probe-bound")
        return 0
    except (OSError, asyncio.TimeoutError) as exc:
        failed[target] = time.monotonic()
        log.info("probe_failed", peer=peer.node, error=str(exc)[:120] or type(exc).__name__)
        return 0
    failed.pop(target, None)
    if runs(peer.node) != (False, begun):  # a run overlapped it
        return 0
    links.observe(peer.node, time.monotonic(), rtt_ms=rtt_ms, mbps=mbps, source="probe")
    wanted = probe_bytes(mbps)
    return wanted if size < UNDERSIZED * wanted else 0
