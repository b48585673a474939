"""Boot numbers that survive a clock set back, and clock skew measured and bounded (pure parts)."""

from __future__ import annotations

from pathlib import Path

from agent.cluster.boots import next_boot
from agent.cluster.skew import ClockSkew

NOW_S = 1_700_000_000.0


def test_boots_count_up_even_when_the_clock_goes_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "boot-c-n"
    first = next_boot(path, NOW_S + 3600)  # the clock an hour fast at the first start
    second = next_boot(path, NOW_S)  # corrected
    third = next_boot(path, NOW_S - 86400)  # a box without an RTC battery, before NTP
    assert first == int((NOW_S + 3600) * 1000)
    assert (second, third) == (first + 1, first + 2)
    assert path.read_text() == f"{third}\n"


def test_a_lost_or_garbled_counter_starts_from_the_clock(tmp_path: Path) -> None:
    path = tmp_path / "boot"
    path.write_text("not a number")
    assert next_boot(path, NOW_S) == int(NOW_S * 1000)


def test_skew_within_the_bound_fits_and_beyond_it_says_why() -> None:
    skew = ClockSkew(max_skew_s=30.0)
    assert skew.why_not(NOW_S + 20, NOW_S, max_age_s=60) is None  # we are 20 s slow
    assert skew.why_not(NOW_S - 85, NOW_S, max_age_s=60) is None  # 60 s old, its clock 25 s behind
    assert "ahead of ours" in str(skew.why_not(NOW_S + 31, NOW_S, max_age_s=60))
    assert "a replay, or its clock is behind" in str(skew.why_not(NOW_S - 91, NOW_S, max_age_s=60))
    assert skew.why_not(float("nan"), NOW_S, max_age_s=60) == "no time"


def test_skew_is_reported_per_peer_and_worth_a_log_line_only_on_change() -> None:
    skew = ClockSkew(max_skew_s=5.0)
    assert not skew.note("a", 0.01, refused=False)  # in step: nothing to say
    assert skew.note("b", 20.0, refused=True)
    assert not skew.note("b", 20.2, refused=True)
    assert skew.report() == {"max_skew_s": 5.0, "ahead_s": {"b": 20.2}, "refused": {"b": 20.2}}
    assert skew.note("b", 0.02, refused=False)  # its clock (or ours) was corrected
    assert skew.report() == {"max_skew_s": 5.0, "ahead_s": {}, "refused": {}}
