"""GPT-2 writes text between two real agents (tiny GPT-2, real mosquitto, GLOO and mDNS on
127.0.0.1): a stock MQTT client on the job's response topic gets ordered partials and one
final result; a full-exchange split writes the local text; a peer SIGKILLed mid-prefill
still gets the whole text; bad values and an over-long prompt are refused; the CLI streams."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.mqtt_env import REPO, agent, ask_node, mosquitto, need, sub, wait_peer
from tests.test_group_abort import started

pytestmark = [pytest.mark.mqtt, pytest.mark.gloo]

CLUSTER = "gen"
FAST = {"PRISM_HEALTH_INTERVAL_S": "0.5", "PRISM_PROBE_INTERVAL_S": "0.5"}
PROMPT = list(range(5, 125))  # 120 tokens
Pair = tuple[int, subprocess.Popen[str], subprocess.Popen[str]]


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with (
        mosquitto() as port,
        agent(port, CLUSTER, "w1", "gpt=tiny-gpt2", env=FAST) as a,
        agent(port, CLUSTER, "w2", "gpt=tiny-gpt2", env=FAST) as b,
    ):
        wait_peer(port, CLUSTER, "w1", "w2")
        yield port, a, b


def job(job_id: str, **fields: Any) -> dict[str, Any]:
    body = {"id": job_id, "model": "gpt", "task": "generate", "inputs": {"token_ids": PROMPT}}
    return {**body, "max_new_tokens": 16, "stop": [], **fields}


def publish(port: int, body: dict[str, Any], reply: str) -> None:
    """``mosquitto_pub`` with an MQTT 5 response topic and correlation data."""
    cmd = [need("mosquitto_pub"), "-p", str(port), "-V", "mqttv5", "-q", "1"]
    cmd += ["-t", f"prism/v1/{CLUSTER}/nodes/w1/jobs", "-D", "publish", "response-topic", reply]
    cmd += ["-D", "publish", "correlation-data", body["id"], "-m", json.dumps(body)]
    subprocess.run(cmd, check=True, timeout=10)


def stream(port: int, body: dict[str, Any], timeout_s: float = 60, before: Any = None) -> tuple[list[Any], Any]:
    """Publish ``body`` to w1 and read its response topic until the final result."""
    reply = f"prism/v1/{CLUSTER}/clients/t-{body['id']}/result"
    waiter = sub(port, reply, 10_000, timeout_s)
    publish(port, body, reply)
    if before is not None:
        before()
    partials = []
    try:
        while True:
            message = json.loads(waiter.next(timeout_s))
            if message.get("final") is not False:
                return partials, message
            partials.append(message)
    finally:
        waiter.close()


def test_partials_in_order_then_one_final_and_a_full_split_writes_the_local_text(pair: Pair) -> None:
    port, _, _ = pair
    _, local = stream(port, job("loc", mode="local"))
    assert local["ok"] is True, local
    partials, split = stream(port, job("split", mode="distributed", cr="full"))
    assert split["ok"] is True, split
    assert (split["mode"], split["peers"], split["fallback"]) == ("distributed", ["w2"], False)
    assert [p["seq"] for p in partials] == list(range(len(partials)))
    assert split["seq"] == len(partials)
    assert [t for p in partials for t in p["tokens"]] == split["output"]["tokens"]
    assert [p["token"] for p in partials] == [p["tokens"][-1] for p in partials]
    assert split["output"]["tokens"] == local["output"]["tokens"]
    assert len(split["output"]["tokens"]) == 16
    assert split["output"]["reason"] == "length"
    assert split["decision"]["option"] == "full"
    for key in ("queue", "prefill", "first_token", "decode", "tokens_per_s"):
        assert split["latency_ms"][key] >= 0
    assert split["latency_ms"]["first_token"] <= split["latency_ms"]["total"]


def test_bad_values_and_an_over_long_prompt_are_refused(pair: Pair) -> None:
    port, _, _ = pair
    got = ask_node(
        port,
        CLUSTER,
        "w1",
        [
            job("hot", temperature=-2),
            job("topp", temperature=0.8, top_p=2),
            job("long", inputs={"token_ids": PROMPT * 4}, max_new_tokens=40),
            job("words", inputs={"text": "Once upon a time"}),
        ],
    )
    assert got["hot"]["error"]["code"] == "bad_request"
    assert "temperature" in got["hot"]["error"]["message"]
    assert got["topp"]["error"]["code"] == "bad_request"
    assert got["long"]["error"]["code"] == "too_large"
    assert "context of 512" in got["long"]["error"]["message"]
    assert "no tokenizer" in got["words"]["error"]["message"]
    assert stream(port, job("after", max_new_tokens=2))[1]["ok"] is True  # and it keeps serving


def test_the_cli_streams_token_ids_then_prints_the_result(pair: Pair) -> None:
    port, _, _ = pair
    ids = ",".join(map(str, PROMPT[:20]))
    cmd = [sys.executable, "-m", "agent", "submit", "--broker", f"mqtt://127.0.0.1:{port}", "--cluster", CLUSTER]
    cmd += ["--model", "gpt", "--task", "generate", "--token-ids", ids, "--max-new-tokens", "6", "--stream"]
    cmd += ["--mode", "local", "--node", "w1", "--timeout", "60"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90, check=False)
    assert out.returncode == 0, out.stderr
    streamed, rest = out.stdout.split("\n", 1)
    wrote = next(line for line in rest.splitlines() if line.startswith("wrote"))
    assert streamed.split() == wrote.split()[3:]  # "wrote  token ids 1 2 3"
    assert "tokens/s" in rest


def test_a_peer_sigkilled_mid_prefill_still_gets_the_whole_text(pair: Pair) -> None:
    port, coordinator, peer = pair
    _, local = stream(port, job("ref", mode="local", max_new_tokens=12))
    peer.send_signal(signal.SIGSTOP)  # holds the prefill on the peer...

    def kill_mid_prefill() -> None:
        started(coordinator, "dead", 30)  # ...the coordinator has split it and waits on the peer
        peer.send_signal(signal.SIGKILL)
        peer.wait(timeout=10)

    partials, got = stream(port, job("dead", mode="distributed", cr="full", max_new_tokens=12), before=kill_mid_prefill)
    assert got["ok"] is True, got
    assert (got["mode"], got["fallback"]) == ("local", True)
    assert got["output"]["tokens"] == local["output"]["tokens"]
    assert [t for p in partials for t in p["tokens"]] == got["output"]["tokens"]
