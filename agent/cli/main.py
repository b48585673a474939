"""``prism-agent``: the command line. Output goes to stdout; errors are one line on stderr.

Every error a person can cause (a bad flag value, a missing file, an unreachable broker)
is one ``prism-agent: error: ...`` line and a non-zero exit, never a traceback; output
piped into ``head`` ends quietly; ``--json`` prints what the human output shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from agent.cli import args, output
from agent.cli.args import Parser, parse_cr
from engine.errors import PrismError
from transport.schema import METHODS

__all__ = ["build_parser", "main", "parse_cr", "run"]

TASKS = ["classify", "features", "embed", "next_token", "loglik"]


def _job_options(p: argparse.ArgumentParser, *, batch_required: bool) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="built-in name (tiny-vit, tiny-bert, tiny-gpt2, vit-base, "
        "bert-base, gpt2, minilm), a model directory, or a hub id",
    )
    p.add_argument("--ranks", type=args.ranks, required=True, help="number of devices P (>= 2)")
    p.add_argument("--cr", type=parse_cr, required=True, help="tokens per segment (>= 1), or 'full'")
    p.add_argument("--batch", type=args.positive, required=batch_required, default=4, help="batch size")
    p.add_argument("--seq", type=args.positive, default=None, help="sequence length (text models)")
    p.add_argument("--task", choices=TASKS, default=None)
    p.add_argument("--no-keep-first", action="store_true", help="average CLS like any token (paper setting)")
    p.add_argument("--keep-last", action="store_true", help="send each sample's last real token exactly")
    p.add_argument("--no-count-bias", action="store_true", help="drop the log(count) logit bias (ablation)")
    p.add_argument("--method", choices=METHODS, default="means", help="what ranks send (default means)")
    p.add_argument("--wire-dtype", choices=["fp16", "bf16", "fp32"], help="segment rows on the wire (default: model's)")
    p.add_argument("--no-overlap", action="store_true", help="wait for each exchange before computing on")
    p.add_argument("--chunks", type=args.positive, help="batch pieces (default: min(batch, 4); 1 without overlap)")
    p.add_argument("--seed", type=args.non_negative, default=0, help="seed of random inputs (>= 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = Parser(prog="prism-agent", description="Distributed Transformer inference on edge boxes (PRISM).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    fid = sub.add_parser("fidelity", help="compare a PRISM run with the plain local model")
    _job_options(fid, batch_required=False)
    fid.add_argument(
        "--runner", choices=["sim", "gloo"], default="sim", help="in-process ranks (default) or real GLOO processes"
    )
    fid.add_argument("--threads", type=args.positive, default=1, help="torch threads per rank")

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=Parser)
    eng = bench_sub.add_parser("engine", help="local vs full exchange vs PRISM over real GLOO processes")
    _job_options(eng, batch_required=True)
    eng.add_argument("--repeat", type=args.positive, default=5, help="timed runs per mode (median reported)")
    eng.add_argument("--warmup", type=args.non_negative, default=1, help="untimed runs per mode")

    from agent.cli import cluster_cmds, demo, policy_cmds
    from testbed import cli as testbed

    cluster_cmds.add_cli(sub)
    ins = sub.add_parser("install-service", help="install the systemd unit, user and config (root)")
    ins.add_argument("--print", dest="print_unit", action="store_true", help="only print the unit file")
    demo.add_cli(sub)
    policy_cmds.add_cli(sub)
    testbed.add_cli(sub)
    return parser


def _job_args(ns: argparse.Namespace) -> Any:
    from agent.cli.engine_cmds import JobArgs
    from engine.segments import Compression, Method

    comp = Compression(
        cr=ns.cr,
        keep_first=not ns.no_keep_first,
        keep_last=ns.keep_last,
        count_bias=not ns.no_count_bias,
        wire_dtype=ns.wire_dtype,
        method=Method.parse(ns.method),
    )
    return JobArgs(ns.model, ns.ranks, comp, ns.batch, ns.seq, ns.task, ns.seed, not ns.no_overlap, ns.chunks)


def _engine(ns: argparse.Namespace) -> int:
    import torch

    from agent.cli import engine_cmds

    if ns.command == "fidelity":
        torch.set_num_threads(ns.threads)
        result = engine_cmds.fidelity(_job_args(ns), ns.runner)
    else:
        result = engine_cmds.bench_engine(_job_args(ns), ns.warmup, ns.repeat)
    print(json.dumps(result) if ns.json else output.pairs(result))
    return 0


def _install(ns: argparse.Namespace) -> int:
    from agent.node import install

    if ns.print_unit:
        print(install.render_unit(), end="")
        return 0
    if os.geteuid() != 0:
        raise install.InstallError("install-service must run as root (or use --print)")
    for line in install.install():
        print(line)
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status."""
    ns = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Light commands first: the test bed, submit, peers and top never import torch.
    if ns.command == "testbed":
        from testbed import cli as testbed

        return testbed.run_cli(ns)
    if ns.command in ("submit", "peers", "run", "top"):
        from agent.base import logs
        from agent.cli import cluster_cmds, submit_cmd, top

        if ns.command != "run":  # a client's stdout is its output: its notes go to stderr (the daemon sets its own)
            logs.configure("console", level=logging.WARNING)

        handlers = {
            "submit": submit_cmd.run,
            "peers": cluster_cmds.peers,
            "run": cluster_cmds.run_daemon,
            "top": top.run,
        }
        return handlers[ns.command](ns)
    if ns.command in ("profile", "map"):
        from agent.cli import policy_cmds

        return policy_cmds.run_cli(ns)
    if ns.command == "install-service":
        return _install(ns)
    if ns.command == "demo":
        from agent.cli import demo

        return demo.run_cli(ns)
    return _engine(ns)


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's last flush is silent."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: every failure a person can cause is one line on stderr."""
    try:
        status = run(argv)
        sys.stdout.flush()  # inside the try: a reader that went away is noticed here
        return status
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a shell tool killed by the closed pipe returns
    except PrismError as exc:
        print(f"prism-agent: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, args.UsageError) else 1
    except OSError as exc:  # a file we could not read or write, a socket we could not open
        where = f": {exc.filename}" if exc.filename else ""
        print(f"prism-agent: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: still one line for the person, the traceback on request
        if os.environ.get("PRISM_DEBUG"):
            raise
        print(
            f"prism-agent: error: internal error ({type(exc).__name__}: {str(exc)[:200]}); "
            "PRISM_DEBUG=1 shows the traceback, please report it",
            file=sys.stderr,
        )
        return 70  # EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
