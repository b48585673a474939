"""Profiling through agents, the pure parts: who takes part, and what the jobs carry.

The end-to-end run over two real agents is in test_auto_policy.py."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from agent.profiling.peers import job_inputs, option_fields, resolve
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
