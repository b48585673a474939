"""How close a profiled option came to the local model: what a map cell's fidelity holds.

Both profilers run the local pass and every option on the same inputs, so each option is
scored against the local pass's main output (engine.fidelity.MAIN_OUTPUT): the mean and
least per-sample cosine, and the argmax agreement for outputs that are logits. The loopback
profiler has the tensors; profiling through agents has the JSON outputs of job results,
which carry the main output except for next-token jobs (only the top logits travel: those
get the top-1 agreement and no cosine) and log-likelihoods (no cosine either).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from engine.adapters import Task, Tensors
from engine.fidelity import MAIN_OUTPUT

#: JSON output key of a job result -> the task whose main output it is (agent.jobs.inputs.to_output).
OUTPUT_TASKS = {"logits": Task.CLASSIFY, "embedding": Task.EMBED, "features": Task.FEATURES}


@dataclass(frozen=True, slots=True)
class Score:
    """Mean and least per-sample cosine of the main output vs local, and top-1 agreement
    (None: not measurable for this output)."""

    cosine: float | None
    cosine_min: float | None
    top1: float | None


def exact(task: Task) -> Score:
    """What local and full exchange score: exact by construction (tests/test_exactness.py)."""
    if task is Task.LOGLIK:
        return Score(None, None, None)
    return Score(1.0, 1.0, 1.0 if MAIN_OUTPUT[task] == "logits" else None)


def score(task: Task, reference: Tensors, got: Tensors) -> Score:
    """``got``'s main output for ``task`` against the local ``reference``."""
    if task is Task.LOGLIK:  # per-token log-likelihoods: no cosine to take
        return Score(None, None, None)
    key = MAIN_OUTPUT[task]
    ref, out = reference[key].float(), got[key].float()
    cosines = F.cosine_similarity(ref.flatten(1), out.flatten(1), dim=1)  # (B,)
    top1 = float((ref.argmax(-1) == out.argmax(-1)).float().mean()) if key == "logits" else None
    # Rounding can put an identical output a hair above 1.
    return Score(min(1.0, float(cosines.mean())), min(1.0, float(cosines.min())), top1)


def score_output(reference: Mapping[str, Any], got: Mapping[str, Any]) -> Score:
    """The same from two job results' ``output`` objects (see the module docstring)."""
    for key, task in OUTPUT_TASKS.items():
        if key in reference and key in got:
            return score(task, {key: torch.tensor(reference[key])}, {key: torch.tensor(got[key])})
    if "top_ids" in reference and "top_ids" in got:  # next token: only the top-k travel
        ref, out = torch.tensor(reference["top_ids"]), torch.tensor(got["top_ids"])
        return Score(None, None, float((ref[..., 0] == out[..., 0]).float().mean()))
    return Score(None, None, None)
