"""``prism-agent run``: the daemon's lifecycle (DESIGN.md §6).

One task group for jobs, which outlives connections, and one per broker connection; every
task named. On connect (a persistent MQTT 5 session, so the broker queues jobs while we are
away): subscribe (shared job topic and this node's own), publish a retained ``online`` birth
(the Last Will says ``offline``), send the results queued meanwhile, then take jobs. A lost
connection is retried with capped full-jitter backoff while jobs keep running; a refused
login is not retried. SIGTERM stops intake, lets in-flight jobs finish within the grace
period, sends their results, publishes ``offline`` and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import time
from collections.abc import Mapping
from typing import Any

import aiomqtt
import structlog

from agent.cluster.admission import Admission, read_secret
from agent.cluster.discovery import Discovery, advert
from agent.cluster.groups import GroupManager
from agent.cluster.peers import Peer, PeerTable
from agent.cluster.probes import ProbeServer, probe
from agent.compat import BaseExceptionGroup, TaskGroup
from agent.jobs.auto import AutoPolicy
from agent.jobs.replies import Outbox, Recent, Reply, job_key
from agent.jobs.service import JobService, Served
from agent.node.broker import HostedBroker, find_broker, port_free
from agent.node.config import ConfigError, Settings, mqtt_credentials, pick_device, tls_context
from agent.node.energy import find_meter
from agent.node.metrics import Metrics
from agent.node.monitors import LinkTable, read_load
from agent.node.sdnotify import Notifier
from engine.adapters import Tensors
from engine.localcluster import free_port
from engine.models import fingerprint, load, to_device
from engine.program import JobSpec
from engine.trace import RunResult
from policy.perfmap import hardware_fingerprint
from transport.mqtt import MqttLink, Topics, TransportError, backoff_s, reply_route, transport_error
from transport.schema import Result

log = structlog.get_logger("prism.daemon")
VERSION = "0.1.0"
GRACE_S = 30.0
FLUSH_S = 10.0


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


class Daemon:
    """A node: its settings, models, peers, job service and broker connection."""

    def __init__(
        self,
        settings: Settings,
        models: Mapping[str, Served],
        notifier: Notifier | None = None,
        address: str = "127.0.0.1",
        admission: Admission | None = None,
    ) -> None:
        self.settings = settings
        self.address = address
        self.admission = admission or Admission(None, settings.cluster)
        self.peers = PeerTable(settings.cluster, settings.node_id, max_age_s=max(15.0, 3 * settings.health_interval_s))
        self.groups = GroupManager(
            settings.node_id,
            address,
            settings.group_timeout_s,
            models,
            self._publish,
            lambda node: f"{settings.topic_root}/nodes/{node}/control",
            self.admission,
        )
        fingerprints = {name: served.fingerprint for name, served in models.items()}
        self.service = JobService(settings, models, self, find_meter(), AutoPolicy.load(settings, fingerprints))
        self.links = LinkTable()
        self.metrics = Metrics(settings.node_id, VERSION, self.service.meter)
        self.hardware = hardware_fingerprint(settings.threads, pick_device(settings.device))
        self.probe_port = 0
        self._link: MqttLink | None = None
        self.topics = Topics(settings.topic_root, settings.node_id)
        self.notifier = notifier or Notifier(None)
        self.stop = asyncio.Event()
        self._jobs: set[asyncio.Task[None]] = set()
        self._job_seq = 0
        self._jobs_tg: TaskGroup | None = None
        self.outbox = Outbox()
        self.recent: Recent[Result] = Recent()

    # -- Distributor, for the job service ---------------------------------------------
    def peers_for(self, model: str, fingerprint: float) -> list[Peer]:
        """Alive peers serving ``model`` with the same weights, least loaded first."""
        return self.peers.able(model, fingerprint, time.monotonic())

    async def run_distributed(self, served: Served, spec: JobSpec, inputs: Tensors, peers: list[Peer]) -> RunResult:
        """Run over a GLOO group with ``peers``; what crossed the group also feeds the link table."""
        result = await self.groups.run(served, spec, inputs, peers)
        mine = result.traces[0]
        if mine.comm_s > 0 and mine.exchange_bytes_recv > 0:
            # Bytes over time spent in collectives: a lower bound on the link (it includes waiting
            # for the slower rank), so it is reported beside the probes' figure, never mixed in.
            mbps = (mine.exchange_bytes_recv + mine.exchange_bytes_sent) * 8 / mine.comm_s / 1e6
            for peer in peers:
                self.links.observe_gloo(peer.node, time.monotonic(), mbps)
        return result

    def link_report(self) -> dict[str, dict[str, Any]]:
        """Per-peer link estimates (for the auto policy)."""
        return self.links.report(time.monotonic())

    async def _publish(self, topic: str, payload: bytes) -> None:
        if self._link is None:
            raise TransportError("not connected to the broker")
        await self._link.publish(topic, payload)

    async def run(self) -> None:
        """Serve until :attr:`stop` is set; reconnect on failures."""
        interfaces = [self.address]
        s = self.settings
        info = advert(s.node_id, s.cluster, self.address, 0, VERSION, sorted(self.service.models), self.admission)
        discovery = Discovery(self.peers, info, interfaces, admission=self.admission)
        serving = self.metrics.serving(s.metrics_address, s.metrics_port)
        async with ProbeServer(self.address) as probes, discovery, serving:
            self.probe_port = probes.port
            await self._serve()

    async def _serve(self) -> None:
        """Connect, serve, reconnect. Jobs live in a task group of their own, so a lost
        connection does not cancel them: their results wait in the outbox for the next one."""
        failure: Exception | None = None
        async with TaskGroup() as jobs:
            self._jobs_tg = jobs
            try:
                await self._reconnecting()
            except Exception as exc:  # noqa: BLE001 - raised again below, once the jobs are cancelled
                failure = exc
            finally:
                self._jobs_tg = None
                unfinished = [task for task in self._jobs if not task.done()]
                if unfinished or self.outbox:
                    log.warning("unanswered_at_stop", jobs_cancelled=len(unfinished), results_unsent=len(self.outbox))
                for task in unfinished:
                    task.cancel()
        self.notifier.notify("STOPPING=1")
        if failure is not None:
            raise failure

    async def _reconnecting(self) -> None:
        broker = self.settings.broker
        assert broker is not None
        attempt = 0
        while not self.stop.is_set():
            try:
                await self._connected(broker.host, broker.port)
                attempt = 0
            except TransportError as exc:
                if exc.fatal:
                    log.error("mqtt_refused", error=str(exc), hint="check username/password; not retrying")
                    raise
                delay = backoff_s(attempt, self.settings.reconnect_min_s, self.settings.reconnect_max_s)
                attempt += 1
                log.warning(
                    "mqtt_reconnect", error=str(exc), in_s=round(delay, 3), attempt=attempt, jobs=len(self._jobs)
                )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)

    async def _connected(self, host: str, port: int) -> None:
        will = (self.topics.status, b"offline")
        try:
            username, password = mqtt_credentials(self.settings)
            link_cm = MqttLink(
                host,
                port,
                client_id=f"prism-{self.settings.cluster}-{self.settings.node_id}",
                will=will,
                username=username,
                password=password,
                tls=tls_context(self.settings),
                session_expiry_s=self.settings.session_expiry_s,
            )
            async with link_cm as link:
                self._link = link
                await link.subscribe(self.topics.shared_jobs, self.topics.my_jobs, *self._watched)
                await link.publish(self.topics.status, b"online", retain=True)
                log.info(
                    "mqtt_connected",
                    broker=f"{host}:{port}",
                    node=self.settings.node_id,
                    jobs=len(self._jobs),
                    results_queued=len(self.outbox),
                )
                self.notifier.notify("READY=1")
                async with TaskGroup() as tg:
                    intake = tg.create_task(self._intake(link), name="intake")
                    stop = tg.create_task(self.stop.wait(), name="stop-signal")
                    background = [
                        tg.create_task(self._send_results(link), name="results"),
                        tg.create_task(self._health(link), name="health"),
                        tg.create_task(self.groups.serve_control(), name="control"),
                        tg.create_task(self._probe_links(), name="link-probes"),
                    ]
                    await asyncio.wait({intake, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if intake.done():  # the connection dropped: let the group raise it
                        for task in [stop, *background]:
                            task.cancel()
                        intake.result()
                    # Stop intake: leave the job topics first so nothing new lands here, then
                    # finish what was admitted, send the results and say goodbye. The session
                    # outlives us: leave the other topics too, so the broker queues nothing for it.
                    await link.unsubscribe(self.topics.shared_jobs, self.topics.my_jobs)
                    intake.cancel()
                    await self._drain()
                    self.service.auto.save_if_due(force=True)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.outbox.flushed(), FLUSH_S)
                    await link.unsubscribe(*self._watched)
                    await link.publish(self.topics.status, b"offline", retain=True)
                    for task in background:
                        task.cancel()
                log.info("stopped", **self.service.stats)
        except BaseExceptionGroup as group:
            transport = transport_error(group)
            if transport is not None:
                raise transport from group  # the connection is gone: the broker sends our Last Will
            await self._say_offline()
            raise
        except Exception:
            await self._say_offline()
            raise
        finally:
            self._link = None

    @property
    def _watched(self) -> tuple[str, ...]:
        """Every topic but the job topics: control, and every node's health and status."""
        return (self.topics.control, self.topics.all_health, self.topics.all_status)

    async def _say_offline(self) -> None:
        """After a crash the client still disconnects cleanly, which cancels the Last Will: say it ourselves."""
        if self._link is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._link.publish(self.topics.status, b"offline", retain=True), 2.0)

    async def _drain(self) -> None:
        if self._jobs:
            log.info("draining", jobs=len(self._jobs), grace_s=GRACE_S)
            _done, pending = await asyncio.wait(set(self._jobs), timeout=GRACE_S)
            for task in pending:
                task.cancel()

    async def _intake(self, link: MqttLink) -> None:
        async for message in link.messages():
            topic = str(message.topic)
            if not topic.endswith("/jobs"):
                try:
                    self._observe(topic, message)
                except Exception as exc:  # noqa: BLE001 - one odd message must never stop the node
                    log.warning("message_ignored", topic=topic, error=f"{type(exc).__name__}: {str(exc)[:120]}")
                continue
            if message.retain:  # a retained job would re-run on every (re)subscribe
                log.warning("retained_job_ignored", topic=topic)
                continue
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            route = reply_route(message)
            key = job_key(payload)
            if key in self.recent:  # redelivered (QoS 1 is at-least-once)
                stored = self.recent.get(key)
                log.info("duplicate_job", job=stored.id if stored else None, answered=stored is not None)
                if stored is not None:
                    self._queue_reply(payload, route, stored)
                continue
            self.recent.start(key)
            self._job_seq += 1
            self._spawn(self._answer(payload, route, key), f"job-{self._job_seq}")

    async def _answer(self, payload: bytes, route: tuple[str | None, bytes | None], key: bytes) -> None:
        try:
            result = await self.service.handle(payload)
        except BaseException:
            self.recent.forget(key)  # cancelled: a redelivery may run it
            raise
        self.recent.finish(key, result)
        self.metrics.job_done(result)
        self._queue_reply(payload, route, result)

    def _queue_reply(self, payload: bytes, route: tuple[str | None, bytes | None], result: Result) -> None:
        """Encode ``result`` like the job (JSON or msgpack) for the outbox."""
        response_topic, correlation = route
        topic = response_topic or (self.topics.result(result.id) if result.id else None)
        if topic is None:
            log.warning("unanswerable_payload", head=payload[:80].decode(errors="replace"))
            return
        as_msgpack = not payload.lstrip().startswith(b"{")
        try:
            encoded = result.encode(as_msgpack)
        except Exception:  # a bug must cost one job its answer, not the daemon
            log.exception("result_unencodable", job=result.id)
            return
        self.outbox.put(Reply(topic, encoded, correlation, result.id))

    async def _send_results(self, link: MqttLink) -> None:
        """Publish queued results in order; one stays queued until the broker acknowledged it."""
        while True:
            reply = await self.outbox.first()
            try:
                await link.publish(reply.topic, reply.payload, correlation=reply.correlation)
            except TransportError as exc:
                if not isinstance(exc.__cause__, ValueError):
                    raise  # the connection is gone: the next one sends it
                log.warning("reply_failed", job=reply.job, error=str(exc))
            self.outbox.sent(reply)

    def _observe(self, topic: str, message: aiomqtt.Message) -> None:
        """Control for this node, and every node's health and status."""
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        if topic == self.topics.control:
            self.groups.control(payload)
            return
        node = topic.split("/")[-2]
        if node == self.settings.node_id:
            return
        if topic.endswith("/status"):
            if payload == b"offline":
                self.peers.offline(node)
                self._spawn(self.groups.membership_changed({node}), f"membership-{node}")
            return
        try:
            health = json.loads(payload)
            signed = {str(k): str(v) for k, v in health["admission"].items()}
            if not self.admission.verify(signed, time.time()) or signed["node"] != node:
                log.warning("admission_refused", node=node, via="health")
                return
            # Only signed fields decide who the peer is, where it is and which weights it has.
            peer = Peer(
                node=signed["node"],
                cluster=self.settings.cluster,
                address=signed["address"],
                models={str(k): float(v) for k, v in json.loads(signed["fingerprints"]).items()},
                version=str(health.get("version", "")),
                load1=float(health["load"]["load1"] or 0.0),
                cpus=max(1, int(health["load"].get("cpus") or 1)),
                queue=int(health["load"]["queue"]),
                probe_port=int(signed["probe_port"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            log.info("health_ignored", node=node)
            return
        if self.peers.get(node) is None:
            log.info("peer_seen", node=node, address=peer.address, via="mqtt")
        self.peers.seen(peer, time.monotonic())

    def _spawn(self, coro: Any, name: str) -> None:
        """A job (or a short task) in the jobs' task group, which outlives connections."""
        if self._jobs_tg is None:
            coro.close()
            return
        task = self._jobs_tg.create_task(coro, name=name)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _probe_links(self) -> None:
        """Time a short transfer to every alive peer, every ``probe_interval_s``."""
        while True:
            for peer in self.peers.alive(time.monotonic()):
                if not peer.probe_port:
                    continue
                try:
                    rtt_ms, mbps = await probe(peer.address, peer.probe_port)
                except (OSError, asyncio.TimeoutError) as exc:
                    log.info("probe_failed", peer=peer.node, error=str(exc)[:120])
                    continue
                self.links.observe(peer.node, time.monotonic(), rtt_ms=rtt_ms, mbps=mbps, source="probe")
            await asyncio.sleep(self.settings.probe_interval_s)

    def health(self) -> dict[str, Any]:
        """The retained health document (who/where/which weights is signed under ``admission``)."""
        fingerprints = {name: s.fingerprint for name, s in self.service.models.items()}
        return {
            "node": self.settings.node_id,
            "time": time.time(),
            "version": VERSION,
            "load": {**read_load(), "queue": self.service.queue_depth},
            "energy_source": self.service.meter.source,
            "jobs": dict(self.service.stats),
            "models": sorted(self.service.models),
            "fingerprints": fingerprints,
            "families": {name: s.model.adapter.family for name, s in self.service.models.items()},
            "hardware": self.hardware,
            "address": self.address,
            "peers": [p.node for p in self.peers.alive(time.monotonic())],
            "links": self.links.report(time.monotonic()),
            "probe_port": self.probe_port,
            "admission": self.admission.sign(
                {
                    "node": self.settings.node_id,
                    "address": self.address,
                    "fingerprints": json.dumps(fingerprints, sort_keys=True),
                    "probe_port": str(self.probe_port),
                },
                time.time(),
            ),
        }

    async def _health(self, link: MqttLink) -> None:
        while True:
            health = self.health()
            self.metrics.health_tick(health, self.service.auto.corrections)
            await link.publish(self.topics.health, json.dumps(health).encode(), retain=True, qos=0)
            self.notifier.notify("WATCHDOG=1")
            await asyncio.to_thread(self.service.auto.save_if_due)
            await asyncio.sleep(self.settings.health_interval_s)


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM and SIGINT start a graceful stop."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stop.set)


async def main_async(settings: Settings) -> None:
    """Load models, find or host a broker, then serve until signalled."""
    admission = Admission(read_secret(settings.secret_file), settings.cluster)  # fail fast on a bad secret
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
                broker = (await stack.enter_async_context(HostedBroker(address, port, settings.node_id))).broker
            else:
                log.info("broker_found", broker=f"{broker.host}:{broker.port}", via="mdns")
            settings = dataclasses.replace(settings, broker=broker)
        if admission.open:
            log.warning("running_open", hint="no cluster secret: any agent on this network can join; set secret_file")
        daemon = Daemon(settings, models, Notifier(os.environ.get("NOTIFY_SOCKET")), address, admission)
        install_signal_handlers(daemon)
        await daemon.run()
