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
from dataclasses import dataclass

import structlog

from agent.config import ModelSpec, Settings
from agent.engine_cmds import default_task
from agent.jobinputs import to_output, to_tensors
from engine.adapters import Task
from engine.errors import BadRequest, PrismError
from engine.models import LoadedModel
from engine.sim import run_local
from transport.schema import Job, Mode, Result, WireError, parse_job

log = structlog.get_logger("prism.service")


@dataclass(frozen=True, slots=True)
class Served:
    """A model this node serves, loaded once at start."""

    spec: ModelSpec
    model: LoadedModel


class JobService:
    """Turns job payloads into results."""

    def __init__(self, settings: Settings, models: Mapping[str, Served]) -> None:
        self.settings = settings
        self.models = dict(models)
        self._pending = 0
        self._engine = asyncio.Lock()
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
        finally:
            self._pending -= 1

    async def _run(self, job: Job, start: float) -> Result:
        served = self.models.get(job.model)
        if served is None:
            known = ", ".join(sorted(self.models)) or "none"
            return self._fail(job.id, "unknown_model", f"this node has no model '{job.model}' (it serves: {known})")
        model = served.model
        try:
            task = Task(job.task or served.spec.task or default_task(model).value)
            model.adapter.check_task(task)
            tensors = to_tensors(job, model, self.settings.limits)
        except ValueError:
            return self._fail(job.id, "invalid_job", f"unknown task '{job.task}'")
        except BadRequest as exc:
            return self._fail(job.id, exc.code, str(exc))
        # Until peers and the policy land, every job runs here; a distributed request says so.
        fallback = job.mode is Mode.DISTRIBUTED
        reason = "no peers admitted" if fallback else "local by default"
        decision = {"mode": "local", "reason": reason, "requested": job.mode.value}
        queued_s = time.monotonic() - start
        async with self._engine:
            engine_start = time.monotonic()
            try:
                result = await asyncio.to_thread(run_local, model.adapter, task, tensors)
            except PrismError as exc:
                return self._fail(job.id, exc.code, str(exc))
            engine_s = time.monotonic() - engine_start
        output = to_output(task, result.outputs)
        self.stats["ok"] += 1
        total_s = time.monotonic() - start
        log.info("job_done", job=job.id, model=job.model, mode="local", ms=round(total_s * 1e3, 2))
        return Result(
            id=job.id,
            ok=True,
            output=output,
            mode="local",
            cr=None,
            peers=(),
            latency_ms={
                "total": total_s * 1e3,
                "queue": queued_s * 1e3,
                "engine": engine_s * 1e3,
                "compute": result.traces[0].compute_s * 1e3,
            },
            decision=decision,
            fallback=fallback,
            node=self.settings.node_id,
        )
