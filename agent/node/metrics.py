"""Prometheus metrics of one agent (``metrics_port``; 0 or unset: off).

The daemon calls five things: :meth:`Metrics.job_done` once per answered job with its
:class:`~transport.schema.Result` (which also keeps the last few jobs' decisions for the
health document, :attr:`Metrics.recent`), :meth:`Metrics.result_refused` per result the broker
refused, :meth:`Metrics.journal_failed` per journal operation the disk refused,
:meth:`Metrics.health_tick` once per health period with the health document it publishes,
and :meth:`Metrics.serving` around its life (the HTTP server runs in a thread of
``prometheus-client``; scrapes never touch the event loop). Every label takes values from a
small set: a fallback's reason is the result's typed ``fallback_reason``
(engine.errors.FailureReason), error codes outside the schema's list become ``other``, and
option names are capped.

GPU load and power come from the agent itself (the Jetson sysfs load file, the INA3221 input
rail, RAPL), since NVML exporters do not work on Jetson. A CPU-time model is not a power
reading, so it exports no power.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from agent.base.config import ConfigError
from agent.base.energy import Ina3221Meter, Meter, RaplMeter
from agent.jobs.recent import RecentJobs
from engine.errors import FailureReason
from transport.schema import Result

log = structlog.get_logger("prism.metrics")

#: Seconds; from a fast local job on a Jetson to a split over a slow WiFi link.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Measured engine time over the map's prediction.
RATIO_BUCKETS = (0.25, 0.5, 0.67, 0.8, 0.9, 1.1, 1.25, 1.5, 2.0, 4.0)
#: Parts of a job's latency that get a histogram (``latency_ms`` keys of a result).
STAGES = ("total", "queue", "engine", "peer_wait", "compute", "comm", "staging", "overhead", "first_token", "decode")
#: Error codes a result may carry (transport.schema, the job service); others count as ``other``.
ERROR_CODES = frozenset(
    {
        "bad_payload",
        "invalid_job",
        "too_large",
        "unknown_model",
        "bad_request",
        "peer_unavailable",
        "busy",
        "internal",
        "model_error",
        "group_error",
        "deadline_exceeded",
        "journal_unavailable",
    }
)
#: Distinct option names counted before the rest become ``other`` (a job may ask for any CR).
MAX_OPTIONS = 32


def _outcome(result: Result) -> str:
    if result.ok:
        return "ok"
    code = result.error.code if result.error is not None else "other"
    return code if code in ERROR_CODES else "other"


class Metrics:
    """One agent's metrics in its own registry (never the process-global one)."""

    def __init__(self, node: str, version: str, meter: Meter | None = None) -> None:
        self.registry = CollectorRegistry()
        self.meter = meter
        self._options: set[str] = set()
        self._links: set[tuple[str, ...]] = set()
        self._corrections: set[str] = set()
        self._rapl: Any = None  # the RAPL reading of the last tick
        self._server: Any = None
        self.recent = RecentJobs()  # the last jobs' decisions, for health (``prism-agent top`` shows them)
        self._restarts: dict[str, int] = {}
        r = self.registry
        Info("prism_agent", "The agent: node id and version.", registry=r).info({"node": node, "version": version})
        self.jobs = Counter(
            "prism_jobs",
            "Jobs answered, by requested mode (none: refused before a decision), mode run and outcome "
            "(ok or the error code).",
            ["requested", "ran", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            "prism_job_latency_seconds",
            "Latency of successful jobs by stage (total, queue, engine, compute, comm, staging, overhead).",
            ["stage", "ran"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.exchange_bytes = Counter(
            "prism_exchange_bytes", "Hidden-state bytes exchanged between ranks (all ranks).", ["ran"], registry=r
        )
        self.wire_bytes = Counter("prism_wire_bytes", "Bytes on the GLOO wire (all ranks).", ["ran"], registry=r)
        self.fallbacks = Counter(
            "prism_fallbacks",
            "Distributed jobs that ran locally instead, by reason (the result's fallback_reason).",
            ["reason"],
            registry=r,
        )
        self.refused = Counter(
            "prism_results_refused",
            "Results the broker refused (PUBACK reason code >= 0x80), by reason; each is answered with the "
            "error result_refused on the job's results topic where that is a different topic.",
            ["reason"],
            registry=r,
        )
        self.journal_errors = Counter(
            "prism_journal_errors",
            "Job journal operations the disk refused (full or failing), by operation: take (the job was "
            "answered journal_unavailable), answer, sent, result.",
            ["op"],
            registry=r,
        )
        self.decisions = Counter(
            "prism_decisions",
            "Mode decisions by requested mode, chosen option and basis (map: the performance map; rule: the "
            "interim rule or a forced mode).",
            ["requested", "option", "basis"],
            registry=r,
        )
        self.prediction = Histogram(
            "prism_prediction_ratio",
            "Measured engine time over the map's prediction, for jobs the map predicted.",
            ["option_mode"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.energy = Counter("prism_energy_joules", "Energy spent on jobs on this node.", ["meter"], registry=r)
        self.generated = Counter(
            "prism_generated_tokens", "Tokens written by generate jobs (their decode, on this node).", registry=r
        )
        self.queue = Gauge("prism_queue_jobs", "Jobs admitted and not yet answered.", registry=r)
        self.load1 = Gauge("prism_load1", "1-minute load average.", registry=r)
        self.peers = Gauge("prism_admitted_peers", "Peers alive and admitted (same cluster secret).", registry=r)
        self.link_bandwidth = Gauge(
            "prism_link_bandwidth_bytes_per_second",
            "Link estimate to a peer: active probes, or bytes over time of GLOO exchanges (a lower bound).",
            ["peer", "source"],
            registry=r,
        )
        self.link_rtt = Gauge("prism_link_rtt_seconds", "Round-trip time to a peer (probes).", ["peer"], registry=r)
        self.link_age = Gauge("prism_link_age_seconds", "Age of a peer's link estimate.", ["peer"], registry=r)
        self.correction = Gauge(
            "prism_map_correction_ratio",
            "The performance map's online correction (observed / predicted, EWMA) per option key.",
            ["key"],
            registry=r,
        )
        self.gpu_load = Gauge("prism_gpu_load_ratio", "GPU load 0..1 (Jetson sysfs), where present.", registry=r)
        self.power = Gauge(
            "prism_power_watts", "Board or package power from this node's meter, if it has one.", ["meter"], registry=r
        )
        self.restarts = Counter(
            "prism_loop_restarts", "Background loops restarted after a crash, by loop.", ["loop"], registry=r
        )
        # A process restart (systemd's Restart=on-failure) shows as a change of this value.
        Gauge("prism_agent_start_time_seconds", "When this agent process started (Unix time).", registry=r).set(
            time.time()
        )

    # -- per job ---------------------------------------------------------------------------
    def job_done(self, result: Result) -> None:
        """Count one answered job (successful or not), and keep it among the recent ones."""
        self.recent.record(result, time.time())
        decision = result.decision or {}
        requested = str(decision.get("requested") or "none")
        ran = result.mode if result.ok and result.mode else "none"
        self.jobs.labels(requested, ran, _outcome(result)).inc()
        if not result.ok:
            return
        for stage in STAGES:
            ms = result.latency_ms.get(stage)
            if ms is not None and (ms > 0 or stage in ("total", "engine")):
                self.latency.labels(stage, ran).observe(ms / 1e3)
        self.exchange_bytes.labels(ran).inc(max(0.0, result.latency_ms.get("exchange_bytes", 0.0)))
        self.wire_bytes.labels(ran).inc(max(0.0, result.latency_ms.get("wire_bytes", 0.0)))
        if result.fallback:
            reason = result.fallback_reason or FailureReason.INTERNAL  # every fallback the service makes has one
            self.fallbacks.labels(reason.value).inc()
        if decision:
            predicted = decision.get("predicted_ms")
            option = str(decision.get("option") or ran)
            if option not in self._options and len(self._options) >= MAX_OPTIONS:
                option = "other"
            self._options.add(option)
            self.decisions.labels(requested, option, "rule" if predicted is None else "map").inc()
            engine_ms = result.latency_ms.get("engine", 0.0)
            if predicted and not result.fallback and engine_ms > 0:
                self.prediction.labels(str(decision.get("mode") or ran)).observe(engine_ms / float(predicted))
        tokens = (result.output or {}).get("tokens") if result.final else None  # a generate job's last message
        if isinstance(tokens, list):
            self.generated.inc(len(tokens))
        energy = result.energy or {}
        if energy.get("joules") is not None:
            self.energy.labels(str(energy.get("source") or "unknown")).inc(max(0.0, float(energy["joules"])))

    def result_refused(self, reason: str) -> None:
        """Count one result the broker refused; ``reason`` is its MQTT 5 reason code's name."""
        self.refused.labels(reason.lower().replace(" ", "_")[:40]).inc()

    def journal_failed(self, op: str) -> None:
        """Count one journal operation the disk refused."""
        self.journal_errors.labels(op[:16]).inc()

    # -- per health period -----------------------------------------------------------------
    def health_tick(self, health: Mapping[str, Any], corrections: Mapping[str, float] | None = None) -> None:
        """Refresh the gauges from the health document the daemon publishes."""
        load = health.get("load") or {}
        self.queue.set(float(load.get("queue") or 0))
        if load.get("load1") is not None:
            self.load1.set(float(load["load1"]))
        if load.get("gpu_load") is not None:
            self.gpu_load.set(float(load["gpu_load"]))
        self.peers.set(len(health.get("peers") or []))
        links: set[tuple[str, ...]] = set()
        for peer, link in (health.get("links") or {}).items():
            for source, key in (("probe", "mbps"), ("gloo", "gloo_mbps")):
                if link.get(key) is not None:
                    self.link_bandwidth.labels(peer, source).set(float(link[key]) * 1e6 / 8)
                    links.add(("bw", peer, source))
            if link.get("rtt_ms") is not None:
                self.link_rtt.labels(peer).set(float(link["rtt_ms"]) / 1e3)
                links.add(("rtt", peer))
            if link.get("age_s") is not None:
                self.link_age.labels(peer).set(float(link["age_s"]))
                links.add(("age", peer))
        for gone in self._links - links:  # a peer that left takes its series with it
            family = {"bw": self.link_bandwidth, "rtt": self.link_rtt, "age": self.link_age}[gone[0]]
            with contextlib.suppress(KeyError):
                family.remove(*gone[1:])
        self._links = links
        for loop, count in (health.get("loops") or {}).items():
            seen = self._restarts.get(loop, 0)
            if int(count) > seen:
                self.restarts.labels(loop).inc(int(count) - seen)
                self._restarts[loop] = int(count)
        keys = set(corrections or {})
        for key, value in (corrections or {}).items():
            self.correction.labels(key).set(float(value))
        for gone_key in self._corrections - keys:
            with contextlib.suppress(KeyError):
                self.correction.remove(gone_key)
        self._corrections = keys
        watts = self._watts()
        if watts is not None and self.meter is not None:
            self.power.labels(self.meter.source).set(watts)

    def _watts(self) -> float | None:
        """Power now (INA3221), or averaged since the last tick (RAPL); None without a sensor."""
        try:
            if isinstance(self.meter, Ina3221Meter):
                return self.meter.watts()
            if isinstance(self.meter, RaplMeter):
                last, self._rapl = self._rapl, self.meter.start()
                if last is None:
                    return None
                reading = self.meter.stop(last)
                return reading.joules / reading.seconds if reading.seconds > 0 else None
        except (OSError, ValueError):  # a sensor that vanished or misreads once must not stop health
            return None
        return None

    # -- the HTTP endpoint -----------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def serving(self, address: str, port: int) -> AsyncIterator[None]:
        """Serve ``/metrics`` on ``address:port`` while inside (port 0: nothing)."""
        if not port:
            yield
            return
        try:
            server, thread = start_http_server(port, address, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}") from None
        log.info("metrics_serving", url=f"http://{address}:{port}/metrics")
        try:
            yield
        finally:
            await asyncio.to_thread(server.shutdown)  # waits for the serving loop (< 0.5 s)
            server.server_close()
            await asyncio.to_thread(thread.join, 5.0)
