"""Hostile and malformed messages on every topic an agent reads: it answers what has an id,
ignores the rest, and keeps serving (regression for crashes found in review)."""

from __future__ import annotations

import base64
import io
import json
import random
import subprocess
from collections.abc import Iterator

import msgpack
import pytest

from tests.mqtt_env import agent, mosquitto, need, pub, sub

pytestmark = pytest.mark.mqtt
CLUSTER = "fuzz"


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    with mosquitto() as port, agent(port, CLUSTER, "f1", "bert=tiny-bert", "vit=tiny-vit") as proc:
        yield port, proc


def big_png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")  # 25 Mpixel, a few KB compressed
    return base64.b64encode(buf.getvalue()).decode()


def hostile_messages() -> list[tuple[str, bytes]]:
    root = f"prism/v1/{CLUSTER}"
    deep = b'{"a":' + b"[" * 200_000
    rng = random.Random(7)
    msgs = [
        (f"{root}/nodes/evil/health", deep),
        (f"{root}/nodes/evil/health", b'{"node": "evil", "load": {"queue": 1e400}, "admission": {}}'),
        (f"{root}/nodes/evil/health", json.dumps({"node": "evil", "admission": {"node": "evil"}}).encode()),
        (f"{root}/nodes/evil/status", b"\xff\xfe"),
        (f"{root}/nodes/f1/control", b"[" * 200_000),
        (
            f"{root}/nodes/f1/control",
            json.dumps(
                {
                    "body": json.dumps(
                        {
                            "op": "form",
                            "gid": "g",
                            "rank": 1e300,
                            "size": 2,
                            "port": 1,
                            "host": "127.0.0.1",
                            "timeout_s": 1e300,
                            "from": "x",
                        }
                    ),
                    "to": "f1",
                }
            ).encode(),
        ),
        (
            f"{root}/nodes/f1/control",
            json.dumps(
                {"body": json.dumps({"op": "run", "gid": "nope", "spec": {}, "from": "x"}), "to": "f1"}
            ).encode(),
        ),
        (f"{root}/nodes/f1/control", msgpack.packb({"op": 1})),
    ]
    for i in range(200):  # random bytes and truncated JSON/msgpack on the job topic
        good = json.dumps({"id": f"r{i}", "model": "bert", "inputs": {"text": ["x"]}}).encode()
        cut = good[: rng.randrange(1, len(good))]
        msgs.append(
            (
                f"{root}/jobs",
                rng.choice([cut, bytes(rng.randrange(256) for _ in range(20)), msgpack.packb({"id": 5, "model": []})]),
            )
        )
    return msgs


def test_hostile_messages_do_not_stop_the_agent(node: tuple[int, subprocess.Popen[str]]) -> None:
    port, proc = node
    root = f"prism/v1/{CLUSTER}"
    for topic, payload in hostile_messages():
        pub(port, topic, payload)
    # Jobs with readable ids that used to crash the daemon: each gets an answer.
    bad_jobs = [
        {"id": "bomb", "model": "vit", "inputs": {"image": big_png()}},
        {"id": "hugecr", "model": "bert", "inputs": {"text": ["x y z"]}, "mode": "distributed", "cr": 1e308},
        {"id": "onetoken", "model": "bert", "inputs": {"token_ids": [[7]]}, "mode": "distributed"},
        {"id": "surrogate", "model": "bert", "inputs": {"text": ["\ud800"]}},
    ]
    waiter = sub(port, f"{root}/results/#", len(bad_jobs) + 1, timeout_s=90)
    for job in bad_jobs:
        pub(port, f"{root}/jobs", json.dumps(job))
    # A response topic with a wildcard cannot be published to: the answer goes to results/{id}.
    subprocess.run(
        [
            need("mosquitto_pub"),
            "-p",
            str(port),
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-t",
            f"{root}/jobs",
            "-D",
            "publish",
            "response-topic",
            "reply/+/x",
            "-m",
            json.dumps({"id": "wildreply", "model": "bert", "inputs": {"text": "x"}}),
        ],
        check=True,
    )
    out, _ = waiter.communicate(timeout=120)
    got = {r["id"]: r for r in (json.loads(line) for line in out.splitlines() if line.strip())}
    assert got["bomb"]["error"]["code"] == "bad_request"
    assert "pixels" in got["bomb"]["error"]["message"]
    assert got["hugecr"]["error"]["code"] == "invalid_job"
    assert got["onetoken"]["ok"] is True  # too short to split: answered locally
    assert got["onetoken"]["mode"] == "local"
    assert got["surrogate"]["id"] == "surrogate"
    assert got["wildreply"]["ok"] is True
    assert proc.poll() is None
    after = sub(port, f"{root}/results/alive", 1, timeout_s=60)
    pub(port, f"{root}/jobs", json.dumps({"id": "alive", "model": "bert", "inputs": {"text": ["still here"]}}))
    assert json.loads(after.communicate(timeout=60)[0])["ok"] is True
    assert proc.poll() is None
