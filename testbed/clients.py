"""Load clients that run inside a host namespace of the bed (``python -m testbed.clients
blast|stream``): the fault tests and the soak use them. JSON summary on stdout."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.services import BROKER_PORT


# -- load clients, run inside a host namespace ------------------------------------------------
def _decode(payload: bytes) -> Any:
    if payload.lstrip().startswith(b"{"):
        return json.loads(payload)
    import msgpack

    return msgpack.unpackb(payload, raw=False)


def _client(host: str, port: int, name: str) -> Any:
    import socket

    import aiomqtt

    return aiomqtt.Client(
        host,
        port,
        identifier=f"{name}-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        max_inflight_messages=1000,
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        keepalive=30,
        timeout=30,
    )


async def blast(
    host: str, port: int, results: str, payloads: list[tuple[str, bytes]], expect: set[str], timeout_s: float
) -> dict[str, Any]:
    """Publish every (topic, payload) at once (QoS 1) and collect results until each ``expect`` id has one
    (and a short quiet spell has passed) or ``timeout_s``."""
    import asyncio

    got: dict[str, list[Any]] = {}
    extra = 0
    async with _client(host, port, "blast") as client:
        await client.subscribe(results, qos=1)
        start = time.monotonic()
        done = asyncio.Event()
        last = [start]

        async def collect() -> None:
            nonlocal extra
            async for msg in client.messages:
                job_id = str(msg.topic).rsplit("/", 1)[1]
                raw = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
                try:
                    value = _decode(raw)
                except Exception:  # noqa: BLE001 - report, never stop collecting
                    value = {"ok": None, "error": {"code": "undecodable_result"}}
                error = value.get("error") or {} if isinstance(value, dict) else {}
                got.setdefault(job_id, []).append(
                    [value.get("ok") if isinstance(value, dict) else None, error.get("code"), time.monotonic() - start]
                )
                if job_id not in expect:
                    extra += 1
                last[0] = time.monotonic()
                if expect <= got.keys():
                    done.set()

        reader = asyncio.create_task(collect(), name="collect")
        await asyncio.gather(*(client.publish(topic, p, qos=1) for topic, p in payloads))
        published_s = time.monotonic() - start
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), timeout_s)
        while time.monotonic() - last[0] < 1.0 and time.monotonic() - start < timeout_s:  # noqa: ASYNC110 - stragglers
            await asyncio.sleep(0.2)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return {
        "sent": len(payloads),
        "published_s": published_s,
        "results": got,
        "missing": sorted(expect - got.keys()),
        "unexpected": extra,
    }


async def stream(
    host: str, port: int, cluster: str, node: str, rate_hz: float, duration_s: float, grace_s: float, batch: int
) -> dict[str, Any]:
    """A steady job stream to ``node`` (tiny-bert sized, alternately distributed and auto);
    every job must get a result within ``grace_s`` after the stream ends."""
    import asyncio

    root = f"prism/v1/{cluster}"
    sent: dict[str, float] = {}
    got: dict[str, dict[str, Any]] = {}
    async with _client(host, port, "stream") as client:
        await client.subscribe(f"{root}/results/+", qos=1)

        async def collect() -> None:
            async for msg in client.messages:
                job_id = str(msg.topic).rsplit("/", 1)[1]
                raw = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
                value = _decode(raw)
                if job_id in sent and job_id not in got:
                    got[job_id] = {
                        "ok": value.get("ok"),
                        "mode": value.get("mode"),
                        "fallback": value.get("fallback"),
                        "code": (value.get("error") or {}).get("code"),
                        "s": time.monotonic() - sent[job_id],
                    }

        reader = asyncio.create_task(collect(), name="collect")
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < duration_s:
            job_id = f"s{n}-{uuid.uuid4().hex[:6]}"
            job = {
                "id": job_id,
                "model": "bert",
                "mode": "distributed" if n % 2 == 0 else "auto",
                "inputs": {"token_ids": [[(7 * r + j) % 900 + 100 for j in range(64)] for r in range(batch)]},
            }
            sent[job_id] = time.monotonic()
            await client.publish(f"{root}/nodes/{node}/jobs", json.dumps(job).encode(), qos=1)
            n += 1
            if n % max(1, int(rate_hz * 10)) == 0:
                print(f"stream: {n} sent, {len(got)} answered", file=sys.stderr, flush=True)  # noqa: T201
            await asyncio.sleep(max(0.0, start + n / rate_hz - time.monotonic()))
        end = time.monotonic() + grace_s
        while len(got) < len(sent) and time.monotonic() < end:  # noqa: ASYNC110 - polls two conditions
            await asyncio.sleep(0.2)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    codes: dict[str, int] = {}
    for r in got.values():
        key = "ok" if r["ok"] else str(r["code"])
        codes[key] = codes.get(key, 0) + 1
    latencies = sorted(r["s"] for r in got.values())
    return {
        "sent": len(sent),
        "answered": len(got),
        "lost": sorted(set(sent) - set(got)),
        "codes": codes,
        "distributed": sum(1 for r in got.values() if r["mode"] == "distributed"),
        "fallback": sum(1 for r in got.values() if r["fallback"]),
        "p50_s": latencies[len(latencies) // 2] if latencies else None,
        "max_s": latencies[-1] if latencies else None,
    }


async def jobs(
    host: str, port: int, cluster: str, node: str | None, todo: list[dict[str, Any]], in_flight: int, timeout_s: float
) -> dict[str, Any]:
    """Run ``todo`` through ``agent.client.stream`` (one persistent
    session that rides out broker restarts) to ``node`` or, with no node, the shared topic."""
    import asyncio

    from agent.base.config import Broker
    from agent.client import stream as client_stream

    stats: dict[str, int] = {}
    got: dict[str, dict[str, Any]] = {}
    start = time.monotonic()

    def took(result: dict[str, Any]) -> None:
        decision = result.get("decision") or {}
        got[str(result.get("id"))] = {
            "ok": result.get("ok"),
            "code": (result.get("error") or {}).get("code"),
            "mode": result.get("mode"),
            "method": result.get("method"),
            "fallback": result.get("fallback"),
            "fallback_reason": decision.get("fallback_reason"),
            "node": result.get("node"),
            "peers": result.get("peers"),
            "s": time.monotonic() - start,
        }

    error = None
    try:
        await client_stream(
            Broker(host, port),
            cluster,
            todo,
            node=node,
            in_flight=in_flight,
            timeout_s=timeout_s,
            on_result=took,
            stats=stats,
            keep_results=False,
        )
    except asyncio.TimeoutError:
        error = "timeout"
    return {"sent": len(todo), "results": got, "duplicates": stats.get("duplicates", 0), "error": error}


def _client_main(argv: Sequence[str]) -> int:
    """``python -m testbed.clients blast|stream|jobs``: the in-namespace clients (JSON summary on stdout)."""
    import asyncio

    p = argparse.ArgumentParser(prog="python -m testbed.clients")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("blast")
    b.add_argument("--host", required=True)
    b.add_argument("--port", type=int, default=BROKER_PORT)
    b.add_argument("--topic", required=True)
    b.add_argument("--results", required=True)
    b.add_argument("--payloads", type=Path, required=True, help="msgpack: [[payload, id or null, topic?], ...]")
    b.add_argument("--timeout", type=float, default=120.0)
    s = sub.add_parser("stream")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, default=BROKER_PORT)
    s.add_argument("--cluster", required=True)
    s.add_argument("--node", required=True)
    s.add_argument("--rate", type=float, default=2.0)
    s.add_argument("--duration", type=float, required=True)
    s.add_argument("--grace", type=float, default=60.0)
    s.add_argument("--batch", type=int, default=4)
    j = sub.add_parser("jobs")
    j.add_argument("--host", required=True)
    j.add_argument("--port", type=int, default=BROKER_PORT)
    j.add_argument("--cluster", required=True)
    j.add_argument("--node", default=None, help="default: the shared jobs topic")
    j.add_argument("--jobs", type=Path, required=True, help="JSON list of jobs")
    j.add_argument("--in-flight", dest="in_flight", type=int, default=8)
    j.add_argument("--timeout", type=float, default=300.0)
    ns = p.parse_args(argv)
    import structlog

    # Logs (the client's reconnects, say) go to stderr: stdout is the summary alone.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    if ns.cmd == "jobs":
        todo = json.loads(ns.jobs.read_text())
        out = asyncio.run(jobs(ns.host, ns.port, ns.cluster, ns.node, todo, ns.in_flight, ns.timeout))
    elif ns.cmd == "blast":
        import msgpack

        items = msgpack.unpackb(ns.payloads.read_bytes(), raw=False)
        payloads = [(str(item[2]) if len(item) > 2 else ns.topic, bytes(item[0])) for item in items]
        expect = {str(item[1]) for item in items if item[1] is not None}
        out = asyncio.run(blast(ns.host, ns.port, ns.results, payloads, expect, ns.timeout))
    else:
        out = asyncio.run(stream(ns.host, ns.port, ns.cluster, ns.node, ns.rate, ns.duration, ns.grace, ns.batch))
    print(json.dumps(out))  # noqa: T201 - the summary is the output
    return 0


if __name__ == "__main__":
    sys.exit(_client_main(sys.argv[1:]))
