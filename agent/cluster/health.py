"""Health: what this node publishes about itself, and what it makes of other nodes' health and status.

The retained health document (transport/health.py) carries load, queue (the engine's:
local jobs and ranks run for others alike), models, links, counters and the last jobs' decisions; who the node is,
where it listens and which weights it serves are repeated under ``admission``, signed, and
only those signed fields decide who a peer is. A node's ``offline`` status (clean stop or
Last Will) drops it from the peer table and from every group it is in.

With a cluster secret, health and status are signed and checked for freshness and replays
(agent/cluster/trust.py): a node is dropped on its own signed goodbye only, and an
unsigned ``offline`` (which anyone on the broker can publish) triggers a check of the node
(agent/cluster/liveness.py), never a drop.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import structlog

from agent.cluster.admission import Admission
from agent.cluster.clock import wall_s
from agent.cluster.freshness import STATUS
from agent.cluster.liveness import Liveness
from agent.cluster.peers import Peer, PeerTable
from agent.cluster.trust import Trust
from transport.health import ClockView, Health, LinkView, Load, RecentJob, parse_health, parse_status
from transport.schema import WireError

log = structlog.get_logger("prism.health")


def signed_identity(
    admission: Admission, node: str, address: str, fingerprints: Mapping[str, float], probe_port: int
) -> dict[str, str]:
    """The fields peers trust: who, where, which weights, which probe port (signed when there is a secret)."""
    fields = {
        "node": node,
        "address": address,
        "fingerprints": json.dumps(dict(fingerprints), sort_keys=True),
        "probe_port": str(probe_port),
    }
    return admission.sign(fields, wall_s())


def status_payload(trust: Trust, node: str, state: str, seq: int | None = None) -> bytes:
    """What ``nodes/{node}/status`` says: plain ``online``/``offline`` in an open cluster, a
    signed JSON object with a secret (``seq``: the connection's, for a Last Will and its online)."""
    if trust.open:
        return state.encode()
    signed = trust.admission.sign({"node": node, "status": state}, wall_s(), seq=seq)
    return json.dumps(signed, separators=(",", ":")).encode()


class Observer:
    """Other nodes' health and status, into the peer table; departures reported to ``on_gone``;
    doubtful ones (an unsigned goodbye in a cluster with a secret) to ``check``."""

    def __init__(
        self,
        me: str,
        cluster: str,
        peers: PeerTable,
        trust: Trust,
        on_gone: Callable[[set[str]], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], Any] | None = None,
    ) -> None:
        self.me = me
        self.cluster = cluster
        self.peers = peers
        self.trust = trust
        self.on_gone = on_gone
        self.liveness = Liveness(peers, spawn)

    def check(self, node: str, via: str = "mdns") -> None:
        """A doubtful goodbye of ``node``: a check, never a drop (agent/cluster/liveness.py)."""
        self.liveness.doubt(node, via)

    def status(self, node: str, payload: bytes) -> None:
        """``nodes/{node}/status``: a goodbye drops the node (see the module docstring)."""
        if node == self.me:
            return
        state, fields = parse_status(payload)
        now = wall_s()
        if state == "online" and fields is not None:
            self.trust.accept(fields, node, STATUS, now, max_age_s=-1)  # its sequence dates its goodbye
            return
        if state != "offline":
            return
        if fields is None and not self.trust.open:
            self.check(node, "status")
            return
        if fields is not None and not self.trust.gone(fields, node, now):
            log.warning("admission_refused", node=node, via="status", why="a stale or forged goodbye")
            return
        self.gone(node)

    def gone(self, node: str) -> None:
        """``node`` is gone (a trusted goodbye)."""
        self.peers.offline(node)
        self.on_gone({node})

    def health(self, node: str, payload: bytes) -> None:
        """``nodes/{node}/health``: admit or refresh the peer from its signed fields."""
        if node == self.me:
            return
        try:
            doc = parse_health(payload)
            signed = doc.admission
            if signed.get("node") != node or not self.trust.accept(signed, node, "health", wall_s()):
                log.warning("admission_refused", node=node, via="health")
                return
            peer = Peer(
                node=node,
                cluster=self.cluster,
                address=signed["address"],
                models={str(k): float(v) for k, v in json.loads(signed["fingerprints"]).items()},
                version=doc.version,
                load1=float(doc.load.load1 or 0.0),
                cpus=doc.load.cpus,
                queue=doc.load.queue,
                queue_for=dict(doc.load.queue_for),
                probe_port=int(signed["probe_port"]),
                speed=dict(doc.speed),
                engine=doc.engine,
            )
        except (WireError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.info("health_ignored", node=node, error=str(exc)[:120])
            return
        if self.peers.get(node) is None:
            log.info("peer_seen", node=node, address=peer.address, via="mqtt")
        self.peers.seen(peer, time.monotonic())


def build_health(
    *,
    node: str,
    version: str,
    engine: int,
    boot: str,
    load: dict[str, Any],
    queue: int,
    queue_for: Mapping[str, int],
    energy_source: str,
    jobs: Mapping[str, int],
    families: Mapping[str, str],
    fingerprints: Mapping[str, float],
    hardware: dict[str, Any],
    address: str,
    peers: list[str],
    links: Mapping[str, Mapping[str, Any]],
    probe_port: int,
    loops: Mapping[str, int],
    admission: Admission,
    speed: Mapping[str, float],
    recent: Sequence[RecentJob] = (),
    clock: Mapping[str, Any] | None = None,
) -> Health:
    """This node's health document."""
    return Health(
        node=node,
        time=wall_s(),
        version=version,
        engine=engine,
        boot=boot,
        load=Load(**{**load, "queue": queue, "queue_for": dict(queue_for)}),
        energy_source=energy_source,
        jobs=dict(jobs),
        models=sorted(fingerprints),
        fingerprints=dict(fingerprints),
        families=dict(families),
        hardware=hardware,
        address=address,
        peers=peers,
        links={peer: LinkView(**view) for peer, view in links.items()},
        probe_port=probe_port,
        loops=dict(loops),
        speed=dict(speed),
        recent=list(recent),
        admission=signed_identity(admission, node, address, fingerprints, probe_port),
        clock=ClockView.model_validate(clock or {}),
    )
