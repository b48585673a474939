"""The last jobs' decisions a node's health carries: bounded, short, and readable by older and newer nodes."""

from __future__ import annotations

import json
from typing import Any

from agent.jobs.recent import KEEP, RecentJobs
from engine.errors import FailureReason
from transport.health import MAX_RECENT, parse_health
from transport.schema import Result

NOW = 1_800_000_000.0


def split_result(job_id: str = "j1", **over: Any) -> Result:
    base: dict[str, Any] = {
        "id": job_id,
        "ok": True,
        "mode": "distributed",
        "peers": ("b",),
        "latency_ms": {"total": 60.0, "engine": 50.0},
        "decision": {"requested": "auto", "option": "codes@8", "predicted_ms": 40.0, "fidelity": 0.99991,
                     "reason": "codes@8 over b is the fastest"},
    }  # fmt: skip
    return Result(**{**base, **over})


def test_health_carries_the_last_few_decisions_and_reads_old_and_long_documents() -> None:
    recent = RecentJobs()
    for i in range(KEEP + 3):
        recent.record(split_result(f"j{i}"), NOW + i)
    recent.record(
        split_result("fb", mode="local", peers=(), fallback=True, fallback_reason=FailureReason.PEER_OFFLINE,
               decision={"option": "means@8", "predicted_ms": 30.0, "reason": "x",
                         "fallback_reason": "a peer of the run went offline " + "x" * 500}),
        NOW + 99,
    )  # fmt: skip
    kept = recent.items()
    assert len(kept) == KEEP
    assert [j.id for j in kept][-2:] == [f"j{KEEP + 2}", "fb"]
    j = kept[0]
    assert (j.option, j.peers, j.predicted_ms, j.measured_ms, j.fidelity) == ("codes@8", ["b"], 40.0, 50.0, 0.99991)
    fb = kept[-1]
    assert fb.fallback
    assert fb.fallback_reason == "peer_offline"  # the code, beside the words
    assert fb.why.startswith("a peer of the run went offline")
    assert len(fb.why) <= 160
    failed = RecentJobs()
    failed.record(Result.failure("bad", "unknown_model", "no model 'x'"), NOW)
    assert (failed.items()[0].ok, failed.items()[0].error, failed.items()[0].why) == (
        False,
        "unknown_model",
        "no model 'x'",
    )

    old = json.dumps({"node": "a", "time": NOW})  # a node from before the field: nothing recent
    assert parse_health(old.encode()).recent == []
    many = json.dumps({"node": "a", "time": NOW, "recent": [{"id": str(i)} for i in range(MAX_RECENT + 8)]})
    assert [j.id for j in parse_health(many.encode()).recent] == [str(i) for i in range(8, MAX_RECENT + 8)]
