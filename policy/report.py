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
    efficiency = f"{perf.link_efficiency:.2f}"
    lines.append(f"energy: {perf.energy_source}; link efficiency {efficiency}; hardware: {hardware(perf)}")
    if perf.corrections:
        lines.append("online corrections: " + ", ".join(f"{k} x{v:.2f}" for k, v in sorted(perf.corrections.items())))
    return "\n".join(lines)


def hardware(perf: PerfMap) -> str:
    """Where the map was measured, in words: ``AMD EPYC, 2 cores, 1 thread, cpu, torch 2.13.0``."""
    h = perf.hardware
    threads = h.get("threads")
    parts = [
        str(h.get("cpu") or "unknown CPU"),
        f"{h['cores']} cores" if h.get("cores") else "",
        f"{threads} thread{'s' if threads != 1 else ''}" if threads else "",
        str(h.get("gpu") or h.get("device") or ""),
        f"torch {h['torch']}" if h.get("torch") else "",
    ]
    return ", ".join(p for p in parts if p)


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


def axes(perf: PerfMap, model: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The plot's axes: the batch sizes profiled, and the standard links plus any measured ones."""
    cells = perf.for_model(model)
    batches = tuple(sorted({c.batch for c in cells})) or BATCHES
    measured = {float(c.mbps) for c in cells if c.mbps}
    return batches, tuple(sorted(set(BANDWIDTHS) | measured))


def winners(
    perf: PerfMap,
    model: str,
    seq: int,
    policy: Policy,
    batches: tuple[int, ...] | None = None,
    bandwidths: tuple[float, ...] | None = None,
) -> dict[tuple[int, float], Decision]:
    """The decision at every (batch, bandwidth): the profiled batches and standard links by default."""
    default_b, default_bw = axes(perf, model)
    return {
        (b, bw): decide_at(perf, model, b, seq, bw, policy)
        for b in batches or default_b
        for bw in bandwidths or default_bw
    }


def crossover(grid: dict[tuple[int, float], Decision]) -> dict[float, int | None]:
    """Per bandwidth, the smallest batch at which splitting wins (None: never)."""
    out: dict[float, int | None] = {}
    for bw in sorted({bw for _, bw in grid}):
        split = [b for (b, w), d in grid.items() if w == bw and d.mode == "distributed"]
        out[bw] = min(split) if split else None
    return out


def split_batches(grid: dict[tuple[int, float], Decision]) -> dict[float, list[int]]:
    """Per bandwidth, every batch at which splitting wins (it need not be a single range)."""
    return {
        bw: sorted(b for (b, w), d in grid.items() if w == bw and d.mode == "distributed")
        for bw in sorted({bw for _, bw in grid})
    }


Segment = tuple[tuple[float, float], tuple[float, float]]


def boundary(
    grid: dict[tuple[int, float], Decision], batches: tuple[int, ...], bandwidths: tuple[float, ...]
) -> list[Segment]:
    """Edges between neighbouring cells where one runs locally and the other splits, in cell
    coordinates (cell (i, j) spans i-0.5..i+0.5): the outline of where splitting wins, whatever its
    shape. Empty when one side wins everywhere."""
    split = {
        (i, j): grid[(b, bw)].mode == "distributed" for i, b in enumerate(batches) for j, bw in enumerate(bandwidths)
    }
    edges: list[Segment] = []
    for (i, j), here in split.items():
        if (i + 1, j) in split and split[(i + 1, j)] != here:
            edges.append(((i + 0.5, j - 0.5), (i + 0.5, j + 0.5)))
        if (i, j + 1) in split and split[(i, j + 1)] != here:
            edges.append(((i - 0.5, j + 0.5), (i + 0.5, j + 0.5)))
    return edges


def measured(perf: PerfMap, model: str, decision: Decision, batch: int, mbps: float) -> bool:
    """Whether the map measured the winning option at this batch (and, for a split, at this link);
    otherwise the figure is predicted (batches interpolated, links moved by the link model)."""
    ranks = len(decision.peers) + 1
    mode = "local" if decision.mode == "local" else ("full" if decision.cr is None else "prism")
    for c in perf.for_model(model):
        if c.batch != batch or c.mode != mode or (mode == "prism" and c.method != decision.method):
            continue
        if mode == "local" or (
            c.ranks == ranks and c.cr == decision.cr and c.mbps is not None and abs(c.mbps - mbps) < 1e-6
        ):
            return True
    return False


def plot(perf: PerfMap, model: str, seq: int, policy: Policy, out: Path) -> None:
    """A PNG: the winning option over the profiled batches x links (among those meeting the
    policy's accuracy floor, named in the title), the edge where splitting starts to win
    outlined, measured cells told apart from predicted ones."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch, Rectangle
    except ImportError as exc:
        raise BadRequest(
            "plotting needs matplotlib: pip install matplotlib (or the extra: pip install -e '.[plot]' in a "
            "checkout, 'prism-edge[plot]' from an index); scripts/setup.sh installs it"
        ) from exc
    batches, bandwidths = axes(perf, model)
    grid = winners(perf, model, seq, policy, batches, bandwidths)
    names = sorted({d.option for d in grid.values()}, key=lambda n: (n != "local", n != "full", n))
    index = {n: i for i, n in enumerate(names)}
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(batches) + 3), 4.2))
    for (b, bw), d in grid.items():
        x, y = batches.index(b), bandwidths.index(bw)
        seen = measured(perf, model, d, b, bw)
        ax.add_patch(
            Rectangle(
                (x - 0.5, y - 0.5), 1, 1, facecolor=cmap(index[d.option]), alpha=0.9 if seen else 0.45,
                hatch=None if seen else "//", edgecolor="white", linewidth=0.5,
            )
        )  # fmt: skip
        label = f"{(d.predicted_ms or 0) / b:.3g}"
        ax.text(x, y, label, ha="center", va="center", fontsize=7, fontweight="bold" if seen else "normal")
    edges = boundary(grid, batches, bandwidths)
    for (x0, y0), (x1, y1) in edges:
        ax.plot([x0, x1], [y0, y1], color="black", linewidth=2.5, solid_capstyle="round")
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_yticks(range(len(bandwidths)), [f"{bw:g}" for bw in bandwidths])
    ax.set_xlim(-0.5, len(batches) - 0.5)
    ax.set_ylim(-0.5, len(bandwidths) - 0.5)
    ax.set_xlabel("batch size (profiled)")
    ax.set_ylabel("link bandwidth (Mbit/s)")
    ax.set_title(f"{model}, seq {seq}: fastest option of fidelity >= {policy.floor(model):g} (ms per sample)")
    handles: list[Any] = [Patch(facecolor=cmap(index[n])) for n in names]
    labels = list(names)
    handles += [Patch(facecolor="grey", alpha=0.9), Patch(facecolor="grey", alpha=0.45, hatch="//")]
    labels += ["measured (bold)", "predicted"]
    if edges:
        handles.append(ax.lines[0])
        labels.append("local | split boundary")
    else:
        side = "local" if all(d.mode == "local" for d in grid.values()) else "a split"
        handles.append(Patch(visible=False))
        labels.append(f"no crossover: {side} wins everywhere here")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
