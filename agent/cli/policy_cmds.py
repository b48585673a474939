"""The policy commands: ``profile`` (measure a performance map) and ``map show|decide``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from engine.errors import BadRequest


def _floats(text: str, name: str, *, full: bool = False) -> tuple[float | None, ...]:
    out: list[float | None] = []
    for part in text.split(","):
        item = part.strip().lower()
        if full and item == "full":
            out.append(None)
            continue
        try:
            value = float(item)
        except ValueError:
            raise BadRequest(
                f"--{name} takes comma-separated numbers{' or full' if full else ''}, got {part!r}"
            ) from None
        if not math.isfinite(value) or value < 1:
            raise BadRequest(f"--{name} values must be >= 1, got {part!r}")
        out.append(value)
    if not out:
        raise BadRequest(f"--{name} is empty")
    return tuple(out)


def add_cli(sub: Any) -> None:
    """Register ``profile`` and ``map`` on the top-level subparsers."""
    pro = sub.add_parser("profile", help="measure a performance map (local, full exchange, PRISM at each CR)")
    pro.add_argument("--model", required=True, help="built-in name, model directory or hub id")
    pro.add_argument("--ranks", type=int, default=None, help="devices to split over (default 2, or peers + 1)")
    pro.add_argument("--batches", default="1,2,4,8,16", help="comma-separated batch sizes")
    pro.add_argument("--crs", default="full,2,4,8,16", help="comma-separated CRs; 'full' is full exchange")
    pro.add_argument("--methods", default="means,codes", help="exchange methods to profile at each CR")
    pro.add_argument("--seq", type=int, default=None, help="sequence length (text models)")
    pro.add_argument("--repeat", type=int, default=None, help="timed passes per cell (default: ~200 passes in all)")
    pro.add_argument("--idle-watts", dest="idle_w", type=float, default=0.0, help="per-device idle power (cpu-model)")
    pro.add_argument(
        "--peers",
        default=None,
        help="measure over real links through running agents: peer node ids (comma-separated) or 'auto' "
        "(every peer of --node with the same weights); default: local ranks on loopback",
    )
    pro.add_argument("--node", default=None, help="with --peers: the node the map is for (default: this host's id)")
    pro.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="with --peers: the cluster's broker")
    pro.add_argument("--cluster", default="default", help="with --peers: the cluster name")
    pro.add_argument("--timeout", type=float, default=600.0, help="with --peers: seconds to wait for one pass")
    pro.add_argument("--out", type=Path, required=True, help="where to write the map (JSON)")
    pro.add_argument("--json", action="store_true", help="print the map instead of a table")

    mp = sub.add_parser("map", help="read a performance map")
    msub = mp.add_subparsers(dest="map_command", required=True, parser_class=sub._parser_class)
    show = msub.add_parser("show", help="the map's cells as a table; --plot draws who wins where")
    show.add_argument("file", type=Path)
    show.add_argument("--plot", type=Path, default=None, help="PNG: fastest option over batch x bandwidth")
    show.add_argument("--model", default=None, help="model to plot (default: the first in the map)")
    show.add_argument("--json", action="store_true")
    dec = msub.add_parser("decide", help="what auto mode would choose for one request")
    dec.add_argument("file", type=Path)
    dec.add_argument("--model", default=None, help="default: the first model in the map")
    dec.add_argument("--batch", type=int, required=True)
    dec.add_argument("--seq", type=int, default=None, help="default: the profiled length")
    dec.add_argument("--bandwidth", type=float, required=True, help="link to the peer, Mbit/s")
    dec.add_argument("--rtt", type=float, default=0.0, help="round-trip time to the peer, ms")
    dec.add_argument("--load", type=float, default=0.0, help="load average per core on both nodes")
    dec.add_argument("--objective", choices=["latency", "energy"], default="latency")
    dec.add_argument(
        "--min-fidelity",
        dest="min_fidelity",
        type=float,
        default=None,
        help="accuracy floor: the least cosine vs local an option may have (default 0.999)",
    )
    dec.add_argument("--method", choices=["means", "codes"], default=None, help="only this exchange method")
    dec.add_argument("--peer-speed", dest="peer_speed", type=float, default=None, help="the peer's ms per token")
    dec.add_argument("--json", action="store_true")


def _positive(value: int | float | None, name: str) -> None:
    if value is not None and not value > 0:
        raise BadRequest(f"--{name} must be > 0, got {value}")


def run_cli(ns: argparse.Namespace) -> int:
    """Run ``profile`` or ``map``; domain errors raise (the CLI prints one line)."""
    if ns.command == "profile":
        return _profile(ns)
    from policy.perfmap import load_map

    perf = load_map(ns.file)
    model = ns.model or (perf.cells[0].model if perf.cells else None)
    if model is None or not perf.for_model(model):
        raise BadRequest(f"the map has no cells for model {model!r} (it has: {', '.join(sorted(perf.models))})")
    seq = getattr(ns, "seq", None) or perf.for_model(model)[0].seq
    if ns.map_command == "show":
        return _show(ns, perf, model, seq)
    return _decide(ns, perf, model, seq)


def _profile(ns: argparse.Namespace) -> int:
    from agent.profiling.loopback import Grid, profile_loopback
    from policy.perfmap import save_map
    from policy.report import table

    if ns.ranks is not None and ns.ranks < 2:
        raise BadRequest(f"--ranks must be >= 2, got {ns.ranks}")
    _positive(ns.seq, "seq")
    batches = tuple(int(b) for b in _floats(ns.batches, "batches") if b is not None)
    crs = _floats(ns.crs, "crs", full=True)
    methods = tuple(m.strip() for m in ns.methods.split(",") if m.strip())
    cells = Grid(ns.model, 2, batches, crs, methods=methods).cells
    repeat = ns.repeat or max(3, round(200 / cells))
    _positive(repeat, "repeat")
    if ns.peers is None:
        grid = Grid(ns.model, ns.ranks or 2, batches, crs, ns.seq, repeat, idle_w=ns.idle_w, methods=methods)
        perf = profile_loopback(grid)
    else:
        grid, perf = _profile_peers(ns, batches, crs, repeat)
    save_map(perf, ns.out)
    print(json.dumps(perf.to_dict()) if ns.json else table(perf))
    if not ns.json:
        print(f"wrote {ns.out} ({grid.passes} timed passes)", file=sys.stderr)
    return 0


def _profile_peers(
    ns: argparse.Namespace, batches: tuple[int, ...], crs: tuple[float | None, ...], repeat: int
) -> tuple[Any, Any]:
    """The map measured through the agents (agent.profiling.peers)."""
    import asyncio
    import os

    from agent.client import client_auth, peers
    from agent.node.config import load_settings, parse_broker
    from agent.profiling.loopback import Grid
    from agent.profiling.peers import profile_peers, resolve

    _positive(ns.timeout, "timeout")
    settings = load_settings(None, os.environ, {"broker": ns.broker})
    broker, auth, node = parse_broker(ns.broker), client_auth(settings), ns.node or settings.node_id
    target = resolve(asyncio.run(peers(broker, ns.cluster, auth=auth)), node, ns.model, ns.peers)
    if ns.ranks is not None and ns.ranks != len(target.peers) + 1:
        raise BadRequest(
            f"--ranks {ns.ranks} does not match --peers: {len(target.peers)} peer(s) make {len(target.peers) + 1} ranks"
        )
    methods = tuple(m.strip() for m in ns.methods.split(",") if m.strip())
    grid = Grid(ns.model, len(target.peers) + 1, batches, crs, ns.seq, repeat, idle_w=ns.idle_w, methods=methods)
    print(f"profiling '{ns.model}' on {node} with {', '.join(target.peers)}", file=sys.stderr)
    return grid, asyncio.run(profile_peers(broker, ns.cluster, grid, target, auth=auth, timeout_s=ns.timeout))


def _show(ns: argparse.Namespace, perf: Any, model: str, seq: int) -> int:
    from policy.decide import Policy
    from policy.report import crossover, plot, table, winners

    if ns.plot is not None:
        plot(perf, model, seq, Policy(), ns.plot)
    if ns.json:
        grid = winners(perf, model, seq, Policy())
        out = perf.to_dict()
        out["crossover_batch"] = {f"{bw:g}": b for bw, b in crossover(grid).items()}
        print(json.dumps(out))
    else:
        print(table(perf))
        if ns.plot is not None:
            print(f"plot: {ns.plot}")
    return 0


def _decide(ns: argparse.Namespace, perf: Any, model: str, seq: int) -> int:
    from policy.decide import Policy
    from policy.report import decide_at

    _positive(ns.batch, "batch")
    _positive(ns.bandwidth, "bandwidth")
    if ns.min_fidelity is not None and not 0 <= ns.min_fidelity <= 1:
        raise BadRequest(f"--min-fidelity must be from 0 to 1 (a cosine), got {ns.min_fidelity}")
    policy = Policy() if ns.min_fidelity is None else Policy(default_min_fidelity=ns.min_fidelity)
    got = decide_at(
        perf,
        model,
        ns.batch,
        seq,
        ns.bandwidth,
        policy,
        objective=ns.objective,
        load=ns.load,
        rtt_ms=ns.rtt,
        method=ns.method,
        peer_ms_per_token=ns.peer_speed,
    )
    out = got.as_dict()
    if ns.json:
        print(json.dumps(out))
    else:
        print(f"{out['option']} (mode {out['mode']}, cr {out['cr']}): predicted {out['predicted_ms']} ms")
        print(f"reason: {out['reason']}")
    return 0
