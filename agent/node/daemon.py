"""A node's lifecycle (docs/design.md §6): one root task group, supervised loops, a graceful stop.

The node opens its job journal (re-running what a crash interrupted), starts its probe server and mDNS advert, then
runs, each supervised (agent/base/supervise.py): the broker connection (capped full-jitter backoff; a refused login
is fatal), the watchdog, link probes, group upkeep and the map saver, plus one task per job or group duty. Per
connection it subscribes (a persistent MQTT 5 session), publishes a retained ``online`` (the Last Will says
``offline``), routes messages — jobs to the intake, control to the groups, health and status to the observer — and
publishes results and health. Jobs are acknowledged once journalled and outlive connections. SIGTERM: see
:meth:`Node._stop_serving`; then ``STOPPING=1``, and the journal and the engine are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import Any

import structlog

from agent.base.config import Settings, mqtt_credentials, pick_device, tls_context
from agent.base.energy import Meter, find_meter
from agent.base.engine import Engine
from agent.base.monitors import read_load
from agent.base.sdnotify import Notifier
from agent.base.supervise import RESTARTS, guarded, supervise
from agent.cluster.admission import Admission
from agent.cluster.channel import ControlChannel
from agent.cluster.discovery import Discovery, advert
from agent.cluster.group import Timing
from agent.cluster.groups import GroupManager
from agent.cluster.health import Observer, build_health, status_payload
from agent.cluster.links import LinkTable, probe_loop
from agent.cluster.peers import Peer, PeerTable
from agent.cluster.probes import ProbeServer
from agent.cluster.trust import Trust
from agent.cluster.upkeep import upkeep
from agent.compat import BaseExceptionGroup, TaskGroup
from agent.jobs.auto import AutoPolicy
from agent.jobs.intake import Arrival, Intake
from agent.jobs.journal import Journal
from agent.jobs.replies import Outbox
from agent.jobs.service import JobService, Served
from agent.node.metrics import Metrics
from engine.adapters import Tensors
from engine.program import ENGINE_VERSION, JobSpec
from engine.trace import RunResult
from policy.perfmap import hardware_fingerprint
from transport.health import Health
from transport.mqtt import MqttLink, Topics, TransportError, backoff_s, reply_route, transport_error
from transport.schema import WireError

log = structlog.get_logger("prism.node")
VERSION = "0.2.0"
GRACE_S = 30.0
FLUSH_S = 10.0
#: A connection that lasted this long resets the reconnect backoff.
GOOD_CONNECTION_S = 10.0
#: A peer that failed to form a group, or said nothing while asked for its engine, sits out splits this long.
UNRESPONSIVE_S = 30.0
LinkFactory = Callable[[], AbstractAsyncContextManager[MqttLink]]


class Node:
    """A node: its settings, models, peers, engine, jobs and broker connection."""

    def __init__(
        self,
        settings: Settings,
        models: Mapping[str, Served],
        *,
        address: str = "127.0.0.1",
        admission: Admission | None = None,
        notifier: Notifier | None = None,
        meter: Meter | None = None,
        link_factory: LinkFactory | None = None,
        watchdog_s: float | None = None,
    ) -> None:
        s = settings
        self.settings = s
        self.address = address
        self.admission = admission or Admission(None, s.cluster)
        self.notifier = notifier or Notifier(None)
        self.watchdog_s = watchdog_s or s.health_interval_s
        self.topics = Topics(s.topic_root, s.node_id)
        self.stop = asyncio.Event()
        self.connected = asyncio.Event()  # set while subscribed to the broker
        self.failure: BaseException | None = None
        self.accepting = True
        self.probe_port = 0
        self.peers = PeerTable(s.cluster, s.node_id, max(15.0, 3 * s.health_interval_s), ENGINE_VERSION)
        self.links = LinkTable(probe_backoff_s=s.probe_backoff_s)
        self.engine = Engine()
        self.journal = Journal(s.journal_path(), sync=s.journal_sync, max_bytes=s.journal_max_bytes)
        self.outbox = Outbox(s.outbox_max_bytes)
        self.trust = Trust(self.admission, s.state_file("fresh", ".json"))
        self.channel = ControlChannel(
            s.node_id, self.trust, self._publish, lambda n: f"{s.topic_root}/nodes/{n}/control"
        )
        self.groups = GroupManager(
            s.node_id,
            address,
            models,
            self.channel,
            self.engine,
            self._spawn,
            Timing(s.group_timeout_s, s.collective_timeout_s, s.group_idle_s, s.peer_silence_s),
            lambda node: getattr(self.links.links.get(node), "mbps", None),
            data_key=None if self.admission.open else self.admission.key("gloo"),
            on_unresponsive=self._sit_out,
            on_silent=lambda node: self._sit_out(node, until_heard=True),
            on_busy=self.peers.busy,
            address_of=lambda node: getattr(self.peers.get(node), "address", None),
        )
        auto = AutoPolicy.load(s, {name: served.fingerprint for name, served in models.items()})
        self.service = JobService(s, models, self, meter or find_meter(), auto, self.engine)
        self.metrics = Metrics(s.node_id, VERSION, self.service.meter)
        self.intake = Intake(self.service, self.journal, self.outbox, self.topics, self._spawn, self.metrics)
        self.observer = Observer(
            s.node_id, s.cluster, self.peers, self.trust, self.groups.membership_changed, self._spawn
        )
        self._conn_seq: int | None = None  # the sequence of this connection's online and Last Will
        self.hardware = hardware_fingerprint(s.threads, pick_device(s.device))
        self._link_factory = link_factory or self._mqtt_link
        self._link: MqttLink | None = None
        self._tg: TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the distributor the job service uses -------------------------------------------
    def peers_for(self, model: str, fingerprint: float) -> list[Peer]:
        """Alive peers serving ``model`` with the same weights, least loaded first."""
        return self.peers.able(model, fingerprint, time.monotonic())

    async def run_distributed(self, served: Served, spec: JobSpec, inputs: Tensors, peers: list[Peer]) -> RunResult:
        """Run over a GLOO group with ``peers``; what crossed the group also feeds the link table."""
        result = await self.groups.run(served, spec, inputs, peers)
        self.links.observe_run([p.node for p in peers], result.traces[0], time.monotonic())
        return result

    def link_report(self) -> dict[str, dict[str, Any]]:
        """Per-peer link estimates (for the auto policy)."""
        return self.links.report(time.monotonic())

    # -- tasks --------------------------------------------------------------------------
    def _sit_out(self, node: str, until_heard: bool = False) -> None:
        """Leave ``node`` out of splits a while (it failed a group), or until heard from (it went silent)."""
        now = time.monotonic()
        self.peers.suspend(node, now + UNRESPONSIVE_S, now if until_heard else None)
        log.warning("peer_suspended", node=node, seconds=UNRESPONSIVE_S, until_heard=until_heard)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task in the root group; its exceptions are logged, never allowed to stop the node."""
        if self._tg is None:
            coro.close()
            raise RuntimeError("the node is not running")
        task = self._tg.create_task(guarded(coro, name), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _publish(self, topic: str, payload: bytes) -> None:
        if self._link is None:
            raise TransportError("not connected to the broker")
        await self._link.publish(topic, payload)

    # -- lifecycle ----------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until :attr:`stop` is set (or the broker refuses our login: then raise that)."""
        s = self.settings
        recovery = await self.journal.open()
        try:
            probes_server = ProbeServer(self.address, max_connections=s.probe_max_connections)
            async with probes_server as probes, self.metrics.serving(s.metrics_address, s.metrics_port):
                self.probe_port = probes.port
                served = sorted(self.service.models)
                trust = None if self.trust.open else self.trust

                def make_info(name: str | None) -> Any:
                    return advert(s.node_id, s.cluster, self.address, probes.port, VERSION, served, trust, name)

                discovery = Discovery(self.peers, make_info, [self.address], self.trust, check=self.observer.check,
                                      name_check_ms=s.mdns_name_check_ms)  # fmt: skip
                async with discovery, TaskGroup() as tg:
                    self._tg = tg
                    await self.intake.recover(recovery)
                    use, working = self.groups.link_use.of, self.engine.working
                    loops = {
                        "watchdog": self._watchdog,
                        "link-probes": lambda: probe_loop(self.peers, self.links, s.probe_interval_s, use, working),
                        "groups": lambda: upkeep(self.groups),
                        "map-saver": self._save_map,
                        "mqtt": self._connections,
                    }
                    tasks = [tg.create_task(supervise(n, body), name=n) for n, body in loops.items()]
                    # Models loaded, journal recovered, intake and watchdog running: the node is
                    # up, and takes jobs once a broker answers (which may be much later; under
                    # Type=notify a READY held back until then made systemd kill and restart it).
                    self.notifier.notify("READY=1")
                    await self.stop.wait()
                    await self._stop_serving()
                    for task in [*tasks, *self._tasks]:
                        task.cancel()
                self._tg = None
        finally:
            self.groups.stop(tell=False)  # _stop_serving told the peers
            self.notifier.notify("STOPPING=1")
            await self.journal.close()
            self.engine.shutdown()
        log.info("stopped", **self.service.stats)
        if self.failure is not None:
            raise self.failure

    async def _stop_serving(self) -> None:
        """Leave the job topics, finish admitted jobs, send their results, drop groups, say goodbye."""
        self.accepting = False
        link = self._link
        if link is not None:
            with contextlib.suppress(TransportError):
                await link.unsubscribe(self.topics.shared_jobs, self.topics.my_jobs)
        if self.intake.running:
            log.info("draining", jobs=self.intake.running, grace_s=GRACE_S)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.intake.idle.wait(), GRACE_S)
        await asyncio.to_thread(self.service.auto.save_if_due, True)
        link = self._link
        if link is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.outbox.flushed(), FLUSH_S)
        if telling := self.groups.stop():  # spawned: the task group still runs
            await asyncio.wait(telling, timeout=FLUSH_S)
        if link is not None:
            with contextlib.suppress(TransportError, asyncio.TimeoutError):
                await asyncio.wait_for(link.unsubscribe(*self._watched), 2.0)
                offline = status_payload(self.trust, self.settings.node_id, "offline")
                await asyncio.wait_for(link.publish(self.topics.status, offline, retain=True), 2.0)
        if self.intake.running or self.outbox:
            log.warning("unanswered_at_stop", jobs=self.intake.running, results_unsent=len(self.outbox))

    @property
    def _watched(self) -> tuple[str, ...]:
        """Every topic but the job topics: control, and every node's health and status."""
        return (self.topics.control, self.topics.all_health, self.topics.all_status)

    # -- the broker connection ------------------------------------------------------------
    def _mqtt_link(self) -> MqttLink:
        s = self.settings
        assert s.broker is not None
        username, password = mqtt_credentials(s)
        # The Last Will is signed now, with this connection's sequence; its online gets the same.
        self._conn_seq = None if self.trust.open else self.admission.next_seq()
        will = status_payload(self.trust, s.node_id, "offline", self._conn_seq)
        return MqttLink(
            s.broker.host,
            s.broker.port,
            client_id=f"prism-{s.cluster}-{s.node_id}",
            will=(self.topics.status, will),
            username=username,
            password=password,
            tls=tls_context(s),
            session_expiry_s=s.session_expiry_s,
            manual_ack=True,
        )

    async def _connections(self) -> None:
        """Connect, serve, reconnect; a refused login stops the node (systemd decides what next)."""
        attempt = 0
        while not self.stop.is_set():
            up_s = 0.0
            try:
                async with self._link_factory() as link:
                    start = time.monotonic()
                    try:
                        await self._session(link)
                    finally:
                        up_s = time.monotonic() - start
            except TransportError as exc:
                if exc.fatal:
                    log.error("mqtt_refused", error=str(exc), hint="check username/password; not retrying")
                    self.failure = exc
                    self.stop.set()
                    return
                if up_s > GOOD_CONNECTION_S:
                    attempt = 0
                delay = backoff_s(attempt, self.settings.reconnect_min_s, self.settings.reconnect_max_s)
                attempt += 1
                log.warning("mqtt_reconnect", error=str(exc), in_s=round(delay, 3), attempt=attempt)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)

    async def _session(self, link: MqttLink) -> None:
        topics = (self.topics.shared_jobs, self.topics.my_jobs) if self.accepting else ()
        await link.subscribe(*topics, *self._watched)
        online = status_payload(self.trust, self.settings.node_id, "online", self._conn_seq)
        await link.publish(self.topics.status, online, retain=True)
        self._link = link
        self.connected.set()
        try:
            log.info("mqtt_connected", node=self.settings.node_id, results_queued=len(self.outbox))
            async with TaskGroup() as tg:
                tg.create_task(supervise("results", lambda: self.intake.send(link), passthrough=(TransportError,)))
                tg.create_task(supervise("health", lambda: self._health(link), passthrough=(TransportError,)))
                await self._messages(link)  # until the connection drops (TransportError) or we are cancelled
        except BaseExceptionGroup as group:
            error = transport_error(group)
            if error is not None:
                raise error from group  # the connection is gone: reconnect
            raise
        finally:
            self._link = None
            self.connected.clear()

    async def _messages(self, link: MqttLink) -> None:
        jobs = {self.topics.jobs, self.topics.my_jobs}
        arrivals: asyncio.Queue[Arrival] = asyncio.Queue()  # at most the broker's in-flight window
        async with TaskGroup() as tg:
            tg.create_task(self.intake.take_all(arrivals))  # jobs' journal I/O: control never waits on the disk
            async for message in link.messages():
                topic = str(message.topic)
                payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                if topic in jobs and not self.accepting:
                    continue  # stopping: not acknowledged, so the broker keeps it for someone else
                if topic not in jobs:
                    try:
                        self._observe(topic, payload)
                    except WireError as exc:
                        log.info("message_ignored", topic=topic[:120], error=str(exc)[:160])
                    except Exception:
                        log.exception("message_failed", topic=topic[:120])
                job, ack = (payload if topic in jobs else None), partial(link.ack, message)
                arrivals.put_nowait(Arrival(job, reply_route(message), bool(message.retain), ack))

    def _observe(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.control:
            opened = self.channel.open(payload)
            if opened is not None:
                self.groups.control(*opened)
            return
        node = topic.split("/")[-2]
        if topic.endswith("/status"):
            self.observer.status(node, payload)
        elif topic.endswith("/health"):
            self.observer.health(node, payload)

    # -- loops --------------------------------------------------------------------------
    def health(self) -> bytes:
        """The retained health document (JSON)."""
        return self._health_doc().encode()

    def _health_doc(self) -> Health:
        fingerprints = {name: s.fingerprint for name, s in self.service.models.items()}
        now = time.monotonic()
        return build_health(
            node=self.settings.node_id,
            version=VERSION,
            engine=ENGINE_VERSION,
            boot=self.admission.boot,
            load=read_load(),
            queue=self.engine.depth,
            queue_for=self.engine.depth_for(),
            energy_source=self.service.meter.source,
            jobs=self.service.stats,
            families={name: s.model.adapter.family for name, s in self.service.models.items()},
            fingerprints=fingerprints,
            hardware=self.hardware,
            address=self.address,
            peers=[p.node for p in self.peers.alive(now)],
            links=self.links.report(now),
            probe_port=self.probe_port,
            loops=dict(RESTARTS),
            speed=self.service.auto.speeds(),
            recent=self.metrics.recent.items(),
            clock=self.trust.clock_report(),
            admission=self.admission,
        )

    async def _health(self, link: MqttLink) -> None:
        while True:
            doc = self._health_doc()
            self.metrics.health_tick(doc.model_dump(), self.service.auto.corrections)
            await link.publish(self.topics.health, doc.encode(), retain=True, qos=0)
            await asyncio.sleep(self.settings.health_interval_s)

    async def _watchdog(self) -> None:
        """Prove the event loop alive to systemd, broker or not (a blocked loop misses pings)."""
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s)

    async def _save_map(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            await asyncio.to_thread(self.service.auto.save_if_due)
