"""Replay protection for signed messages: each node's boot, and a window of sequence numbers.

With a cluster secret every signed message (health, status, adverts, group control) carries
its sender's *boot* (a random id drawn at start), the boot's *number* (``bt``: above every
earlier boot of that node, agent/cluster/boots.py) and a sequence number counted up across
everything the sender signs during that boot. A receiver keeps, per node:

- the current boot: a message of another boot counts only when its number is higher (the
  node restarted); messages of a lower-numbered boot are replays. The number is a counter
  the sender persists, not its clock, so a node restarted with its clock set back is still
  a new boot. (Agents before boot numbers sent their start time in seconds; a number is in
  milliseconds at least, so an upgraded node's first boot counts as newer.)
- per channel, the highest sequence accepted and which of the last :data:`WINDOW` below it
  were seen (as IPsec does), so a copy is refused while messages that overtake one another
  on the way are not;
- a floor: a goodbye (a Last Will or a clean ``offline``) of the node's current connection
  refuses everything of that boot seen so far or older, so a dead node's captured messages
  cannot bring it back. A connection's Last Will is signed when it connects, with the
  sequence of that connection's ``online``; a goodbye older than the latest ``online`` is a
  replay of an earlier connection's and changes nothing.

:meth:`Freshness.saved` and ``Freshness(saved)`` carry, per node, its boot and the highest
sequence accepted over a restart of the receiver (agent/cluster/trust.py writes them to the
state directory): after a restart everything up to that sequence is refused, so messages
accepted before cannot be replayed to it. At most :data:`MAX_NODES` nodes are kept, the
least recently heard dropped first.

Pure: no clock, no I/O; the caller passes what it read off the wire (table-tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Sequence numbers below the highest one seen that may still arrive (out of order).
WINDOW = 256
#: The channel of ``online`` messages (a goodbye is checked against it).
STATUS = "status"
#: Nodes remembered (and saved); the least recently heard beyond it are forgotten.
MAX_NODES = 1024


@dataclass(slots=True)
class _Node:
    boot: str
    boot_n: float
    floor: int = 0  # everything at or below is refused (a goodbye, or a restart of ours, said so)
    top: dict[str, int] = field(default_factory=dict)  # channel -> highest sequence accepted
    seen: dict[str, set[int]] = field(default_factory=dict)  # channel -> accepted within the window

    def high(self) -> int:
        return max(self.floor, *self.top.values(), 0)


class Freshness:
    """Per-node boots and sequence windows (see the module docstring)."""

    def __init__(self, saved: Mapping[str, Any] | None = None) -> None:
        self._nodes: dict[str, _Node] = {}
        for node, item in (saved or {}).items():
            try:
                self._nodes[str(node)] = _Node(str(item["boot"]), float(item["bt"]), floor=int(item["seq"]))
            except (KeyError, TypeError, ValueError):
                continue  # one bad entry costs that node's history, not the others'
        self._trim()

    def _trim(self) -> None:
        while len(self._nodes) > MAX_NODES:
            del self._nodes[next(iter(self._nodes))]

    def _heard(self, node: str, state: _Node) -> None:
        self._nodes.pop(node, None)
        self._nodes[node] = state  # most recently heard last
        self._trim()

    def accept(self, node: str, boot: str, boot_n: float, seq: int, channel: str) -> bool:
        """Whether a validly signed message of ``node`` is new; records it when it is."""
        state = self._nodes.get(node)
        if state is None or (boot != state.boot and boot_n > state.boot_n):
            state = _Node(boot, boot_n)  # first sight, or the node restarted
        elif boot != state.boot:
            return False  # a lower-numbered boot: a replay
        if seq <= state.floor:
            return False
        top = state.top.get(channel, 0)
        seen = state.seen.setdefault(channel, set())
        if seq <= top and (seq <= top - WINDOW or seq in seen):
            return False
        if seq > top:
            state.top[channel] = seq
            seen.difference_update({s for s in seen if s <= seq - WINDOW})
        seen.add(seq)
        self._heard(node, state)
        return True

    def gone(self, node: str, boot: str, boot_n: float, seq: int) -> bool:
        """A signed goodbye of ``node`` at ``seq`` (see the module docstring). True when it is the
        goodbye of the node's current connection, i.e. the node is really gone; False for a
        stale one (an older boot, or a connection before the latest ``online``)."""
        state = self._nodes.get(node)
        if state is None or (boot != state.boot and boot_n > state.boot_n):
            self._heard(node, _Node(boot, boot_n, floor=seq))
            return True
        if boot != state.boot or seq < state.top.get(STATUS, 0):
            return False
        state.floor = max(state.floor, seq, *state.top.values())
        self._heard(node, state)
        return True

    def boot_of(self, node: str) -> str | None:
        """The boot of ``node`` this receiver believes current."""
        state = self._nodes.get(node)
        return None if state is None else state.boot

    def saved(self) -> dict[str, dict[str, Any]]:
        """What a restarted receiver needs, per node: boot, boot number, highest sequence seen."""
        return {node: {"boot": s.boot, "bt": s.boot_n, "seq": s.high()} for node, s in self._nodes.items()}
