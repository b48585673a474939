"""Reading a map: a table of its cells, the winner over batch x bandwidth, and its picture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import BadRequest
from policy.decide import Decision, PeerLink, Policy, Request, decide
from policy.perfmap import PerfMap

BANDWIDTHS = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
BATCHES = (1, 2, 4, 8, 16, 32)


def _num(value: float | None, width: int, digits: int = 5) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def table(perf: PerfMap) -> str:
    """The cells, one line each, grouped by model and batch; fidelity is the mean (and least)
    per-sample cosine against the local model and the top-1 agreement ("-": not measured,
    "exact": local and full exchange)."""
    head = f"{'model':<12}{'batch':>6}{'seq':>6}  {'option':<14}{'median ms':>10}{'p90 ms':>9}"
    head += f"{'ms/sample':>10}{'compute':>9}{'comm':>8}{'wire KB':>9}{'J/sample':>9}"
    head += f"{'cosine':>9}{'min':>9}{'top-1':>8}  link"
    lines = [head]
    order = {"local": 0, "full": 1, "means": 2, "codes": 3}
    for c in sorted(perf.cells, key=lambda c: (c.model, c.batch, c.ranks, order.get(c.kind, 4), c.cr or 0)):
        link = "-" if c.mode == "local" else ("loopback" if c.mbps is None else f"{c.mbps:g} Mbit/s")
        if c.mode in ("local", "full"):
            fidelity = f"{'exact':>9}{'':>9}{'':>8}"
        else:
            fidelity = _num(c.cosine, 9) + _num(c.cosine_min, 9) + _num(c.top1, 8, 3)
        lines.append(
            f"{c.model:<12}{c.batch:>6}{c.seq:>6}  {c.option:<14}{c.median_ms:>10.1f}{c.p90_ms:>9.1f}"
            f"{c.median_ms / c.batch:>10.1f}{c.compute_ms:>9.1f}{c.comm_ms:>8.1f}{c.wire_bytes / 1e3:>9.0f}"
            f"{c.energy_j:>9.3f}{fidelity}  {link}"
        )
    if any(c.mode == "prism" and c.cosine is None for c in perf.cells):
        lines.append("cells without fidelity are never chosen by auto: re-profile to measure it")
    lines.append(f"energy: {perf.energy_source}; link efficiency {perf.link_efficiency:.2f}; hardware: {perf.hardware}")
    if perf.corrections:
        lines.append("online corrections: " + ", ".join(f"{k} x{v:.2f}" for k, v in sorted(perf.corrections.items())))
    return "\n".join(lines)


def decide_at(perf: PerfMap, model: str, batch: int, seq: int, mbps: float, policy: Policy, **req: Any) -> Decision:
    """The decision for one request with one peer at ``mbps`` (an idle one unless told;
    ``peer_ms_per_token`` gives it a speed, this node's own is its map's)."""
    load = float(req.pop("load", 0.0))
    speed = req.pop("peer_ms_per_token", None)
    peer = PeerLink("peer", mbps, rtt_ms=float(req.pop("rtt_ms", 0.0)), load1=load, cpus=1, ms_per_token=speed)
    got = decide(Request(model, batch, seq, **req), perf, [peer], local_load=load, cpus=1, policy=policy)
    if got is None:
        raise BadRequest(f"the map has no cells for model '{model}'")
    return got


def winners(perf: PerfMap, model: str, seq: int, policy: Policy) -> dict[tuple[int, float], Decision]:
    """The decision at every (batch, bandwidth) of the standard grid."""
    return {(b, bw): decide_at(perf, model, b, seq, bw, policy) for b in BATCHES for bw in BANDWIDTHS}


def crossover(grid: dict[tuple[int, float], Decision]) -> dict[float, int | None]:
    """Per bandwidth, the smallest batch from which splitting wins (None: never)."""
    out: dict[float, int | None] = {}
    for bw in BANDWIDTHS:
        split = [b for b in BATCHES if grid[(b, bw)].mode == "distributed"]
        out[bw] = min(split) if split else None
    return out


def plot(perf: PerfMap, model: str, seq: int, policy: Policy, out: Path) -> None:
    """A PNG: the winning option over batch x bandwidth (among those meeting the policy's
    accuracy floor, named in the title), the local/split crossover outlined."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as exc:
        raise BadRequest("plotting needs matplotlib: pip install 'prism-agent[plot]'") from exc
    grid = winners(perf, model, seq, policy)
    names = sorted({d.option for d in grid.values()}, key=lambda n: (n != "local", n != "full", n))
    index = {n: i for i, n in enumerate(names)}
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (b, bw), d in grid.items():
        x, y = BATCHES.index(b), BANDWIDTHS.index(bw)
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, color=cmap(index[d.option]), alpha=0.85))
        ax.text(x, y, f"{(d.predicted_ms or 0) / b:.0f}", ha="center", va="center", fontsize=7)
    cross = crossover(grid)
    line_x: list[float] = []
    line_y: list[float] = []
    for row, first in enumerate(cross.values()):  # one vertical edge per bandwidth row, joined up
        edge = BATCHES.index(first) - 0.5 if first is not None else len(BATCHES) - 0.5
        line_x += [edge, edge]
        line_y += [row - 0.5, row + 0.5]
    ax.plot(line_x, line_y, color="black", linewidth=2.5)
    ax.set_xticks(range(len(BATCHES)), [str(b) for b in BATCHES])
    ax.set_yticks(range(len(BANDWIDTHS)), [f"{bw:g}" for bw in BANDWIDTHS])
    ax.set_xlim(-0.5, len(BATCHES) - 0.5)
    ax.set_ylim(-0.5, len(BANDWIDTHS) - 0.5)
    ax.set_xlabel("batch size")
    ax.set_ylabel("link bandwidth (Mbit/s)")
    ax.set_title(f"{model}, seq {seq}: fastest option of fidelity >= {policy.floor(model):g} (predicted ms/sample)")
    handles = [Rectangle((0, 0), 1, 1, color=cmap(index[n])) for n in names]
    ax.legend([*handles, ax.lines[0]], [*names, "crossover"], loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
