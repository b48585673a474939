"""Clock differences between this node and its peers: measured, bounded, and reported.

Every signed message carries its sender's wall-clock time (``ts``). A receiver accepts a
message signed up to ``max_skew_s`` in its future, and up to the message's age limit plus
``max_skew_s`` in its past (``max_clock_skew_s``, default 30 s). Replays no longer lean on
that window: boot numbers and sequences refuse them, and a restarted receiver keeps what it
had seen (agent/cluster/freshness.py); the window only bounds how stale a message that this
receiver never saw may be.

From each live message (health, control) it records how far the sender's clock is ahead of
its own (network delay included: milliseconds). Health reports them, with the peers refused
because of the difference, so a box whose clock is off shows up as one that every peer sees
ahead or behind, instead of a silent partition.

Pure: the caller passes the times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Differences below this are noise (delivery, scheduling): not reported.
REPORT_S = 1.0
#: Peers remembered here at most (the least recently measured are dropped first).
MAX_PEERS = 256


@dataclass(slots=True)
class ClockSkew:
    """Per-peer clock differences (seconds the peer's clock is ahead of ours)."""

    max_skew_s: float = 30.0
    ahead_s: dict[str, float] = field(default_factory=dict)
    refused: dict[str, float] = field(default_factory=dict)

    def why_not(self, ts_s: float, now_s: float, max_age_s: float) -> str | None:
        """None when a message signed at ``ts_s`` fits at ``now_s``; else why not, in words."""
        ahead = ts_s - now_s
        if not math.isfinite(ahead):
            return "no time"
        if ahead > self.max_skew_s:
            return f"signed {ahead:.0f} s in our future: its clock is ahead of ours by more than {self.max_skew_s:g} s"
        if -ahead > max_age_s + self.max_skew_s:
            return (
                f"signed {-ahead:.0f} s ago (limit {max_age_s:g} s + {self.max_skew_s:g} s of clock skew): "
                "a replay, or its clock is behind ours"
            )
        return None

    def note(self, node: str, ahead_s: float, *, refused: bool) -> bool:
        """Record a measurement; True when ``node`` newly crossed :data:`REPORT_S` or was newly refused
        (or came back): worth a log line."""
        was_off = abs(self.ahead_s.get(node, 0.0)) >= REPORT_S
        was_refused = node in self.refused
        self.ahead_s.pop(node, None)
        self.ahead_s[node] = ahead_s
        if refused:
            self.refused[node] = ahead_s
        else:
            self.refused.pop(node, None)
        while len(self.ahead_s) > MAX_PEERS:
            self.refused.pop(old := next(iter(self.ahead_s)), None)
            del self.ahead_s[old]
        return was_off != (abs(ahead_s) >= REPORT_S) or was_refused != refused

    def report(self) -> dict[str, object]:
        """For health: the bound, peers whose clocks differ by :data:`REPORT_S` or more, and those refused."""
        return {
            "max_skew_s": self.max_skew_s,
            "ahead_s": {n: round(a, 3) for n, a in sorted(self.ahead_s.items()) if abs(a) >= REPORT_S},
            "refused": {n: round(a, 3) for n, a in sorted(self.refused.items())},
        }
