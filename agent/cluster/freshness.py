"""Replay protection for signed messages: each node's boot, and a window of sequence numbers.

With a cluster secret every signed message (health, status, adverts, group control) carries
its sender's *boot* (a random id drawn at start), the boot's start time and a sequence number
counted up across everything the sender signs during that boot. A receiver keeps, per node:

- the current boot: a message of another boot counts only when that boot started later
  (the node restarted); messages of an older boot are replays;
- per channel, the highest sequence accepted and which of the last :data:`WINDOW` below it
  were seen (as IPsec does), so a copy is refused while messages that overtake one another
  on the way are not;
- a floor: a goodbye (a Last Will or a clean ``offline``) of the node's current connection
  refuses everything of that boot seen so far or older, so a dead node's captured messages
  cannot bring it back. A connection's Last Will is signed when it connects, with the
  sequence of that connection's ``online``; a goodbye older than the latest ``online`` is a
  replay of an earlier connection's and changes nothing.

Pure: no clock, no I/O; the caller passes what it read off the wire (table-tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Sequence numbers below the highest one seen that may still arrive (out of order).
WINDOW = 256
#: The channel of ``online`` messages (a goodbye is checked against it).
STATUS = "status"


@dataclass(slots=True)
class _Node:
    boot: str
    boot_ts: float
    floor: int = 0  # everything at or below is refused (a will or an offline said so)
    top: dict[str, int] = field(default_factory=dict)  # channel -> highest sequence accepted
    seen: dict[str, set[int]] = field(default_factory=dict)  # channel -> accepted within the window


class Freshness:
    """Per-node boots and sequence windows (see the module docstring)."""

    def __init__(self) -> None:
        self._nodes: dict[str, _Node] = {}

    def accept(self, node: str, boot: str, boot_ts: float, seq: int, channel: str) -> bool:
        """Whether a validly signed message of ``node`` is new; records it when it is."""
        state = self._nodes.get(node)
        if state is None or (boot != state.boot and boot_ts > state.boot_ts):
            state = self._nodes[node] = _Node(boot, boot_ts)  # first sight, or the node restarted
        elif boot != state.boot:
            return False  # an older boot: a replay
        if seq <= state.floor:
            return False
        top = state.top.get(channel, 0)
        seen = state.seen.setdefault(channel, set())
        if seq > top:
            state.top[channel] = seq
            seen.add(seq)
            seen.difference_update({s for s in seen if s <= seq - WINDOW})
            return True
        if seq <= top - WINDOW or seq in seen:
            return False
        seen.add(seq)
        return True

    def gone(self, node: str, boot: str, boot_ts: float, seq: int) -> bool:
        """A signed goodbye of ``node`` at ``seq`` (see the module docstring). True when it is the
        goodbye of the node's current connection, i.e. the node is really gone; False for a
        stale one (an older boot, or a connection before the latest ``online``)."""
        state = self._nodes.get(node)
        if state is None or (boot != state.boot and boot_ts > state.boot_ts):
            self._nodes[node] = _Node(boot, boot_ts, floor=seq)
            return True
        if boot != state.boot or seq < state.top.get(STATUS, 0):
            return False
        state.floor = max(state.floor, seq, *state.top.values())
        return True

    def boot_of(self, node: str) -> str | None:
        """The boot of ``node`` this receiver believes current."""
        state = self._nodes.get(node)
        return None if state is None else state.boot
