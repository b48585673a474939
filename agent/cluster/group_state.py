"""A GLOO group's life as a pure state machine: forming, ready, running, dropped.

Both sides of a group (the coordinator and each peer) move through the same states. Any
failure, a teardown, a member leaving or a long idle spell drops a group for good: it is
never reused, and a later job forms a new one. Table-tested (tests/test_group_state.py).
"""

from __future__ import annotations

import enum


class GroupState(enum.Enum):
    """Where a group is."""

    FORMING = "forming"  # rendezvous in progress
    READY = "ready"  # formed, no run in progress
    RUNNING = "running"  # a run is using it
    DROPPED = "dropped"  # gone for good


class GroupEvent(enum.Enum):
    """What happens to a group."""

    FORMED = "formed"
    RUN_START = "run_start"
    RUN_END = "run_end"
    FAILED = "failed"  # formation or a run failed, or a member reported failure
    TEARDOWN = "teardown"  # the coordinator said so
    MEMBER_LEFT = "member_left"  # a member went offline
    IDLE = "idle"  # unused for group_idle_s (closes its GLOO listeners)


class InvalidTransition(ValueError):
    """An event that makes no sense in the group's state (a bug or a confused peer)."""


_ENDS = {GroupEvent.FAILED, GroupEvent.TEARDOWN, GroupEvent.MEMBER_LEFT, GroupEvent.IDLE}
_MOVES = {
    (GroupState.FORMING, GroupEvent.FORMED): GroupState.READY,
    (GroupState.READY, GroupEvent.RUN_START): GroupState.RUNNING,
    (GroupState.RUNNING, GroupEvent.RUN_END): GroupState.READY,
}


def next_state(state: GroupState, event: GroupEvent) -> GroupState:
    """The state after ``event``; raises InvalidTransition when the event cannot happen now."""
    if state is GroupState.DROPPED or event in _ENDS:
        return GroupState.DROPPED
    try:
        return _MOVES[(state, event)]
    except KeyError:
        raise InvalidTransition(f"{event.value} while {state.value}") from None
