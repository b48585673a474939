"""Typed failure reasons: every GroupError names one, a fallback's result carries it, and the
docs list each (the label values of ``prism_fallbacks_total``). The end to end path with real
agents is in tests/test_group_abort.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from agent.jobs.service import fallback_reason
from engine.errors import BadRequest, FailureReason, GroupError
from transport.gloo_errors import collective_error
from transport.schema import Result

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("agent", "engine", "transport", "policy", "testbed")


def group_error_calls() -> list[tuple[str, ast.Call]]:
    """Every ``GroupError(...)`` in the shipped code, with where it is."""
    paths = sorted(p for package in SOURCES for p in (REPO / package).rglob("*.py"))
    return [
        (f"{path.relative_to(REPO)}:{node.lineno}", node)
        for path in paths
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "GroupError"
    ]


def test_every_group_error_raised_names_its_reason() -> None:
    calls = group_error_calls()
    assert len(calls) >= 10  # groups, rendezvous, GLOO, sealed traffic, the local cluster
    missing = [where for where, call in calls if not any(kw.arg == "reason" for kw in call.keywords)]
    assert not missing, f"GroupError without a reason at {missing}"
    untyped = [
        where
        for where, call in calls
        for kw in call.keywords
        if kw.arg == "reason" and isinstance(kw.value, ast.Constant)  # a string or None, not a FailureReason
    ]
    assert not untyped, f"GroupError with a literal for its reason at {untyped}"
    with pytest.raises(TypeError):
        GroupError("a peer died")  # type: ignore[call-arg]  # no reason: refused at run time too


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (GroupError("b went offline", reason=FailureReason.PEER_OFFLINE), FailureReason.PEER_OFFLINE),
        (GroupError("b was silent for 3.2 s", reason=FailureReason.PEER_SILENT), FailureReason.PEER_SILENT),
        (GroupError("b's engine is busy", reason=FailureReason.PEER_BUSY), FailureReason.PEER_BUSY),
        (BadRequest("cannot split 3 tokens over 4 ranks"), FailureReason.CANNOT_SPLIT),
        (RuntimeError("a bug"), FailureReason.INTERNAL),
    ],
)
def test_a_failed_split_falls_back_with_the_reason_its_error_carries(exc: Exception, reason: FailureReason) -> None:
    assert fallback_reason(exc) is reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 2000ms for recv operation", "collective_timeout"),
        ("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:40613", "collective_failed"),
        ("[gloo/transport/tcp/pair.cc:598] Connection reset by peer", "collective_failed"),
        ("", "collective_failed"),
    ],
)
def test_a_gloo_failure_is_told_apart_as_a_timeout_or_a_broken_link(text: str, reason: str) -> None:
    err = collective_error("alltoall", 1, RuntimeError(text))
    assert err.reason.value == reason
    assert err.message.startswith("GLOO alltoall failed on rank 1")


def test_a_fallback_result_carries_its_reason_on_the_wire_and_a_normal_one_none() -> None:
    fell = Result(id="j", ok=True, mode="local", fallback=True, fallback_reason=FailureReason.GRANT_TIMEOUT)
    assert fell.to_dict()["fallback_reason"] == "grant_timeout"
    assert Result(id="k", ok=True, mode="local").to_dict()["fallback_reason"] is None


def test_the_readme_explains_every_reason() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| `fallback_reason` |") :].split("\n\n", 1)[0].split("\n", 2)[2]  # the rows
    rows = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    values = [r.value for r in FailureReason]
    assert len(rows) >= 10
    assert set(rows) <= set(values), rows  # the reasons a result can carry, each once
    assert len(rows) == len(set(rows))
    missing = [v for v in values if f"`{v}`" not in readme]  # the rest: named below the table
    assert not missing, f"README does not explain {missing}"
