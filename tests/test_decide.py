"""decide() over tables of situations: the accuracy floor, forced options, loads and links.

The map is tests/policy_maps.py's (its docstring has every option's figures)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from policy.decide import OBJECTIVES, Decision, PeerLink, Policy, Request, decide
from policy.perfmap import Cell, PerfMap
from policy.predict import predict_fidelity
from tests.policy_maps import peer as one_peer
from tests.policy_maps import synthetic_map

FAST, MEDIUM = 1000.0, 100.0


def run(req: Request, peers: list[PeerLink], policy: Policy | None = None, local_load: float = 0.0) -> Decision:
    got = decide(req, synthetic_map(), peers, local_load, 1, policy)
    assert got is not None
    return got


CR8 = {"cr": 8.0, "cr_given": True}


@pytest.mark.parametrize(
    ("why", "job", "mbps", "floor", "want"),
    [
        ("default floor 0.999: means@8 is faster but loses accuracy", {}, MEDIUM, None, "codes@8"),
        ("floor 0.998 lets codes@16 in", {}, MEDIUM, 0.998, "codes@16"),
        ("floor 0.9 on a fast link: means@8", {}, FAST, 0.9, "means@8"),
        ("floor 0.9 at 100 Mbit/s: codes@16 is faster", {}, MEDIUM, 0.9, "codes@16"),
        ("floor 0.9999: only codes@4 of the compressed", {}, MEDIUM, 0.9999, "codes@4"),
        ("floor 1: exact only, local beats full at 100", {}, MEDIUM, 1.0, "local"),
        ("floor 1: exact only, full beats local at 1000", {}, FAST, 1.0, "full"),
        ("slow link: local", {}, 10.0, None, "local"),
        ("per-model floor", {}, FAST, {"m": 0.99}, "codes@16"),
        ("another model's floor does not apply", {}, FAST, {"x": 0.9}, "codes@8"),
        ("the job's floor wins over the model's (lower)", {"min_fidelity": 0.9}, FAST, {"m": 0.9999}, "means@8"),
        ("the job's floor wins over the model's (higher)", {"min_fidelity": 0.9999}, FAST, {"m": 0.9}, "codes@4"),
        ("forced method means, none meets the floor: local", {"method": "means"}, MEDIUM, None, "local"),
        (
            "forced method means, floor 0.96: means@4",
            {"method": "means", "min_fidelity": 0.96},
            MEDIUM,
            None,
            "means@4",
        ),
        ("forced method codes, floor 0.9: codes@16", {"method": "codes", "min_fidelity": 0.9}, FAST, None, "codes@16"),
        ("forced CR 8: the method that meets the floor", CR8, MEDIUM, None, "codes@8"),
        ("forced CR 8, floor 0.9: the faster method", {**CR8, "min_fidelity": 0.9}, FAST, None, "means@8"),
        ("forced full exchange", {"cr": None, "cr_given": True}, FAST, None, "full"),
        ("forced means@8 in auto: below the floor, so local", {**CR8, "method": "means"}, FAST, None, "local"),
        (
            "forced means@8, distributed: the job fixed it, it runs",
            {**CR8, "method": "means", "mode": "distributed"},
            FAST,
            None,
            "means@8",
        ),
        ("distributed on a slow link: the fastest over the floor", {"mode": "distributed"}, 10.0, None, "codes@8"),
        ("the job asked for local", {"mode": "local"}, FAST, None, "local"),
        ("unprofiled batch 3", {"batch": 3}, MEDIUM, None, "codes@8"),
        ("energy: the most frugal exact option", {"objective": "energy"}, FAST, None, "full"),
        ("energy, floor 0.96: means@4 is the most frugal", {"objective": "energy"}, FAST, 0.96, "means@4"),
    ],
)
def test_the_floor_and_the_job_choose(
    why: str, job: dict[str, Any], mbps: float, floor: float | dict[str, float] | None, want: str
) -> None:
    if floor is None:
        policy = Policy()
    elif isinstance(floor, dict):
        policy = Policy(min_fidelity=floor)
    else:
        policy = Policy(default_min_fidelity=floor)
    req = Request("m", job.pop("batch", 4), 128, **job)
    got = run(req, one_peer(mbps), policy)
    assert got.option == want, f"{why}: {got.reason}"
    assert got.option in got.reason
    assert got.mode == ("local" if want == "local" else "distributed")
    assert got.method == (want.split("@")[0] if "@" in want else None)
    assert got.fidelity is not None
    assert got.predicted_ms is not None
    assert got.predicted_ms > 0


@pytest.mark.parametrize(
    ("why", "mbps", "load1", "queue", "local_load", "want"),
    [
        ("idle peer, fast link", FAST, 0.0, 0, 0.0, "codes@8"),
        ("peer overloaded (load 4 on 1 core)", MEDIUM, 4.0, 0, 0.0, "local"),
        ("peer has 2 jobs queued", MEDIUM, 0.0, 2, 0.0, "local"),
        ("this node overloaded: split even on a slow link", 10.0, 0.0, 0, 3.0, "codes@8"),
        ("link not measured yet: assume 20 Mbit/s", None, 0.0, 0, 0.0, "local"),
    ],
)
def test_loads_and_links(why: str, mbps: float | None, load1: float, queue: int, local_load: float, want: str) -> None:
    got = run(Request("m", 4, 128), one_peer(mbps, load1, queue), local_load=local_load)
    assert got.option == want, f"{why}: {got.reason}"


def test_the_reason_names_what_the_floor_ruled_out() -> None:
    got = run(Request("m", 4, 128), one_peer(MEDIUM))
    assert got.option == "codes@8"
    assert "codes@16 (246 ms) has fidelity 0.99800, below the floor 0.999" in got.reason  # the fastest ruled out
    out = got.as_dict()
    assert out["method"] == "codes"
    assert out["fidelity"] == pytest.approx(0.9993)
    assert out["min_fidelity"] == 0.999
    assert out["options_fidelity"]["local"] == 1.0
    assert out["options_fidelity"]["means@8"] == pytest.approx(0.95)
    assert set(out["options"]) == set(out["options_fidelity"])


def test_a_forced_option_below_the_floor_says_so() -> None:
    req = Request("m", 4, 128, mode="distributed", cr=8.0, cr_given=True, method="means")
    got = run(req, one_peer(FAST))
    assert "no option meets the accuracy floor" in got.reason
    assert got.fidelity == pytest.approx(0.95)


def test_a_map_without_fidelity_never_splits_compressed() -> None:
    """A version-1 map: compressed cells carry no fidelity, so only exact options run."""
    old = synthetic_map(fidelity=False)
    got = decide(Request("m", 4, 128), old, one_peer(MEDIUM))
    assert got is not None
    assert got.option == "local"
    assert "no profiled fidelity: re-profile" in got.reason
    fast = decide(Request("m", 4, 128, min_fidelity=0.0), old, one_peer(FAST))
    assert fast is not None
    assert fast.option == "full"  # even a floor of 0 never trusts an unmeasured cell
    forced = decide(Request("m", 4, 128, mode="distributed", cr=8.0, cr_given=True), old, one_peer(FAST))
    assert forced is not None  # a job that fixed the CR still runs, with its fidelity unknown
    assert forced.option in ("means@8", "codes@8")
    assert "fidelity unknown" in forced.reason


MAPS = {"both": synthetic_map(), "means only": synthetic_map(methods=("means",)), "v1": synthetic_map(fidelity=False)}


@pytest.mark.parametrize("name", sorted(MAPS))
def test_auto_never_picks_an_option_below_the_floor(name: str) -> None:
    perf: PerfMap = MAPS[name]
    floors = (0.0, 0.9, 0.96, 0.99, 0.998, 0.999, 0.9999, 1.0)
    links = (5.0, 20.0, 100.0, 1000.0, None)
    for floor, mbps, load, batch, objective in itertools.product(floors, links, (0.0, 3.0), (1, 3, 8), OBJECTIVES):
        req = Request("m", batch, 128, objective=objective, min_fidelity=floor)
        got = decide(req, perf, one_peer(mbps, load1=load), load, 1)
        assert got is not None
        kind = got.method or ("local" if got.mode == "local" else "full")
        profiled = predict_fidelity(perf, "m", batch, 128, kind, got.cr, len(got.peers) + 1)
        assert profiled is not None, got.reason
        assert profiled >= floor, f"floor {floor}, {mbps} Mbit/s, load {load}: {got.reason}"
        assert got.fidelity == profiled


def test_the_energy_objective_keeps_to_the_deadline() -> None:
    """The most frugal option is slow; a deadline it cannot make moves the choice to one that can."""
    perf = PerfMap(
        hardware={},
        models={"m": 1.0},
        energy_source="cpu-model",
        cells=[
            Cell("m", 8, 64, "local", None, 1, 400.0, 400.0, 3, compute_ms=400.0, energy_j=0.1),
            Cell("m", 8, 64, "full", None, 2, 250.0, 250.0, 3, compute_ms=200.0, energy_j=0.3, wire_bytes=1000),
        ],
    )
    peer = [PeerLink("b", 1000.0)]
    frugal = decide(Request("m", 8, 64, objective="energy"), perf, peer)
    hurried = decide(Request("m", 8, 64, objective="energy", deadline_ms=300.0), perf, peer)
    assert frugal is not None
    assert hurried is not None
    assert frugal.option == "local"
    assert hurried.option == "full"
    assert "deadline" in hurried.reason
