"""Agent overhead over MQTT: submit-to-result time minus engine time, and sustained jobs/s.

    python scripts/bench_agent.py --jobs 500 --window 8

Starts a mosquitto broker on a free loopback port (TCP_NODELAY) and one real agent serving
tiny-bert, then (1) sends jobs one at a time and reports p50/p99 of the overhead (wall time
from publish to result, minus the engine time the agent reports), and (2) keeps ``window``
jobs in flight and reports jobs/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.node.broker import mosquitto_binary  # noqa: E402
from transport.localcluster import free_port  # noqa: E402
from transport.mqtt import MqttLink  # noqa: E402


def wait_online(port: int, node: str = "b1", cluster: str = "bench", timeout_s: int = 60) -> None:
    """Until ``node``'s retained status says online (mosquitto_sub exits non-zero past the timeout)."""
    topic = f"prism/v1/{cluster}/nodes/{node}/status"
    cmd = ["mosquitto_sub", "-p", str(port), "-t", topic, "-C", "1", "-W", str(timeout_s)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "online", out.stdout


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(port: int, cluster: str, jobs: int, window: int) -> dict[str, float]:
    reply = f"prism/v1/{cluster}/clients/bench/result"
    async with MqttLink("127.0.0.1", port, client_id="bench") as link:
        await link.subscribe(reply)
        pending: dict[str, float] = {}
        results: dict[str, tuple[float, dict[str, object]]] = {}
        arrived = asyncio.Event()

        async def reader() -> None:
            async for message in link.messages():
                data = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                results[data["id"]] = (time.perf_counter() - pending.pop(data["id"]), data)
                arrived.set()

        async def send(job_id: str) -> None:
            job = {"id": job_id, "model": "bert", "inputs": {"token_ids": [[1, 592, 88, 2]]}, "mode": "local"}
            pending[job_id] = time.perf_counter()
            await link.publish(f"prism/v1/{cluster}/jobs", json.dumps(job).encode(), response_topic=reply)

        task = asyncio.create_task(reader(), name="bench-reader")
        for i in range(20):  # warm-up
            arrived.clear()
            await send(f"w{i}")
            await arrived.wait()
        results.clear()
        for i in range(jobs):  # one at a time: latency
            arrived.clear()
            await send(f"s{i}")
            await arrived.wait()
        serial = dict(results)
        results.clear()
        start = time.perf_counter()
        sent = 0
        while len(results) < jobs:  # `window` in flight: throughput
            while sent < jobs and len(pending) < window:
                await send(f"t{sent}")
                sent += 1
            arrived.clear()
            await arrived.wait()
        elapsed = time.perf_counter() - start
        task.cancel()
    failed = [r for _, r in serial.values() if not r["ok"]]
    assert not failed, failed[0]
    walls = [w * 1e3 for w, _ in serial.values()]
    engine = [float(r["latency_ms"]["engine"]) for _, r in serial.values()]  # type: ignore[index]
    overhead = [w - e for w, e in zip(walls, engine, strict=True)]
    return {
        "jobs": jobs,
        "wall_p50_ms": pct(walls, 0.5),
        "engine_p50_ms": pct(engine, 0.5),
        "overhead_p50_ms": pct(overhead, 0.5),
        "overhead_p99_ms": pct(overhead, 0.99),
        "window": window,
        "jobs_per_s": jobs / elapsed,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=500)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "m.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n")
        broker = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stderr=subprocess.DEVNULL)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "run",
                "--broker",
                f"mqtt://127.0.0.1:{port}",
                "--cluster",
                "bench",
                "--node-id",
                "b1",
                "--model",
                "bert=tiny-bert",
                "--log-format",
                "json",
            ],
            cwd=REPO,
            env={**env, "PRISM_QUEUE_MAX": str(max(16, 2 * args.window))},
            stderr=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)
            wait_online(port)
            res = asyncio.run(measure(port, "bench", args.jobs, args.window))
        finally:
            agent.terminate()
            agent.wait()
            broker.terminate()
            broker.wait()
    if args.json:
        print(json.dumps(res))
    else:
        print("| jobs | wall p50 ms | engine p50 ms | overhead p50 ms | overhead p99 ms | window | jobs/s |")
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {res['jobs']} | {res['wall_p50_ms']:.2f} | {res['engine_p50_ms']:.2f} | {res['overhead_p50_ms']:.2f} | "
            f"{res['overhead_p99_ms']:.2f} | {res['window']} | {res['jobs_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
