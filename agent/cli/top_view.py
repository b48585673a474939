"""What ``prism-agent top`` knows of a cluster, and how it shows it.

:class:`ClusterView` takes the retained ``nodes/{node}/status`` and ``nodes/{node}/health``
messages as they come; with a cluster secret it keeps only what verifies, by the checks the
agents themselves apply (agent/cluster/trust.py: a member's signature, recent, not a
replay), and counts the rest. :meth:`ClusterView.snapshot` turns it into plain rows (nodes,
links as each node probed them, the last jobs' decisions); :func:`render` lays a snapshot out
with ``rich``, and :meth:`Snapshot.to_dict` is what ``--json`` prints. No I/O here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from agent.cluster.freshness import STATUS
from agent.cluster.trust import Trust
from transport.health import Health, RecentJob, parse_health, parse_status
from transport.schema import WireError

#: Recent jobs a snapshot shows, over all nodes, newest first.
JOBS_SHOWN = 12
#: An online node whose health is older than this (seconds; health comes every 5 s by default) shows as quiet.
STALE_S = 30.0


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One node: its status and what its health says."""

    node: str
    status: str  # online | offline | unknown
    health_age_s: float | None  # None: no health (yet, or none that verified)
    version: str = ""
    engine: int = 0
    address: str = ""
    cpus: int = 0
    load1: float | None = None
    queue: int = 0
    models: tuple[str, ...] = ()
    speed: dict[str, float] = dataclasses.field(default_factory=dict)  # model -> ms per token
    peers: tuple[str, ...] = ()
    restarts: int = 0  # background loops restarted after a crash


@dataclass(frozen=True, slots=True)
class LinkRow:
    """One link as ``node`` probed it."""

    node: str
    peer: str
    mbps: float | None
    mbps_err: float | None
    rtt_ms: float | None
    gloo_mbps: float | None
    age_s: float | None
    source: str


@dataclass(frozen=True, slots=True)
class JobRow:
    """One recent job of ``node``: its decision and how it went."""

    node: str
    id: str
    age_s: float
    ok: bool
    error: str | None
    option: str | None
    mode: str | None
    peers: tuple[str, ...]
    predicted_ms: float | None
    measured_ms: float | None
    total_ms: float | None
    fidelity: float | None
    fallback: bool
    fallback_reason: str | None
    why: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The cluster at one moment, as the broker told it."""

    cluster: str
    broker: str
    time: float
    verified: bool  # True with a cluster secret: only signed, fresh messages were kept
    refused: int  # messages that did not verify
    connected: bool
    nodes: tuple[NodeRow, ...]
    links: tuple[LinkRow, ...]
    jobs: tuple[JobRow, ...]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``top --once --json``)."""
        return dataclasses.asdict(self)


class ClusterView:
    """Nodes' status and health as the broker carries them (see the module docstring)."""

    def __init__(self, trust: Trust) -> None:
        self.trust = trust
        self.status_of: dict[str, str] = {}
        self.health_of: dict[str, Health] = {}
        self._payload: dict[str, bytes] = {}  # the last health kept per node (a re-delivery is no replay)
        self.refused = 0
        self.connected = False

    def status(self, node: str, payload: bytes, now_s: float) -> None:
        """A ``nodes/{node}/status`` message."""
        state, fields = parse_status(payload)
        if not self.trust.open:
            if fields is None:
                self.refused += state != "unknown"  # an unsigned word, which anyone can publish
                return
            if state == "online":
                ok = self.trust.accept(fields, node, STATUS, now_s, max_age_s=-1)  # signed when it connected
            else:
                ok = self.trust.gone(fields, node, now_s)
            if not ok:
                self.refused += 1
                return
        self.status_of[node] = state

    def health(self, node: str, payload: bytes, now_s: float) -> None:
        """A ``nodes/{node}/health`` message."""
        if self._payload.get(node) == payload:
            return
        try:
            doc = parse_health(payload)
        except WireError:
            self.refused += 1
            return
        signed = doc.admission
        if doc.node != node or (
            not self.trust.open and (signed.get("node") != node or not self.trust.accept(signed, node, "health", now_s))
        ):
            self.refused += 1
            return
        self.health_of[node] = doc
        self._payload[node] = payload

    def snapshot(self, cluster: str, broker: str, now_s: float, jobs: int = JOBS_SHOWN) -> Snapshot:
        """Plain rows of what is known now (``now_s``: wall-clock seconds)."""
        nodes: list[NodeRow] = []
        links: list[LinkRow] = []
        recent: list[JobRow] = []
        times: dict[tuple[str, str], float] = {}
        for node in sorted(set(self.status_of) | set(self.health_of)):
            status = self.status_of.get(node, "unknown")
            doc = self.health_of.get(node)
            if doc is None:
                nodes.append(NodeRow(node, status, None))
                continue
            nodes.append(
                NodeRow(
                    node=node,
                    status=status,
                    health_age_s=round(max(0.0, now_s - doc.time), 1),
                    version=doc.version,
                    engine=doc.engine,
                    address=doc.address,
                    cpus=doc.load.cpus,
                    load1=doc.load.load1,
                    queue=doc.load.queue,
                    models=tuple(doc.models),
                    speed=dict(doc.speed),
                    peers=tuple(doc.peers),
                    restarts=sum(doc.loops.values()),
                )
            )
            if status == "offline":
                continue  # its links and jobs are history
            for peer, link in sorted(doc.links.items()):
                links.append(
                    LinkRow(node, peer, link.mbps, link.mbps_err, link.rtt_ms, link.gloo_mbps, link.age_s, link.source)
                )
            recent.extend(_job_row(node, job, now_s) for job in doc.recent)
            times.update({(node, job.id): job.time for job in doc.recent})
        recent.sort(key=lambda j: -times[(j.node, j.id)])  # newest first (ages are rounded)
        return Snapshot(
            cluster=cluster,
            broker=broker,
            time=now_s,
            verified=not self.trust.open,
            refused=self.refused,
            connected=self.connected,
            nodes=tuple(nodes),
            links=tuple(links),
            jobs=tuple(recent[:jobs]),
        )


def _job_row(node: str, job: RecentJob, now_s: float) -> JobRow:
    return JobRow(
        node=node,
        id=job.id,
        age_s=round(max(0.0, now_s - job.time), 1),
        ok=job.ok,
        error=job.error,
        option=job.option,
        mode=job.mode,
        peers=tuple(job.peers),
        predicted_ms=job.predicted_ms,
        measured_ms=job.measured_ms,
        total_ms=job.total_ms,
        fidelity=job.fidelity,
        fallback=job.fallback,
        fallback_reason=job.fallback_reason,
        why=job.why,
    )


# -- rendering -------------------------------------------------------------------------------
def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 1 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _status(status: str, age_s: float | None) -> Text:
    if status == "online" and (age_s is None or age_s > STALE_S):
        return Text("online (quiet)", style="yellow")
    return Text(status, style={"online": "green", "offline": "red"}.get(status, "yellow"))


def _nodes(rows: tuple[NodeRow, ...]) -> Table:
    t = Table(title="nodes", title_justify="left", box=box.SIMPLE_HEAD, expand=True)
    for name, justify in (("node", "left"), ("status", "left"), ("load", "right"), ("queue", "right")):
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    t.add_column("engine", justify="right")
    t.add_column("speed ms/token")
    t.add_column("models")
    t.add_column("peers")
    t.add_column("health", justify="right", no_wrap=True)
    for n in rows:
        load = "-" if n.load1 is None else f"{n.load1:.2f}/{n.cpus}"
        speed = " ".join(f"{m} {ms:.3g}" for m, ms in sorted(n.speed.items())) or "-"
        age = "-" if n.health_age_s is None else f"{n.health_age_s:.0f} s ago"
        restarts = Text(f" {n.restarts} restarts", style="red") if n.restarts else Text("")
        t.add_row(
            Text(n.node, style="bold"),
            _status(n.status, n.health_age_s),
            load,
            str(n.queue),
            f"v{n.engine}" if n.engine else "-",
            speed,
            ", ".join(n.models) or "-",
            ", ".join(n.peers) or "-",
            Text(age) + restarts,
        )
    return t


def _links(rows: tuple[LinkRow, ...]) -> Table:
    t = Table(title="links (as probed)", title_justify="left", box=box.SIMPLE_HEAD, expand=True)
    t.add_column("link", no_wrap=True)
    t.add_column("Mbit/s", justify="right", no_wrap=True)
    t.add_column("± err", justify="right")
    t.add_column("rtt ms", justify="right")
    t.add_column("gloo Mbit/s", justify="right")
    t.add_column("age s", justify="right")
    t.add_column("source")
    for link in rows:
        t.add_row(
            f"{link.node} → {link.peer}",
            _num(link.mbps),
            _num(link.mbps_err),
            _num(link.rtt_ms, "{:.2f}"),
            _num(link.gloo_mbps),
            _num(link.age_s, "{:.0f}"),
            link.source or "-",
        )
    return t


def _jobs(rows: tuple[JobRow, ...]) -> Table:
    t = Table(title="recent jobs", title_justify="left", box=box.SIMPLE_HEAD, expand=True)
    t.add_column("age s", justify="right", no_wrap=True)
    t.add_column("node", no_wrap=True)
    t.add_column("job", no_wrap=True, max_width=14)
    t.add_column("option", no_wrap=True)
    t.add_column("peers")
    t.add_column("pred ms", justify="right")
    t.add_column("meas ms", justify="right")
    t.add_column("fidelity", justify="right")
    t.add_column("why", overflow="ellipsis", no_wrap=True, ratio=1)
    for j in rows:
        if not j.ok:
            option, why = Text(j.error or "failed", style="red"), j.why
        elif j.fallback:
            code = f" ({j.fallback_reason})" if j.fallback_reason else ""
            option, why = Text(f"{j.option} → local", style="yellow"), f"fallback{code}: {j.why}"
        else:
            option, why = Text(j.option or j.mode or "-"), j.why
        meas = Text(_ms(j.measured_ms))
        if j.predicted_ms and j.measured_ms is not None and not j.fallback:
            off = j.measured_ms / j.predicted_ms
            meas.append(f" {off:.2f}x", style="green" if 0.8 <= off <= 1.25 else "yellow")
        t.add_row(
            _num(j.age_s, "{:.0f}"),
            j.node,
            j.id,
            option,
            ", ".join(j.peers) or "-",
            _ms(j.predicted_ms),
            meas,
            _num(j.fidelity, "{:.5f}"),
            why,
        )
    return t


def render(snap: Snapshot) -> RenderableType:
    """The whole view of one snapshot."""
    online = sum(n.status == "online" for n in snap.nodes)
    head = Text.assemble(
        ("prism-agent top", "bold"),
        f"  cluster {snap.cluster} on {snap.broker}  ",
        (f"{online}/{len(snap.nodes)} online", "green" if online else "yellow"),
    )
    if not snap.connected:
        head.append("  reconnecting to the broker", style="red")
    if snap.verified:
        head.append(f"  signed only ({snap.refused} refused)" if snap.refused else "  signed only", style="cyan")
    parts: list[RenderableType] = [head]
    if not snap.nodes:
        parts.append(Text(f"no nodes in cluster '{snap.cluster}' yet", style="yellow"))
    else:
        parts += [_nodes(snap.nodes), _links(snap.links), _jobs(snap.jobs)]
    return Group(*parts)
