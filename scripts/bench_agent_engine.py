"""A local job's engine time through the agent against the engine alone, same inputs, interleaved.

    python scripts/bench_agent_engine.py --model vit-base --batch 8 --rounds 16

Starts mosquitto on a free loopback port and one agent serving the model (one torch thread,
``mode: local`` jobs), and beside it one plain worker process: the engine alone (one torch
thread, no agent around it; the agent's glibc settings unless ``--worker-malloc default``).
Every round sends one job of ``batch`` random PNG images through the agent and runs the same
images on the worker, order alternating round to round. The worker decodes the PNGs with the
agent's own input code, so both run the model on the same tensors. Reported per sample: the
agent's ``latency_ms.compute`` (the model's forward pass as the engine times it inside the
agent) and ``engine`` (from the engine slot's start to its end: the forward plus the job's
input tensors and output), and the worker's forward pass timed the same way; medians, spreads
(IQR / median), and the ratio.

``--rss-jobs N`` then sends N more jobs through the agent alone and reports its resident
memory every 50 jobs (what the agent's allocator settings must keep flat, agent/base/memory.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.node.broker import mosquitto_binary  # noqa: E402
from scripts.bench_agent import wait_online  # noqa: E402
from testbed.procs import rss_kib  # noqa: E402
from transport.localcluster import free_port  # noqa: E402
from transport.mqtt import MqttLink  # noqa: E402

WORKER = """
import json, sys, time, base64
import torch
torch.set_num_threads(1)
if sys.argv[2] == "agent":
    from agent.base.memory import tame_malloc
    tame_malloc()
from agent.jobs.inputs import to_tensors
from engine.adapters import Task
from engine.models import load
from engine.sim import run_local
from transport.schema import Job, Limits
model = load(sys.argv[1])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    images = tuple(base64.b64decode(b) for b in json.loads(line))
    inputs = to_tensors(Job(id="w", model="m", images=images), model, Limits())
    result = run_local(model.adapter, Task.CLASSIFY, inputs)
    print(json.dumps({"compute_ms": result.traces[0].compute_s * 1e3}), flush=True)
"""


def images(batch: int, seed: int) -> list[str]:
    """``batch`` random 224 x 224 RGB PNGs, base64."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    med = statistics.median(values)
    return f"{med:.1f} ({(q[2] - q[0]) / med * 100:.0f} %)"


async def agent_job(link: MqttLink, cluster: str, reply: str, pngs: list[str], job_id: str) -> dict[str, Any]:
    job = {"id": job_id, "model": "m", "inputs": {"image": pngs}, "mode": "local"}
    await link.publish(f"prism/v1/{cluster}/jobs", json.dumps(job).encode(), response_topic=reply)
    async for message in link.messages():
        data = json.loads(bytes(message.payload))  # type: ignore[arg-type]
        if data.get("id") == job_id:
            if not data["ok"]:
                raise RuntimeError(f"job failed: {data['error']}")
            return dict(data["latency_ms"])
    raise RuntimeError("the broker connection ended")


async def measure(
    port: int, worker: subprocess.Popen[str], agent_pid: int, args: argparse.Namespace
) -> dict[str, list[float]]:
    cluster, reply = "bench", "prism/v1/bench/clients/bench/result"
    got: dict[str, list[float]] = {"agent_compute": [], "agent_engine": [], "alone_compute": []}
    assert worker.stdin is not None
    assert worker.stdout is not None
    async with MqttLink("127.0.0.1", port, client_id="bench") as link:
        await link.subscribe(reply)
        for rnd in range(-2, args.rounds):  # two warm-up rounds
            pngs = images(args.batch, rnd + 10)
            order = ("agent", "alone") if rnd % 2 == 0 else ("alone", "agent")
            for who in order:
                if who == "agent":
                    lat = await agent_job(link, cluster, reply, pngs, f"r{rnd}")
                    if rnd >= 0:
                        got["agent_compute"].append(lat["compute"] / args.batch)
                        got["agent_engine"].append(lat["engine"] / args.batch)
                else:
                    worker.stdin.write(json.dumps(pngs) + "\n")
                    worker.stdin.flush()
                    ms = json.loads(worker.stdout.readline())["compute_ms"]
                    if rnd >= 0:
                        got["alone_compute"].append(ms / args.batch)
        for i in range(args.rss_jobs):  # the agent alone: its memory over many jobs
            await agent_job(link, cluster, reply, images(args.batch, 1000 + i % 16), f"m{i}")
            if (i + 1) % 50 == 0 or i + 1 == args.rss_jobs:
                got.setdefault("rss_jobs", []).append(float(i + 1))
                got.setdefault("rss_mib", []).append(rss_kib(agent_pid) / 1024)
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-base")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument(
        "--worker-malloc",
        choices=["agent", "default"],
        default="agent",
        help="the engine-alone worker's glibc settings: the agent's (the agent's own cost alone), or glibc's",
    )
    p.add_argument("--rss-jobs", type=int, default=0, help="then this many jobs through the agent alone, RSS logged")
    p.add_argument("--out", type=Path, default=None, help="write the per-round figures here (JSON)")
    args = p.parse_args()
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "m.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n")
        broker = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stderr=subprocess.DEVNULL)
        run = [sys.executable, "-m", "agent", "run", "--broker", f"mqtt://127.0.0.1:{port}", "--cluster", "bench"]
        run += ["--node-id", "b1", "--interface", "lo", "--threads", "1", "--model", f"m={args.model}"]
        agent = subprocess.Popen(
            run,
            cwd=REPO,
            env={**env, "PRISM_STATE_DIR": tmp},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, args.model, args.worker_malloc],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert worker.stdout is not None
            assert json.loads(worker.stdout.readline()).get("ready")
            wait_online(port, timeout_s=120)
            start = time.monotonic()
            got = asyncio.run(measure(port, worker, agent.pid, args))
        finally:
            for proc in (agent, worker, broker):
                proc.terminate()
                proc.wait()
    ratio = [a / b for a, b in zip(got["agent_compute"], got["alone_compute"], strict=True)]
    print(f"{args.model}, batch {args.batch}, {args.rounds} interleaved rounds, {time.monotonic() - start:.0f} s")
    print("| ms per sample | median (spread) |\n|---|---|")
    print(f"| engine alone: forward | {spread(got['alone_compute'])} |")
    print(f"| through the agent: forward (`compute`) | {spread(got['agent_compute'])} |")
    print(f"| through the agent: engine slot (`engine`) | {spread(got['agent_engine'])} |")
    print(f"| agent forward / alone, per round | {statistics.median(ratio):.3f} ({min(ratio):.3f}-{max(ratio):.3f}) |")
    if got.get("rss_jobs"):
        first = got["rss_mib"][0]
        print("| jobs through the agent (after the rounds) | agent RSS, MiB | since the first row |\n|---|---|---|")
        for n, mib in zip(got["rss_jobs"], got["rss_mib"], strict=True):
            print(f"| {n:.0f} | {mib:.1f} | {mib - first:+.1f} ({(mib - first) / first * 100:+.1f} %) |")
    if args.out:
        args.out.write_text(json.dumps({**got, "ratio": ratio}, indent=1) + "\n")


if __name__ == "__main__":
    main()
