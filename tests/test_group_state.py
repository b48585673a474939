"""Group states, table-driven."""

from __future__ import annotations

import pytest

from agent.cluster.group import Group
from agent.cluster.group_state import GroupEvent, GroupState, InvalidTransition, next_state
from agent.cluster.upkeep import idle
from transport.rendezvous import RelayStore

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


@pytest.mark.parametrize(
    ("state", "users", "age_s", "is_idle"),
    [
        (S.READY, 0, 2.0, True),
        (S.READY, 0, 0.5, False),
        (S.READY, 1, 2.0, False),  # a job reserving engines after a formation longer than idle_s
        (S.RUNNING, 0, 2.0, False),
        (S.FORMING, 0, 2.0, False),
    ],
)
def test_a_group_is_idle_only_when_formed_unused_and_old(state: GroupState, users: int, age_s: float,
                                                          is_idle: bool) -> None:  # fmt: skip
    group = Group("g", ("a", "b"), 0, RelayStore(lambda key, value: None, 1.0), state=state, users=users)
    group.used_s = 100.0
    assert idle(group, 100.0 + age_s, 1.0) is is_idle
