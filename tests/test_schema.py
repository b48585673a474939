"""The wire schema: every bad payload becomes a readable error with the job's id when possible."""

from __future__ import annotations

import base64
import json

import msgpack
import pytest

from transport.schema import Limits, Mode, Result, WireError, parse_job

LIMITS = Limits(max_payload_bytes=10_000, max_batch=4, max_seq=16, max_text_chars=100, max_image_bytes=64)


def js(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_a_minimal_json_job() -> None:
    job = parse_job(js({"id": "j1", "model": "tiny-bert", "inputs": {"text": ["hello world"]}}), LIMITS)
    assert (job.id, job.model, job.text, job.mode, job.batch) == ("j1", "tiny-bert", ("hello world",), Mode.AUTO, 1)


def test_msgpack_with_raw_image_bytes_and_options() -> None:
    payload = msgpack.packb(
        {
            "id": "m-2",
            "model": "vit",
            "inputs": {"image": [b"\x89PNG..."]},
            "mode": "distributed",
            "cr": 8,
            "ranks": 2,
            "peers": ["jetson-2"],
            "deadline_ms": 500,
        },
        use_bin_type=True,
    )
    job = parse_job(payload, LIMITS)
    assert job.images == (b"\x89PNG...",)
    assert (job.mode, job.cr, job.ranks, job.deadline_ms) == (Mode.DISTRIBUTED, 8.0, 2, 500.0)
    assert job.peers == ("jetson-2",)


def test_token_ids_and_base64_images() -> None:
    assert parse_job(js({"id": "t", "model": "g", "inputs": {"token_ids": [1, 2, 3]}}), LIMITS).token_ids == (
        (1, 2, 3),
    )
    img = base64.b64encode(b"abc").decode()
    assert parse_job(js({"id": "i", "model": "v", "inputs": {"image": img}}), LIMITS).images == (b"abc",)


BAD = [
    (b"{not json", None, "bad_payload"),
    (b"\xc1\xc1", None, "bad_payload"),
    (js([1, 2]), None, "bad_payload"),
    (b"{" + b" " * 10_001 + b"}", None, "too_large"),
    (js({"model": "m", "inputs": {"text": "x"}}), None, "invalid_job"),
    (js({"id": "a/b", "model": "m", "inputs": {"text": "x"}}), None, "invalid_job"),
    (js({"id": "j", "inputs": {"text": "x"}}), "j", "invalid_job"),
    (js({"id": "j", "model": 7, "inputs": {"text": "x"}}), "j", "invalid_job"),
    (js({"id": "j", "model": "m"}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"text": "x", "token_ids": [1]}}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"text": [1]}}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"text": "x" * 101}}), "j", "too_large"),
    (js({"id": "j", "model": "m", "inputs": {"text": ["a"] * 5}}), "j", "too_large"),
    (js({"id": "j", "model": "m", "inputs": {"token_ids": [1] * 17}}), "j", "too_large"),
    (js({"id": "j", "model": "m", "inputs": {"token_ids": [1, -2]}}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"token_ids": [1.5]}}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"image": "!!notbase64"}}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"image": base64.b64encode(b"x" * 65).decode()}}), "j", "too_large"),
    (js({"id": "j", "model": "m", "inputs": {"text": "x"}, "mode": "fast"}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"text": "x"}, "cr": 0.5}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"text": "x"}, "cr": True}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"text": "x"}, "ranks": "2"}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"text": "x"}, "deadline_ms": -1}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"text": "x"}, "peers": "b"}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"text": "x"}, "peers": ["b", "b"]}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"text": "x"}, "peers": ["a/b"]}), "j", "invalid_job"),
    (js({"id": "j", "model": "m", "inputs": {"text": "x"}, "peers": ["b"], "ranks": 3}), "j", "invalid_job"),
    (js({"v": 2, "id": "j", "model": "m", "inputs": {"text": "x"}}), "j", "invalid_job"),
]


@pytest.mark.parametrize(("payload", "job_id", "code"), BAD)
def test_bad_payloads_are_wire_errors_with_the_readable_id(payload: bytes, job_id: str | None, code: str) -> None:
    with pytest.raises(WireError) as info:
        parse_job(payload, LIMITS)
    assert info.value.job_id == job_id
    assert info.value.code == code
    assert "\n" not in str(info.value)


def test_results_encode_as_json_or_msgpack() -> None:
    ok = Result(id="j1", ok=True, output={"logits": [[0.1, 0.9]]}, mode="distributed", cr=None, peers=("b",))
    wire = json.loads(ok.encode())
    assert wire["ok"] is True
    assert wire["error"] is None
    assert wire["cr"] == "full"
    assert wire["fallback"] is False
    bad = msgpack.unpackb(Result.failure("j2", "unknown_model", "no model 'x'").encode(as_msgpack=True))
    assert bad["error"] == {"code": "unknown_model", "message": "no model 'x'"}
