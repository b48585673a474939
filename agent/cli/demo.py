"""``prism-agent demo``: a broker and two real agents on this box, jobs in every mode.

The agents are separate processes that find each other (mDNS on 127.0.0.1), form a GLOO
group over MQTT control and split jobs; the table shows what each job cost and how close
it came to the local answer. Real all-MiniLM-L6-v2 weights, real English sentences.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import uuid
from typing import Any

import torch

from agent.client import peers, submit
from agent.node import logs
from agent.node.broker import HostedBroker
from engine.corpus import english_sentences
from engine.localcluster import free_port

NODES = ("demo-a", "demo-b")


async def _wait_for_peers(broker: Any, cluster: str, timeout_s: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        nodes = await peers(broker, cluster, listen_s=0.5)
        if len(nodes) == 2 and all(n.get("health", {}).get("peers") for n in nodes):
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("the demo agents did not find each other in time")


def _cosine(a: list[list[float]], b: list[list[float]]) -> float:
    x, y = torch.tensor(a), torch.tensor(b)
    return float(torch.nn.functional.cosine_similarity(x, y, dim=1).mean())


async def run_demo(model: str, batch: int, crs: list[float]) -> list[dict[str, Any]]:
    """Start everything, run the jobs, stop everything; returns the result objects."""
    cluster = f"demo-{uuid.uuid4().hex[:6]}"
    texts = english_sentences(batch)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PRISM_HEALTH_INTERVAL_S": "0.5"}
    async with HostedBroker("127.0.0.1", free_port(), advertise=False) as hosted:
        url = f"mqtt://{hosted.broker.host}:{hosted.broker.port}"
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "agent",
                "run",
                "--broker",
                url,
                "--cluster",
                cluster,
                "--node-id",
                node,
                "--model",
                f"demo={model}",
                "--log-format",
                "json",
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            for node in NODES
        ]
        try:
            await _wait_for_peers(hosted.broker, cluster)
            jobs: list[dict[str, Any]] = [{"mode": "local"}, {"mode": "distributed", "cr": "full"}]
            jobs += [{"mode": "distributed", "cr": cr} for cr in crs]
            jobs += [{"mode": "auto"}, {"mode": "auto", "small": True}]
            results = []
            for i, extra in enumerate(jobs):
                inputs = texts[:2] if extra.pop("small", False) else texts
                job = {"v": 1, "id": f"demo-{i}", "model": "demo", "inputs": {"text": inputs}, "task": "embed", **extra}
                results.append(await submit(hosted.broker, cluster, job, node=NODES[0], timeout_s=300))
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                await proc.wait()
    reference = results[0]["output"]["embedding"]
    for r in results:
        emb = (r.get("output") or {}).get("embedding")
        n = len(emb) if emb else 0
        r["cosine_vs_local"] = _cosine(emb, reference[:n]) if emb else None
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    """The human view of the demo."""
    rows = []
    for r in results:
        lat = r.get("latency_ms") or {}
        rows.append(
            {
                "job": r["id"],
                "asked": (r.get("decision") or {}).get("requested", "-"),
                "ran": r.get("mode") or "error",
                "cr": r.get("cr") if r.get("cr") is not None else "-",
                "peers": ",".join(r.get("peers") or []) or "-",
                "batch": len((r.get("output") or {}).get("embedding") or []),
                "total_ms": f"{lat.get('total', 0):.1f}",
                "comm_ms": f"{lat.get('comm', 0):.1f}",
                "exchanged_KiB": f"{lat.get('exchange_bytes', 0) / 1024:.0f}",
                "cosine_vs_local": "-" if r.get("cosine_vs_local") is None else f"{r['cosine_vs_local']:.4f}",
                "why": (r.get("decision") or {}).get("reason", (r.get("error") or {}).get("message", "")),
            }
        )
    widths = {k: max(len(k), *(len(str(row[k])) for row in rows)) for k in rows[0]}
    print("  ".join(k.ljust(w) for k, w in widths.items()))
    for row in rows:
        print("  ".join(str(row[k]).ljust(w) for k, w in widths.items()))


def main(model: str, batch: int, crs: list[float], as_json: bool) -> int:
    """Run the demo and print it."""
    logs.configure("console", level=logging.WARNING)
    results = asyncio.run(run_demo(model, batch, crs))
    if as_json:
        print(json.dumps(results))
    else:
        print(
            f"two prism-agent processes (mDNS on 127.0.0.1, GLOO on loopback), model {model}, "
            f"{batch} real sentences, submitted to {NODES[0]}"
        )
        print_table(results)
    return 0 if all(r.get("ok") for r in results) else 1
