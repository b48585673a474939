"""The policy, pure: the map file, predictions of latency and fidelity, corrections.

decide() over tables of situations is in test_decide.py; the maps are tests/policy_maps.py's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from policy.decide import Request, decide
from policy.perfmap import MAP_VERSION, MapError, ModelShape, PerfMap, load_map, mismatches, save_map
from policy.predict import correction_key, fit_link_efficiency, ms_per_token, predict, predict_fidelity, refine
from tests.policy_maps import peer, synthetic_map


def test_predictions_follow_the_link_model() -> None:
    perf = synthetic_map()
    est = predict(perf, "m", 4, 128, "means", 8.0, 2, mbps=100.0)
    assert est is not None
    assert est.ms == pytest.approx(4 * 53 + 4 * 125_000 * 8 / 100e3)
    assert predict(perf, "m", 4, 128, "prism", 8.0, 2, mbps=100.0) == est  # "prism" (before methods) is means
    codes = predict(perf, "m", 4, 128, "codes", 8.0, 2, mbps=100.0)
    assert codes is not None
    assert codes.ms == pytest.approx(4 * 57 + 4 * 125_000 * 8 / 100e3)  # codes' own cells, own compute
    with_rtt = predict(perf, "m", 4, 128, "means", 8.0, 2, mbps=100.0, rtt_ms=2.0)
    assert with_rtt is not None
    assert with_rtt.ms == pytest.approx(est.ms + 15 * 1.0)  # one-way latency per collective
    interpolated = predict(perf, "m", 12, 128, "local", None, 1)
    assert interpolated is not None
    assert interpolated.ms == pytest.approx(1200)
    assert predict(perf, "m", 4, 128, "means", 3.0, 2) is None  # never profiled
    assert predict(perf, "m", 4, 128, "codes", 2.0, 2) is None
    assert predict(perf, "other", 4, 128, "local", None, 1) is None


@pytest.mark.parametrize("method", ["means", "codes"])
def test_a_noisy_cell_never_makes_a_higher_cr_look_slower(method: str) -> None:
    perf = synthetic_map()
    for c in perf.cells:  # the profile caught CR 8 at a bad moment: 10 % slower than CR 4
        if c.kind == method and c.cr == 8.0:
            c.median_ms = c.batch * 60.0 * 1.1
    at4 = predict(perf, "m", 4, 128, method, 4.0, 2, mbps=1000.0)
    at8 = predict(perf, "m", 4, 128, method, 8.0, 2, mbps=1000.0)
    assert at4 is not None
    assert at8 is not None
    assert at8.ms == pytest.approx(at4.ms)  # fewer bytes for the same work: no slower than @4
    assert f"no slower than {method}@4" in at8.basis
    got = decide(Request("m", 4, 128, method=method, min_fidelity=0.9), perf, peer(1000))
    assert got is not None
    assert got.option == f"{method}@8" or (method == "codes" and got.option == "codes@16")
    # The CR it runs comes out 10 % slower than predicted at this link: the correction it earns
    # applies to CR 4 as well (never run, it must not stay the optimistic choice), so the order holds.
    assert got.key is not None
    first = predict(perf, "m", 4, 128, method, got.cr, 2, mbps=1000.0)
    assert first is not None
    for _ in range(30):
        est = predict(perf, "m", 4, 128, method, got.cr, 2, mbps=1000.0)
        assert est is not None
        refine(perf, got.key, est.ms, first.ms * 1.1)
    slow4 = predict(perf, "m", 4, 128, method, 4.0, 2, mbps=1000.0)
    assert slow4 is not None
    assert slow4.ms == pytest.approx(at4.ms * 1.1, rel=0.02)
    again = decide(Request("m", 4, 128, method=method, min_fidelity=0.9), perf, peer(1000))
    assert again is not None
    assert again.option == got.option


def test_unknown_model_gives_no_decision() -> None:
    assert decide(Request("nope", 4, 128), synthetic_map(), peer(100)) is None


def test_link_efficiency_is_fitted_from_cells_at_several_bandwidths() -> None:
    perf = synthetic_map()
    for c in list(perf.cells):
        if c.mode != "local":  # the same cell measured over a 10 Mbit/s link, 1.2x slower than ideal
            slow_ms = c.median_ms + 1.2 * c.wire_bytes * 8 / 10e3
            perf.cells.append(dataclasses.replace(c, mbps=10.0, median_ms=slow_ms))
    assert fit_link_efficiency(perf) == pytest.approx(1.2)
    assert fit_link_efficiency(synthetic_map()) == 1.0  # nothing to fit


def test_observed_latencies_pull_the_prediction() -> None:
    perf = synthetic_map()
    key = correction_key("m", "local", 1)
    for _ in range(40):  # the box got twice as slow
        est = predict(perf, "m", 4, 128, "local", None, 1)
        assert est is not None
        refine(perf, key, est.ms, 800.0)
    est = predict(perf, "m", 4, 128, "local", None, 1)
    assert est is not None
    assert est.ms == pytest.approx(800.0, rel=0.02)
    refine(perf, key, est.ms, 1e9)  # one absurd observation moves it by a bounded factor
    assert perf.corrections[key] <= 4.0


def test_corrections_are_kept_per_link_band_and_method() -> None:
    perf = synthetic_map()
    slow = correction_key("m", "means", 2, 10.0)
    assert slow != correction_key("m", "means", 2, 100.0)
    assert correction_key("m", "means", 2, 100.0) == correction_key("m", "means", 2, 110.0)
    assert correction_key("m", "codes", 2, 100.0) != correction_key("m", "means", 2, 100.0)
    before = predict(perf, "m", 4, 128, "means", 8.0, 2, mbps=100.0)
    assert before is not None
    refine(perf, slow, 1000.0, 3000.0)  # the 10 Mbit/s band ran slower than predicted
    after = predict(perf, "m", 4, 128, "means", 8.0, 2, mbps=100.0)
    assert after is not None
    assert after.ms == before.ms  # other bands keep their own correction
    codes_before = predict(perf, "m", 4, 128, "codes", 8.0, 2, mbps=100.0)
    refine(perf, correction_key("m", "means", 2, 100.0), 1000.0, 2000.0)
    means_after = predict(perf, "m", 4, 128, "means", 16.0, 2, mbps=100.0)
    assert means_after is None  # never profiled
    assert predict(perf, "m", 4, 128, "codes", 8.0, 2, mbps=100.0) == codes_before  # codes keep theirs
    means4 = predict(perf, "m", 4, 128, "means", 4.0, 2, mbps=100.0)
    assert means4 is not None
    assert means4.ms > before.ms  # shared by means' CRs
    got = decide(Request("m", 4, 128), perf, peer(10))
    assert got is not None
    assert got.key is not None
    assert got.key.endswith("/8") or got.option == "local"


def test_map_file_round_trip_version_and_trust(tmp_path: Path) -> None:
    perf = synthetic_map()
    perf.corrections["m/local/1"] = 1.5
    path = tmp_path / "map.json"
    save_map(perf, path)
    back = load_map(path)
    assert back.to_dict() == perf.to_dict()
    assert not list(tmp_path.glob(".map.json.*"))  # the temporary file was renamed, not left
    data = json.loads(path.read_text())
    data["version"] = MAP_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(MapError, match="version"):
        load_map(path)
    path.write_text("{not json")
    with pytest.raises(MapError, match="not JSON"):
        load_map(path)
    assert mismatches(perf, dict(perf.hardware), {"m": 1.0}) == []
    problems = mismatches(perf, {**perf.hardware, "cpu": "y"}, {"m": 2.0})
    assert any("cpu" in p for p in problems)
    assert any("other weights" in p for p in problems)


def test_a_version_1_map_loads_as_segment_means_without_fidelity(tmp_path: Path) -> None:
    """A map written before methods: its prism cells are means, its corrections follow them,
    and saving it writes the current version."""
    v1 = synthetic_map(fidelity=False, methods=("means",)).to_dict()
    v1["version"] = 1
    v1.pop("shapes")
    for c in v1["cells"]:
        for key in ("method", "cosine", "cosine_min", "top1"):
            c.pop(key)
    v1["corrections"] = {"m/prism/2/64": 1.3, "m/local/1": 0.9}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(v1))
    perf = load_map(path)
    prism = [c for c in perf.cells if c.mode == "prism"]
    assert prism
    assert {c.method for c in prism} == {"means"}
    assert {c.option for c in prism} == {"means@4", "means@8"}
    assert all(c.fidelity is None for c in prism)
    assert all(c.fidelity == 1.0 for c in perf.cells if c.mode in ("local", "full"))
    assert perf.corrections == {"m/means/2/64": 1.3, "m/local/1": 0.9}
    assert perf.shape("m") == ModelShape()
    save_map(perf, path)
    assert json.loads(path.read_text())["version"] == MAP_VERSION == 2


@pytest.mark.parametrize(
    ("cell", "problem"),
    [
        ({"mode": "prism", "method": None}, "no method"),
        ({"mode": "prism", "method": "zip"}, "unknown method"),
        ({"mode": "full", "method": "codes"}, "a method on full exchange"),
        ({"mode": "prism", "method": "codes", "cr": None}, "no CR"),
        ({"cosine": 1.5}, "a cosine above 1"),
    ],
)
def test_a_malformed_cell_is_refused(tmp_path: Path, cell: dict[str, object], problem: str) -> None:
    data = synthetic_map().to_dict()
    target = next(c for c in data["cells"] if c["mode"] == "prism" and c["method"] == "codes")
    target.update(cell)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MapError, match="bad cell"):
        load_map(path)


def _worse_at_16() -> PerfMap:
    perf = synthetic_map()
    for c in perf.cells:
        if c.kind == "codes" and c.cr == 8.0 and c.batch == 16:
            c.cosine = 0.9985  # one profiled batch came out worse
    return perf


@pytest.mark.parametrize(
    ("why", "batch", "kind", "cr", "ranks", "want"),
    [
        ("local is exact", 4, "local", None, 1, 1.0),
        ("full exchange is exact", 4, "full", None, 2, 1.0),
        ("a profiled batch: its own cell", 4, "codes", 8.0, 2, 0.9993),
        ("the worse profiled batch: its own cell", 16, "codes", 8.0, 2, 0.9985),
        ("an unprofiled batch: the least over the profiled ones", 3, "codes", 8.0, 2, 0.9985),
        ("a larger unprofiled batch too", 32, "codes", 8.0, 2, 0.9985),
        ("another method keeps its own", 32, "means", 8.0, 2, 0.95),
        ("an unprofiled CR: nothing known", 4, "codes", 2.0, 2, None),
        ("unprofiled ranks: nothing known", 4, "codes", 8.0, 3, None),
    ],
)
def test_predicted_fidelity(why: str, batch: int, kind: str, cr: float | None, ranks: int, want: float | None) -> None:
    got = predict_fidelity(_worse_at_16(), "m", batch, 128, kind, cr, ranks)
    assert got == (None if want is None else pytest.approx(want)), why


def test_cells_without_fidelity_predict_none() -> None:
    assert predict_fidelity(synthetic_map(fidelity=False), "m", 4, 128, "means", 8.0, 2) is None
    assert predict_fidelity(synthetic_map(fidelity=False), "m", 4, 128, "full", None, 2) == 1.0


def test_speed_is_local_ms_per_token_with_the_correction() -> None:
    perf = synthetic_map()
    assert ms_per_token(perf, "m") == pytest.approx(100.0 / 128)  # 100 ms per sample of 128 tokens
    perf.corrections[correction_key("m", "local", 1)] = 2.0  # the box runs twice as slow as profiled
    assert ms_per_token(perf, "m") == pytest.approx(200.0 / 128)
    assert ms_per_token(perf, "other") is None
