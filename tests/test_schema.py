"""The wire schema: every bad payload becomes a readable error with the job's id when possible."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import re
from typing import Any

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
    # A list of raw msgpack images, one too large: the list's refusal, not the single image's.
    (msgpack.packb({"id": "j", "model": "m", "inputs": {"image": [b"x" * 65]}}), "j", "too_large"),
    # float() of a 400-digit integer raises: once an internal error, now a refusal.
    (js({"id": "j", "model": "m", "inputs": {"text": "x"}, "task": "generate", "top_p": 10**400}), "j", "invalid_job"),
    # A trailing newline is not an id (it would end up in the results/{id} topic).
    (js({"id": "j\n", "model": "m", "inputs": {"text": "x"}}), None, "invalid_job"),
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


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"ranks": 0}, "field 'ranks' must be an integer from 1 to 64, got 0"),
        ({"cr": "lots"}, "field 'cr' must be a number from 1 to 1000000 or 'full', got 'lots'"),
        ({"inputs": {"token_ids": [1, -2]}}, "field 'inputs.token_ids' must be a non-empty list (or list of lists)"),
        ({"inputs": None}, "field 'inputs' is required"),
        ({"v": 2}, "field 'v' must be 1"),
    ],
)
def test_a_refusal_names_the_field_and_what_it_got(fields: dict[str, Any], said: str) -> None:
    with pytest.raises(WireError, match=re.escape(said)):
        parse_job(js({"id": "j", "model": "m", "inputs": {"text": "x"}, **fields}), LIMITS)


#: Values no field wants (some too large for LIMITS), for every field in turn.
HOSTILE: list[Any] = [None, True, -1, 0, 1.5, 1e308, 10**400, float("nan"), "", "x", "x" * 101, "\ud800", [], [[]],
                      [None], {}, {"a": 1}]  # fmt: skip


def test_hostile_field_values_are_wire_errors_never_anything_else() -> None:
    rng = random.Random(11)
    good = {"id": "j", "model": "m", "inputs": {"text": ["a"]}, "task": "generate", "peers": ["b"], "cr": 8}
    fields = [*good, "mode", "ranks", "method", "objective", "deadline_ms", "min_fidelity", "max_new_tokens",
              "temperature", "top_k", "top_p", "seed", "stop", "inputs.text", "inputs.image",
              "inputs.token_ids"]  # fmt: skip
    codes: set[str] = set()
    for _ in range(1000):
        job: dict[str, Any] = json.loads(json.dumps(good))
        for name in rng.sample(fields, rng.randint(1, 3)):
            value = rng.choice(HOSTILE)
            if name.startswith("inputs."):
                job["inputs"] = {name.split(".")[1]: value}
            else:
                job[name] = value
        payloads = [json.dumps(job).encode()]
        # msgpack has no 400-digit integers and no lone surrogates: those go as JSON only
        with contextlib.suppress(OverflowError, UnicodeEncodeError):
            payloads.append(msgpack.packb(job))
        for payload in payloads:
            try:
                parse_job(payload, LIMITS)
            except WireError as exc:
                codes.add(exc.code)
    assert codes == {"invalid_job", "too_large", "bad_request"}
