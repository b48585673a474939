"""Weighted shares: a slower rank gets fewer tokens, and decide() predicts and picks that.

The map is tests/policy_maps.py's: this node computes 100/128 ms per token."""

from __future__ import annotations

import pytest

from engine.plan import PartitionPlan
from policy.decide import PeerLink, Policy, Request, decide
from policy.perfmap import ModelShape
from policy.shares import split
from tests.policy_maps import synthetic_map

OWN = 100.0 / 128  # this node's ms per token, from the map
PLAIN, CAUSAL = ModelShape(), ModelShape(causal=True)


@pytest.mark.parametrize(
    ("why", "slowness", "kind", "cr", "shape", "weigh", "shares"),
    [
        ("equal speeds: equal shares", (1.0, 1.0), "means", 8.0, PLAIN, True, (0.5, 0.5)),
        ("a peer at half speed gets a third", (1.0, 2.0), "means", 8.0, PLAIN, True, (2 / 3, 1 / 3)),
        ("this node at a third of its speed gets a quarter", (3.0, 1.0), "codes", 8.0, PLAIN, True, (0.25, 0.75)),
        ("three ranks, one slow", (1.0, 1.0, 2.0), "full", None, PLAIN, True, (0.4, 0.4, 0.2)),
        ("speeds not known: equal shares", (1.0, 2.0), "means", 8.0, PLAIN, False, (0.5, 0.5)),
        ("causal, equal speeds: equal shares", (1.0, 1.0), "codes", 8.0, CAUSAL, True, (0.5, 0.5)),
        ("causal, a slow peer", (1.0, 2.0), "full", None, CAUSAL, True, (2 / 3, 1 / 3)),
    ],
)
def test_shares_follow_speed(
    why: str,
    slowness: tuple[float, ...],
    kind: str,
    cr: float | None,
    shape: ModelShape,
    weigh: bool,
    shares: tuple[float, ...],
) -> None:
    got = split(100.0, 128, slowness, kind, cr, shape, weigh=weigh)
    assert got.shares == pytest.approx(shares), why
    assert sum(got.shares) == pytest.approx(1.0)
    assert got.weighted == (len(set(shares)) > 1)
    equal = split(100.0, 128, slowness, kind, cr, shape, weigh=False)
    assert got.extra_ms <= equal.extra_ms, why  # weighing never predicts slower than the equal split
    if got.weighted:
        assert got.extra_ms < equal.extra_ms, why
        # the service's plan gives the slowest rank the fewest tokens
        sizes = PartitionPlan.weighted(128, list(got.shares)).sizes
        assert sizes[slowness.index(max(slowness))] == min(sizes)


@pytest.mark.parametrize(
    ("why", "slowness", "kind", "extra"),
    [
        ("the map's own case: no change", (1.0, 1.0), "means", 0.0),
        ("an equal split at twice the time on one rank: compute doubles", (1.0, 2.0), "full", 100.0),
        ("this node loaded 3x: compute triples", (3.0, 1.0), "codes", 200.0),
    ],
)
def test_an_equal_split_is_paced_by_its_slowest_rank(
    why: str, slowness: tuple[float, ...], kind: str, extra: float
) -> None:
    got = split(100.0, 128, slowness, kind, 8.0, PLAIN, weigh=False)
    assert got.extra_ms == pytest.approx(extra), why


def test_full_and_codes_gain_less_from_weighing_than_means() -> None:
    """Under full exchange and codes every rank computes K/V of every remote row, work a
    smaller share does not shed; Segment Means receive only segment rows."""
    gain = {
        kind: split(100.0, 128, (1.0, 2.0), kind, 8.0, PLAIN, weigh=False).extra_ms
        - split(100.0, 128, (1.0, 2.0), kind, 8.0, PLAIN, weigh=True).extra_ms
        for kind in ("means", "codes", "full")
    }
    assert gain["means"] > gain["codes"] > 0
    assert gain["full"] > 0


def test_too_few_tokens_to_weigh_keeps_equal_shares() -> None:
    got = split(100.0, 1, (1.0, 2.0), "means", 8.0, PLAIN, weigh=True)
    assert got.shares == (0.5, 0.5)
    assert got.extra_ms == 0.0


LOOSE = Policy(default_min_fidelity=0.9)


def choose(peers: list[PeerLink]) -> tuple[str, tuple[float, ...], float]:
    got = decide(Request("m", 4, 128), synthetic_map(), peers, 0.0, 1, LOOSE)
    assert got is not None
    assert got.predicted_ms is not None
    return got.option, got.shares, got.predicted_ms


def test_a_peer_at_half_speed_gets_a_third_and_the_split_wins() -> None:
    # At 1000 Mbit/s means@8 takes 216 ms (200 of compute) against local's 400. A peer at half
    # speed on an equal split doubles the compute: 416 ms, local wins.
    equal_option, equal_shares, _ = choose([PeerLink("p", 1000.0, load1=2.0)])  # 2x slower, speed unknown
    assert (equal_option, equal_shares) == ("local", ())
    loaded = decide(Request("m", 4, 128), synthetic_map(), [PeerLink("p", 1000.0, load1=2.0)], 0.0, 1, LOOSE)
    assert loaded is not None
    assert {o.name: o.ms for o in loaded.options}["means@8"] == pytest.approx(416.0, rel=0.01)
    # The same peer known to be half as fast: a third of the tokens, and the split wins.
    option, shares, ms = choose([PeerLink("p", 1000.0, ms_per_token=2 * OWN)])
    assert option == "means@8"
    assert shares == pytest.approx((2 / 3, 1 / 3))
    assert 216.0 < ms < 400.0


def test_equal_speeds_give_equal_shares() -> None:
    option, shares, ms = choose([PeerLink("p", 1000.0, ms_per_token=OWN)])
    assert option == "means@8"
    assert shares == (0.5, 0.5)
    assert ms == pytest.approx(216.0)


def test_unknown_speed_falls_back_to_equal_shares() -> None:
    assert choose([PeerLink("p", 1000.0)]) == choose([PeerLink("p", 1000.0, ms_per_token=OWN)])
    # one peer of two without a speed: nobody is weighed
    _, shares, _ = choose([PeerLink("p", 1000.0, ms_per_token=2 * OWN), PeerLink("q", 1000.0)])
    assert len(set(shares)) == 1


def test_a_job_may_keep_equal_shares() -> None:
    got = decide(
        Request("m", 4, 128, equal_shares=True),
        synthetic_map(),
        [PeerLink("p", 1000.0, ms_per_token=2 * OWN)],
        0.0,
        1,
        LOOSE,
    )
    assert got is not None
    assert got.option == "local"  # at equal shares the half-speed peer makes the split slower than local
    means8 = next(o for o in got.options if o.name == "means@8")
    assert means8.shares == (0.5, 0.5)
    assert means8.ms == pytest.approx(416.0, rel=0.01)


def test_a_faster_peer_takes_more() -> None:
    option, shares, ms = choose([PeerLink("p", 1000.0, ms_per_token=OWN / 2)])
    assert option == "means@8"
    assert shares == pytest.approx((1 / 3, 2 / 3))
    assert ms < 216.0  # this node is the slow one now and sheds work to the peer


def test_an_implausible_speed_is_held_to_eight_times() -> None:
    _, claims_fast, _ = choose([PeerLink("p", 1000.0, ms_per_token=OWN / 1000)])
    _, eight_times, _ = choose([PeerLink("p", 1000.0, ms_per_token=OWN / 8)])
    assert claims_fast == eight_times == pytest.approx((1 / 9, 8 / 9))


def test_decision_carries_the_shares() -> None:
    got = decide(Request("m", 4, 128), synthetic_map(), [PeerLink("p", 1000.0, ms_per_token=2 * OWN)], 0, 1, LOOSE)
    assert got is not None
    out = got.as_dict()
    assert out["shares"] == [0.6667, 0.3333]
    assert "shares 0.67/0.33" in out["reason"]
