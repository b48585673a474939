"""How close a PRISM output is to the local model's: the numbers `fidelity` prints."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F  # noqa: N812

from engine.adapters import Task, Tensors

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
