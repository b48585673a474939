"""How close a PRISM output is to the local model's: the numbers `fidelity` prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F  # noqa: N812

from engine.adapters import Adapter, Task, Tensors
from engine.cost import exchange_bytes, full_exchange_bytes
from engine.program import JobSpec, plan_job
from engine.segments import Compression
from engine.sim import run_local, run_simulated
from engine.trace import RunResult

#: How a job is run for fidelity: in process by default, or e.g. on a LocalCluster.
Runner = Callable[[JobSpec, Tensors], RunResult]

#: The output each task is judged on.
MAIN_OUTPUT = {
    Task.CLASSIFY: "logits",
    Task.FEATURES: "features",
    Task.EMBED: "embedding",
    Task.NEXT_TOKEN: "logits",
    Task.LOGLIK: "loglik",  # compared per token
}


@dataclass(frozen=True, slots=True)
class Fidelity:
    """max |diff| of the main output, mean per-sample cosine, and argmax agreement.

    For ``loglik`` the difference is of the per-token log-likelihood and there is no cosine.
    """

    max_abs_diff: float
    mean_cosine: float | None
    top1_agreement: float | None

    def as_dict(self) -> dict[str, float | None]:
        """The JSON contract of ``prism-agent fidelity --json``."""
        return {
            "max_abs_diff": self.max_abs_diff,
            "mean_cosine": self.mean_cosine,
            "top1_agreement": self.top1_agreement,
        }


def compare(task: Task, reference: Tensors, got: Tensors) -> Fidelity:
    """Compare ``got`` against the local ``reference`` for ``task``."""
    key = MAIN_OUTPUT[task]
    ref, out = reference[key].float(), got[key].float()
    if task is Task.LOGLIK:  # per-token log-likelihood; a cosine of scalars means nothing
        per_ref = ref / reference["count"].float().clamp(min=1)
        per_out = out / got["count"].float().clamp(min=1)
        return Fidelity(float((per_ref - per_out).abs().max()), None, None)
    diff = float((ref - out).abs().max())
    cosine = float(F.cosine_similarity(ref.flatten(1), out.flatten(1), dim=1).mean())
    top1 = None
    if key == "logits":
        top1 = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    return Fidelity(diff, cosine, top1)


def full_bytes(adapter: Adapter, spec: JobSpec) -> int:
    """Exchange bytes full exchange moves for ``spec`` on ``adapter`` (in the model's dtype),
    exactly what a full-exchange run of the same job measures."""
    elem = adapter.dtype.itemsize
    return full_exchange_bytes(spec.plan, spec.batch, adapter.hidden_size, adapter.n_layers, adapter.causal, elem)


def planned_bytes(adapter: Adapter, spec: JobSpec, inputs: Tensors) -> int:
    """Exchange bytes a run of ``spec`` on ``inputs`` will measure, without running it."""
    mask = adapter.token_mask(inputs, spec.shapes).cpu()
    return exchange_bytes(
        spec.plan, spec.comp, mask, adapter.hidden_size, adapter.n_layers, adapter.causal, adapter.dtype.itemsize
    )


def bytes_ratio(adapter: Adapter, spec: JobSpec, result: RunResult) -> float:
    """Exchange bytes that crossed the group in ``result`` over full exchange's for the same job."""
    full = full_bytes(adapter, spec)
    return result.exchange_bytes / full if full else 0.0


def job_fidelity(adapter: Adapter, spec: JobSpec, reference: Tensors, got: RunResult) -> dict[str, Any]:
    """What ``fidelity`` reports for one job: :func:`compare` of ``got`` against the local
    ``reference`` outputs, the method, and the bytes (measured, full exchange's, ratio)."""
    return {
        "method": spec.comp.method.value,
        **compare(spec.task, reference, got.outputs).as_dict(),
        "exchange_bytes": got.exchange_bytes,
        "full_exchange_bytes": full_bytes(adapter, spec),
        "bytes_ratio": bytes_ratio(adapter, spec, got),
    }


def run_fidelity(
    adapter: Adapter,
    model: str,
    task: Task,
    inputs: Tensors,
    *,
    ranks: int,
    comp: Compression,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Run one job split over ``ranks`` with ``comp`` (its ``method`` included) and the plain
    local model on the same ``inputs``; :func:`job_fidelity` of the two, plus batch and seq.

    ``runner`` runs the spec (default: the in-process runner); the GLOO path passes e.g.
    ``lambda spec, inputs: cluster.run(loaded, spec, inputs)``.
    """
    spec = plan_job(adapter, model, task, inputs, ranks=ranks, comp=comp)
    reference = run_local(adapter, task, inputs)
    got = (runner or (lambda s, x: run_simulated(adapter, s, x)))(spec, inputs)
    return {"batch": spec.batch, "seq": spec.plan.n_tokens, **job_fidelity(adapter, spec, reference.outputs, got)}
