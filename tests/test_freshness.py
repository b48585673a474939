"""Replay protection, table by table: boots, sequence windows, goodbyes."""

from __future__ import annotations

from agent.cluster.freshness import STATUS, WINDOW, Freshness


def test_new_sequences_pass_copies_and_old_ones_do_not() -> None:
    f = Freshness()
    assert f.accept("b", "boot1", 100.0, 1, "health")
    assert f.accept("b", "boot1", 100.0, 3, "health")
    assert f.accept("b", "boot1", 100.0, 2, "health")  # overtaken on the way: still new
    assert not f.accept("b", "boot1", 100.0, 2, "health")  # a copy
    assert f.accept("b", "boot1", 100.0, 3 + WINDOW, "health")
    assert not f.accept("b", "boot1", 100.0, 3, "health")  # fell out of the window
    assert f.accept("b", "boot1", 100.0, 4, "control")  # channels are kept apart


def test_a_restart_is_a_newer_boot_and_an_older_boot_is_a_replay() -> None:
    f = Freshness()
    assert f.accept("b", "old", 100.0, 50, "health")
    assert f.accept("b", "new", 200.0, 1, "health")  # restarted: its count starts again
    assert not f.accept("b", "old", 100.0, 51, "health")
    assert f.boot_of("b") == "new"


def test_the_goodbye_of_the_current_connection_refuses_everything_seen_before_it() -> None:
    f = Freshness()
    assert f.accept("b", "boot1", 100.0, 10, STATUS)  # online of the connection, seq 10
    for seq in (11, 12, 13):
        assert f.accept("b", "boot1", 100.0, seq, "health")
    assert f.gone("b", "boot1", 100.0, 10)  # its Last Will, signed at connect with seq 10
    for seq in (10, 11, 12, 13):
        assert not f.accept("b", "boot1", 100.0, seq, "health")  # captured health replayed
    assert f.accept("b", "boot1", 100.0, 14, STATUS)  # a real reconnection goes on counting


def test_a_goodbye_of_an_earlier_connection_or_boot_is_stale() -> None:
    f = Freshness()
    assert f.accept("b", "boot1", 100.0, 20, STATUS)  # the second connection's online
    assert not f.gone("b", "boot1", 100.0, 5)  # the first connection's will, replayed
    assert f.accept("b", "boot1", 100.0, 21, "health")
    assert not f.gone("b", "boot0", 50.0, 99)  # a will of a boot before this one
