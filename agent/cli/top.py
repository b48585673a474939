"""``prism-agent top``: a live view of a cluster from what its broker already carries.

It subscribes to the retained ``nodes/+/status`` and ``nodes/+/health`` topics (nothing
else: a stock broker and a client login that may read them are all it needs), keeps them in
a :class:`~agent.cli.top_view.ClusterView` and redraws about once a second: nodes (status,
load, queue, engine version, speed, models), links as each node probed them, and the last
jobs' decisions from the nodes' health. With a cluster secret (``--secret-file`` or
``PRISM_SECRET_FILE``) it shows only what verifies. ``--once`` listens for
:data:`LISTEN_S` (long enough for the retained messages) and prints one snapshot; with
``--json``, as one JSON object. A lost broker is retried with backoff and said in the header.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from agent.base.config import Broker
from agent.cli import args, cluster_cmds
from agent.cli.top_view import JOBS_SHOWN, ClusterView, Snapshot, render
from agent.client import Auth
from transport.mqtt import MqttLink, TransportError, backoff_s, transport_error

#: Seconds ``--once`` listens: retained messages come right after the subscription.
LISTEN_S = 1.5


def add_parser(sub: Any) -> None:
    """Register ``top``."""
    tp = sub.add_parser("top", help="a live view of the cluster: nodes, links, recent jobs' decisions")
    cluster_cmds.broker_flags(tp)
    tp.add_argument(
        "--secret-file",
        dest="secret_file",
        type=args.existing_file,
        default=None,
        help="cluster secret: show only what its members signed (default: $PRISM_SECRET_FILE)",
    )
    tp.add_argument("--interval", type=args.seconds, default=1.0, help="seconds between redraws (default 1)")
    tp.add_argument("--jobs", type=args.positive, default=JOBS_SHOWN, help=f"recent jobs shown (default {JOBS_SHOWN})")
    tp.add_argument("--once", action="store_true", help="print one snapshot and exit")
    tp.add_argument("--json", action="store_true", help="with --once: the snapshot as one JSON object")


def run(ns: argparse.Namespace) -> int:
    """``prism-agent top``."""
    from agent.client import client_auth
    from agent.cluster.admission import Admission, read_secret
    from agent.cluster.trust import Trust

    if ns.json and not ns.once:
        raise args.UsageError("--json prints one snapshot: give --once with it")
    settings, broker = cluster_cmds.client_settings(ns.broker, ns.cluster)
    secret = read_secret(str(ns.secret_file) if ns.secret_file else settings.secret_file)
    view = ClusterView(Trust(Admission(secret, settings.cluster)))
    where = cluster_cmds.broker_text(broker)
    auth = client_auth(settings)
    if ns.once:
        asyncio.run(_once(broker, settings.cluster, view, auth))
        snap = view.snapshot(settings.cluster, where, time.time(), ns.jobs)
        if ns.json:
            print(json.dumps(snap.to_dict()))
        else:
            _console().print(render(snap))
        return 0
    asyncio.run(_live(broker, settings.cluster, where, view, auth, ns.interval, ns.jobs))
    return 0


def _console() -> Any:
    from rich.console import Console

    return Console()


def _link(broker: Broker, auth: Auth) -> MqttLink:
    return MqttLink(broker.host, broker.port, client_id=f"prism-top-{uuid.uuid4().hex[:8]}", **auth)


async def _listen(link: MqttLink, cluster: str, view: ClusterView) -> None:
    """Feed ``view`` from one connection until it drops."""
    root = f"prism/v1/{cluster}"
    await link.subscribe(f"{root}/nodes/+/status", f"{root}/nodes/+/health")
    view.connected = True
    async for message in link.messages():
        parts = str(message.topic).split("/")
        if len(parts) != 6:
            continue
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        if parts[-1] == "status":
            view.status(parts[-2], payload, time.time())
        elif parts[-1] == "health":
            view.health(parts[-2], payload, time.time())


async def _once(broker: Broker, cluster: str, view: ClusterView, auth: Auth) -> None:
    async with _link(broker, auth) as link:
        with contextlib.suppress(asyncio.TimeoutError):  # listened long enough
            await asyncio.wait_for(_listen(link, cluster, view), LISTEN_S)


async def _connections(broker: Broker, cluster: str, view: ClusterView, auth: Auth) -> None:
    """Listen forever, reconnecting with backoff; a refused login ends it (it will not get better)."""
    attempt = 0
    while True:
        started = time.monotonic()
        try:
            async with _link(broker, auth) as link:
                await _listen(link, cluster, view)
        except TransportError as exc:
            if exc.fatal:
                raise
        view.connected = False
        attempt = 0 if time.monotonic() - started > 10 else attempt + 1
        await asyncio.sleep(backoff_s(attempt, 0.2, 5.0))


async def _live(
    broker: Broker, cluster: str, where: str, view: ClusterView, auth: Auth, interval_s: float, jobs: int
) -> None:
    from rich.live import Live

    from agent.compat import BaseExceptionGroup, TaskGroup

    async with _link(broker, auth):
        pass  # an unreachable broker or a refused login is one error line at once, not a retry loop

    def snapshot() -> Snapshot:
        return view.snapshot(cluster, where, time.time(), jobs)

    with Live(render(snapshot()), console=_console(), auto_refresh=False, screen=False) as live:
        try:
            async with TaskGroup() as tg:
                tg.create_task(_connections(broker, cluster, view, auth), name="top-listen")
                while True:
                    await asyncio.sleep(interval_s)
                    live.update(render(snapshot()), refresh=True)
        except BaseExceptionGroup as group:
            error = transport_error(group)
            if error is None:
                raise
            raise error from None
