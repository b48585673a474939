"""The peer table: who is out there, alive, and able to share a job (pure, no I/O, no clock).

Two sources feed it: mDNS adverts and the retained MQTT health of each node (the latter
also works on networks without multicast). Times are passed in, so tests drive it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from engine.weights import same_weights


@dataclass(frozen=True, slots=True)
class Peer:
    """What we know of another node."""

    node: str
    cluster: str
    address: str
    models: dict[str, float] = field(default_factory=dict)  # name -> weight fingerprint
    version: str = ""
    online: bool = True
    last_seen_s: float = 0.0
    load1: float = 0.0
    cpus: int = 1
    queue: int = 0
    queue_for: dict[str, int] = field(default_factory=dict)  # of queue: ranks held for each coordinator
    probe_port: int = 0
    speed: dict[str, float] = field(default_factory=dict)  # model -> local ms per token (its map)
    engine: int = 0  # engine.program.ENGINE_VERSION of the peer (0: unknown, e.g. mDNS only)


class PeerTable:
    """Peers of one cluster, keyed by node id."""

    def __init__(self, cluster: str, me: str, max_age_s: float = 30.0, engine: int = 0) -> None:
        self.cluster = cluster
        self.me = me
        self.max_age_s = max_age_s
        self.engine = engine
        self._peers: dict[str, Peer] = {}
        self._suspended: dict[str, tuple[float, float | None]] = {}  # node -> (until, lifted if heard after)

    def seen(self, peer: Peer, now_s: float) -> bool:
        """Record an advert or health message; returns False when it is ignored."""
        if peer.cluster != self.cluster or peer.node == self.me:
            return False
        old = self._peers.get(peer.node)
        if old is not None and not peer.models:
            peer = replace(peer, models=old.models, speed=old.speed, engine=old.engine)  # mDNS carries none
        self._peers[peer.node] = replace(peer, last_seen_s=now_s, online=True)
        return True

    def offline(self, node: str) -> None:
        """The node said goodbye (Last Will, mDNS removal)."""
        if node in self._peers:
            self._peers[node] = replace(self._peers[node], online=False)

    def get(self, node: str) -> Peer | None:
        """A peer by id."""
        return self._peers.get(node)

    def alive(self, now_s: float) -> list[Peer]:
        """Online peers heard from within ``max_age_s``, least loaded first."""
        fresh = [p for p in self._peers.values() if p.online and now_s - p.last_seen_s <= self.max_age_s]
        return sorted(fresh, key=lambda p: (p.queue, p.load1, p.node))

    def busy(self, node: str, queue: int) -> None:
        """``node`` said its engine is busy, ``queue`` pieces of work on it: that is its queue until it
        is next seen (its health carries its queue). It is not suspended: ``auto`` prices it as busy."""
        peer = self._peers.get(node)
        if peer is not None:
            self._peers[node] = replace(peer, queue=max(peer.queue, queue))

    def suspend(self, node: str, until_s: float, heard_after_s: float | None = None) -> None:
        """Leave ``node`` out of splits until ``until_s`` (it failed to form a group or to answer),
        or, given ``heard_after_s``, until it is heard from after then (it had gone silent)."""
        self._suspended[node] = (until_s, heard_after_s)

    def suspended(self, node: str, now_s: float) -> bool:
        """Is ``node`` left out of splits now?"""
        until_s, lifted_after = self._suspended.get(node, (0.0, None))
        peer = self._peers.get(node)
        if lifted_after is not None and peer is not None and peer.last_seen_s > lifted_after:
            return False
        return until_s > now_s

    def able(self, model: str, fingerprint: float, now_s: float) -> list[Peer]:
        """Alive peers that serve ``model`` with the same weights (and run the same engine version)."""

        def same(p: Peer) -> bool:
            theirs = p.models.get(model)
            return theirs is not None and same_weights(fingerprint, theirs) and p.engine == self.engine

        return [p for p in self.alive(now_s) if same(p) and not self.suspended(p.node, now_s)]

    def all(self) -> list[Peer]:
        """Every peer ever seen, for ``prism-agent peers``."""
        return sorted(self._peers.values(), key=lambda p: p.node)
