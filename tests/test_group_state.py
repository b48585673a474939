"""Group states, table-driven."""

from __future__ import annotations

import pytest

from agent.cluster.group_state import GroupEvent, GroupState, InvalidTransition, next_state

S, E = GroupState, GroupEvent


@pytest.mark.parametrize(
    ("state", "event", "after"),
    [
        (S.FORMING, E.FORMED, S.READY),
        (S.READY, E.RUN_START, S.RUNNING),
        (S.RUNNING, E.RUN_END, S.READY),
        (S.FORMING, E.FAILED, S.DROPPED),
        (S.RUNNING, E.FAILED, S.DROPPED),
        (S.RUNNING, E.MEMBER_LEFT, S.DROPPED),
        (S.READY, E.IDLE, S.DROPPED),
        (S.READY, E.TEARDOWN, S.DROPPED),
        (S.DROPPED, E.FORMED, S.DROPPED),  # dropped is for good
        (S.DROPPED, E.RUN_START, S.DROPPED),
    ],
)
def test_transitions(state: GroupState, event: GroupEvent, after: GroupState) -> None:
    assert next_state(state, event) is after


@pytest.mark.parametrize(
    ("state", "event"),
    [(S.FORMING, E.RUN_START), (S.RUNNING, E.RUN_START), (S.READY, E.RUN_END), (S.READY, E.FORMED)],
)
def test_events_that_cannot_happen_now(state: GroupState, event: GroupEvent) -> None:
    with pytest.raises(InvalidTransition):
        next_state(state, event)
