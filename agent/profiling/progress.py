"""The profiler's progress line: a bar with an ETA on a terminal, a line per tenth elsewhere.

The plan lists every pass to come, in order, as (batch, kind, timed): warm-ups count for the
ETA though not in the pass count. The ETA prices each remaining pass at the seconds per
sample measured so far for its kind (local, full, means, codes), since a batch of 16 costs
far more than a batch of 1 and a split pass costs otherwise than a local one; a kind not
measured yet is priced from the others (split ones at :data:`SPLIT_PRIOR` x local).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from agent.profiling.loopback import Grid

#: Until a split pass has been timed, one is priced at this many local passes of the same batch.
SPLIT_PRIOR = 1.5


def kind_of(mode: str, method: str | None) -> str:
    """``local``, ``full``, ``means`` or ``codes``: passes of one kind cost alike per sample."""
    return method if mode == "prism" and method else mode


@dataclass(slots=True)
class Progress:
    """See the module docstring."""

    plan: list[tuple[int, str, bool]]
    out: TextIO = field(default_factory=lambda: sys.stderr)
    done: int = 0
    start: float = field(default_factory=time.monotonic)
    _cost: dict[str, list[float]] = field(default_factory=dict)  # kind -> [seconds, samples]
    _shown: int = -1

    @classmethod
    def for_grid(cls, grid: Grid, out: TextIO | None = None, *, interleaved: bool = False) -> Progress:
        """The plan for ``grid``: cell after cell (profiling through agents), or per batch the
        warm-ups, then the options taking turns pass by pass (the loopback profiler)."""
        kinds = [kind_of(mode, method) for mode, method, _cr in grid.options]
        plan: list[tuple[int, str, bool]] = []
        for batch in grid.batches:
            if interleaved:
                plan += [(batch, kind, False) for kind in kinds for _ in range(grid.warmup)]
                plan += [(batch, kind, True) for _ in range(grid.repeat) for kind in kinds]
            else:
                for kind in kinds:
                    plan += [(batch, kind, False)] * grid.warmup + [(batch, kind, True)] * grid.repeat
        return cls(plan, out or sys.stderr)

    @property
    def total(self) -> int:
        """Timed passes in all."""
        return sum(1 for *_, timed in self.plan if timed)

    def skip(self, batch: int, kind: str, passes: int, why: str) -> None:
        """``passes`` of (batch, kind) will not run (an option the model cannot take), and why."""
        left = self.plan[self.done :]
        for _ in range(passes):
            for i, (b, k, _timed) in enumerate(left):
                if (b, k) == (batch, kind):
                    del left[i]
                    break
        self.plan[self.done :] = left
        self.out.write(f"profile: skipped {why}\n")
        self.out.flush()

    def eta_s(self) -> float | None:
        """Seconds the remaining passes should take; None before anything was measured."""
        if not self._cost:
            return None
        rate = {kind: s / n for kind, (s, n) in self._cost.items()}
        local = rate.get("local") or min(rate.values()) / SPLIT_PRIOR
        split = [r for k, r in rate.items() if k != "local"]
        default_split = sum(split) / len(split) if split else local * SPLIT_PRIOR
        return sum(
            batch * rate.get(kind, local if kind == "local" else default_split)
            for batch, kind, _ in self.plan[self.done :]
        )

    def step(self, label: str, seconds: float, timed: bool = True, kind: str | None = None) -> None:
        """One pass (``label`` names it) took ``seconds``."""
        planned = self.plan[self.done] if self.done < len(self.plan) else None
        batch, kind = (planned[0], planned[1]) if planned else (1, kind or label.split()[-1].split("@")[0])
        self.done += 1
        spent = self._cost.setdefault(kind, [0.0, 0.0])
        spent[0] += seconds
        spent[1] += batch
        if not timed:
            return
        count = sum(1 for *_, t in self.plan[: self.done] if t)
        total = max(1, self.total)
        elapsed = time.monotonic() - self.start
        eta = self.eta_s()
        left = "-" if eta is None else f"{eta:.0f} s"
        line = f"{count}/{total} passes, {elapsed:.0f} s, about {left} left ({label})"
        if self.out.isatty():
            filled = int(30 * count / total)
            self.out.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {line}   ")
            if count == total:
                self.out.write("\n")
        elif (tenth := 10 * count // total) != self._shown:
            self._shown = tenth
            self.out.write(f"profile: {line}\n")
        self.out.flush()
