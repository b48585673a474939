"""Typed health and control documents: what peers accept and what they refuse, never an exception."""

from __future__ import annotations

import json

import pytest

from transport.control import Beat, Busy, Form, Run, dump_control, parse_control
from transport.health import Health, parse_health
from transport.schema import WireError


def test_health_round_trips_and_ignores_unknown_fields() -> None:
    doc = Health(node="a", time=1.0, models=["bert"], fingerprints={"bert": 1.5}, probe_port=4242)
    raw = json.loads(doc.encode())
    raw["from_a_newer_agent"] = {"x": 1}
    got = parse_health(json.dumps(raw).encode())
    assert (got.node, got.fingerprints, got.probe_port, got.load.queue) == ("a", {"bert": 1.5}, 4242, 0)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"[]",
        b'{"node": "a"}',
        b'{"node": "a", "time": "x"}',
        b'{"node": "a", "time": 1, "probe_port": 99999}',
        b"[" * 100_000,
        b'{"node": "a", "time": 1e999999}',
        b"\xff\xfe",
    ],
)
def test_bad_health_is_a_wire_error(payload: bytes) -> None:
    with pytest.raises(WireError):
        parse_health(payload)


def test_control_messages_round_trip() -> None:
    msgs = [
        Form(gid="0123456789ab", members=["a", "b", "c"], timeout_s=10),
        Run(gid="0123456789ab", run=3, spec={"model": "bert"}, collective_s=2.5),
        Beat(gid="0123456789ab"),
        Busy(gid="0123456789ab", run=3, queue=2),
    ]
    for msg in msgs:
        assert parse_control(dump_control(msg)) == msg


@pytest.mark.parametrize(
    "body",
    [
        "{}",
        '{"op": "form", "gid": "0123456789ab", "members": ["a"], "timeout_s": 10}',  # a group of one
        '{"op": "form", "gid": "../etc", "members": ["a", "b"], "timeout_s": 10}',
        '{"op": "run", "gid": "0123456789ab", "run": -1, "spec": {}, "collective_s": 1}',
        '{"op": "explode", "gid": "0123456789ab"}',
        '{"op": "teardown", "gid": "0123456789ab", "extra": 1}',
        '{"op": "busy", "gid": "0123456789ab", "run": 3, "queue": 0}',  # busy with nothing
        "x" * 70_000,
    ],
)
def test_bad_control_is_a_wire_error(body: str) -> None:
    with pytest.raises(WireError):
        parse_control(body)
