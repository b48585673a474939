"""The job service: payload -> validate -> decide -> run -> result (docs/design.md §6).

Transport-free: it takes payload bytes and returns a :class:`Result`, so it is tested
without a broker. Decoding and tokenising run on a thread of their own (fast tokenizers
must not be shared by concurrent jobs); torch work runs on the node's one engine
(agent/base/engine.py), shared with the ranks this node runs for others. At most
``queue_max`` jobs wait; past that a job is answered ``busy`` at once. A job's
``deadline_ms`` counts from its arrival: a job that cannot meet it is answered
``deadline_exceeded`` at once, and one still waiting or running when it passes gets that
answer then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from agent.base.config import ModelSpec, Settings
from agent.base.energy import CpuModelMeter, Meter
from agent.base.engine import Engine
from agent.base.monitors import read_load
from agent.cluster.peers import Peer
from agent.jobs import generate
from agent.jobs.auto import AutoPolicy, interim
from agent.jobs.inputs import to_output, to_tensors
from agent.jobs.token_feed import Sink
from engine.adapters import Task, Tensors
from engine.errors import BadRequest, FailureReason, GroupError, PrismError
from engine.fidelity import planned_bytes
from engine.models import LoadedModel
from engine.program import JobSpec, chunks_for, plan_job
from engine.segments import Compression, Method
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
    """What the service needs to split a job across peers (the node's groups provide it)."""

    def peers_for(self, model: str, fingerprint: float) -> list[Peer]: ...

    async def run_distributed(self, served: Served, spec: JobSpec, inputs: Tensors, peers: list[Peer]) -> RunResult: ...

    def link_report(self) -> dict[str, dict[str, Any]]: ...


class DeadlineExceeded(PrismError):
    """The job's deadline passed (or would, by the prediction) before it could be answered."""

    code = "deadline_exceeded"


class JobService:
    """Turns job payloads into results."""

    def __init__(
        self,
        settings: Settings,
        models: Mapping[str, Served],
        distributor: Distributor | None = None,
        meter: Meter | None = None,
        auto: AutoPolicy | None = None,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.models = dict(models)
        self.distributor = distributor
        self.auto = auto or AutoPolicy(settings, {}, None, None)
        self.meter: Meter = meter or CpuModelMeter()
        self.engine = engine or Engine()
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prep")
        self.writer = generate.Writer(self.engine)
        self._pending = 0
        self.stats = {"received": 0, "ok": 0, "failed": 0, "busy": 0, "unparseable": 0}

    @property
    def queue_depth(self) -> int:
        """Jobs admitted and not yet answered."""
        return self._pending

    def _fail(self, job_id: str | None, code: str, message: str) -> Result:
        self.stats["failed"] += 1
        log.info("job_failed", job=job_id, code=code, error=message[:200])
        return Result.failure(job_id, code, message, node=self.settings.node_id)

    async def handle(self, payload: bytes, sink: Sink | None = None) -> Result:
        """Answer one payload. Never raises (but for cancellation). A generate job streams
        its tokens to ``sink`` as partials before this returns its final result."""
        self.stats["received"] += 1
        start = time.monotonic()
        job: Job | None = None
        try:
            job = parse_job(payload, self.settings.limits)
            if self._pending >= self.settings.queue_max:
                self.stats["busy"] += 1
                return Result.failure(
                    job.id, "busy", f"queue full ({self.settings.queue_max} jobs)", node=self.settings.node_id
                )
            self._pending += 1
            try:
                return await self._run(job, start, sink)
            finally:
                self._pending -= 1
        except WireError as exc:
            if exc.job_id is None:
                self.stats["unparseable"] += 1
            return self._fail(exc.job_id, exc.code, str(exc))
        except PrismError as exc:
            return self._fail(job.id if job else None, exc.code, str(exc))
        except Exception as exc:
            log.exception("job_crashed", job=job.id if job else None)
            return self._fail(job.id if job else None, "internal", f"internal error ({type(exc).__name__})")

    def _choose(self, job: Job, batch: int, seq: int, peers: list[Peer], deadline: float | None) -> Decision:
        """The map's decision when it can speak for this model, else the interim rule."""
        hard = job.mode is Mode.LOCAL or job.ranks == 1
        objective = job.objective.value if job.objective is not None else self.settings.objective
        if not hard:
            request = Request(
                job.model,
                batch,
                seq,
                job.mode.value,
                job.cr,
                job.cr_given,
                job.ranks,
                objective,
                method=job.method,
                min_fidelity=job.min_fidelity,
                equal_shares=job.peers is not None,  # pinned peers (the profiler's passes) stay comparable
                deadline_ms=None if deadline is None else max(0.0, (deadline - time.monotonic()) * 1e3),
            )
            links = self.distributor.link_report() if self.distributor else {}
            load = read_load()
            got = self.auto.decide(request, peers, links, float(load["load1"] or 0.0), int(load["cpus"] or 1))
            if got is not None and (got.mode == "distributed" or job.mode is not Mode.DISTRIBUTED):
                return got
        return interim(job, batch, peers, "" if hard else self.auto.why_not(job.model), seq)

    async def _inputs(self, job: Job, served: Served) -> tuple[Task, Tensors]:
        model = served.model
        try:
            task = Task(job.task or served.spec.task or model.adapter.default_task().value)
        except ValueError:
            raise BadRequest(f"unknown task '{job.task}'", code="invalid_job") from None
        model.adapter.check_task(task)
        loop = asyncio.get_running_loop()
        prep = generate.prompt_tensors if task is Task.GENERATE else to_tensors
        raw = await loop.run_in_executor(self._prep, prep, job, model, self.settings.limits)
        return task, {k: v.to(model.adapter.device) for k, v in raw.items()}

    def _chunked(
        self, spec: JobSpec, served: Served, tensors: Tensors, used: list[Peer], predicted_ms: float | None
    ) -> JobSpec:
        """``spec`` in fewer chunks where its link has little to hide (:func:`chunks_for`): the
        bytes one rank sends over the slowest probed link of ``used``, against the compute the
        decision predicted."""
        if not spec.overlap or predicted_ms is None or self.distributor is None:
            return spec
        links = self.distributor.link_report()
        rates = [links.get(p.node, {}).get("mbps") or 0.0 for p in used]
        if not rates or min(rates) <= 0:
            return spec
        sent = planned_bytes(served.model.adapter, spec, tensors) / spec.plan.ranks
        link_ms = sent * 8 / min(rates) / 1e3
        chunks = chunks_for(spec.batch, link_ms, predicted_ms - link_ms)
        return spec if chunks == spec.chunks else dataclasses.replace(spec, chunks=chunks)

    def _peers(self, job: Job, served: Served) -> list[Peer]:
        peers = self.distributor.peers_for(job.model, served.fingerprint) if self.distributor else []
        if job.peers is None:
            return peers
        able = {p.node: p for p in peers}
        missing = [n for n in job.peers if n not in able]
        if missing:
            raise BadRequest(
                f"peer(s) {', '.join(missing)} cannot take '{job.model}' now (not alive, not admitted, "
                f"or other weights); available: {', '.join(sorted(able)) or 'none'}",
                code="peer_unavailable",
            )
        return [able[n] for n in job.peers]

    async def _run(self, job: Job, start: float, sink: Sink | None = None) -> Result:
        served = self.models.get(job.model)
        if served is None:
            known = ", ".join(sorted(self.models)) or "none"
            return self._fail(job.id, "unknown_model", f"this node has no model '{job.model}' (it serves: {known})")
        deadline = None if job.deadline_ms is None else start + job.deadline_ms / 1e3
        task, tensors = await self._inputs(job, served)
        peers = self._peers(job, served)
        batch = int(next(iter(tensors.values())).shape[0])
        seq = served.model.adapter.shapes(tensors).n_tokens
        ask = None  # a generate job: checked before any work; its prefill is decided as a next_token job's
        if task is Task.GENERATE:
            cap = served.spec.max_new_tokens or self.settings.max_new_tokens
            ask = generate.ask_of(job, served.model, cap, self.settings, seq)
        chosen = self._choose(job, batch, seq, peers, deadline)
        decision = chosen.as_dict()
        decision.update(requested=job.mode.value, batch=batch, tokens=seq)
        if deadline is not None and chosen.predicted_ms is not None:
            left_ms = (deadline - time.monotonic()) * 1e3
            if chosen.predicted_ms > left_ms:
                raise DeadlineExceeded(
                    f"the fastest way to run it ({chosen.option}) is predicted to take {chosen.predicted_ms:.0f} ms; "
                    f"{max(0.0, left_ms):.0f} ms of the deadline are left"
                )
        queued_s = time.monotonic() - start
        log.info(
            "job_started",
            job=job.id,
            option=chosen.option,
            peers=list(chosen.peers),
            queued_ms=round(queued_s * 1e3, 1),
        )
        engine_start = time.monotonic()
        metering = self.meter.start()
        result, used, cr, method, fallback = None, [], None, None, False
        reason: FailureReason | None = None  # why a split ran locally instead
        if chosen.mode == "distributed" and self.distributor is not None:
            able = {p.node: p for p in peers}
            used = [able[n] for n in chosen.peers if n in able] or peers[: max(1, (job.ranks or 2) - 1)]
            cr, method = chosen.cr, (chosen.method or "means") if chosen.cr is not None else None
            shares = list(chosen.shares) if len(chosen.shares) == len(used) + 1 else None
            weights = shares if shares and len(set(shares)) > 1 else None
            try:
                comp = Compression(cr=cr, method=Method.parse(method or "means"))
                adapter = served.model.adapter
                spec = plan_job(adapter, job.model, task, tensors, ranks=len(used) + 1, comp=comp, weights=weights)
                if job.peers is None:  # pinned peers (the profiler's passes) keep the default, comparable
                    spec = self._chunked(spec, served, tensors, used, chosen.predicted_ms)
                decision["chunks"] = spec.chunks
                result = await _until(deadline, self.distributor.run_distributed(served, spec, tensors, used))
            except DeadlineExceeded:
                raise
            except Exception as exc:
                if not isinstance(exc, PrismError):
                    log.exception("distributed_crashed", job=job.id)
                reason = fallback_reason(exc)
                log.warning("distributed_fallback", job=job.id, reason=reason.value, error=str(exc)[:200])
                decision["fallback_reason"] = str(exc)[:300] or type(exc).__name__
                decision.pop("chunks", None)  # the batch ran locally, in one piece
                result, used, cr, method, fallback = None, [], None, None, True
        elif job.mode is Mode.DISTRIBUTED:
            fallback = True
            reason = FailureReason.ONE_RANK if job.ranks == 1 else FailureReason.NO_PEER
        if result is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                async with self.engine.slot(f"job {job.id}", timeout_s=left) as slot:
                    engine_start = time.monotonic()
                    result = await _until(deadline, slot.run(run_local, served.model.adapter, task, tensors))
            except asyncio.TimeoutError:
                raise DeadlineExceeded("the deadline passed while the job waited for the engine") from None
        engine_s = time.monotonic() - engine_start
        # A split's group formation and its wait for the peers' engines are not the option's
        # cost (the next job finds the group formed): left out of what auto learns.
        peer_wait_s = max(0.0, engine_s - result.traces[0].wall_s) if used else 0.0
        if not fallback and chosen.predicted_ms is not None:
            self.auto.observe(chosen, (engine_s - peer_wait_s) * 1e3)
        made, feed, text = None, None, None
        if ask is not None:
            feed = self.writer.feed(job, served.model, sink)
            past = result.outputs["past_kv"]
            made, text = await self.writer.write(job, served.model, tensors, past, ask, deadline, feed)
        energy = self.meter.stop(metering)  # the whole job's: a generate job's decode too
        answer = self._result(
            job,
            task,
            result,
            decision,
            used,
            (cr, method),
            reason if fallback else None,
            start,
            queued_s,
            (engine_s, peer_wait_s),
            energy,
            batch,
        )
        if made is None or feed is None:
            return answer
        return generate.final(answer, made, text, feed, seq, start)

    def _result(
        self,
        job: Job,
        task: Task,
        result: RunResult,
        decision: dict[str, Any],
        used: list[Peer],
        compression: tuple[float | None, str | None],
        fallback: FailureReason | None,
        start: float,
        queued_s: float,
        engine: tuple[float, float],
        energy: Any,
        batch: int,
    ) -> Result:
        mode = "distributed" if used else "local"
        cr, method = compression
        engine_s, peer_wait_s = engine
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
            fallback=fallback is not None,
            fallback_reason=None if fallback is None else fallback.value,
        )
        return Result(
            id=job.id,
            ok=True,
            output=to_output(task, result.outputs),
            mode=mode,
            cr=cr,
            method=method,
            peers=tuple(p.node for p in used),
            latency_ms={
                "total": total_s * 1e3,
                "queue": queued_s * 1e3,
                "engine": engine_s * 1e3,
                "peer_wait": peer_wait_s * 1e3,
                "compute": t.compute_s * 1e3,
                "comm": t.comm_s * 1e3,
                "staging": t.staging_s * 1e3,
                "overhead": t.overhead_s * 1e3,
                "exchange_bytes": float(result.exchange_bytes),
                "wire_bytes": float(result.wire_bytes),
                "rounds": float(t.rounds),
            },
            decision=decision,
            fallback=fallback is not None,
            fallback_reason=fallback,
            node=self.settings.node_id,
            energy={
                "joules": energy.joules,
                "per_sample_j": energy.joules / max(1, batch),
                "source": energy.source,
                "scope": "this node",
                "group_cpu_s": sum(tr.cpu_s for tr in result.traces),
            },
        )


def fallback_reason(exc: BaseException) -> FailureReason:
    """Why a split that raised ``exc`` runs locally: a group's failure carries its reason; a job
    that cannot be planned over the ranks raises BadRequest; anything else is a bug."""
    if isinstance(exc, GroupError):
        return exc.reason
    return FailureReason.CANNOT_SPLIT if isinstance(exc, BadRequest) else FailureReason.INTERNAL


async def _until(deadline: float | None, work: Any) -> Any:
    """Await ``work``, giving up with DeadlineExceeded when ``deadline`` (monotonic) passes."""
    if deadline is None:
        return await work
    try:
        return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise DeadlineExceeded("the deadline passed while the job ran; its answer is abandoned") from None
