"""The policy commands: ``profile`` (measure a performance map) and ``map show|decide``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cli import args, output
from agent.cli.args import Parser
from engine.errors import BadRequest
from transport.schema import METHODS


def batch_list(text: str) -> tuple[int, ...]:
    """``1,2,4``: batch sizes, whole numbers >= 1."""
    try:
        out = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return out


def method_list(text: str) -> tuple[str, ...]:
    """``means,codes,kv``: exchange methods, each once."""
    out = tuple(part.strip() for part in text.split(","))
    if not out or any(m not in METHODS for m in out) or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(METHODS)}, comma-separated, got {text!r}")
    return out


def cr_list(text: str) -> tuple[float | None, ...]:
    """``full,2,4``: compression rates >= 1, ``full`` for full exchange."""
    try:
        return tuple(args.parse_cr(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated CRs >= 1 or 'full', got {text!r}") from None


def add_cli(sub: Any) -> None:
    """Register ``profile`` and ``map`` on the top-level subparsers."""
    pro = sub.add_parser("profile", help="measure a performance map (local, full exchange, PRISM at each CR)")
    pro.add_argument("--model", required=True, help="built-in name, model directory or hub id")
    pro.add_argument("--ranks", type=args.ranks, default=None, help="devices to split over (default 2, or peers + 1)")
    pro.add_argument("--batches", type=batch_list, default=(1, 2, 4, 8, 16), help="comma-separated batch sizes")
    pro.add_argument(
        "--crs", type=cr_list, default=(None, 2.0, 4.0, 8.0, 16.0), help="comma-separated CRs; 'full' is full exchange"
    )
    pro.add_argument("--methods", type=method_list, default=METHODS, help="exchange methods to profile at each CR")
    pro.add_argument("--seq", type=args.positive, default=None, help="sequence length (text models)")
    pro.add_argument(
        "--repeat", type=args.positive, default=None, help="timed passes per cell (default: ~200 passes in all)"
    )
    pro.add_argument(
        "--idle-watts", dest="idle_w", type=args.non_negative_float, default=0.0, help="per-device idle power (W)"
    )
    pro.add_argument(
        "--peers",
        type=args.peers,
        default=None,
        help="measure over real links through running agents: peer node ids (comma-separated) or 'auto' "
        "(every peer of --node with the same weights); default: local ranks on loopback",
    )
    pro.add_argument(
        "--node", type=args.name, default=None, help="with --peers: the node the map is for (default: this host's id)"
    )
    pro.add_argument(
        "--broker", type=args.broker, default=None, help="with --peers: the cluster's broker (default: $PRISM_BROKER)"
    )
    pro.add_argument("--cluster", type=args.name, default=None, help="with --peers: cluster (default: $PRISM_CLUSTER)")
    pro.add_argument("--timeout", type=args.seconds, default=600.0, help="with --peers: seconds to wait for one pass")
    pro.add_argument("--out", type=args.writable_path, required=True, help="where to write the map (JSON)")
    pro.add_argument("--json", action="store_true", help="print the map instead of a table")

    mp = sub.add_parser("map", help="read a performance map")
    msub = mp.add_subparsers(dest="map_command", required=True, parser_class=Parser)
    show = msub.add_parser("show", help="the map's cells as a table; --plot draws who wins where")
    show.add_argument("file", type=args.existing_file)
    show.add_argument("--plot", type=args.writable_path, default=None, help="PNG: fastest option over batch x link")
    show.add_argument("--model", default=None, help="model to plot (default: the first in the map)")
    show.add_argument("--json", action="store_true")
    dec = msub.add_parser("decide", help="what auto mode would choose for one request")
    dec.add_argument("file", type=args.existing_file)
    dec.add_argument("--model", default=None, help="default: the first model in the map")
    dec.add_argument("--batch", type=args.positive, required=True)
    dec.add_argument("--seq", type=args.positive, default=None, help="default: the profiled length")
    dec.add_argument("--bandwidth", type=args.positive_float, required=True, help="link to the peer, Mbit/s")
    dec.add_argument("--rtt", type=args.non_negative_float, default=0.0, help="round-trip time to the peer, ms")
    dec.add_argument("--load", type=args.non_negative_float, default=0.0, help="load average per core on both nodes")
    dec.add_argument("--objective", choices=["latency", "energy"], default="latency")
    dec.add_argument(
        "--min-fidelity",
        dest="min_fidelity",
        type=args.fraction,
        default=None,
        help="accuracy floor: the least cosine vs local an option may have (default 0.999)",
    )
    dec.add_argument("--method", choices=METHODS, default=None, help="only this exchange method")
    dec.add_argument(
        "--peer-speed", dest="peer_speed", type=args.positive_float, default=None, help="the peer's ms per token"
    )
    dec.add_argument("--json", action="store_true")


def run_cli(ns: argparse.Namespace) -> int:
    """Run ``profile`` or ``map``; domain errors raise (the CLI prints one line)."""
    if ns.command == "profile":
        return _profile(ns)
    from policy.perfmap import load_map

    perf = load_map(ns.file)
    model = ns.model or (perf.cells[0].model if perf.cells else None)
    if model is None or not perf.for_model(model):
        have = ", ".join(sorted(perf.models)) or "none"
        raise BadRequest(f"the map {ns.file} has no cells for model '{model or '-'}' (it has: {have})")
    seq = getattr(ns, "seq", None) or perf.for_model(model)[0].seq
    if ns.map_command == "show":
        return _show(ns, perf, model, seq)
    return _decide(ns, perf, model, seq)


def _profile(ns: argparse.Namespace) -> int:
    from agent.profiling.loopback import Grid, profile_loopback
    from policy.perfmap import save_map
    from policy.report import table

    batches, crs, methods = ns.batches, ns.crs, ns.methods
    cells = Grid(ns.model, 2, batches, crs, methods=methods).cells
    repeat = max(3, round(200 / cells)) if ns.repeat is None else ns.repeat
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

    from agent.cli.cluster_cmds import client_settings
    from agent.client import client_auth, peers
    from agent.profiling.loopback import Grid
    from agent.profiling.peers import profile_peers, resolve

    settings, broker = client_settings(ns.broker, ns.cluster)
    auth, node, cluster = client_auth(settings), ns.node or settings.node_id, settings.cluster
    target = resolve(asyncio.run(peers(broker, cluster, auth=auth)), node, ns.model, ns.peers)
    if ns.ranks is not None and ns.ranks != len(target.peers) + 1:
        raise BadRequest(
            f"--ranks {ns.ranks} does not match --peers: {len(target.peers)} peer(s) make {len(target.peers) + 1} ranks"
        )
    grid = Grid(ns.model, len(target.peers) + 1, batches, crs, ns.seq, repeat, idle_w=ns.idle_w, methods=ns.methods)
    print(f"profiling '{ns.model}' on {node} with {', '.join(target.peers)}", file=sys.stderr)
    return grid, asyncio.run(profile_peers(broker, cluster, grid, target, auth=auth, timeout_s=ns.timeout))


def _show(ns: argparse.Namespace, perf: Any, model: str, seq: int) -> int:
    from policy.decide import Policy
    from policy.report import crossover, plot, split_batches, table, winners

    if ns.plot is not None:
        plot(perf, model, seq, Policy(), ns.plot)
    if ns.json:
        grid = winners(perf, model, seq, Policy())
        out = perf.to_dict()
        out["crossover_batch"] = {f"{bw:g}": b for bw, b in crossover(grid).items()}
        out["split_batches"] = {f"{bw:g}": b for bw, b in split_batches(grid).items()}
        print(json.dumps(out))
    else:
        print(table(perf))
        if ns.plot is not None:
            print(f"plot: {ns.plot}")
    return 0


def _decide(ns: argparse.Namespace, perf: Any, model: str, seq: int) -> int:
    from policy.decide import Policy
    from policy.report import decide_at

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
        how = "run locally" if out["mode"] == "local" else f"split over 2 ranks at {ns.bandwidth:g} Mbit/s"
        print(f"{out['option']}: {how}, predicted {output.ms(out['predicted_ms'])}")
        if out.get("fidelity") is not None:
            print(f"fidelity: {out['fidelity']:.5f} (floor {out.get('min_fidelity')})")
        print(f"reason: {out['reason']}")
        others = ", ".join(f"{name} {output.ms(v)}" for name, v in out["options"].items())
        print(f"options: {others}")
    return 0
