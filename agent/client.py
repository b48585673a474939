"""``prism-agent submit``: publish one job, wait for its result on a private response topic."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from pathlib import Path
from typing import Any

from agent.config import Broker, Settings, mqtt_credentials, tls_context
from engine.errors import BadRequest
from transport.mqtt import MqttLink, Topics, TransportError

Auth = dict[str, Any]


def client_auth(settings: Settings) -> Auth:
    """Username, password and TLS context for a client, from the same settings the agent reads."""
    username, password = mqtt_credentials(settings)
    return {"username": username, "password": password, "tls": tls_context(settings)}


def build_job(
    model: str,
    *,
    text: list[str] | None = None,
    images: list[Path] | None = None,
    token_ids: list[list[int]] | None = None,
    mode: str = "auto",
    cr: str | None = None,
    task: str | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """The JSON job for the given inputs (exactly one kind)."""
    given = [x for x in (text, images, token_ids) if x]
    if len(given) != 1:
        raise BadRequest("give exactly one of --text, --image or --token-ids")
    inputs: dict[str, Any]
    if text:
        inputs = {"text": text}
    elif images:
        try:
            inputs = {"image": [base64.b64encode(p.read_bytes()).decode() for p in images]}
        except OSError as exc:
            raise BadRequest(f"cannot read image: {exc.filename}: {exc.strerror}") from None
    else:
        inputs = {"token_ids": token_ids}
    job: dict[str, Any] = {
        "v": 1,
        "id": job_id or uuid.uuid4().hex[:12],
        "model": model,
        "inputs": inputs,
        "mode": mode,
    }
    if cr is not None:
        job["cr"] = cr if cr == "full" else float(cr)
    if task:
        job["task"] = task
    return job


async def _result(link: MqttLink, job_id: str) -> Any:
    async for message in link.messages():
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        data = json.loads(payload)
        if isinstance(data, dict) and data.get("id") == job_id:
            return data
    raise TransportError("connection closed before the result arrived")


async def submit(
    broker: Broker, cluster: str, job: dict[str, Any], *, node: str | None, timeout_s: float, auth: Auth | None = None
) -> Any:
    """Publish ``job`` and return the decoded result; raises ``asyncio.TimeoutError``."""
    topics = Topics(f"prism/v1/{cluster}", node or "-")
    reply = f"prism/v1/{cluster}/clients/{uuid.uuid4().hex}/result"
    target = topics.node_jobs(node) if node else topics.jobs
    async with MqttLink(
        broker.host, broker.port, client_id=f"prism-submit-{uuid.uuid4().hex[:8]}", **(auth or {})
    ) as link:
        await link.subscribe(reply)
        await link.publish(target, json.dumps(job).encode(), response_topic=reply, correlation=job["id"].encode())
        return await asyncio.wait_for(_result(link, job["id"]), timeout_s)


async def peers(
    broker: Broker, cluster: str, *, listen_s: float = 1.5, auth: Auth | None = None
) -> list[dict[str, Any]]:
    """Every node's retained status and health in ``cluster``, one dict per node."""
    root = f"prism/v1/{cluster}"
    nodes: dict[str, dict[str, Any]] = {}
    async with MqttLink(
        broker.host, broker.port, client_id=f"prism-peers-{uuid.uuid4().hex[:8]}", **(auth or {})
    ) as link:
        await link.subscribe(f"{root}/nodes/+/status", f"{root}/nodes/+/health")

        async def collect() -> None:
            async for message in link.messages():
                parts = str(message.topic).split("/")
                payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                entry = nodes.setdefault(parts[-2], {"node": parts[-2], "status": "unknown"})
                if parts[-1] == "status":
                    entry["status"] = payload.decode(errors="replace")
                else:
                    with contextlib.suppress(ValueError):
                        entry["health"] = json.loads(payload)

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(collect(), listen_s)
    return [nodes[n] for n in sorted(nodes)]
