"""The cluster commands: ``run`` (the daemon), ``submit`` (jobs; :mod:`agent.cli.submit_cmd`), ``peers``
and ``top`` (a live view; :mod:`agent.cli.top`).

``submit``, ``peers``, ``top`` and ``profile --peers`` find the broker and cluster the way the agent
does: flags win, then ``PRISM_BROKER`` / ``PRISM_CLUSTER`` (and the other ``PRISM_*`` login
and TLS settings), then ``mqtt://127.0.0.1:1883`` and ``default``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from agent.base.config import Broker, ConfigError, Settings, load_settings, parse_broker, pick_device
from agent.cli import args, output

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
#: Settings ``run`` takes from flags (the rest come from --config and PRISM_* variables).
RUN_FLAGS = (
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
    "metrics_port",
)


def add_cli(sub: Any) -> None:
    """Register ``run``, ``submit``, ``peers`` and ``top``."""
    run = sub.add_parser("run", help="run the agent daemon (MQTT job service)")
    run.add_argument("--config", type=args.existing_file, default=None, help="TOML settings file")
    run.add_argument(
        "--broker",
        type=args.broker,
        default=None,
        help="mqtt://host:port (default: one advertised over mDNS, else host one)",
    )
    run.add_argument("--cluster", type=args.name, default=None, help="cluster name (topic root prism/v1/NAME)")
    run.add_argument("--node-id", dest="node_id", type=args.name, default=None, help="this node's id (default: host)")
    run.add_argument("--interface", default=None, help="network interface for discovery and GLOO")
    run.add_argument(
        "--model",
        dest="models",
        action="append",
        default=None,
        metavar="NAME=SOURCE",
        help="serve a model (repeatable); SOURCE is a directory, hub id or built-in name",
    )
    run.add_argument("--threads", type=args.positive, default=None, help="torch threads")
    run.add_argument(
        "--secret-file", dest="secret_file", type=args.existing_file, default=None, help="cluster secret (admits peers)"
    )
    run.add_argument("--log-format", dest="log_format", choices=["auto", "json", "console"], default=None)
    run.add_argument(
        "--map", dest="map_file", type=args.existing_file, default=None, help="performance map for auto mode"
    )
    run.add_argument("--objective", choices=["latency", "energy"], default=None, help="what auto mode minimises")
    run.add_argument(
        "--metrics-port", dest="metrics_port", type=args.port, default=None, help="Prometheus endpoint port (0: off)"
    )

    from agent.cli import submit_cmd, top  # they use this module's broker flags and settings

    submit_cmd.add_parser(sub)
    top.add_parser(sub)

    pe = sub.add_parser("peers", help="list the cluster's nodes: status, address, load, models, peers")
    broker_flags(pe)
    pe.add_argument("--json", action="store_true", help="print a JSON list of nodes")


def broker_flags(p: argparse.ArgumentParser) -> None:
    """``--broker`` and ``--cluster`` of a client command."""
    p.add_argument(
        "--broker",
        type=args.broker,
        default=None,
        help=f"mqtt://host:port (default: $PRISM_BROKER, else {DEFAULT_BROKER})",
    )
    p.add_argument("--cluster", type=args.name, default=None, help="cluster (default: $PRISM_CLUSTER, else default)")


def client_settings(broker: str | None, cluster: str | None) -> tuple[Settings, Broker]:
    """The settings a client uses (flags over ``PRISM_*``), and the broker to dial."""
    settings = load_settings(None, os.environ, {"broker": broker, "cluster": cluster})
    return settings, settings.broker or parse_broker(DEFAULT_BROKER)


def broker_text(broker: Broker) -> str:
    """``mqtt://host:port`` for messages."""
    return f"{'mqtts' if broker.tls else 'mqtt'}://{broker.host}:{broker.port}"


def preflight(settings: Settings) -> None:
    """What ``run`` can check before loading models (which takes a while): fail at once instead."""
    from agent.cluster.admission import read_secret
    from policy.perfmap import MapError, load_map

    if not settings.models:
        # An agent with no model answers every job unknown_model and can help no peer; a unit that
        # starts like that is a mistake an operator wants to see at once, not an idle service.
        raise ConfigError("no model to serve: give --model NAME=SOURCE (or [models] in --config, or PRISM_MODELS)")
    pick_device(settings.device)
    read_secret(settings.secret_file)
    if settings.map_file:
        try:
            load_map(Path(settings.map_file))
        except MapError as exc:
            raise ConfigError(f"map_file: {exc} (profile one with prism-agent profile, or unset map_file)") from None
    if settings.interface:
        import ifaddr

        names = sorted(a.nice_name for a in ifaddr.get_adapters())
        if settings.interface not in names:
            raise ConfigError(f"interface {settings.interface!r} does not exist (this box has: {', '.join(names)})")


def run_daemon(ns: argparse.Namespace) -> int:
    """``prism-agent run``."""
    import torch

    from agent.base import logs
    from agent.node import main

    overrides = {k: getattr(ns, k) for k in RUN_FLAGS}
    for key in ("map_file", "secret_file"):
        overrides[key] = None if overrides[key] is None else str(overrides[key])
    settings = load_settings(ns.config, os.environ, overrides)
    preflight(settings)
    logs.configure(settings.log_format)
    torch.set_num_threads(settings.threads)
    asyncio.run(main.main_async(settings))
    return 0


def peers(ns: argparse.Namespace) -> int:
    """``prism-agent peers``."""
    from agent.client import client_auth
    from agent.client import peers as listen

    settings, broker = client_settings(ns.broker, ns.cluster)
    nodes = asyncio.run(listen(broker, settings.cluster, auth=client_auth(settings)))
    if ns.json:
        print(json.dumps(nodes))
        return 0
    if not nodes:
        print(f"no nodes in cluster '{settings.cluster}' on {broker_text(broker)}")
        return 0
    rows = []
    for n in nodes:
        h = n.get("health") or {}
        load = h.get("load") or {}
        rows.append(
            {
                "node": n["node"],
                "status": n["status"],
                "address": h.get("address"),
                "load1": load.get("load1"),
                "queue": load.get("queue"),
                "models": h.get("models"),
                "peers": h.get("peers"),
            }
        )
    print(output.table(rows))
    return 0
