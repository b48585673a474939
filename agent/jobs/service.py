"""The job service: intake -> validate -> choose mode -> run -> result (DESIGN.md §6).

Transport-free: it takes payload bytes and returns a :class:`Result`, so it is tested
without a broker. Torch work runs in a worker thread, never on the event loop, one job
at a time per node (each job already uses the node's torch threads); at most
``queue_max`` jobs wait, past that a job is answered ``busy`` at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from agent.cluster.peers import Peer
from agent.jobs.auto import AutoPolicy
from agent.jobs.inputs import to_output, to_tensors
from agent.node.config import ModelSpec, Settings
from agent.node.energy import CpuModelMeter, Meter
from agent.node.monitors import read_load
from engine.adapters import Task, Tensors
from engine.errors import BadRequest, PrismError
from engine.models import LoadedModel
from engine.program import JobSpec, plan_job
from engine.segments import Compression
from engine.sim import run_local
from engine.trace import RunResult
from policy.decide import Decision, Request
from transport.schema import Job, Mode, Result, WireError, parse_job

log = structlog.get_logger("prism.service")


@dataclass(frozen=True, slots=True)
class Served:
    """A model this node serves, loaded once at start (``fingerprint`` identifies its weights)."""

    spec: ModelSpec
    model: LoadedModel
    fingerprint: float = 0.0


class Distributor(Protocol):
    """What the service needs to split a job across peers (the daemon provides it)."""

    def peers_for(self, model: str, fingerprint: float) -> list[Peer]: ...

    async def run_distributed(self, served: Served, spec: JobSpec, inputs: Tensors, peers: list[Peer]) -> RunResult: ...

    def link_report(self) -> dict[str, dict[str, Any]]: ...


#: Interim rule for ``auto`` when there is no usable performance map: distribute from this
#: batch size up when a peer is available (the Jetson paper's crossover was batch 8).
AUTO_MIN_BATCH = 8
DEFAULT_CR = 8.0


def choose(job: Job, batch: int, peers: int) -> tuple[str, str]:
    """(mode, reason) for a job: pure, table-tested."""
    if job.mode is Mode.LOCAL:
        return "local", "requested local"
    if job.ranks == 1:
        return "local", "requested 1 rank"
    if peers == 0:
        return "local", "no peer serves this model with the same weights"
    if job.mode is Mode.DISTRIBUTED:
        return "distributed", "requested distributed"
    if batch >= AUTO_MIN_BATCH:
        return "distributed", f"auto: batch {batch} >= {AUTO_MIN_BATCH} and {peers} peer(s) available"
    return "local", f"auto: batch {batch} < {AUTO_MIN_BATCH}"


def _interim(job: Job, batch: int, peers: list[Peer], why: str) -> Decision:
    mode, reason = choose(job, batch, len(peers))
    cr = (job.cr if job.cr_given else DEFAULT_CR) if mode == "distributed" else None
    chosen = tuple(p.node for p in peers[: max(1, (job.ranks or 2) - 1)]) if mode == "distributed" else ()
    option = "local" if mode == "local" else ("full" if cr is None else f"prism@{cr:g}")
    return Decision(mode, cr, chosen, None, None, f"{reason}; {why}" if why else reason, option)


class JobService:
    """Turns job payloads into results."""

    def __init__(
        self,
        settings: Settings,
        models: Mapping[str, Served],
        distributor: Distributor | None = None,
        meter: Meter | None = None,
        auto: AutoPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.models = dict(models)
        self.distributor = distributor
        self.auto = auto or AutoPolicy(settings, {}, None, None)
        self.meter: Meter = meter or CpuModelMeter()
        self._pending = 0
        self._engine = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.stats = {"received": 0, "ok": 0, "failed": 0, "busy": 0, "unparseable": 0}

    @property
    def queue_depth(self) -> int:
        """Jobs admitted and not yet answered."""
        return self._pending

    def _fail(self, job_id: str | None, code: str, message: str) -> Result:
        self.stats["failed"] += 1
        log.info("job_failed", job=job_id, code=code, error=message[:200])
        return Result.failure(job_id, code, message, node=self.settings.node_id)

    async def handle(self, payload: bytes) -> Result:
        """Answer one payload. Never raises for bad input."""
        self.stats["received"] += 1
        start = time.monotonic()
        try:
            job = parse_job(payload, self.settings.limits)
        except WireError as exc:
            if exc.job_id is None:
                self.stats["unparseable"] += 1
            return self._fail(exc.job_id, exc.code, str(exc))
        if self._pending >= self.settings.queue_max:
            self.stats["busy"] += 1
            return Result.failure(
                job.id, "busy", f"queue full ({self.settings.queue_max} jobs)", node=self.settings.node_id
            )
        self._pending += 1
        try:
            return await self._run(job, start)
        except Exception as exc:  # a bug must cost one job an error result, not the daemon
            log.exception("job_crashed", job=job.id)
            return self._fail(job.id, "internal", f"internal error ({type(exc).__name__}); see the agent log")
        finally:
            self._pending -= 1

    def _choose(self, job: Job, batch: int, seq: int, peers: list[Peer]) -> Decision:
        """The map's decision when it can speak for this model, else the interim rule."""
        hard = job.mode is Mode.LOCAL or job.ranks == 1
        if not hard:
            request = Request(
                job.model, batch, seq, job.mode.value, job.cr, job.cr_given, job.ranks, self.settings.objective
            )
            links = self.distributor.link_report() if self.distributor else {}
            load = read_load()
            got = self.auto.decide(request, peers, links, float(load["load1"] or 0.0), int(load["cpus"] or 1))
            if got is not None and (got.mode == "distributed" or job.mode is not Mode.DISTRIBUTED):
                return got
        return _interim(job, batch, peers, "" if hard else self.auto.why_not(job.model))

    async def _run(self, job: Job, start: float) -> Result:
        served = self.models.get(job.model)
        if served is None:
            known = ", ".join(sorted(self.models)) or "none"
            return self._fail(job.id, "unknown_model", f"this node has no model '{job.model}' (it serves: {known})")
        model = served.model
        try:
            task = Task(job.task or served.spec.task or model.adapter.default_task().value)
        except ValueError:
            return self._fail(job.id, "invalid_job", f"unknown task '{job.task}'")
        try:
            model.adapter.check_task(task)
            raw = await asyncio.to_thread(to_tensors, job, model, self.settings.limits)  # decoding is CPU work
            tensors = {k: v.to(model.adapter.device) for k, v in raw.items()}
        except BadRequest as exc:
            return self._fail(job.id, exc.code, str(exc))
        peers = self.distributor.peers_for(job.model, served.fingerprint) if self.distributor else []
        if job.peers is not None:
            able = {p.node: p for p in peers}
            missing = [n for n in job.peers if n not in able]
            if missing:
                return self._fail(
                    job.id,
                    "peer_unavailable",
                    f"peer(s) {', '.join(missing)} cannot take '{job.model}' now (not alive, not admitted, "
                    f"or other weights); available: {', '.join(sorted(able)) or 'none'}",
                )
            peers = [able[n] for n in job.peers]
        batch = int(next(iter(tensors.values())).shape[0])
        seq = model.adapter.shapes(tensors).n_tokens
        chosen = self._choose(job, batch, seq, peers)
        mode, decision = chosen.mode, chosen.as_dict()
        decision.update(requested=job.mode.value, batch=batch, tokens=seq)
        queued_s = time.monotonic() - start
        async with self._engine:
            engine_start = time.monotonic()
            metering = self.meter.start()
            result, used, cr, fallback = None, [], None, False
            if mode == "distributed" and self.distributor is not None:
                used = [p for p in peers if p.node in chosen.peers] or peers[: max(1, (job.ranks or 2) - 1)]
                cr = chosen.cr
                comp = Compression(cr=cr)
                try:
                    spec = plan_job(model.adapter, job.model, task, tensors, ranks=len(used) + 1, comp=comp)
                    result = await self.distributor.run_distributed(served, spec, tensors, used)
                except PrismError as exc:  # too few tokens to split, a peer died, a deadline passed: run here
                    log.warning("distributed_fallback", job=job.id, error=str(exc)[:200])
                    decision["fallback_reason"] = str(exc)[:300]
                    result, used, cr, fallback = None, [], None, True
            elif job.mode is Mode.DISTRIBUTED:
                fallback = True
            if result is None:
                mode = "local"
                try:
                    # One engine thread: even a cancelled job's computation never overlaps the next one.
                    loop = asyncio.get_running_loop()
                    result = await loop.run_in_executor(self._executor, run_local, model.adapter, task, tensors)
                except PrismError as exc:
                    return self._fail(job.id, exc.code, str(exc))
            engine_s = time.monotonic() - engine_start
            energy = self.meter.stop(metering)
        if not fallback and chosen.predicted_ms is not None:
            self.auto.observe(chosen, engine_s * 1e3)
        output = to_output(task, result.outputs)
        self.stats["ok"] += 1
        total_s = time.monotonic() - start
        t = result.traces[0]
        log.info(
            "job_done",
            job=job.id,
            model=job.model,
            mode=mode,
            option=decision.get("option"),
            predicted_ms=decision.get("predicted_ms"),
            reason=decision["reason"],
            peers=[p.node for p in used],
            ms=round(total_s * 1e3, 2),
            fallback=fallback,
        )
        return Result(
            id=job.id,
            ok=True,
            output=output,
            mode=mode,
            cr=cr,
            peers=tuple(p.node for p in used),
            latency_ms={
                "total": total_s * 1e3,
                "queue": queued_s * 1e3,
                "engine": engine_s * 1e3,
                "compute": t.compute_s * 1e3,
                "comm": t.comm_s * 1e3,
                "staging": t.staging_s * 1e3,
                "overhead": t.overhead_s * 1e3,
                "exchange_bytes": float(result.exchange_bytes),
                "wire_bytes": float(result.wire_bytes),
                "rounds": float(t.rounds),
            },
            decision=decision,
            fallback=fallback,
            node=self.settings.node_id,
            energy={
                "joules": energy.joules,
                "per_sample_j": energy.joules / max(1, batch),
                "source": energy.source,
                "scope": "this node",
                "group_cpu_s": sum(tr.cpu_s for tr in result.traces),
            },
        )
