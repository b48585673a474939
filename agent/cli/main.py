"""``prism-agent``: the command line. Output goes to stdout; errors are one line on stderr."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from engine.errors import PrismError
from engine.segments import Compression


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"prism-agent: error: {message}\n")


def parse_cr(text: str) -> float | None:
    """``full`` -> None (full exchange); else a number >= 1."""
    if text.strip().lower() == "full":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cr must be a number >= 1 or 'full', got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"--cr must be a number >= 1 or 'full', got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ranks(text: str) -> int:
    value = _positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"--ranks must be >= 2, got {text!r}")
    return value


def _job_options(p: argparse.ArgumentParser, *, batch_required: bool) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="built-in name (tiny-vit, tiny-bert, tiny-gpt2, vit-base, "
        "bert-base, gpt2, minilm), a model directory, or a hub id",
    )
    p.add_argument("--ranks", type=_ranks, required=True, help="number of devices P (>= 2)")
    p.add_argument("--cr", type=parse_cr, required=True, help="tokens per segment (>= 1), or 'full'")
    p.add_argument("--batch", type=_positive, required=batch_required, default=4, help="batch size")
    p.add_argument("--seq", type=_positive, default=None, help="sequence length (text models)")
    p.add_argument("--task", choices=["classify", "features", "embed", "next_token", "loglik"], default=None)
    p.add_argument("--no-keep-first", action="store_true", help="average CLS like any token (paper setting)")
    p.add_argument("--keep-last", action="store_true", help="send each sample's last real token exactly")
    p.add_argument("--no-count-bias", action="store_true", help="drop the log(count) logit bias (ablation)")
    p.add_argument("--wire-dtype", choices=["fp16", "bf16", "fp32"], help="segment rows on the wire (default: model's)")
    p.add_argument("--no-overlap", action="store_true", help="wait for each exchange before computing on")
    p.add_argument("--chunks", type=_positive, help="batch pieces (default: min(batch, 4); 1 without overlap)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = _Parser(prog="prism-agent", description="Distributed Transformer inference on edge boxes (PRISM).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fid = sub.add_parser("fidelity", help="compare a PRISM run with the plain local model")
    _job_options(fid, batch_required=False)
    fid.add_argument(
        "--runner",
        choices=["sim", "gloo"],
        default="sim",
        help="in-process ranks (default) or real GLOO processes on loopback",
    )
    fid.add_argument("--threads", type=_positive, default=1, help="torch threads per rank")

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    eng = bench_sub.add_parser("engine", help="local vs full exchange vs PRISM over real GLOO processes")
    _job_options(eng, batch_required=True)
    eng.add_argument("--repeat", type=_positive, default=5, help="timed runs per mode (median reported)")
    eng.add_argument("--warmup", type=int, default=1, help="untimed runs per mode")

    run = sub.add_parser("run", help="run the agent daemon (MQTT job service)")
    run.add_argument("--config", type=Path, default=None, help="TOML settings file")
    run.add_argument(
        "--broker", default=None, help="mqtt://host:port (default: one advertised over mDNS, else host one)"
    )
    run.add_argument("--cluster", default=None, help="cluster name (topic root prism/v1/NAME)")
    run.add_argument("--node-id", dest="node_id", default=None, help="this node's id (default: hostname)")
    run.add_argument("--interface", default=None, help="network interface for discovery and GLOO")
    run.add_argument(
        "--model",
        dest="models",
        action="append",
        default=None,
        metavar="NAME=SOURCE",
        help="serve a model (repeatable); SOURCE is a directory, hub id or built-in name",
    )
    run.add_argument("--threads", type=_positive, default=None, help="torch threads")
    run.add_argument("--secret-file", dest="secret_file", default=None, help="cluster secret (admits peers)")
    run.add_argument("--log-format", dest="log_format", choices=["auto", "json", "console"], default=None)
    run.add_argument("--map", dest="map_file", default=None, help="performance map for auto mode (prism-agent profile)")
    run.add_argument("--objective", choices=["latency", "energy"], default=None, help="what auto mode minimises")

    sm = sub.add_parser("submit", help="publish one job over MQTT and print its result")
    sm.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    sm.add_argument("--cluster", default="default")
    sm.add_argument("--model", required=True, help="model name as the agents serve it")
    sm.add_argument("--text", action="append", default=None, help="input text (repeat for a batch)")
    sm.add_argument("--image", action="append", type=Path, default=None, help="image file (repeat for a batch)")
    sm.add_argument("--token-ids", dest="token_ids", action="append", default=None, help="comma-separated ids")
    sm.add_argument("--mode", choices=["auto", "local", "distributed"], default="auto")
    sm.add_argument("--cr", default=None, help="compression rate or 'full'")
    sm.add_argument("--task", default=None)
    sm.add_argument("--node", default=None, help="send to this node only")
    sm.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the result")
    sm.add_argument("--json", action="store_true", help="print the result object")

    pe = sub.add_parser("peers", help="list the cluster's nodes: status, address, load, models, peers")
    pe.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    pe.add_argument("--cluster", default="default")
    pe.add_argument("--json", action="store_true", help="print a JSON list of nodes")

    ins = sub.add_parser("install-service", help="install the systemd unit, user and config (root)")
    ins.add_argument("--print", dest="print_unit", action="store_true", help="only print the unit file")

    demo = sub.add_parser("demo", help="the main job: a broker and two agents on this box, jobs in every mode")
    demo.add_argument("--model", default="minilm", help="model to run (default: real all-MiniLM-L6-v2)")
    demo.add_argument("--batch", type=_positive, default=8)
    demo.add_argument("--crs", default="4,16", help="comma-separated compression rates to show")
    demo.add_argument("--json", action="store_true", help="print a JSON list of the jobs' result objects")
    demo.add_argument(
        "--engine", action="store_true", help="engine only: one process vs 2 GLOO ranks, no daemon, broker or discovery"
    )
    from agent.cli import policy_cmds
    from testbed import cli as testbed

    policy_cmds.add_cli(sub)
    testbed.add_cli(sub)
    return parser


def _job_args(ns: argparse.Namespace) -> Any:
    from agent.cli.engine_cmds import JobArgs

    comp = Compression(
        cr=ns.cr,
        keep_first=not ns.no_keep_first,
        keep_last=ns.keep_last,
        count_bias=not ns.no_count_bias,
        wire_dtype=ns.wire_dtype,
    )
    return JobArgs(ns.model, ns.ranks, comp, ns.batch, ns.seq, ns.task, ns.seed, not ns.no_overlap, ns.chunks)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _print_demo(rows: list[dict[str, Any]], batch: int) -> None:
    full = next((r["exchange_bytes"] for r in rows if r["mode"] == "full"), 0) or 1
    table = [
        {
            "mode": r["mode"] if r["cr"] is None else f"prism cr={r['cr']:g}",
            "ranks": r["ranks"],
            "latency_ms": f"{r['ms']:.1f}",
            "exchanged_KiB": f"{r['exchange_bytes'] / 1024:.0f}",
            "vs_full": "-" if r["mode"] == "local" else f"{100 * r['exchange_bytes'] / full:.1f}%",
            "cosine_vs_local": f"{r['mean_cosine']:.4f}",
            "top1_agree": "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.3f}",
        }
        for r in rows
    ]
    print(f"{rows[0]['model']} ({rows[0]['task']}), batch {batch}: one process vs 2 GLOO ranks on loopback")
    _print_table(table, list(table[0]))


def _print_pairs(result: dict[str, Any]) -> None:
    width = max(len(k) for k in result)
    for key, value in result.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
        print(f"{key.ljust(width)}  {_fmt(value)}")


def _run_daemon(ns: argparse.Namespace) -> int:
    import asyncio

    import torch

    from agent.node import logs, main
    from agent.node.config import load_settings

    keys = (
        "broker",
        "cluster",
        "node_id",
        "interface",
        "models",
        "threads",
        "log_format",
        "secret_file",
        "map_file",
        "objective",
    )
    overrides = {k: getattr(ns, k) for k in keys}
    settings = load_settings(ns.config, os.environ, overrides)
    logs.configure(settings.log_format)
    torch.set_num_threads(settings.threads)
    asyncio.run(main.main_async(settings))
    return 0


def _submit(ns: argparse.Namespace) -> int:
    import asyncio

    from agent.client import build_job, client_auth, submit
    from agent.node.config import load_settings, parse_broker

    try:
        ids = [[int(t) for t in row.split(",") if t.strip()] for row in ns.token_ids or []]
    except ValueError:
        raise SystemExit("prism-agent: error: --token-ids must be comma-separated integers") from None
    job = build_job(
        ns.model, text=ns.text, images=ns.image, token_ids=ids or None, mode=ns.mode, cr=ns.cr, task=ns.task
    )
    try:
        settings = load_settings(None, os.environ, {"broker": ns.broker})
        result = asyncio.run(
            submit(
                parse_broker(ns.broker), ns.cluster, job, node=ns.node, timeout_s=ns.timeout, auth=client_auth(settings)
            )
        )
    except asyncio.TimeoutError:
        print(f"prism-agent: error: no result for job {job['id']} within {ns.timeout:g} s", file=sys.stderr)
        return 3
    if ns.json:
        print(json.dumps(result))
    else:
        _print_pairs({k: v for k, v in result.items() if k != "v"})
    return 0 if result.get("ok") else 1


def _peers(ns: argparse.Namespace) -> int:
    import asyncio

    from agent.client import client_auth, peers
    from agent.node.config import load_settings, parse_broker

    settings = load_settings(None, os.environ, {"broker": ns.broker})
    nodes = asyncio.run(peers(parse_broker(ns.broker), ns.cluster, auth=client_auth(settings)))
    if ns.json:
        print(json.dumps(nodes))
        return 0
    rows = []
    for n in nodes:
        h = n.get("health", {})
        load = h.get("load", {})
        rows.append(
            {
                "node": n["node"],
                "status": n["status"],
                "address": h.get("address"),
                "load1": load.get("load1"),
                "queue": load.get("queue"),
                "models": ",".join(h.get("models", [])),
                "peers": ",".join(h.get("peers", [])),
            }
        )
    if rows:
        _print_table(rows, list(rows[0]))
    else:
        print(f"no nodes in cluster {ns.cluster!r} on {ns.broker}")
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status."""
    ns = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if ns.command == "testbed":  # before torch: the bed's commands are plain process and namespace work
        from testbed import cli as testbed

        return testbed.run_cli(ns)
    if ns.command in ("profile", "map"):
        from agent.cli import policy_cmds

        return policy_cmds.run_cli(ns)
    import torch

    from agent.cli import engine_cmds

    if ns.command == "fidelity":
        torch.set_num_threads(ns.threads)
        result: Any = engine_cmds.fidelity(_job_args(ns), ns.runner)
        print(json.dumps(result)) if ns.json else _print_pairs(result)
    elif ns.command == "bench":
        result = engine_cmds.bench_engine(_job_args(ns), ns.warmup, ns.repeat)
        print(json.dumps(result)) if ns.json else _print_pairs(result)
    elif ns.command == "run":
        return _run_daemon(ns)
    elif ns.command == "submit":
        return _submit(ns)
    elif ns.command == "peers":
        return _peers(ns)
    elif ns.command == "install-service":
        from agent.node import install

        if ns.print_unit:
            print(install.render_unit(), end="")
        else:
            if os.geteuid() != 0:
                raise install.InstallError("install-service must run as root (or use --print)")
            for line in install.install():
                print(line)
    elif ns.command == "demo":
        try:
            crs = [c for c in (parse_cr(x) for x in ns.crs.split(",") if x.strip()) if c is not None]
        except argparse.ArgumentTypeError as exc:
            raise SystemExit(f"prism-agent: error: {exc}") from None
        if not ns.engine:
            from agent.cli import demo

            return demo.main(ns.model, ns.batch, crs, ns.json)
        rows = engine_cmds.demo(ns.model, ns.batch, crs)
        if ns.json:
            print(json.dumps(rows))
        else:
            _print_demo(rows, ns.batch)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: domain errors become one line on stderr and exit status 1."""
    try:
        return run(argv)
    except PrismError as exc:
        print(f"prism-agent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
