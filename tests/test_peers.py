"""Pure pieces of the distributed path: the peer table and the interim mode rule."""

from __future__ import annotations

import json

import pytest

from agent.cluster.peers import Peer, PeerTable
from agent.jobs.auto import choose
from engine.errors import BadRequest
from engine.program import JobSpec, spec_from_dict, spec_to_dict
from transport.schema import Limits, parse_job


def peer(node: str, cluster: str = "c", fp: float = 1.0, queue: int = 0) -> Peer:
    return Peer(node=node, cluster=cluster, address="10.9.0.1", models={"bert": fp}, queue=queue)


def test_peer_table_admits_same_cluster_same_weights_and_forgets_the_silent() -> None:
    table = PeerTable("c", me="me", max_age_s=10)
    assert table.seen(peer("a"), now_s=0)
    assert table.seen(peer("b", queue=3), now_s=5)
    assert not table.seen(peer("x", cluster="other"), now_s=5)
    assert not table.seen(peer("me"), now_s=5)
    assert table.seen(peer("w", fp=2.0), now_s=5)
    assert [p.node for p in table.able("bert", 1.0, now_s=6)] == ["a", "b"]  # least loaded first
    assert [p.node for p in table.able("bert", 1.0, now_s=12)] == ["b"]  # a went silent
    table.offline("b")
    assert table.able("bert", 1.0, now_s=12) == []
    assert table.able("gpt", 1.0, now_s=6) == []


def test_an_mdns_refresh_keeps_fingerprints_from_health() -> None:
    table = PeerTable("c", me="me")
    table.seen(peer("a"), now_s=0)
    table.seen(Peer(node="a", cluster="c", address="10.9.0.1"), now_s=1)
    assert [p.node for p in table.able("bert", 1.0, now_s=2)] == ["a"]


def test_a_silent_peer_sits_out_until_it_is_heard_from_again_or_its_time_is_up() -> None:
    table = PeerTable("c", me="me", max_age_s=100)
    table.seen(peer("a"), now_s=0)
    table.seen(peer("b"), now_s=0)
    table.suspend("a", until_s=40, heard_after_s=10)  # went silent at 10
    table.suspend("b", until_s=40)  # failed to form a group
    assert table.able("bert", 1.0, now_s=11) == []
    table.seen(peer("a"), now_s=12)
    table.seen(peer("b"), now_s=12)
    assert [p.node for p in table.able("bert", 1.0, now_s=13)] == ["a"]  # a is back; b sits out its time
    assert [p.node for p in table.able("bert", 1.0, now_s=41)] == ["a", "b"]


def test_a_peer_that_said_busy_counts_as_loaded_until_its_next_health_and_is_not_suspended() -> None:
    table = PeerTable("c", me="me", max_age_s=100)
    table.seen(peer("a"), now_s=0)
    table.seen(peer("b", queue=1), now_s=0)
    table.busy("a", 2)  # it answered busy: two jobs of its own on its engine
    assert [(p.node, p.queue) for p in table.able("bert", 1.0, now_s=1)] == [("b", 1), ("a", 2)]  # last, not out
    table.seen(peer("a"), now_s=2)  # its next health: idle again
    assert [(p.node, p.queue) for p in table.able("bert", 1.0, now_s=3)] == [("a", 0), ("b", 1)]


def job(mode: str) -> bytes:
    return json.dumps({"id": "j", "model": "m", "inputs": {"text": "x"}, "mode": mode}).encode()


@pytest.mark.parametrize(
    ("mode", "batch", "peers", "tokens", "want"),
    [
        ("local", 16, 3, 10, "local"),
        ("distributed", 1, 1, 10, "distributed"),
        ("distributed", 16, 0, 10, "local"),
        ("auto", 8, 1, 10, "distributed"),
        ("auto", 7, 1, 197, "local"),
        ("auto", 64, 0, 10, "local"),
        ("auto", 1, 1, 992, "distributed"),  # one long prompt (a generate job's prefill)
        ("auto", 1, 1, 511, "local"),
        ("auto", 1, 0, 992, "local"),
        ("local", 1, 1, 992, "local"),
    ],
)
def test_interim_mode_rule(mode: str, batch: int, peers: int, tokens: int, want: str) -> None:
    got, reason = choose(parse_job(job(mode), Limits()), batch, peers, tokens)
    assert got == want
    assert reason


def test_job_spec_survives_the_wire(models: object) -> None:
    from engine.adapters import Task
    from engine.plan import PartitionPlan
    from engine.segments import Compression

    spec = JobSpec("bert", Task.EMBED, PartitionPlan((3, 4)), Compression(cr=3.3, keep_last=True), 2)
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec
    with pytest.raises(BadRequest):
        spec_from_dict({"model": "bert"})


def test_a_peer_on_another_engine_version_is_not_split_with() -> None:
    table = PeerTable("c", me="me", engine=2)
    table.seen(Peer(node="old", cluster="c", address="10.9.0.1", models={"bert": 1.0}, engine=1), now_s=1)
    table.seen(Peer(node="new", cluster="c", address="10.9.0.2", models={"bert": 1.0}, engine=2), now_s=1)
    assert [p.node for p in table.able("bert", 1.0, now_s=2)] == ["new"]
