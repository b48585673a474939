"""Replay protection, table by table: boots, sequence windows, goodbyes."""

from __future__ import annotations

from agent.cluster.freshness import MAX_NODES, STATUS, WINDOW, Freshness


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


def test_a_boot_numbered_higher_is_new_whatever_its_clock_said() -> None:
    f = Freshness()
    assert f.accept("b", "first", 1_700_000_003_600_000, 9, "health")  # started with its clock an hour fast
    assert f.accept("b", "second", 1_700_000_003_600_001, 1, "health")  # the counter went on; the clock went back
    assert not f.accept("b", "first", 1_700_000_003_600_000, 10, "health")


def test_a_restarted_receiver_refuses_what_it_saw_and_takes_what_is_new() -> None:
    before = Freshness()
    for seq in (5, 6, 7):
        assert before.accept("b", "boot1", 100.0, seq, "control")
    assert before.accept("b", "boot1", 100.0, 9, "health")
    after = Freshness(before.saved())
    for seq in (5, 6, 7, 8, 9):  # what it saw, or older than what it saw, on any channel
        assert not after.accept("b", "boot1", 100.0, seq, "control")
    assert after.accept("b", "boot1", 100.0, 10, "control")
    assert not after.accept("b", "boot0", 50.0, 99, "control")  # an older boot stays older
    assert after.accept("b", "boot2", 200.0, 1, "control")  # the sender restarted meanwhile


def test_saved_state_is_bounded_and_bad_entries_are_skipped() -> None:
    f = Freshness()
    for i in range(MAX_NODES + 10):
        f.accept(f"n{i}", "boot", 1.0, 1, "health")
    saved = f.saved()
    assert len(saved) == MAX_NODES
    assert "n0" not in saved  # the least recently heard went first
    assert f"n{MAX_NODES + 9}" in saved
    g = Freshness({"good": {"boot": "x", "bt": 2.0, "seq": 4}, "bad": {"boot": "y"}, "worse": "z"})
    assert g.saved() == {"good": {"boot": "x", "bt": 2.0, "seq": 4}}
