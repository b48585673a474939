"""The coordinator's heartbeat watch (agent/cluster/beats.py), driven with explicit times."""

from __future__ import annotations

from agent.cluster.beats import Silence


def test_a_watched_peer_quiet_past_the_limit_is_reported_once() -> None:
    s = Silence(limit_s=3.0, stall_s=1.5)
    s.watch("g", "form", "a", now_s=0.0)
    s.watch("g", "form", "b", now_s=0.0)
    for t in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):
        s.heard("g", "a", t)  # a beats, b says nothing
        assert s.silent(t) == []
    s.heard("g", "a", 3.5)
    assert s.silent(3.5) == [("g", "b", 3.5)]
    assert s.silent(4.0) == []  # reported once: the run fails on the first report


def test_beats_keep_a_busy_peer_watched_as_long_as_it_takes() -> None:
    s = Silence(limit_s=3.0, stall_s=1.5)
    s.watch("g", 1, "a", now_s=0.0)
    for i in range(1, 40):
        s.heard("g", "a", i * 0.5)
        assert s.silent(i * 0.5) == []


def test_the_clock_starts_when_the_coordinator_starts_waiting() -> None:
    s = Silence(limit_s=3.0, stall_s=10.0)
    s.heard("g", "a", 0.0)  # a word long before this run
    s.watch("g", 2, "a", now_s=10.0)
    assert s.silent(12.0) == []
    assert s.silent(13.5) == [("g", "a", 3.5)]


def test_a_run_that_ends_stops_its_watch_and_a_dropped_group_is_forgotten() -> None:
    s = Silence(limit_s=3.0, stall_s=10.0)
    s.watch("g", 1, "a", now_s=0.0)
    s.watch("g", 2, "a", now_s=0.0)
    s.watch("h", 1, "a", now_s=0.0)
    s.unwatch("g", 1)
    s.forget("h")
    assert s.silent(5.0) == [("g", "a", 5.0)]


def test_a_late_check_restarts_the_clocks_instead_of_blaming_the_peers() -> None:
    s = Silence(limit_s=3.0, stall_s=1.5)
    s.watch("g", 1, "a", now_s=0.0)
    assert s.silent(0.5) == []
    assert s.silent(5.0) == []  # this node's loop stalled 4.5 s: a's beats may be unread
    for t in (5.5, 6.0, 6.5, 7.0, 7.5, 8.0):
        assert s.silent(t) == []
    assert s.silent(8.5) == [("g", "a", 3.5)]


def test_whether_a_peer_said_anything_since_the_coordinator_asked() -> None:
    s = Silence(limit_s=3.0, stall_s=10.0)
    assert not s.heard_since("g", "a", 0.0)  # never heard
    s.heard("g", "a", 5.0)
    assert s.heard_since("g", "a", 4.0)
    assert not s.heard_since("g", "a", 6.0)  # only before the ask
    assert not s.heard_since("h", "a", 4.0)  # about another group
