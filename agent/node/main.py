"""``prism-agent run``: load the models, find or host a broker, then run the node until signalled."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import resource
import signal
import socket
import time

import structlog

from agent.base.config import ConfigError, Settings, pick_device
from agent.base.memory import tame_malloc
from agent.base.sdnotify import Notifier
from agent.cluster import clock
from agent.cluster.admission import Admission, read_secret
from agent.cluster.boots import next_boot
from agent.jobs.service import Served
from agent.node.broker import HostedBroker, find_broker, port_free
from agent.node.daemon import Node
from engine.models import fingerprint, load, to_device
from transport.localcluster import free_port

log = structlog.get_logger("prism.main")


def load_models(settings: Settings) -> dict[str, Served]:
    """Load every configured model once (at start, before taking jobs)."""
    served = {}
    device = pick_device(settings.device)
    for spec in settings.models:
        start = time.monotonic()
        model = to_device(load(spec.source), device)
        served[spec.name] = Served(spec, model, fingerprint(model.adapter))
        log.info(
            "model_loaded", model=spec.name, source=spec.source, device=device, s=round(time.monotonic() - start, 2)
        )
    return served


def local_address(settings: Settings) -> str:
    """The IPv4 address we advertise and bind GLOO to: the chosen interface's, else the
    one that routes to the broker (127.0.0.1 for a broker on loopback)."""
    if settings.interface:
        import ifaddr

        for adapter in ifaddr.get_adapters():
            if adapter.nice_name == settings.interface:
                for ip in adapter.ips:
                    if ip.is_IPv4:
                        return str(ip.ip)
        raise ConfigError(f"interface {settings.interface!r} has no IPv4 address")
    if settings.broker is None:
        return "127.0.0.1"  # single-box mode; --interface puts the node on a LAN
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((settings.broker.host, settings.broker.port))  # UDP: sends nothing
        return str(probe.getsockname()[0])


def raise_descriptor_limit() -> int:
    """Raise the soft limit on open files to the hard one (stray connections cost descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def watchdog_interval_s() -> float | None:
    """Half systemd's watchdog period (``WATCHDOG_USEC``), if it set one for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


async def main_async(settings: Settings) -> None:
    """Load models, find or host a broker, then serve until signalled."""
    secret = read_secret(settings.secret_file)  # fail fast on a bad secret
    clock.set_offset(settings.clock_offset_s)
    if settings.clock_offset_s:
        log.warning("clock_offset", offset_s=settings.clock_offset_s, hint="a test hook: this agent's clock is shifted")
    try:
        boot_n = await asyncio.to_thread(next_boot, settings.state_file("boot"), clock.wall_s())
    except OSError as exc:
        raise ConfigError(f"cannot count this boot in {settings.state_file('boot')}: {exc.strerror}") from None
    admission = Admission(secret, settings.cluster, boot_n=boot_n, max_skew_s=settings.max_clock_skew_s)
    if not settings.models:
        raise ConfigError("no model to serve: pass --model NAME=SOURCE (or [models] in the config file)")
    files = raise_descriptor_limit()
    tame_malloc()
    models = await asyncio.to_thread(load_models, settings)
    address = local_address(settings)
    async with contextlib.AsyncExitStack() as stack:
        if settings.broker is None:
            broker = await find_broker(address)
            if broker is None:  # a random pause, so two boxes starting together rarely both host one
                await asyncio.sleep(random.uniform(0.0, 1.0))
                broker = await find_broker(address, wait_s=0.5)
            if broker is None:
                port = 1883 if port_free(address, 1883) else free_port(address)
                state = settings.journal_path().parent
                hosted = HostedBroker(address, port, settings.node_id, workdir=state / f"broker-{settings.node_id}")
                broker = (await stack.enter_async_context(hosted)).broker
            else:
                log.info("broker_found", broker=f"{broker.host}:{broker.port}", via="mdns")
            settings = dataclasses.replace(settings, broker=broker)
        if admission.open:
            log.warning("running_open", hint="no cluster secret: any agent on this network can join; set secret_file")
        node = Node(
            settings,
            models,
            address=address,
            admission=admission,
            notifier=Notifier(os.environ.get("NOTIFY_SOCKET")),
            watchdog_s=watchdog_interval_s(),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.stop.set)
        log.info(
            "node_starting",
            node=settings.node_id,
            address=address,
            open_files=files,
            boot=admission.boot,
            boot_n=boot_n,
        )
        await node.run()
