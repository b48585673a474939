"""Profiling through agents, the pure parts: who takes part, what the jobs carry, what an
answer means, and how results' outputs are scored against the local pass.

The end-to-end run over two real agents is in test_auto_policy.py."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest

from agent.profiling.accuracy import Score, score_output
from agent.profiling.peers import ProfileError, Skip, _check, job_inputs, option_fields, resolve
from engine.errors import BadRequest

HW = {"cpu": "x", "cores": 2, "threads": 1, "device": "cpu", "gpu": None}


def node(name: str, fp: float, peers: list[str], status: str = "online", **extra: Any) -> dict[str, Any]:
    health = {"models": ["m"], "fingerprints": {"m": fp}, "families": {"m": "bert"}, "hardware": HW, "peers": peers}
    return {"node": name, "status": status, "health": {**health, **extra}}


NODES = [
    node("a", 1.0, ["b", "c", "d"]),
    node("b", 1.0, ["a"]),
    node("c", 2.0, ["a"]),  # other weights
    node("d", 1.0, ["a"], status="offline"),
]


def test_auto_takes_every_peer_with_the_same_weights() -> None:
    got = resolve(NODES, "a", "m", "auto")
    assert got.peers == ("b",)
    assert got.fingerprint == 1.0
    assert got.family == "bert"
    assert got.hardware == HW


@pytest.mark.parametrize(
    ("nodes", "who", "model", "peers", "message"),
    [
        (NODES, "z", "m", "auto", r"node 'z' is not online on this broker \(online: a, b, c\)"),
        (NODES, "a", "q", "auto", "node 'a' does not serve 'q'"),
        (NODES, "a", "m", "c", "peer 'c' cannot help 'a' with 'm'"),
        (NODES, "a", "m", "d", "peer 'd' cannot help 'a' with 'm'"),
        (NODES, "a", "m", "b,b", "--peers names a node twice"),
        (NODES[2:3], "c", "m", "auto", "no peer of 'c' serves 'm' with the same weights"),
        ([{"node": "a", "status": "online", "health": {"models": ["m"]}}], "a", "m", "auto", "too old"),
    ],
)
def test_who_cannot_take_part_is_named(
    nodes: list[dict[str, Any]], who: str, model: str, peers: str, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        resolve(nodes, who, model, peers)


def test_inputs_and_forced_options() -> None:
    rows = job_inputs("bert", 3, 40)["token_ids"]
    assert [len(r) for r in rows] == [40, 40, 40]
    assert all(0 < t < 1000 for r in rows for t in r)  # inside the tiny models' vocabulary
    images = job_inputs("vit", 2, None)["image"]
    assert len(images) == 2
    assert base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(BadRequest, match="--seq does not apply to ViT"):
        job_inputs("vit", 1, 64)
    assert option_fields("local", None, ("b",)) == {"mode": "local"}
    assert option_fields("full", None, ("b",)) == {"mode": "distributed", "cr": "full", "peers": ["b"]}
    assert option_fields("prism", 4.0, ("b", "c")) == {"mode": "distributed", "cr": 4.0, "peers": ["b", "c"]}
    codes = option_fields("prism", 4.0, ("b",), "codes")
    assert codes == {"mode": "distributed", "cr": 4.0, "peers": ["b"], "method": "codes"}


def answer(**fields: Any) -> dict[str, Any]:
    """A result as an agent sends it for a forced split."""
    return {"ok": True, "mode": "distributed", "fallback": False, "decision": {}, **fields}


TOO_TIGHT = "CR 64 is too tight for method 'codes' on this model: 1-bit codes of every row need 1/51.2"


@pytest.mark.parametrize(
    ("why", "result", "method", "outcome"),
    [
        ("means ran as asked", answer(method="means"), "means", None),
        ("codes ran as asked", answer(method="codes"), "codes", None),
        ("an agent from before methods runs means", answer(), "means", None),
        ("an agent from before methods cannot run codes", answer(), "codes", "every batch"),
        ("the node ran the other method", answer(method="means"), "codes", "ran method means instead"),
        (
            "a codes CR too tight: the node fell back to local",
            answer(mode="local", fallback=True, decision={"fallback_reason": TOO_TIGHT}),
            "codes",
            "this batch",
        ),
        (
            "a codes CR too tight: the node refused",
            {"ok": False, "error": {"code": "bad_request", "message": TOO_TIGHT}},
            "codes",
            "this batch",
        ),
        (
            "a split that fell back for another reason stops the profile",
            answer(mode="local", fallback=True, decision={"fallback_reason": "peer b died"}),
            "means",
            "ran it local instead (peer b died)",
        ),
        (
            "an error stops the profile",
            {"ok": False, "error": {"code": "busy", "message": "queue full"}},
            "means",
            "busy",
        ),
    ],
)
def test_what_an_answer_means(why: str, result: dict[str, Any], method: str, outcome: str | None) -> None:
    if outcome is None:
        _check(result, "prism", method, "batch 1", "a")
    elif outcome in ("every batch", "this batch"):
        with pytest.raises(Skip) as skip:
            _check(result, "prism", method, "batch 1", "a")
        assert skip.value.every_batch == (outcome == "every batch"), why
    else:
        with pytest.raises(ProfileError, match=re.escape(outcome)):
            _check(result, "prism", method, "batch 1", "a")


LOGITS = {"logits": [[1.0, 2.0], [3.0, 1.0]]}
FLIPPED = {"logits": [[1.0, 2.0], [1.0, 3.0]]}  # the second sample's argmax changed, cosine 0.6
TOKENS = {"features": [[[1.0, 0.0], [0.0, 1.0]]]}
SWAPPED = {"features": [[[0.0, 1.0], [1.0, 0.0]]]}


@pytest.mark.parametrize(
    ("why", "reference", "got", "want"),
    [
        ("identical logits", LOGITS, LOGITS, Score(1.0, 1.0, 1.0)),
        ("one sample flips its argmax", LOGITS, FLIPPED, Score(0.8, 0.6, 0.5)),
        (
            "embeddings: cosine only",
            {"embedding": [[1.0, 0.0]]},
            {"embedding": [[1.0, 1.0]]},
            Score(0.7071, 0.7071, None),
        ),
        ("features: cosine per sample over all tokens", TOKENS, SWAPPED, Score(0.0, 0.0, None)),
        (
            "next token: top-1 agreement only",
            {"top_ids": [[5, 6], [7, 8]]},
            {"top_ids": [[5, 7], [8, 7]]},
            Score(None, None, 0.5),
        ),
        ("log-likelihoods: nothing to score", {"loglik": [-3.0]}, {"loglik": [-3.1]}, Score(None, None, None)),
    ],
)
def test_results_are_scored_against_the_local_pass(
    why: str, reference: dict[str, Any], got: dict[str, Any], want: Score
) -> None:
    score = score_output(reference, got)
    for field in ("cosine", "cosine_min", "top1"):
        value, expected = getattr(score, field), getattr(want, field)
        assert value == (None if expected is None else pytest.approx(expected, abs=1e-4)), f"{why}: {field}"
