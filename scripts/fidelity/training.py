"""A minimal training loop shared by the two small models the fidelity scripts train."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit(
    model: nn.Module,
    loss_at: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float = 0.05,
    log_every: int = 100,
    evaluate: Callable[[], str] | None = None,
) -> float:
    """Train ``model`` for ``steps`` AdamW steps on ``loss_at(step)``; returns seconds taken.

    Every ``log_every`` steps (and at the end) it prints the mean training loss and,
    when given, ``evaluate()``'s one-line summary (run with the model in eval mode).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    start = time.perf_counter()
    running = 0.0
    model.train()
    for step in range(steps):
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += float(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            line = f"step {step + 1:5d}/{steps}  loss {running / n:.4f}  {time.perf_counter() - start:6.1f} s"
            if evaluate is not None:
                model.eval()
                with torch.no_grad():
                    line += "  " + evaluate()
                model.train()
            print(line, flush=True)
            running = 0.0
    model.eval()
    return time.perf_counter() - start
