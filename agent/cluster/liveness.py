"""Unsigned goodbyes: a check of the node, never an eviction.

With a cluster secret only signed evidence drops a peer: its own signed goodbye (a clean
stop's ``offline`` or its Last Will), or signed health missing for longer than the peer
table's ``max_age_s`` (the table then leaves it out of splits; a group's beats have already
failed a run with it). An unsigned goodbye (an mDNS removal, or an unsigned ``offline`` on the
broker, which any host on the LAN can send) triggers a check: a ping of the node's probe
server. The check cannot drop the node either: a probe server that does not answer may be
full (its 32 slots are easy to hold) or the path lossy, so no answer is "unknown" and the
node keeps its place, in the table and in its groups. Checks are de-duplicated and
rate-limited per node (:class:`Checks`), so a flood of goodbyes costs at most one ping every
:data:`CHECK_EVERY_S`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from agent.cluster.peers import PeerTable
from agent.cluster.probes import answers

log = structlog.get_logger("prism.liveness")
#: A node is checked at most this often, whatever the number of goodbyes naming it.
CHECK_EVERY_S = 10.0
#: Pings of one check (each up to ``answers``' own timeout).
CHECK_TRIES = 2


class Checks:
    """Which nodes may be checked now: one check per node at a time, and at most one per
    ``every_s`` (pure, no clock: times are passed in)."""

    def __init__(self, every_s: float = CHECK_EVERY_S) -> None:
        self.every_s = every_s
        self._started: dict[str, float] = {}
        self._running: set[str] = set()

    def begin(self, node: str, now_s: float) -> bool:
        """Start a check of ``node`` unless one is running or began under ``every_s`` ago."""
        if node in self._running or now_s - self._started.get(node, -self.every_s) < self.every_s:
            return False
        self._running.add(node)
        self._started[node] = now_s
        return True

    def end(self, node: str) -> None:
        """The check of ``node`` is over."""
        self._running.discard(node)


class Liveness:
    """Checks the nodes unsigned goodbyes name (see the module docstring)."""

    def __init__(
        self,
        peers: PeerTable,
        spawn: Callable[[Coroutine[Any, Any, None], str], Any] | None,
        checks: Checks | None = None,
    ) -> None:
        self.peers = peers
        self.spawn = spawn
        self.checks = checks or Checks()

    def doubt(self, node: str, via: str) -> None:
        """An unsigned goodbye of ``node`` came ``via`` mdns or status: check it, at most once
        every :data:`CHECK_EVERY_S`."""
        peer = self.peers.get(node)
        if peer is None or not peer.online or not peer.probe_port or self.spawn is None:
            return
        if not self.checks.begin(node, time.monotonic()):
            return  # checked or being checked: a flood costs nothing more
        log.info("goodbye_unsigned", node=node, via=via, action="checking it")
        try:
            self.spawn(self._check(node, peer.address, peer.probe_port), f"check-{node}")
        except RuntimeError:  # the node is stopping
            self.checks.end(node)

    async def _check(self, node: str, address: str, port: int) -> None:
        try:
            for _ in range(CHECK_TRIES):
                if await answers(address, port):
                    log.info("goodbye_ignored", node=node, why="it still answers")
                    return
            log.warning(
                "goodbye_unverified",
                node=node,
                why="its probe server did not answer (full, or the path is down)",
                action="kept until its signed health stops",
            )
        finally:
            self.checks.end(node)
